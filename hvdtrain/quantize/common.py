"""Framework-free parts of the quantize stage: data, evaluation, latency, the guard's verdicts, the report."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from hvdtrain import checkpoints
from hvdtrain.config import Config, load
from hvdtrain.data import Dataset
from hvdtrain.errors import ConfigError
from hvdtrain.atomic import write_json, write_text


@dataclass
class Inputs:
    calibration: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    sample_shape: tuple[int, ...]
    num_classes: int


@dataclass
class Candidate:
    name: str                     # e.g. "static int8 (MinMax)"
    path: Path
    accuracy: float = 0.0
    agreement: float = 0.0        # share of test predictions equal to fp32's
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
    dataset = Dataset(cfg.data, cfg.seed)
    calibration_set = dataset
    if calibration_data:
        calibration_set = Dataset(cfg.data.model_copy(update={"source": "hdf5", "train": calibration_data,
                                                              "test": calibration_data}), cfg.seed)
    batch = min(64, calibration)
    train_view = calibration_set.for_rank(batch, 0, 1)
    parts = []
    for x, _ in train_view.batches(0, train_view.steps_per_epoch):
        parts.append(np.asarray(x, np.float32))
        if sum(len(p) for p in parts) >= calibration:
            break
    xs, ys = zip(*dataset.for_rank(1, 0, 1).eval_batches())
    return Inputs(np.concatenate(parts)[:calibration], np.concatenate(xs).astype(np.float32), np.concatenate(ys),
                  tuple(dataset.sample_shape), dataset.num_classes)


def accuracy(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray,
             batch: int = 256) -> tuple[float, np.ndarray]:
    labels = np.concatenate([predict(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float(np.mean(labels == y)), labels


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
    lines = [f"# Quantization report: {report['run_dir']}", ""]
    for fmt in report["formats"]:
        fp32, int8 = fmt["fp32"], fmt["int8"]
        lines += [f"## {fmt['format']} ({fmt['runtime']})", "",
                  f"Chosen: **{int8['name']}**; calibration on {report['calibration_samples']} training samples; "
                  f"evaluated on {report['test_samples']} held-out samples.", "",
                  "| model | size KiB | accuracy | batch 1 ms | batch 32 ms |", "|---|---|---|---|---|",
                  f"| fp32 | {fp32['bytes'] / 1024:.1f} | {fp32['accuracy']:.4f} | {fp32['latency_ms_b1']:.3f} | "
                  f"{fp32['latency_ms_b32']:.3f} |",
                  f"| int8 | {int8['bytes'] / 1024:.1f} | {int8['accuracy']:.4f} | {int8['latency_ms_b1']:.3f} | "
                  f"{int8['latency_ms_b32']:.3f} |", "",
                  f"- size ratio int8/fp32: {fmt['size_ratio']:.3f}",
                  f"- accuracy drop: {fmt['accuracy_drop_points']:.2f} points (bound {report['max_accuracy_drop']}); "
                  f"predictions equal to fp32 on {int8['agreement']:.1%} of samples",
                  f"- speed-up fp32/int8: batch 1 {fmt['speedup_b1']:.2f}x, batch 32 {fmt['speedup_b32']:.2f}x "
                  "(1 thread, median after warm-up)",
                  f"- kept in float: {', '.join(int8['kept_in_float']) or 'nothing'}",
                  "- tried: " + "; ".join(f"{t['name']} {t['accuracy']:.4f}" for t in fmt["tried"]), ""]
    write_text(out / "quantize_report.md", "\n".join(lines) + "\n")
