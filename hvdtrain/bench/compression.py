"""`hvdtrain bench compression`: step time, bytes per step and time to accuracy of every compression mode
and of the DDP baselines a PyTorch user would pick (fp32, its fp16/bf16 hooks, PowerSGD), per link.

Links: plain loopback (horovodrun on this machine) and two "hosts" in network namespaces joined by a
bridge, each veth capped with tc (1 Gbit/s, 10 Gbit/s), with ranks started by mpirun through an rsh agent
and Open MPI forced onto TCP over that bridge, one core per "host". The model is communication-heavy (an
MLP of 4.3 M parameters on the digits); each point is a real `hvdtrain train` run (median steps/s of its
later epochs, test accuracy after the same number of steps, training seconds until the test accuracy
first reached ACCURACY_BAR).
The dense methods are also timed with Horovod over Gloo (rows `gloo:none`, `gloo:fp16`), where hvdtrain
overlaps the exchange with backward. Also: the top-k selection time against one memcpy of the gradient.
"""
from __future__ import annotations

import contextlib
import json
import os
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
# what a PyTorch user would run instead (hvdtrain.bench.ddp)
BASELINES = ("ddp:none", "ddp:fp16", "ddp:bf16", "ddp:powersgd")
# also timed with Horovod over Gloo (rows gloo:METHOD): the dense exchanges, which overlap there
OVER_GLOO = ("none", "fp16")
ACCURACY_BAR = 0.95  # time_to_accuracy: training seconds until the test accuracy first reaches it
JOB_TIMEOUT = 900
# Communication-heavy: an MLP of 4.3 M parameters on the digits (8x8) computes a step in tens of
# milliseconds; 8 epochs (360 steps at 2 x 16) so accuracy compares modes after the same steps.
RANKS, BATCH, EPOCHS = 2, 16, 8
TRAIN = ["data.source=digits", "model.name=mlp", "model.width=2048", "model.depth=2", f"train.batch_size={BATCH}",
         "train.log_every=10", "train.warmup_steps=50",
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


def _epochs(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def reaching(epochs: list[dict], bar: float = ACCURACY_BAR, ranks: int = RANKS) -> tuple[float, int] | None:
    """(training seconds, evaluations excluded, and steps) until the test accuracy first reached `bar`:
    each epoch's steps at its measured rate; None if it never did."""
    seconds, step = 0.0, 0
    for epoch in epochs:
        seconds += (epoch["step"] - step) * ranks * BATCH / epoch["samples_per_s"]
        step = epoch["step"]
        if epoch["test_accuracy"] >= bar:
            return seconds, step
    return None


def _row(method: str, epochs: list[dict], ranks: int = RANKS) -> dict:
    later = epochs[1:] or epochs
    samples_per_s = statistics.median(e["samples_per_s"] for e in later)
    reached = reaching(epochs, ranks=ranks)
    return {"method": method, "step_ms": 1e3 * ranks * BATCH / samples_per_s, "samples_per_s": samples_per_s,
            "bytes_per_step": statistics.median(e["bytes_per_step"] for e in later),
            "compression": later[-1]["compression"], "test_accuracy": epochs[-1]["test_accuracy"],
            "time_to_accuracy": reached and reached[0], "steps_to_accuracy": reached and reached[1],
            **{key: later[-1][key] for key in ("auto_tensors", "auto_link_bytes_per_s", "auto_seconds")
               if key in later[-1]}}


def _run(command: list[str], method: str, run_dir: Path, env: dict | None = None, ranks: int = RANKS) -> dict:
    """One training job; a baseline that fails or hangs is a row with its error, not the end of the bench."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT, env=env)
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        return {"method": method, "error": f"hung: no result after {JOB_TIMEOUT} s", "output_tail": output[-1500:]}
    if proc.returncode != 0:
        if not method.startswith("ddp:"):
            raise RuntimeError(f"{method}: {' '.join(command[:6])} ... failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("ddp ")), None) or \
            next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
        return {"method": method, "error": f"exit {proc.returncode}: {reason.strip()[:300]}",
                "output_tail": (proc.stdout + proc.stderr)[-1500:]}
    summary = json.loads((run_dir / "summary.json").read_text())
    kept = ("weights_identical",) if method.startswith("ddp:") else ("horovod_collectives", "gradient_exchange")
    return {**_row(method, _epochs(run_dir), ranks), **{key: summary[key] for key in kept}}


def _launcher(link: str, gloo: dict | None = None) -> list[str]:
    """How hvdtrain's ranks start on `link`: horovodrun here, mpirun on the namespace hosts. gloo: Horovod
    over Gloo (`horovodrun --gloo`; on the hosts, the variables of links.horovod_over_gloo)."""
    if link == "loopback":
        return [str(Path(sys.executable).parent / "horovodrun"), "-np", str(RANKS), *([] if gloo is None else ["--gloo"])]
    return links.mpirun_in_namespaces(RANKS, ("HOROVOD_CYCLE_TIME", "TF_CPP_MIN_LOG_LEVEL"), gloo=gloo)


def _hvdtrain(prefix: list[str], method: str, scratch: Path, job: list[str], ranks: int = RANKS,
              name: str | None = None) -> dict:
    """hvdtrain with compression `method`, its row named `name` (default: the method)."""
    name = name or method
    run_dir = scratch / name
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [*prefix, str(Path(sys.executable).parent / "hvdtrain"), "train", "--run-dir", str(run_dir),
               f"compression.method={method}", *job]
    return _run(command, name, run_dir, ranks=ranks)


def _hvdtrain_over_gloo(link: str, method: str, scratch: Path, job: list[str]) -> dict:
    """The row `gloo:METHOD`: hvdtrain with Horovod over Gloo; `auto` then overlaps the exchange
    (runtime.exchange_mode). On the namespace hosts Horovod's own rendezvous serves the job."""
    rendezvous = contextlib.nullcontext({}) if link == "loopback" else links.horovod_over_gloo(RANKS)
    with rendezvous as gloo:
        return _hvdtrain(_launcher(link, gloo), method, scratch, job, name=f"gloo:{method}")


def compute_floor(scratch: Path, job: list[str]) -> dict:
    """What no exchange can beat: one rank alone on one core (each namespace host's share), the same batch
    per rank, nothing sent. Its step time bounds every method's; its accuracy is not comparable (half the
    global batch)."""
    row = _hvdtrain(["taskset", "-c", "0"], "none", scratch, [*job, "train.epochs=2"], ranks=1)  # epoch 2 timed
    return {"step_ms": row["step_ms"], "samples_per_s_per_rank": row["samples_per_s"],
            "command": "taskset -c 0 hvdtrain train compression.method=none (the job, 2 epochs)"}


def _ddp(link: str, hook: str, scratch: Path, job: list[str]) -> dict:
    """DDP (gloo) with communication hook `hook` on the same job (hvdtrain.bench.ddp)."""
    run_dir = scratch / f"ddp-{hook}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    worker = ["-m", "hvdtrain.bench.ddp", "--hook", hook, "--run-dir", str(run_dir), *job]
    env = dict(os.environ)
    if link == "loopback":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}", *worker]
    else:
        env.update(links.torch_distributed_env())
        command = [*links.mpirun_in_namespaces(RANKS, tuple(links.torch_distributed_env())), sys.executable, *worker]
    return _run(command, f"ddp:{hook}", run_dir, env)


def _plot(link: str, rows: list[dict], path: Path, floor: dict | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "error" not in r]
    names = [r["method"] for r in done]
    colors = ["tab:gray" if n.startswith("ddp:") else "tab:blue" for n in names]
    fig, (steps, reach) = plt.subplots(1, 2, figsize=(12, 4))
    steps.bar(names, [r["step_ms"] for r in done], color=colors)
    steps.set_ylabel("ms per step")
    if floor:
        steps.axhline(floor["step_ms"], color="black", linestyle="--", linewidth=1)
        steps.annotate("compute floor (nothing sent)", (0, floor["step_ms"]), xytext=(0, 3),
                       textcoords="offset points", fontsize=8)
    reach.bar(names, [r["time_to_accuracy"] or 0 for r in done], color=colors)
    reach.set_ylabel(f"s to test accuracy {ACCURACY_BAR} (0: not reached)")
    for ax in (steps, reach):
        ax.tick_params(axis="x", rotation=45)
    failed = [f"{r['method']}: {r['error'][:80]}" for r in rows if "error" in r]
    fig.suptitle(f"{link}: hvdtrain (blue) and DDP hooks (gray), {RANKS} ranks"
                 + ("\nnot run: " + "; ".join(failed) if failed else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _check_link(link: str, rows: list[dict], targets: Targets, floor: dict | None = None) -> None:
    by = {r["method"]: r for r in rows if "error" not in r}
    base = by["none"]
    for method in ("topk", "shared_topk", "powersgd"):
        if method in by:
            change = by[method]["test_accuracy"] - base["test_accuracy"]
            line = f"  {link:8s} {method}: accuracy {change:+.3f} vs none " + \
                targets.check(f"{link} {method} accuracy vs none", change, ">=", -0.01)
            if link == "1gbit":
                speedup = by[method]["speedup_vs_none"]
                line += f", step x{speedup:.2f} " + targets.check(f"1gbit {method} step speed-up vs none", speedup, ">=", 3)
            print(line)
    for ours, theirs in (("none", "ddp:none"), ("fp16", "ddp:fp16"), ("gloo:none", "ddp:none"), ("gloo:fp16", "ddp:fp16")):
        if ours in by and theirs in by:
            ratio = by[theirs]["step_ms"] / by[ours]["step_ms"]
            print(f"  {link:8s} {ours} vs {theirs}: {ratio:.2f}x DDP's speed "
                  f"{targets.check(f'{link} hvdtrain {ours} step speed / {theirs}', ratio, '>=', 1.0)}")
    if "auto" in by and link == "loopback":
        ratio = by["auto"]["step_ms"] / min(r["step_ms"] for r in by.values())
        print(f"  {link:8s} auto: step {ratio:.2f}x the fastest method's "
              f"{targets.check('loopback auto step / fastest step', ratio, '<=', 1.05)}; {by['auto'].get('auto_tensors', '')}")
    reached = {m: r["time_to_accuracy"] for m, r in by.items() if r["time_to_accuracy"] is not None}
    ours = {m: t for m, t in reached.items() if not m.startswith("ddp:")}
    theirs = {m: t for m, t in reached.items() if m.startswith("ddp:")}
    if ours and theirs:
        best, rival = min(ours, key=ours.get), min(theirs, key=theirs.get)
        ratio = theirs[rival] / ours[best]
        line = (f"  {link:8s} time to accuracy {ACCURACY_BAR}: hvdtrain {best} {ours[best]:.1f} s, DDP's best "
                f"{rival} {theirs[rival]:.1f} s: {ratio:.2f}x sooner")
        if link == "1gbit":
            line += " " + targets.check("1gbit time to accuracy: DDP's best / hvdtrain's best", ratio, ">=", 3)
        print(line)
        if floor and by[best].get("steps_to_accuracy"):
            # the most any exchange could give: the same steps to the bar, each at the compute floor
            bound = theirs[rival] / (floor["step_ms"] / 1e3 * by[best]["steps_to_accuracy"])
            by[best]["bound_vs_" + rival] = bound
            print(f"  {link:8s} at the compute floor ({floor['step_ms']:.1f} ms per step, nothing sent) "
                  f"{best}'s {by[best]['steps_to_accuracy']} steps to {ACCURACY_BAR} would take "
                  f"{floor['step_ms'] * by[best]['steps_to_accuracy'] / 1e3:.1f} s: at most {bound:.2f}x sooner than {rival}")


def run(link_names: list[str], out: Path | None, methods: tuple[str, ...] = METHODS,
        baselines: tuple[str, ...] = BASELINES, epochs: int = EPOCHS, over_gloo: tuple[str, ...] = OVER_GLOO) -> dict:
    targets = Targets()
    job = [*TRAIN, f"train.epochs={epochs}"]
    results: dict = {"selection": [selection_vs_memcpy(n) for n in (1_000_000, 6_400_000, 25_000_000)],
                     "settings": {"ranks": RANKS, "batch_per_rank": BATCH, "train": job,
                                  "accuracy_bar": ACCURACY_BAR}, "links": {}, "plots": []}
    for row in results["selection"]:
        verdict = targets.check(f"top-1% selection of {row['elements']:,} floats, memcpy-times",
                                row["memcpy_times"], "<=", 3)
        print(f"top-1% selection of {row['elements']:,} floats: {row['selection_ms']:.1f} ms = "
              f"{row['memcpy_times']:.2f} memcpy-times {verdict}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        print("bench compression: compute floor (one rank, one core, nothing sent) ...", flush=True)
        results["floor"] = floor = compute_floor(Path(scratch), job)
        print(f"  compute floor: {floor['step_ms']:.1f} ms per step", flush=True)
        for link in link_names:
            prefix = _launcher(link)
            rows = []
            with links.network(link):
                for method in dict.fromkeys(("none", *methods)):  # none is every link's baseline
                    print(f"bench compression: {link} {method} ...", flush=True)
                    rows.append(_hvdtrain(prefix, method, Path(scratch), job))
                for method in over_gloo:
                    print(f"bench compression: {link} {method} over Gloo ...", flush=True)
                    rows.append(_hvdtrain_over_gloo(link, method, Path(scratch), job))
                for hook in baselines:
                    print(f"bench compression: {link} DDP {hook} ...", flush=True)
                    rows.append(_ddp(link, hook.split(":")[-1], Path(scratch), job))
            base = next(r for r in rows if r["method"] == "none")
            for row in rows:
                if "error" in row:
                    print(f"  {link:8s} {row['method']:12s} not run: {row['error']}", flush=True)
                    continue
                row["speedup_vs_none"] = base["step_ms"] / row["step_ms"]
                reach = f"{row['time_to_accuracy']:.1f} s" if row["time_to_accuracy"] is not None else "not reached"
                print(f"  {link:8s} {row['method']:12s} step {row['step_ms']:7.1f} ms  x{row['speedup_vs_none']:.2f} "
                      f"vs none  {row['bytes_per_step'] / 1e6:7.2f} MB/step  ({row['compression']}, "
                      f"accuracy {row['test_accuracy']:.3f}, to {ACCURACY_BAR}: {reach})", flush=True)
            _check_link(link, rows, targets, floor)
            results["links"][link] = rows
            if out:
                results["plots"].append(_plot(link, rows, out.with_name(f"{out.stem}-{link}.png"), floor))
    results["targets"] = targets.checked
    if out:
        write_json(out, results)
    return results
