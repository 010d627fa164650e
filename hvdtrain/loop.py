"""The training loop, shared by the PyTorch and TensorFlow adapters (framework-free).

Every rank runs the same sequence of collectives: the optimizer's gradient allreduce each step, one
small allreduce per logging interval (train loss plus the stop flag), one per evaluation, and the final
digest gather. A rank-dependent branch around a collective would hang the job, so rank 0's private work
(reading checkpoints, writing files) only ever feeds the others through a broadcast.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

from tqdm import tqdm

from hvdtrain import checkpoints
from hvdtrain.config import Config, to_yaml
from hvdtrain.errors import ConfigError, UserError
from hvdtrain.faults import FaultInjector
from hvdtrain.atomic import JsonlLog, write_json, write_text
from hvdtrain.schedule import learning_rate


class Adapter(Protocol):
    """What a framework provides to the loop. Tensors never cross this interface, only numbers."""

    rank: int
    size: int
    framework: str
    checkpoint_suffix: str

    def sum(self, values: list[float], name: str) -> list[float]: ...
    def gather_object(self, obj: Any, name: str) -> list: ...
    def broadcast_object(self, obj: Any, name: str) -> Any: ...
    def broadcast_state(self) -> None: ...
    def batches(self, rank_data, start_step: int, last_step: int) -> Iterator: ...
    def train_step(self, batch, lr: float) -> float: ...
    def eval_sums(self, rank_data) -> tuple[float, float, float]: ...
    def save(self, path: Path, meta: dict) -> None: ...
    def load(self, path: Path) -> dict: ...
    def weights_digest(self) -> str: ...
    def stats(self) -> dict: ...
    def versions(self) -> dict: ...


class StopRequest:
    """SIGUSR1 (Slurm's warning before the time limit) or SIGTERM (preemption): finish cleanly."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def _trim_metrics(log: JsonlLog, last_step: int) -> None:
    """On resume, drop records written after the checkpoint so the log has each step once."""
    if not log.path.exists():
        return
    kept = [line for line in log.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    write_text(log.path, "".join(line + "\n" for line in kept))


def prepare_run_dir(cfg: Config, run_dir: Path, resume: str, adapter: Adapter,
                    metrics: JsonlLog) -> tuple[int, int, Optional[str]]:
    """Rank 0: load the checkpoint to resume from (if any) and reset the metrics log to match it.
    Returns the checkpoint's step and epoch (0, 0 when starting fresh) and its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    start_step, start_epoch, resumed_from = 0, 0, None
    tried = checkpoints.candidates(run_dir, resume)
    for source in tried:
        problem = checkpoints.damage(source)
        if problem is not None and resume != "auto" and not checkpoints.has_digest(source):
            print(f"warning: {source} has no digest to verify; loading it as given", flush=True)
            problem = None
        if problem is None:
            try:
                meta = adapter.load(source)
            except Exception as exc:  # any unreadable file is the same finding: fall back or say so
                problem = f"unreadable ({type(exc).__name__})"
        if problem is not None:
            if resume != "auto":
                raise ConfigError(f"--resume: {source}: {problem}")
            print(f"warning: skipping checkpoint {source.name}: {problem}; falling back to an older one",
                  flush=True)
            continue
        start_step, start_epoch, resumed_from = int(meta["step"]), int(meta["epoch"]), str(source)
        if meta["world_size"] != adapter.size:
            print(f"note: resuming a {meta['world_size']}-rank checkpoint on {adapter.size} ranks: "
                  "the global batch and data order change", flush=True)
        break
    if tried and resumed_from is None and resume == "auto":
        raise ConfigError(f"--run-dir {run_dir}: no intact checkpoint among {len(tried)}; "
                          "resume from a copy or start a new run directory")
    if resumed_from is None and resume == "none" and checkpoints.existing(run_dir):
        raise ConfigError(f"--run-dir {run_dir}: holds checkpoints of an earlier run; "
                          "continue it with --resume auto or choose a new run directory")
    _trim_metrics(metrics, start_step)
    write_text(run_dir / "config.yaml", to_yaml(cfg))
    return start_step, start_epoch, resumed_from


def run(cfg: Config, dataset, run_dir: Path, resume: str, adapter: Adapter, threads: int) -> dict[str, Any]:
    rank, size = adapter.rank, adapter.size
    is_root = rank == 0
    stop = StopRequest()
    fault = FaultInjector(rank)
    rank_data = dataset.for_rank(cfg.train.batch_size, rank, size)
    steps_per_epoch = rank_data.steps_per_epoch
    global_batch = cfg.train.batch_size * size
    total_steps = cfg.train.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.train.max_steps or total_steps)

    metrics = JsonlLog(run_dir / "metrics.jsonl")
    start_step, resumed_from, failure = 0, None, None
    if is_root:
        try:
            start_step, _, resumed_from = prepare_run_dir(cfg, run_dir, resume, adapter, metrics)
        except UserError as exc:
            failure = exc
    # Rank 0 alone reads the run directory; the others learn its outcome here instead of hanging.
    start_step, exit_code = adapter.broadcast_object((start_step, failure.exit_code if failure else 0), "start")
    if failure is not None:
        raise failure
    if exit_code:
        error = UserError("rank 0 could not prepare the run directory", quiet=True)
        error.exit_code = exit_code
        raise error
    adapter.broadcast_state()  # rank 0's state (fresh or resumed) becomes every rank's state
    hosts = adapter.gather_object(socket.gethostname(), "hosts")
    if is_root:
        placement = ", ".join(f"rank {r} on {h}" for r, h in enumerate(hosts))
        print(f"hvdtrain: {size} rank{'s' if size > 1 else ''} ({placement}), {threads} threads per rank, "
              f"steps {start_step}..{last_step} of {total_steps}", flush=True)

    def checkpoint(step: int) -> Path:
        if not is_root:
            return checkpoints.path_for(run_dir, step, adapter.checkpoint_suffix)
        return checkpoints.write(run_dir, step, adapter.checkpoint_suffix, adapter.save,
                                 {"epoch": step // steps_per_epoch, "seed": cfg.seed, "world_size": size},
                                 cfg.checkpoint.keep)

    # In a batch job's log file, a bar redrawn every second is noise: redraw every 30 s there.
    progress = tqdm(total=last_step, initial=start_step, disable=not is_root, unit="step",
                    dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    running_loss, running_count = 0.0, 0
    interval_start, interval_samples, train_seconds = time.perf_counter(), 0, 0.0
    record: dict[str, Any] = {}
    started = time.perf_counter()
    done, stopped_by = start_step, None
    for step, batch in zip(range(start_step, last_step), adapter.batches(rank_data, start_step, last_step)):
        fault.at_step(step)
        lr = learning_rate(cfg.train, step, size, total_steps)
        running_loss += adapter.train_step(batch, lr)
        running_count += 1
        interval_samples += global_batch
        done = step + 1
        progress.update(1)

        end_of_epoch = done % steps_per_epoch == 0 or done == last_step
        if done % cfg.train.log_every == 0 or end_of_epoch:
            # One allreduce carries the loss and whether any rank was asked to stop.
            loss_sum, stop_votes = adapter.sum([running_loss / running_count, float(stop.requested)], "log")
            train_loss = loss_sum / size
            running_loss, running_count = 0.0, 0
            progress.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.4g}")
            if end_of_epoch:
                train_seconds += time.perf_counter() - interval_start
                samples_per_s = interval_samples / (time.perf_counter() - interval_start)
                loss_total, correct, count = adapter.sum(list(adapter.eval_sums(rank_data)), "eval")
                record = {"step": done, "epoch": -(-done // steps_per_epoch), "train_loss": train_loss,
                          "test_loss": loss_total / count, "test_accuracy": correct / count,
                          "samples_per_s": samples_per_s, "lr": lr, **adapter.stats()}
                if is_root:
                    metrics.append(record)
                    progress.write(f"epoch {record['epoch']}: train_loss {train_loss:.4f}  "
                                   f"test_loss {record['test_loss']:.4f}  test_accuracy "
                                   f"{record['test_accuracy']:.4f}  {samples_per_s:.0f} samples/s")
                interval_start, interval_samples = time.perf_counter(), 0
            if stop_votes > 0 and done < last_step:
                stopped_by = stop.signal_name or "a signal to another rank"
                break
        if done % cfg.checkpoint.every_steps == 0 and done != last_step:
            checkpoint(done)
    progress.close()

    final_checkpoint = checkpoint(done)
    if stopped_by and is_root:
        print(f"checkpointed at step {done} after {stopped_by}; continue with --resume auto", flush=True)
    digests = adapter.gather_object(adapter.weights_digest(), "weights_digest")
    summary = {
        "framework": adapter.framework, "status": "stopped" if stopped_by else "completed",
        "stopped_by": stopped_by, "world_size": size, "hosts": hosts, "threads_per_rank": threads,
        "steps": done, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "global_batch": global_batch, "resumed_from": resumed_from,
        "final": record, "wall_seconds": time.perf_counter() - started, "train_seconds": train_seconds,
        "weights_digests": digests, "weights_identical": len(set(digests)) == 1,
        "checkpoint": str(final_checkpoint),
        "versions": {"python": platform.python_version(), **adapter.versions()},
        "horovod_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("HOROVOD_")},
    }
    if is_root:
        write_json(run_dir / "summary.json", summary)
    return summary
