"""`hvdtrain bench allreduce`: allreduce bus bandwidth over message sizes, per implementation.

Implementations: Horovod over MPI and over Gloo (with hvdtrain's settings), mpi4py's Allreduce, and
torch.distributed (gloo); one memcpy of the same buffer is the limit a shared-memory allreduce
approaches. Bus bandwidth = bytes x 2(N-1)/N / time (nccl-tests' convention: comparable across N).
Links: loopback, and tc-capped links between two network-namespace hosts such as 1gbit or 10gbit, which
calibrate the report's model (every implementation runs on both). dtype float16: what the fp16 compressor
sends; mpi4py is left out there, as MPI has no half-precision sum.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from hvdtrain.atomic import write_json
from hvdtrain.bench import Targets, end_torch_distributed, links

IMPLEMENTATIONS = ("horovod-mpi", "horovod-gloo", "mpi4py", "torch-gloo")
DEFAULT_SIZES_MB = (0.004, 0.064, 0.25, 1, 4, 16, 64, 100)
DTYPES = ("float32", "float16")


def _time(op: Callable[[], None], nbytes: int, barrier: Callable[[], None], gap_s: float = 0.0,
          repeats: int = 0) -> tuple[float, float, float]:
    """Median, mean and max seconds of `op`, after warm-up; more repetitions for small messages unless
    `repeats` is given. Median and mean: over a capped link a few slow calls (Open MPI's ring) leave the
    median alone and raise the mean, which is what a training step pays. gap_s: idle time before each
    call, as a training step's compute leaves between its allreduces."""
    for _ in range(3):
        op()
    repeats = repeats or max(5, min(200, int(2e8 / max(nbytes, 1))))
    samples = []
    for _ in range(repeats):
        if gap_s:
            time.sleep(gap_s)
        barrier()
        started = time.perf_counter()
        op()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), statistics.mean(samples), max(samples)


def _result_name(impl: str, ranks: int, link: str, dtype: str = "float32") -> str:
    return (f"allreduce-{impl}-np{ranks}" + ("" if link == "loopback" else f"-{link}")
            + ("" if dtype == "float32" else f"-{dtype}") + ".json")


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    impl = args.impl
    if impl.startswith("horovod"):
        import horovod.torch as hvd
        from hvdtrain import runtime
        from hvdtrain.config import HorovodConfig

        runtime.configure_horovod_env(HorovodConfig())
        hvd.init()
        rank, size = hvd.rank(), hvd.size()
        barrier = lambda: hvd.allreduce(torch.zeros(1), name="barrier")  # noqa: E731
    elif impl == "mpi4py":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, size, barrier = comm.Get_rank(), comm.Get_size(), comm.Barrier
    else:  # torchrun's ranks, or mpirun's on the namespace hosts: world reads either launcher
        from hvdtrain.world import world

        torch.distributed.init_process_group("gloo", rank=world.rank, world_size=world.size)
        rank, size, barrier = torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.distributed.barrier

    dtype = getattr(torch, args.dtype)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for megabytes in args.sizes:
        count = max(1, int(megabytes * 2**20) // itemsize)
        nbytes = count * itemsize
        tensor = torch.ones(count, dtype=dtype)
        if impl.startswith("horovod"):
            op = lambda: hvd.allreduce_(tensor, op=hvd.Sum, name=f"allreduce.{count}")  # noqa: E731
        elif impl == "mpi4py":
            array, out = np.ones(count, np.float32), np.empty(count, np.float32)
            op = lambda: comm.Allreduce(array, out, op=MPI.SUM)  # noqa: E731
        else:
            op = lambda: torch.distributed.all_reduce(tensor)  # noqa: E731
        seconds, mean, slowest = _time(op, nbytes, barrier, args.gap_ms / 1e3, args.repeats)
        source, target = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
        memcpy, _, _ = _time(lambda: np.copyto(target, source), nbytes, lambda: None)
        bus = nbytes * 2 * (size - 1) / size / 1e9
        rows.append({"bytes": nbytes, "seconds": seconds, "mean_seconds": mean, "max_seconds": slowest,
                     "memcpy_seconds": memcpy,
                     "bus_gb_s": bus / seconds if size > 1 else None, "mean_bus_gb_s": bus / mean if size > 1 else None,
                     "alg_gb_s": nbytes / seconds / 1e9, "memcpy_gb_s": nbytes / memcpy / 1e9})
    if rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / _result_name(impl, size, args.link, args.dtype)).write_text(
            json.dumps({"impl": impl, "ranks": size, "link": args.link, "dtype": args.dtype,
                        "gap_ms": args.gap_ms, "rows": rows,
                        # what Open MPI was told, as rank 0 saw it (hvdtrain's own settings included)
                        "ompi_mca": {k: v for k, v in sorted(os.environ.items()) if k.startswith("OMPI_MCA_")}},
                       indent=2))
    if impl == "torch-gloo":
        end_torch_distributed()


