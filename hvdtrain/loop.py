"""The training loop, the one both framework adapters and both kinds of job run (framework-free).

Every rank runs the same sequence of collectives: the exchange's gradient allreduce each step, one small
allreduce per logging interval (train loss plus the stop vote), one per evaluation, one per checkpoint
when ranks hold exchange state of their own, and the final digest gather. A rank-dependent branch around
a collective would hang the job, so rank 0's private work (reading checkpoints, writing files) only ever
feeds the others through a broadcast.

What differs between a job of fixed size and an elastic one is only where batches come from and when
the job's state commits; that is the schedule's business (`FixedSchedule` here, `ElasticSchedule` in
hvdtrain.elastic). The schedule hands the loop `Tick`s: a batch to train on (or none), and whether this
is a point to agree on the loss, evaluate, or checkpoint.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

import numpy as np
from tqdm import tqdm

from hvdtrain import checkpoints, runtime
from hvdtrain.atomic import JsonlLog, write_json, write_text
from hvdtrain.config import Config, to_yaml
from hvdtrain.errors import ConfigError, UserError
from hvdtrain.faults import FaultInjector
from hvdtrain.schedule import learning_rate
from hvdtrain.world import world


class Adapter(Protocol):
    """What a framework provides to the loop. Tensors never cross this interface, only numbers and
    NumPy arrays. Rank and size are not the adapter's: they are `world`'s."""

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
    def exchange_state(self) -> dict[str, np.ndarray]: ...
    def load_exchange_state(self, state: dict[str, np.ndarray]) -> None: ...
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


@dataclass
class Tick:
    """One turn of the loop: train on `batch` (None: a boundary without a batch), then maybe agree on the
    loss and the stop vote (`sync`), evaluate (`epoch_end`) and checkpoint (`checkpoint`)."""
    batch: Any
    sync: bool
    epoch_end: bool
    checkpoint: bool


class Progress:
    """Where training stands. An elastic job uses Horovod's elastic state instead, which commits these."""

    def __init__(self, step: int, epoch: int, position: int = 0):
        self.step, self.epoch, self.position = step, epoch, position

    def commit(self) -> None:
        pass


