"""`hvdtrain bench quantize`: int8 against fp32 on the digits CNN and a ResNet-style CNN.

Both are real runs: train (horovodrun, 2 ranks), then `hvdtrain quantize`; the ResNet is trained briefly
on a synthetic 3x32x32 shard set so its weights and activation ranges are realistic, not random.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from hvdtrain.atomic import write_json
from hvdtrain.bench import Targets


def _run(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


# The digits demo's model and schedule (configs/digits-torch.yaml), as overrides: no file of the repository needed.
DIGITS_CNN = ["framework=torch", "model.name=cnn", "model.width=16", "data.source=hdf5", "train.epochs=30",
              "train.lr=0.05", "train.momentum=0.9", "train.weight_decay=0.0005"]


def run(out: Path | None) -> dict:
    bin_dir = Path(sys.executable).parent
    hvdtrain, horovodrun = str(bin_dir / "hvdtrain"), str(bin_dir / "horovodrun")
    results, targets = {}, Targets()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        _run([hvdtrain, "data", "shard", "--source", "digits", "--out", str(scratch / "digits"), "--shards", "4",
              "--chunk-samples", "64"])
        _run([hvdtrain, "data", "shard", "--source", "synthetic", "--synthetic-shape", "3,32,32",
              "--synthetic-count", "6000", "--out", str(scratch / "synthetic"), "--shards", "4"])
        models = {
            "digits CNN": [*DIGITS_CNN, f"data.train={scratch}/digits/train", f"data.test={scratch}/digits/test"],
            "ResNet-style CNN": [*DIGITS_CNN, f"data.train={scratch}/synthetic/train",
                                 f"data.test={scratch}/synthetic/test", "model.name=resnet", "model.width=64",
                                 "model.depth=4", "train.epochs=3", "train.lr=0.01", "train.warmup_steps=100"],
        }
        for name, overrides in models.items():
            run_dir = scratch / name.split()[0]
            print(f"bench quantize: training {name} ...", flush=True)
            _run([horovodrun, "-np", "2", hvdtrain, "train", "--run-dir", str(run_dir),
                  *overrides])
            print(f"bench quantize: quantizing {name} ...", flush=True)
            _run([hvdtrain, "quantize", "--run-dir", str(run_dir), "--format", "onnx"])
            fmt = json.loads((run_dir / "quantize/quantize_report.json").read_text())["formats"][0]
            results[name] = {k: fmt[k] for k in ("size_ratio", "metric_drop", "speedup_b1", "speedup_b32")}
            results[name].update({"fp32": fmt["fp32"], "int8": fmt["int8"]})
            size_verdict = targets.check(f"{name} int8 / fp32 size", fmt["size_ratio"], "<=", 0.27)
            print(f"{name:18s} size x{fmt['size_ratio']:.3f} {size_verdict}  accuracy {fmt['fp32']['score']:.4f}"
                  f" -> {fmt['int8']['score']:.4f} ({fmt['metric_drop']:+.2f} pt drop)  batch-1 "
                  f"{fmt['fp32']['latency_ms_b1']:.3f} -> {fmt['int8']['latency_ms_b1']:.3f} ms "
                  f"({fmt['speedup_b1']:.2f}x), batch-32 {fmt['speedup_b32']:.2f}x", flush=True)
    results["targets"] = targets.checked
    if out:
        write_json(out, results)
    return results