def _command(impl: str, np: int, module: list[str]) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if impl == "horovod-mpi":
        return [str(bin_dir / "horovodrun"), "-np", str(np), "--mpi", *module]
    if impl == "horovod-gloo":
        return [str(bin_dir / "horovodrun"), "-np", str(np), "--gloo", *module]
    if impl == "mpi4py":
        return [shutil.which("mpirun") or "mpirun", "-np", str(np), "--oversubscribe", *module]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={np}", *module[1:]]


@contextlib.contextmanager
def _launch(impl: str, link: str, np: int, module: list[str], env: dict) -> Iterator[tuple[list[str], dict]]:
    """The command that starts `impl`'s ranks on `link`, and its environment. On the namespace hosts
    mpirun places the ranks; Horovod over Gloo also needs its rendezvous server for the job's lifetime."""
    if link == "loopback":
        yield _command(impl, np, module), env
    elif impl == "horovod-gloo":
        with links.horovod_over_gloo(np) as gloo:
            yield [*links.mpirun_in_namespaces(np, env=env, gloo=gloo), *module], env
    else:
        extra = links.torch_distributed_env() if impl == "torch-gloo" else {}
        env = {**env, **extra}
        yield [*links.mpirun_in_namespaces(np, tuple(extra), env=env), *module], env


def _run_link(link: str, args: argparse.Namespace, out: Path, env: dict) -> list[dict]:
    results = []
    impls = [i for i in args.impls if not (i == "mpi4py" and args.dtype == "float16")]
    if len(impls) < len(args.impls):
        print("allreduce: mpi4py left out: MPI has no float16 sum", flush=True)
    for impl in impls:
        module = [sys.executable, "-m", "hvdtrain.bench.allreduce", "--impl", impl, "--out", str(out),
                  "--link", link, "--dtype", args.dtype, "--gap-ms", str(args.gap_ms),
                  "--repeats", str(args.repeats), "--sizes", *map(str, args.sizes)]
        print(f"allreduce: {impl} np={args.np} {args.dtype} over {link} ...", flush=True)
        with _launch(impl, link, args.np, module, env) as (command, run_env):
            proc = subprocess.run(command, capture_output=True, text=True, env=run_env, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{impl} over {link} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        results.append(json.loads((out / _result_name(impl, args.np, link, args.dtype)).read_text()))
    return results


def sweep(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out) / "raw"
    # --mca name=value: Open MPI parameters for every MPI-launched rank, as OMPI_MCA_name environment variables
    mca = {f"OMPI_MCA_{name}": value for name, value in (item.split("=", 1) for item in args.mca)}
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **mca)
    every, targets = [], Targets()
    for link in args.links:
        with links.network(link):
            results = _run_link(link, args, out, env)
        every += results
        print(f"{link}: {'MB':>8s} " + " ".join(f"{r['impl']:>13s}" for r in results) + "   memcpy   (bus GB/s)")
        for i, megabytes in enumerate(args.sizes):
            cells = " ".join(f"{r['rows'][i]['bus_gb_s'] or r['rows'][i]['alg_gb_s']:13.2f}" for r in results)
            print(f"{link}: {megabytes:8g} {cells} {results[0]['rows'][i]['memcpy_gb_s']:8.2f}")
        by = {r["impl"]: r["rows"][-1]["bus_gb_s"] for r in results}
        if results[0]["rows"][-1]["mean_bus_gb_s"]:
            print(f"{link}: {args.sizes[-1]:g} MB, bus GB/s median / mean: " + ", ".join(
                f"{r['impl']} {r['rows'][-1]['bus_gb_s']:.3f} / {r['rows'][-1]['mean_bus_gb_s']:.3f}" for r in results))
            print(f"{link}: {args.sizes[-1]:g} MB, ms per call median / mean / max: " + ", ".join(
                f"{r['impl']} {1e3 * r['rows'][-1]['seconds']:.1f} / {1e3 * r['rows'][-1]['mean_seconds']:.1f} / "
                f"{1e3 * r['rows'][-1]['max_seconds']:.1f}" for r in results))
        if by.get("mpi4py"):
            for impl in ("horovod-mpi", "horovod-gloo"):
                if by.get(impl):
                    ratio = by[impl] / by["mpi4py"]
                    verdict = targets.check(f"{link} {impl} / mpi4py bus bandwidth", ratio, ">=", 0.9)
                    print(f"{link}: {args.sizes[-1]:g} MB: {impl} / mpi4py bus bandwidth = {ratio:.2f}x {verdict}")
        if by.get("horovod-gloo") and by.get("torch-gloo"):  # the same transport, Horovod's reduction vs PyTorch's
            print(f"{link}: {args.sizes[-1]:g} MB {args.dtype}: horovod-gloo / torch-gloo bus bandwidth = "
                  f"{by['horovod-gloo'] / by['torch-gloo']:.2f}x")
    if targets.checked:  # a float16 sweep has no mpi4py to check against
        write_json(Path(args.out) / "allreduce-targets.json", targets.checked)
    return every


if __name__ == "__main__":  # the worker entry point the launchers start
    parser = argparse.ArgumentParser(prog="python -m hvdtrain.bench.allreduce")
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--link", default="loopback")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--sizes", type=float, nargs="+", default=list(DEFAULT_SIZES_MB))
    parser.add_argument("--gap-ms", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=0)
    worker(parser.parse_args())
