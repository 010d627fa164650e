"""Framework-free parts of the quantize stage: data, evaluation, latency, the guard's verdicts, the report."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from hvdtrain import checkpoints, tasks
from hvdtrain.config import Config, load
from hvdtrain.data import Dataset
from hvdtrain.errors import ConfigError
from hvdtrain.atomic import write_json, write_text
from hvdtrain.metrics import MetricSet


@dataclass
class Inputs:
    calibration: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    sample_shape: tuple[int, ...]
    num_classes: int
    label_shape: tuple[int, ...] = ()
    metric: str = "accuracy"      # the run's headline metric, which the guard compares


@dataclass
class Candidate:
    name: str                     # e.g. "static int8 (MinMax)"
    path: Path
    score: float = 0.0            # the headline metric on the test set
    agreement: Optional[float] = None  # share of predicted classes (samples or pixels) equal to fp32's
    kept_in_float: list[str] = field(default_factory=list)


def run_config(run_dir: Path) -> Config:
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run-dir {run_dir}: no config.yaml (not an hvdtrain run directory)")
    return load(str(run_dir / "config.yaml"))


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint whose digest matches (a damaged newest one falls back to the previous)."""
    found = checkpoints.existing(run_dir)
    if not found:
        raise ConfigError(f"--run-dir {run_dir}: no checkpoint in {checkpoints.directory(run_dir)}")
    intact = [p for p in found if checkpoints.damage(p) is None]
    return (intact or found)[-1]


def inputs(cfg: Config, calibration: int, calibration_data: Optional[str]) -> Inputs:
    """Calibration samples from the training data (shuffled as training reads it), and the test set."""
    dataset = Dataset(cfg.data, cfg.seed, cfg.task)
    calibration_set = dataset
    if calibration_data:
        calibration_set = Dataset(cfg.data.model_copy(update={"source": "hdf5", "train": calibration_data,
                                                              "test": calibration_data}), cfg.seed, cfg.task)
    batch = min(64, calibration)
    train_view = calibration_set.for_rank(batch, 0, 1)
    parts = []
    for x, _ in train_view.batches(0, train_view.steps_per_epoch):
        parts.append(np.asarray(x, np.float32))
        if sum(len(p) for p in parts) >= calibration:
            break
    xs, ys = zip(*dataset.for_rank(1, 0, 1).eval_batches())
    return Inputs(np.concatenate(parts)[:calibration], np.concatenate(xs).astype(np.float32), np.concatenate(ys),
                  tuple(dataset.sample_shape), dataset.num_classes, tuple(dataset.label_shape),
                  tasks.headline(cfg).removeprefix("test_"))


def score(predict: Callable[[np.ndarray], np.ndarray], inputs: Inputs, class_axis: int = 1,
          batch: int = 64) -> tuple[float, Optional[np.ndarray]]:
    """The headline metric of `predict` on the test set, and its predicted classes (None for regression).
    class_axis: where the model's outputs keep the classes (TFLite segmentation: last)."""
    metric = MetricSet([inputs.metric], inputs.num_classes)
    totals, predicted = metric.zeros(), []
    for i in range(0, len(inputs.x_test), batch):
        outputs = predict(inputs.x_test[i:i + batch])
        if inputs.num_classes:
            outputs = np.moveaxis(outputs, class_axis, 1)
            predicted.append(outputs.argmax(1))
        totals += metric.sums(outputs, inputs.y_test[i:i + batch])
    value = next(iter(metric.values(totals).values()))
    return value, (np.concatenate(predicted) if predicted else None)


def drop(inputs: Inputs, fp32: float, int8: float) -> float:
    """How much worse int8 is: points (x100) of a score where higher is better; percent of fp32's error
    where lower is better (mse, mae)."""
    if tasks.lower_is_better(f"test_{inputs.metric}"):
        return 100 * (int8 - fp32) / max(abs(fp32), 1e-12)
    return 100 * (fp32 - int8)


def latency_ms(predict: Callable[[np.ndarray], np.ndarray], sample: np.ndarray, batch: int,
               repeats: int = 50) -> float:
    """Median milliseconds per call at `batch`, after warm-up (the caller sets 1 thread)."""
    x = np.repeat(sample[:1], batch, axis=0)
    for _ in range(5):
        predict(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def write_report(out: Path, report: dict) -> None:
    write_json(out / "quantize_report.json", report)
    metric = report["metric"]
    unit = "% of fp32's error" if tasks.lower_is_better(f"test_{metric}") else "points"
    lines = [f"# Quantization report: {report['run_dir']}", ""]
    for fmt in report["formats"]:
        fp32, int8 = fmt["fp32"], fmt["int8"]
        agreement = ("" if int8["agreement"] is None else
                     f"; predicted classes equal to fp32's on {int8['agreement']:.1%} of samples (pixels)")
        lines += [f"## {fmt['format']} ({fmt['runtime']})", "",
                  f"Chosen: **{int8['name']}**; calibration on {report['calibration_samples']} training samples; "
                  f"evaluated on {report['test_samples']} held-out samples.", "",
                  f"| model | size KiB | {metric} | batch 1 ms | batch 32 ms |", "|---|---|---|---|---|",
                  f"| fp32 | {fp32['bytes'] / 1024:.1f} | {fp32['score']:.4f} | {fp32['latency_ms_b1']:.3f} | "
                  f"{fp32['latency_ms_b32']:.3f} |",
                  f"| int8 | {int8['bytes'] / 1024:.1f} | {int8['score']:.4f} | {int8['latency_ms_b1']:.3f} | "
                  f"{int8['latency_ms_b32']:.3f} |", "",
                  f"- size ratio int8/fp32: {fmt['size_ratio']:.3f}",
                  f"- {metric} drop: {fmt['metric_drop']:.2f} {unit} (bound {report['max_metric_drop']}){agreement}",
                  f"- speed-up fp32/int8: batch 1 {fmt['speedup_b1']:.2f}x, batch 32 {fmt['speedup_b32']:.2f}x "
                  "(1 thread, median after warm-up)",
                  f"- kept in float: {', '.join(int8['kept_in_float']) or 'nothing'}",
                  "- tried: " + "; ".join(f"{t['name']} {t['score']:.4f}" for t in fmt["tried"]), ""]
    write_text(out / "quantize_report.md", "\n".join(lines) + "\n")
