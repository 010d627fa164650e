"""`hvdtrain bench scaling`: training throughput measured on every rank, Horovod vs DDP vs no communication.

The launcher runs one job per (mode, ranks): `horovodrun` for Horovod, `torchrun` for DDP and for the
no-communication ceiling (N independent processes, the hardware limit). Each rank times its own steps
after a warm-up and writes them; nothing is extrapolated from rank 0. Weak scaling: the batch per rank is
fixed, so efficiency E(N) = T(N) / (N x T(1)) with T the total samples/s of the same mode.
With `--links 1gbit,...` the communicating modes also run at 2 ranks on the capped network-namespace hosts
(hvdtrain.bench.links, one core each), through mpirun; T(1) is the same mode's one-rank run (no link).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hvdtrain import runtime
from hvdtrain.bench import Targets, end_torch_distributed
from hvdtrain.config import HorovodConfig, choices

# horovod: hvdtrain's path (its tuned settings and gradient exchange) over MPI; horovod-gloo: the same
# path with Horovod over Gloo (`horovodrun --gloo`); horovod-default: Horovod's own DistributedOptimizer
# with Horovod's default settings; ddp: torch DDP (gloo); nocomm: the ceiling.
MODES = ("horovod", "horovod-gloo", "horovod-default", "ddp", "nocomm")


def worker(args: argparse.Namespace) -> None:
    """One rank of a benchmark job: train on synthetic batches and write this rank's timings.

    Horovod modes time hvdtrain's own `TorchAdapter.train_step`, the step users run (horovod-default
    with Horovod's DistributedOptimizer and Horovod's default settings); ddp and nocomm are the
    plain-PyTorch baselines."""
    import torch
    import torch.nn.functional as F

    from hvdtrain.config import Config
    from hvdtrain.world import world

    shape = tuple(args.shape)
    cfg = Config.model_validate({"model": {"name": args.model, "width": args.width, "depth": args.depth},
                                 "train": {"lr": 0.01, "momentum": 0.9, "batch_size": args.batch_size},
                                 "device": args.device})
    device = torch.device(runtime.device_for_rank(args.device, torch.cuda.device_count(), world.local_rank,
                                                  world.local_size))
    if args.mode.startswith("horovod"):
        from hvdtrain.torch.trainer import TorchAdapter, build_model, start_horovod

        if args.mode in ("horovod", "horovod-gloo"):
            start_horovod(cfg)
        else:  # Horovod's own DistributedOptimizer with Horovod's default settings: none of hvdtrain's tuning
            import horovod.torch as hvd

            cfg.horovod.gradient_exchange = "overlap"
            hvd.init()
            world.attach(hvd)
        adapter = TorchAdapter(cfg, build_model(cfg, shape, 10))
        adapter.broadcast_state()
        model = adapter.model
        collectives = world.collectives
        if args.mode == "horovod-gloo" and collectives != "gloo":  # e.g. srun: Horovod took MPI
            raise SystemExit("horovod-gloo: Horovod is running over MPI here; start the ranks with "
                             "`horovodrun --gloo` (hvdtrain bench scaling does)")

        def step(x, y, lr) -> tuple[float, float]:
            adapter.train_step((x, y), lr)
            return adapter.phase_seconds["forward_backward"], adapter.phase_seconds["update"]
    else:
        from hvdtrain import models

        collectives = "gloo"  # torch.distributed's, for DDP
        if args.mode == "ddp" and world.size > 1:
            # under srun there is no torchrun: the rendezvous comes from Slurm's variables
            os.environ.setdefault("RANK", str(world.rank))
            os.environ.setdefault("WORLD_SIZE", str(world.size))
            if device.type == "cuda":
                torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        torch.manual_seed(cfg.seed)
        model = models.build(cfg, shape, 10, ()).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if args.mode == "ddp" and world.size > 1:
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

        def step(x, y, lr) -> tuple[float, float]:
            started = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()  # DDP: allreduces from the backward hooks
            computed = time.perf_counter()
            optimizer.step()
            return computed - started, time.perf_counter() - computed
    threads = args.threads or world.cores
    torch.set_num_threads(threads)
    rank, size = world.rank, world.size
    generator = torch.Generator().manual_seed(rank)
    batches = [(torch.randn((args.batch_size, *shape), generator=generator).to(device),
                torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)) for _ in range(4)]

    timings = {"data": [], "forward_backward": [], "optimizer_step": [], "step": []}
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        x, y = batches[i % len(batches)]
        t1 = time.perf_counter()
        compute, update = step(x, y, 0.01)
        if device.type == "cuda":
            torch.cuda.synchronize()  # GPU work is asynchronous: a step ends when its kernels have
        t3 = time.perf_counter()
        if i >= args.warmup:
            for key, value in zip(timings, (t1 - t0, compute, update, t3 - t0)):
                timings[key].append(value)
    elapsed = sum(timings["step"])
    result = {"mode": args.mode, "link": args.link, "rank": rank, "size": size, "threads": threads, "device": str(device),
              "collectives": collectives, "exchange": adapter.exchange if args.mode.startswith("horovod") else None,
              "samples_per_s": args.batch_size * args.steps / elapsed,
              **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in timings.items()},
              "params": sum(p.numel() for p in model.parameters()),
              "settings": {k: getattr(args, k) for k in ("model", "width", "depth", "shape", "batch_size",
                                                         "steps", "warmup")}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    link = "" if args.link == "loopback" else f"-{args.link}"
    with open(Path(args.out) / f"{args.mode}{link}-np{size}-rep{args.repeat}-rank{rank}.json", "w") as handle:
        json.dump(result, handle)
    if args.mode == "ddp" and size > 1:
        end_torch_distributed()


def _launch(mode: str, np: int, worker_args: list[str], timeout: float, timeline: Path | None = None,
            link: str = "loopback") -> None:
    module = [sys.executable, "-m", "hvdtrain.bench.scaling", "worker", "--mode", mode, "--link", link, *worker_args]
    env = dict(os.environ)
    if timeline is not None and mode.startswith("horovod"):
        env["HOROVOD_TIMELINE"] = str(timeline)  # Horovod's own trace of every collective (rank 0 writes it)
        timeline.parent.mkdir(parents=True, exist_ok=True)  # Horovod writes none, silently, into no directory
    gloo = mode == "horovod-gloo"
    with contextlib.ExitStack() as job:
        if link != "loopback":  # one rank per namespace host, started by mpirun; gloo (DDP) over the capped veth
            from hvdtrain.bench import links

            env.update(links.torch_distributed_env())
            rendezvous = job.enter_context(links.horovod_over_gloo(np)) if gloo else None
            command = [*links.mpirun_in_namespaces(np, (*links.torch_distributed_env(),
                                                        *(k for k in env if k.startswith("HOROVOD_"))),
                                                   gloo=rendezvous), *module]
        elif mode.startswith("horovod"):
            command = [str(Path(sys.executable).parent / "horovodrun"), "-np", str(np), *(["--gloo"] if gloo else []),
                       *module]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={np}",
                       *module[1:]]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} at np={np} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def collect(results_dir: Path) -> list[dict[str, Any]]:
    """One row per (mode, link, ranks): the median over repetitions of the summed per-rank throughput."""
    runs: dict[tuple[str, str, int], dict[str, list[dict]]] = {}
    for path in sorted(results_dir.glob("raw/*-np*-rep*-rank*.json")):
        result = json.loads(path.read_text())
        repeat = path.name.split("-rep")[1].split("-")[0]
        link = result.get("link", "loopback")
        runs.setdefault((result["mode"], link, result["size"]), {}).setdefault(repeat, []).append(result)
    table = []
    for (mode, link, size), repeats in sorted(runs.items(), key=lambda item: (item[0][1] != "loopback", item[0])):
        complete = [ranks for ranks in repeats.values() if len(ranks) == size]
        totals = [sum(r["samples_per_s"] for r in ranks) for ranks in complete]
        median_run = complete[sorted(range(len(totals)), key=totals.__getitem__)[len(totals) // 2]]
        table.append({"mode": mode, "link": link, "ranks": size, "samples_per_s": statistics.median(totals),
                      "runs_samples_per_s": totals,
                      "per_rank_samples_per_s": [r["samples_per_s"] for r in sorted(median_run, key=lambda r: r["rank"])],
                      **{k: statistics.mean(r[k] for r in median_run) for k in
                         ("data_ms", "forward_backward_ms", "optimizer_step_ms", "step_ms")},
                      "threads": median_run[0]["threads"], "params": median_run[0]["params"]})
    for row in table:
        one = next((r for r in table if r["mode"] == row["mode"] and r["ranks"] == 1 and r["link"] == "loopback"), None)
        row["efficiency"] = row["samples_per_s"] / (row["ranks"] * one["samples_per_s"]) if one else None
    return table


def write_scaling(out: Path) -> list[dict[str, Any]]:
    """Aggregate raw/ into scaling.json (what `bench report` reads), print the table and the targets."""
    table = collect(out)
    if not table:
        raise RuntimeError(f"{out / 'raw'}: no benchmark results")
    first = json.loads(next(iter(sorted((out / "raw").glob("*-rank*.json")))).read_text())
    for row in table:
        eff = f"{row['efficiency']:.2f}" if row["efficiency"] is not None else "-"
        print(f"{row['mode']:15s} {row['link']:8s} np={row['ranks']}  {row['samples_per_s']:8.1f} samples/s  "
              f"efficiency {eff}  step {row['step_ms']:.1f} ms (fwd+bwd {row['forward_backward_ms']:.1f}, "
              f"exchange+optimizer {row['optimizer_step_ms']:.1f})")
    targets = Targets()
    ceiling = {r["ranks"]: r["samples_per_s"] for r in table if r["mode"] == "nocomm"}
    for link in dict.fromkeys(r["link"] for r in table):
        by = {(r["mode"], r["ranks"]): r["samples_per_s"] for r in table if r["link"] == link}
        for np in sorted({n for _, n in by}):
            where = f"np={np}" + ("" if link == "loopback" else f" over {link}")
            if ("horovod", np) in by and ("horovod-default", np) in by:
                print(f"{where}: hvdtrain settings / Horovod defaults = {by['horovod', np] / by['horovod-default', np]:.2f}x")
            if ("horovod", np) in by and ("ddp", np) in by:
                ratio = by["horovod", np] / by["ddp", np]
                print(f"{where}: hvdtrain (Horovod) / DDP = {ratio:.2f}x "
                      f"{targets.check(f'{where} hvdtrain / DDP', ratio, '>=', 0.97 if np == 1 else 1.05)}"
                      + (f", / ceiling = {by['horovod', np] / ceiling[np]:.2f}x" if np in ceiling else ""))
            if ("horovod-gloo", np) in by and ("ddp", np) in by:
                ratio = by["horovod-gloo", np] / by["ddp", np]
                print(f"{where}: hvdtrain (Horovod over Gloo) / DDP = {ratio:.2f}x "
                      f"{targets.check(f'{where} hvdtrain over Gloo / DDP', ratio, '>=', 0.97 if np == 1 else 1.05)}"
                      + (f", / over MPI = {by['horovod-gloo', np] / by['horovod', np]:.2f}x"
                         if ("horovod", np) in by else ""))
    with open(out / "scaling.json", "w") as handle:
        json.dump({"settings": {**first["settings"], "horovod_env": {**runtime.horovod_env(HorovodConfig()),
                                                                       **_exported_horovod_env()}},
                   "rows": table, "targets": targets.checked}, handle, indent=2)
    return table


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = Path(args.out)
    raw = out / "raw"
    worker_args = ["--model", args.model, "--width", str(args.width), "--depth", str(args.depth),
                   "--shape", *map(str, args.shape), "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(raw),
                   "--threads", str(args.threads), "--device", args.device]
    # Repetitions interleave the modes, so a slow spell of a shared machine hits them alike.
    for repeat in range(args.repeats):
        for np in args.np:
            for mode in args.modes:
                print(f"scaling: {mode} np={np} (run {repeat + 1}/{args.repeats}) ...", flush=True)
                timeline = out / f"timeline-{mode}-np{np}.json" if args.timeline and repeat == 0 else None
                _launch(mode, np, [*worker_args, "--repeat", str(repeat)], args.timeout, timeline)
    capped = [link for link in getattr(args, "links", ["loopback"]) if link != "loopback"]
    if capped:
        from hvdtrain.bench import links

        for link in capped:
            with links.network(link):
                for repeat in range(args.repeats):
                    for mode in (m for m in args.modes if m != "nocomm"):  # no communication: no link
                        print(f"scaling: {mode} np=2 over {link} (run {repeat + 1}/{args.repeats}) ...", flush=True)
                        _launch(mode, 2, [*worker_args, "--repeat", str(repeat)], args.timeout, link=link)
    return write_scaling(out)


def _exported_horovod_env() -> dict[str, str]:
    """Variables the user exported win over hvdtrain's settings, in the workers as in the record."""
    return {k: v for k, v in os.environ.items() if k.startswith("HOROVOD_")}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="cnn", choices=choices("model.name"))
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 28, 28])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                        help="cuda: one GPU per rank, DDP over NCCL, Horovod over its GPU build (NCCL)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per rank (1: each added rank adds a core, as weak scaling needs; "
                             "0: cores / ranks)")


if __name__ == "__main__":  # entry points for launchers and job scripts (slurm/bench.sh)
    parser = argparse.ArgumentParser(prog="python -m hvdtrain.bench.scaling")
    sub = parser.add_subparsers(dest="command", required=True)
    work = sub.add_parser("worker", help="one rank of a benchmark job")
    work.add_argument("--mode", choices=MODES, required=True)
    work.add_argument("--out", required=True)
    work.add_argument("--repeat", type=int, default=0)
    work.add_argument("--link", default="loopback", help="recorded with the timings (the launcher picks the network)")
    add_model_arguments(work)
    gather = sub.add_parser("collect", help="write scaling.json from the ranks' files in OUT/raw")
    gather.add_argument("--out", required=True)
    cli_args = parser.parse_args()
    if cli_args.command == "worker":
        worker(cli_args)
    else:
        write_scaling(Path(cli_args.out))