class FixedSchedule:
    """A job whose size does not change: steps [start, last) of this rank's planned share."""

    elastic = False
    resets = 0

    def __init__(self, cfg: Config, dataset, adapter: Adapter):
        self.cfg, self.adapter = cfg, adapter
        self.rank_data = dataset.for_rank(cfg.train.batch_size, world.rank, world.size)
        self.steps_per_epoch = self.rank_data.steps_per_epoch
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)

    def progress(self, start_step: int, start_epoch: int, exit_code: int = 0) -> Progress:
        return Progress(start_step, start_step // self.steps_per_epoch)

    def run(self, body, progress: Progress) -> None:
        body(progress)

    def ticks(self, progress: Progress) -> Iterator[Tick]:
        every, log_every = self.cfg.checkpoint.every_steps, self.cfg.train.log_every
        batches = self.adapter.batches(self.rank_data, progress.step, self.last_step)
        for done, batch in zip(range(progress.step + 1, self.last_step + 1), batches):
            epoch_end = done % self.steps_per_epoch == 0 or done == self.last_step
            yield Tick(batch, sync=done % log_every == 0 or epoch_end, epoch_end=epoch_end,
                       checkpoint=done % every == 0 and done != self.last_step)

    def epochs_done(self, progress: Progress, tick: Optional[Tick] = None) -> int:
        return progress.step // self.steps_per_epoch

    def epoch_number(self, progress: Progress) -> int:
        """The epoch being trained, from 1."""
        return -(-progress.step // self.steps_per_epoch)

    def advance(self, progress: Progress, tick: Tick) -> None:
        progress.epoch = progress.step // self.steps_per_epoch

    def finished(self, progress: Progress) -> bool:
        return progress.step >= self.last_step

    def eval_data(self):
        return self.rank_data


def _trim_metrics(log: JsonlLog, last_step: int) -> None:
    """On resume, drop records written after the checkpoint so the log has each step once."""
    if not log.path.exists():
        return
    kept = [line for line in log.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    write_text(log.path, "".join(line + "\n" for line in kept))


@dataclass
class Start:
    step: int = 0
    epoch: int = 0
    resumed_from: Optional[str] = None
    world_size: Optional[int] = None  # of the checkpoint resumed from


def prepare_run_dir(cfg: Config, run_dir: Path, resume: str, adapter: Adapter, metrics: JsonlLog) -> Start:
    """Rank 0: load the checkpoint to resume from (if any) and reset the metrics log to match it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    start = Start()
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
        start = Start(int(meta["step"]), int(meta["epoch"]), str(source), int(meta["world_size"]))
        if start.world_size != world.size:
            print(f"note: resuming a {start.world_size}-rank checkpoint on {world.size} ranks: "
                  "the global batch and data order change", flush=True)
        break
    if tried and start.resumed_from is None and resume == "auto":
        raise ConfigError(f"--run-dir {run_dir}: no intact checkpoint among {len(tried)}; "
                          "resume from a copy or start a new run directory")
    if start.resumed_from is None and resume == "none" and checkpoints.existing(run_dir):
        raise ConfigError(f"--run-dir {run_dir}: holds checkpoints of an earlier run; "
                          "continue it with --resume auto or choose a new run directory")
    _trim_metrics(metrics, start.step)
    write_text(run_dir / "config.yaml", to_yaml(cfg))
    return start


class Trainer:
    """The loop and its parts: the adapter (framework), the schedule (fixed or elastic), the metrics log,
    checkpoints, the stop request and the fault injector."""

    def __init__(self, cfg: Config, dataset, run_dir: Path, resume: str, adapter: Adapter, threads: int):
        self.cfg, self.run_dir, self.resume, self.adapter, self.threads = cfg, run_dir, resume, adapter, threads
        if runtime.elastic_launch():
            from hvdtrain.elastic import ElasticSchedule
            self.schedule = ElasticSchedule(cfg, dataset, adapter, run_dir)
        else:
            self.schedule = FixedSchedule(cfg, dataset, adapter)
        self.metrics = JsonlLog(run_dir / "metrics.jsonl")
        self.stop = StopRequest()
        self.fault = FaultInjector()
        self.train_loss, self.record, self.train_seconds = float("nan"), {}, 0.0
        self.stopped_by: Optional[str] = None
        self.failure: Optional[UserError] = None  # rank 0's, preparing the run directory
        self.hosts: list[str] = []

    # start -------------------------------------------------------------------------------------
    def _prepare(self) -> tuple[Start, int]:
        """Rank 0 alone reads the run directory: what to resume from, and the exit code of its failure."""
        if not world.is_root:
            return Start(), 0
        try:
            return prepare_run_dir(self.cfg, self.run_dir, self.resume, self.adapter, self.metrics), 0
        except UserError as exc:
            self.failure = exc
            return Start(), exc.exit_code

    def _start(self) -> Start:
        """A fixed job: the others learn rank 0's outcome from a broadcast instead of hanging."""
        start, exit_code = self.adapter.broadcast_object(self._prepare(), "start")
        self._raise_if_failed(exit_code)
        if start.resumed_from:
            self._load_rank_state(Path(start.resumed_from), start.world_size)
        return start

    def _raise_if_failed(self, exit_code: int) -> None:
        if self.failure is not None:
            raise self.failure
        if exit_code:
            error = UserError("rank 0 could not prepare the run directory", quiet=True)
            error.exit_code = exit_code
            raise error

    def _load_rank_state(self, checkpoint: Path, saved_size: Optional[int]) -> None:
        """Each rank's own exchange state (error-feedback residual, corrected momentum) beside the checkpoint."""
        if not self.adapter.exchange_state():
            return
        state = checkpoints.read_rank_state(checkpoint, world.rank) if saved_size == world.size else None
        if state is None:
            if world.is_root:
                print(f"note: {checkpoint.name}: no exchange state for this rank and world size; "
                      "error feedback and momentum correction start from zero", flush=True)
            return
        self.adapter.load_exchange_state(state)

    def _enter(self, progress) -> None:
        """Every (re)start of training, on every rank: name the ranks and hosts."""
        self.hosts = self.adapter.gather_object(socket.gethostname(), "hosts")
        if world.is_root:
            placement = ", ".join(f"rank {r} on {h}" for r, h in enumerate(self.hosts))
            last = self.schedule.last_step if np.isfinite(self.schedule.last_step) else "end"
            print(f"hvdtrain: {world.size} rank{'s' if world.size > 1 else ''} ({placement}), "
                  f"{self.threads} threads per rank, steps {progress.step}..{last} of {self.schedule.total_steps}"
                  + (" at this size (elastic)" if self.schedule.elastic else ""), flush=True)

    # checkpoints -------------------------------------------------------------------------------
    def _checkpoint(self, progress, tick: Optional[Tick] = None) -> Path:
        path = checkpoints.path_for(self.run_dir, progress.step, self.adapter.checkpoint_suffix)
        rank_state = self.adapter.exchange_state()
        if rank_state:  # the same on every rank (it follows the config), so all take this collective
            checkpoints.write_rank_state(path, world.rank, rank_state)
            self.adapter.sum([0.0], "checkpoint.rank_state")  # every rank's file is down before rank 0 seals
        if world.is_root:
            checkpoints.write(self.run_dir, progress.step, self.adapter.checkpoint_suffix, self.adapter.save,
                              {"epoch": self.schedule.epochs_done(progress, tick), "seed": self.cfg.seed,
                               "world_size": world.size}, self.cfg.checkpoint.keep)
        return path

    # the loop ----------------------------------------------------------------------------------
    def _train(self, progress) -> None:
        """Train from `progress` to the end; an elastic job calls this again after each reset."""
        if self.schedule.elastic:
            # Horovod has just synced the state from rank 0: its failure, if any, is every rank's now.
            self._raise_if_failed(progress.exit_code)
            self.adapter.resync_exchange()
        self._enter(progress)
        running_loss, running_count = 0.0, 0
        interval_start, interval_samples = time.perf_counter(), 0
        lr = learning_rate(self.cfg.train, progress.step, world.size, self.schedule.total_steps)
        for tick in self.schedule.ticks(progress):
            if tick.batch is not None:
                self.fault.at_step(progress.step)
                lr = learning_rate(self.cfg.train, progress.step, world.size, self.schedule.total_steps)
                running_loss += self.adapter.train_step(tick.batch, lr)
                running_count += 1
                interval_samples += self.cfg.train.batch_size * world.size
                progress.step += 1
                self.progress_bar.update(1)
            stop_votes = 0.0
            if tick.sync:
                # One allreduce carries the loss and whether any rank was asked to stop.
                loss_sum, stop_votes = self.adapter.sum(
                    [running_loss / max(1, running_count), float(self.stop.requested)], "log")
                self.train_loss = loss_sum / world.size
                running_loss, running_count = 0.0, 0
                self.progress_bar.set_postfix(loss=f"{self.train_loss:.4f}", lr=f"{lr:.4g}")
            if tick.epoch_end:
                elapsed = time.perf_counter() - interval_start
                self.train_seconds += elapsed
                self._evaluate(progress, lr, interval_samples / max(elapsed, 1e-9))
                interval_start, interval_samples = time.perf_counter(), 0
            if tick.checkpoint:
                self._checkpoint(progress, tick)
            self.schedule.advance(progress, tick)
            if tick.sync or tick.epoch_end:
                progress.commit()  # an elastic job's restore point; a resize takes effect here
            if stop_votes > 0 and not self.schedule.finished(progress):
                self.stopped_by = self.stop.signal_name or "a signal to another rank"
                return

    def _evaluate(self, progress, lr: float, samples_per_s: float) -> None:
        loss_total, correct, count = self.adapter.sum(list(self.adapter.eval_sums(self.schedule.eval_data())), "eval")
        self.record = {"step": progress.step, "epoch": self.schedule.epoch_number(progress),
                       "train_loss": self.train_loss, "test_loss": loss_total / count,
                       "test_accuracy": correct / count, "samples_per_s": samples_per_s, "lr": lr,
                       "world_size": world.size, **self.adapter.stats()}
        if world.is_root:
            self.metrics.append(self.record)
            ranks = f" on {world.size} rank(s)" if self.schedule.elastic else ""
            self.progress_bar.write(f"epoch {self.record['epoch']}: train_loss {self.train_loss:.4f}  "
                                    f"test_loss {self.record['test_loss']:.4f}  test_accuracy "
                                    f"{self.record['test_accuracy']:.4f}  {samples_per_s:.0f} samples/s{ranks}")

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        if self.schedule.elastic:
            # A worker that joins later runs this too, while the others are in Horovod's reset: no collective
            # may come before the state sync. Rank 0's outcome travels in the synced state instead.
            start, exit_code = self._prepare()
            progress = self.schedule.progress(start.step, start.epoch, exit_code)
        else:
            start = self._start()
            progress = self.schedule.progress(start.step, start.epoch)
            self.adapter.broadcast_state()  # rank 0's state (fresh or resumed) becomes every rank's state
        # In a batch job's log file, a bar redrawn every second is noise: redraw every 30 s there.
        total = self.schedule.last_step if np.isfinite(self.schedule.last_step) else None
        self.progress_bar = tqdm(total=total, initial=start.step, disable=not world.is_root, unit="step",
                                 dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
        self.schedule.run(self._train, progress)
        self.progress_bar.close()

        final_checkpoint = self._checkpoint(progress)
        if self.stopped_by and world.is_root:
            print(f"checkpointed at step {progress.step} after {self.stopped_by}; continue with --resume auto",
                  flush=True)
        digests = self.adapter.gather_object(self.adapter.weights_digest(), "weights_digest")
        summary = {
            "framework": self.adapter.framework, "status": "stopped" if self.stopped_by else "completed",
            "stopped_by": self.stopped_by, "world_size": world.size, "elastic": self.schedule.elastic,
            "resets": self.schedule.resets, "hosts": self.hosts, "threads_per_rank": self.threads,
            "steps": progress.step, "total_steps": self.schedule.total_steps,
            "global_batch": self.cfg.train.batch_size * world.size, "resumed_from": start.resumed_from,
            "final": self.record, "wall_seconds": time.perf_counter() - started,
            "train_seconds": self.train_seconds,
            "weights_digests": digests, "weights_identical": len(set(digests)) == 1,
            "checkpoint": str(final_checkpoint),
            "versions": {"python": platform.python_version(), **self.adapter.versions()},
            "horovod_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("HOROVOD_")},
        }
        if not self.schedule.elastic:
            summary["steps_per_epoch"] = self.schedule.steps_per_epoch
        if world.is_root:
            write_json(self.run_dir / "summary.json", summary)
        return summary


def run(cfg: Config, dataset, run_dir: Path, resume: str, adapter: Adapter, threads: int) -> dict[str, Any]:
    return Trainer(cfg, dataset, run_dir, resume, adapter, threads).run()
