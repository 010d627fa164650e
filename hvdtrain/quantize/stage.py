"""`hvdtrain quantize`: pick the int8 model that keeps the run's metric, measure it, report it.

The metric is the run's headline (test accuracy, mean IoU, mse...: hvdtrain.tasks.headline); the bound is
in points for scores (accuracy, IoU) and in percent of fp32's error for errors (mse, mae).
Guard: static int8 with MinMax calibration first; if it loses more than the bound, Entropy and
Percentile; then (ONNX) the most sensitive layers are kept in float, a group at a time, up to a third of
the compute layers; (TFLite) float input/output with float fallback kernels. Nothing within the bound:
exit code 1, with the report of what was tried.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from hvdtrain import tasks
from hvdtrain.errors import ConfigError, UserError
from hvdtrain.quantize import common
from hvdtrain.quantize.common import Candidate


def _measure(name: str, path: Path, predict, inputs: common.Inputs, class_axis: int) -> dict:
    value, labels = common.score(predict, inputs, class_axis)
    return {"name": name, "path": str(path), "bytes": path.stat().st_size, "score": value, "labels": labels,
            "latency_ms_b1": common.latency_ms(predict, inputs.x_test, 1),
            "latency_ms_b32": common.latency_ms(predict, inputs.x_test, 32)}


def _evaluate(candidate: Candidate, predict, inputs: common.Inputs, reference, class_axis: int) -> Candidate:
    candidate.score, labels = common.score(predict, inputs, class_axis)
    if labels is not None:
        candidate.agreement = float(np.mean(labels == reference))
    return candidate


def _onnx(run_dir: Path, out: Path, cfg, inputs: common.Inputs, bound: float, dynamic: bool):
    from hvdtrain.quantize import onnx_path

    prepared = onnx_path.export(common.latest_checkpoint(run_dir), cfg, inputs, out)
    shipped_fp32 = onnx_path.compact(prepared, out / "model-fp32.onnx")  # sizes compare shipped files
    fp32_predict = onnx_path.session(shipped_fp32)
    fp32 = _measure("fp32", shipped_fp32, fp32_predict, inputs, 1)
    tried: list[Candidate] = []

    def attempt(name: str, path: Path, kept=()) -> Candidate:
        candidate = _evaluate(Candidate(name, path, kept_in_float=list(kept)), onnx_path.session(path),
                              inputs, fp32["labels"], 1)
        tried.append(candidate)
        return candidate

    def better(a: Candidate, b: Candidate) -> bool:
        return common.drop(inputs, fp32["score"], a.score) < common.drop(inputs, fp32["score"], b.score)

    def good(c: Candidate) -> bool:
        return common.drop(inputs, fp32["score"], c.score) <= bound

    if dynamic:
        chosen = attempt("dynamic int8", onnx_path.quantize_dynamic_int8(prepared, out / "model-int8-dynamic.onnx"))
        chosen.path = onnx_path.compact(chosen.path, out / "model-int8.onnx")
        return fp32, chosen, tried, good(chosen), onnx_path.session(chosen.path)
    best = None
    for method in onnx_path.METHODS:
        candidate = attempt(f"static int8 QDQ ({method})",
                            onnx_path.quantize(prepared, out / f"model-int8-{method}.onnx", inputs.calibration, method))
        best = candidate if best is None or better(candidate, best) else best
        if good(candidate):
            break
    if not good(best):
        method = best.name.split("(")[1].rstrip(")")
        with tempfile.TemporaryDirectory() as scratch:
            groups = onnx_path.sensitive_nodes(prepared, best.path, inputs.calibration[:64], Path(scratch))
        import onnx
        compute = sum(n.op_type in onnx_path.COMPUTE_OPS for n in onnx.load(str(prepared)).graph.node)
        kept: list[str] = []
        for group in groups:
            if len(set(kept + group)) > max(1, compute // 3):
                break
            kept = sorted(set(kept + group))
            candidate = attempt(f"static int8 QDQ ({method}), {len(kept)} layer(s) in float",
                                onnx_path.quantize(prepared, out / f"model-int8-float{len(kept)}.onnx",
                                                   inputs.calibration, method, kept), kept)
            if better(candidate, best):
                best = candidate
            if good(candidate):
                break
    best.path = onnx_path.compact(best.path, out / "model-int8.onnx")
    return fp32, best, tried, good(best), onnx_path.session(best.path)


def _tflite(run_dir: Path, out: Path, inputs: common.Inputs, bound: float):
    from hvdtrain.quantize import tflite_path

    model = tflite_path.load_model(run_dir)
    fp32_path = tflite_path.convert(model, out / "model-fp32.tflite", None)
    fp32 = _measure("fp32", fp32_path, tflite_path.session(fp32_path), inputs, -1)  # Keras: classes last
    tried = []
    for name, integer_io, kept in (("full-integer int8", True, []),
                                   ("int8 with float input/output and float fallback", False,
                                    ["model input and output", "ops without int8 kernels"])):
        path = tflite_path.convert(model, out / f"model-int8{'' if integer_io else '-float-io'}.tflite",
                                   inputs.calibration, integer_io)
        candidate = _evaluate(Candidate(name, path, kept_in_float=kept), tflite_path.session(path), inputs,
                              fp32["labels"], -1)
        tried.append(candidate)
        if common.drop(inputs, fp32["score"], candidate.score) <= bound:
            break
    best = min(tried, key=lambda c: common.drop(inputs, fp32["score"], c.score))
    ok = common.drop(inputs, fp32["score"], best.score) <= bound
    return fp32, best, tried, ok, tflite_path.session(best.path)


def run(run_dir: Path, fmt: str, calibration: int, bound: float, calibration_data: str | None = None,
        dynamic: bool = False) -> dict:
    cfg = common.run_config(run_dir)
    available = "onnx" if cfg.framework == "torch" else "tflite"
    formats = [available] if fmt in ("auto", "both") else [fmt]
    if formats != [available]:
        raise ConfigError(f"--format {fmt}: a {cfg.framework} run exports {available}; "
                          f"train with framework: {'tensorflow' if fmt == 'tflite' else 'torch'} for {fmt}")
    inputs = common.inputs(cfg, calibration, calibration_data)
    out = run_dir / "quantize"
    out.mkdir(parents=True, exist_ok=True)
    report = {"run_dir": str(run_dir), "task": cfg.task, "metric": inputs.metric,
              "calibration_samples": len(inputs.calibration),
              "calibration_data": calibration_data or "training shards", "test_samples": len(inputs.y_test),
              "max_metric_drop": bound, "formats": []}
    failed = []
    for name in formats:
        if name == "onnx":
            fp32, best, tried, ok, predict = _onnx(run_dir, out, cfg, inputs, bound, dynamic)
            runtime = "onnxruntime"
        else:
            fp32, best, tried, ok, predict = _tflite(run_dir, out, inputs, bound)
            runtime = "LiteRT (ai-edge-litert)"
        int8 = {"name": best.name, "path": str(best.path), "bytes": best.path.stat().st_size,
                "score": best.score, "agreement": best.agreement, "kept_in_float": best.kept_in_float,
                "latency_ms_b1": common.latency_ms(predict, inputs.x_test, 1),
                "latency_ms_b32": common.latency_ms(predict, inputs.x_test, 32)}
        fp32.pop("labels")
        report["formats"].append({
            "format": name, "runtime": runtime, "fp32": fp32, "int8": int8, "within_bound": ok,
            "size_ratio": int8["bytes"] / fp32["bytes"],
            "metric_drop": common.drop(inputs, fp32["score"], int8["score"]),
            "speedup_b1": fp32["latency_ms_b1"] / int8["latency_ms_b1"],
            "speedup_b32": fp32["latency_ms_b32"] / int8["latency_ms_b32"],
            "tried": [{"name": t.name, "score": t.score, "agreement": t.agreement,
                       "kept_in_float": t.kept_in_float} for t in tried]})
        if not ok:
            failed.append(f"{name}: best int8 {inputs.metric} {best.score:.4f} vs fp32 {fp32['score']:.4f}")
    common.write_report(out, report)
    if failed:
        unit = "% of fp32's error" if tasks.lower_is_better(f"test_{inputs.metric}") else " points"
        raise UserError(f"no int8 model within {bound}{unit} of fp32 ({'; '.join(failed)}); "
                        f"see {out / 'quantize_report.md'}")
    return report
