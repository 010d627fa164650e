"""`hvdtrain bench frameworks`: the PyTorch and TensorFlow training paths on the same model and data.

Each configuration is a real `hvdtrain train` run (horovodrun, synthetic in-memory data, the CNN of the
model zoo); throughput is the median over epochs after the first (which includes tracing/warm-up).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from hvdtrain.atomic import write_json


def run(np_list: list[int], overrides: list[str], out: Path | None) -> dict:
    bin_dir = Path(sys.executable).parent
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for np in np_list:
            for framework in ("torch", "tensorflow"):
                run_dir = Path(scratch) / f"{framework}-np{np}"
                command = [str(bin_dir / "horovodrun"), "-np", str(np), str(bin_dir / "hvdtrain"), "train",
                           "--run-dir", str(run_dir), f"framework={framework}", "data.source=synthetic",
                           "data.synthetic_shape=[1,28,28]", "data.synthetic_samples=4096", "model.name=cnn",
                           "model.width=32", "train.epochs=4", "train.batch_size=32", *overrides]
                print(f"frameworks: {framework} np={np} ...", flush=True)
                proc = subprocess.run(command, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{framework} np={np} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                rows.append({"framework": framework, "ranks": np,
                             "samples_per_s": statistics.median(e["samples_per_s"] for e in epochs[1:]),
                             "test_accuracy": epochs[-1]["test_accuracy"]})
    for row in rows:
        one = next(r for r in rows if r["framework"] == row["framework"] and r["ranks"] == 1) \
            if 1 in np_list else None
        row["efficiency"] = row["samples_per_s"] / (row["ranks"] * one["samples_per_s"]) if one else None
        eff = f"{row['efficiency']:.2f}" if row["efficiency"] else "-"
        print(f"{row['framework']:10s} np={row['ranks']}  {row['samples_per_s']:8.0f} samples/s  efficiency {eff}")
    for np in np_list:
        by = {r["framework"]: r["samples_per_s"] for r in rows if r["ranks"] == np}
        print(f"np={np}: tensorflow / torch = {by['tensorflow'] / by['torch']:.2f}x")
    result = {"rows": rows, "overrides": overrides}
    if out:
        write_json(out, result)
    return result
