"""`hvdtrain bench compression`: step time and bytes per step of every compression mode, per link.

Links: plain loopback (horovodrun on this machine) and two "hosts" in network namespaces joined by a
bridge, each veth capped with tc (1 Gbit/s, 10 Gbit/s), with ranks started by mpirun through an rsh agent
and Open MPI forced onto TCP over that bridge, one core per "host". The model is communication-heavy (an
MLP of 4.3 M parameters on the digits); each point is a real `hvdtrain train` run (median steps/s of its
later epochs, test accuracy after the same number of steps).
Also: the top-k selection time against one memcpy of the gradient.
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hvdtrain.bench import Targets, links
from hvdtrain.atomic import write_json
from hvdtrain.config import choices
from hvdtrain.topk import TopK

METHODS = choices("compression.method")
# Communication-heavy: an MLP of 4.3 M parameters on the digits (8x8) computes a step in tens of
# milliseconds; 8 epochs (360 steps at 2 x 16) so accuracy compares modes after the same steps.
RANKS, BATCH = 2, 16
TRAIN = ["data.source=digits", "model.name=mlp", "model.width=2048", "model.depth=2", f"train.batch_size={BATCH}",
         "train.epochs=8", "train.log_every=10", "train.warmup_steps=50",
         "compression.auto_trial_steps=5", "compression.auto_recheck_every=1000"]


def selection_vs_memcpy(n: int, ratio: float = 0.01) -> dict:
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    target = np.empty_like(x)
    select = TopK(0)
    select(x, int(n * ratio))

    def median(fn):
        times = []
        for _ in range(7):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    copy = median(lambda: np.copyto(target, x))
    selection = median(lambda: select(x, int(n * ratio)))
    return {"elements": n, "selection_ms": 1e3 * selection, "memcpy_ms": 1e3 * copy,
            "memcpy_times": selection / copy}


def _train(command_prefix: list[str], method: str, scratch: Path) -> dict:
    run_dir = scratch / method
    shutil.rmtree(run_dir, ignore_errors=True)
    bin_dir = Path(sys.executable).parent
    command = [*command_prefix, str(bin_dir / "hvdtrain"), "train", "--run-dir", str(run_dir),
               f"compression.method={method}", *TRAIN]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"{method}: {' '.join(command[:6])} ... failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    later = epochs[1:]
    samples_per_s = statistics.median(e["samples_per_s"] for e in later)
    return {"method": method, "step_ms": 1e3 * RANKS * BATCH / samples_per_s, "samples_per_s": samples_per_s,
            "bytes_per_step": statistics.median(e["bytes_per_step"] for e in later),
            "compression": later[-1]["compression"], "test_accuracy": epochs[-1]["test_accuracy"],
            **{key: later[-1][key] for key in ("auto_tensors", "auto_link_bytes_per_s", "auto_seconds")
               if key in later[-1]}}


def run(link_names: list[str], out: Path | None, methods: tuple[str, ...] = METHODS) -> dict:
    targets = Targets()
    results: dict = {"selection": [selection_vs_memcpy(n) for n in (1_000_000, 6_400_000, 25_000_000)],
                     "links": {}}
    for row in results["selection"]:
        verdict = targets.check(f"top-1% selection of {row['elements']:,} floats, memcpy-times",
                                row["memcpy_times"], "<=", 3)
        print(f"top-1% selection of {row['elements']:,} floats: {row['selection_ms']:.1f} ms = "
              f"{row['memcpy_times']:.2f} memcpy-times {verdict}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for link in link_names:
            if link == "loopback":
                prefix = [str(Path(sys.executable).parent / "horovodrun"), "-np", str(RANKS)]
            else:
                prefix = links.mpirun_in_namespaces(RANKS, ("HOROVOD_CYCLE_TIME", "TF_CPP_MIN_LOG_LEVEL"))
            rows = []
            with links.network(link):
                for method in dict.fromkeys(("none", *methods)):  # none is every link's baseline
                    print(f"bench compression: {link} {method} ...", flush=True)
                    rows.append(_train(prefix, method, Path(scratch)))
            base = next(r for r in rows if r["method"] == "none")
            for row in rows:
                row["speedup_vs_none"] = base["step_ms"] / row["step_ms"]
                print(f"  {link:8s} {row['method']:12s} step {row['step_ms']:7.1f} ms  x{row['speedup_vs_none']:.2f} "
                      f"vs none  {row['bytes_per_step'] / 1e6:7.2f} MB/step  ({row['compression']}, "
                      f"accuracy {row['test_accuracy']:.3f})", flush=True)
            for row in rows:
                method = row["method"]
                if method in ("topk", "shared_topk"):
                    change = row["test_accuracy"] - base["test_accuracy"]
                    line = f"  {link:8s} {method}: accuracy {change:+.3f} vs none " + \
                        targets.check(f"{link} {method} accuracy vs none", change, ">=", -0.01)
                    if link == "1gbit":
                        speedup = row["speedup_vs_none"]
                        line += f", step x{speedup:.2f} " + \
                            targets.check(f"1gbit {method} step speed-up vs none", speedup, ">=", 3)
                    print(line)
                if row["method"] == "auto" and link == "loopback":
                    ratio = 1 / row["speedup_vs_none"]
                    print(f"  {link:8s} auto: step {ratio:.2f}x none's "
                          f"{targets.check('loopback auto step / none step', ratio, '<=', 1.05)}; {row.get('auto_tensors', '')}")
            results["links"][link] = rows
    results["targets"] = targets.checked
    if out:
        write_json(out, results)
    return results
