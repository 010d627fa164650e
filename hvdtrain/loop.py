"""The training loop, the one both framework adapters and both kinds of job run (framework-free).

Every rank runs the same sequence of collectives: the exchange's gradient allreduce each step, one small
allreduce per logging interval (train loss, gradient norms, the stop vote and the divergence vote), one
per evaluation, one per checkpoint when ranks hold exchange state of their own, and the final digest
gather. The divergence vote rides on the interval's allreduce, and every checkpoint step is such an
interval's end, so all ranks see a non-finite loss, gradient norm or weight at the same step and no
checkpoint of non-finite weights is ever written. A rank-dependent branch around
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
from typing import Any, Iterator, NamedTuple, Optional, Protocol

import numpy as np
from tqdm import tqdm

from hvdtrain import checkpoints, runtime, tasks
from hvdtrain.atomic import JsonlLog, write_json, write_text
from hvdtrain.config import Config, to_yaml
from hvdtrain.errors import ConfigError, DivergenceError, UserError
from hvdtrain.faults import FaultInjector
from hvdtrain.metrics import MetricSet
from hvdtrain.tensorboard import TensorBoard
from hvdtrain.schedule import learning_rate
from hvdtrain.world import world


class StepResult(NamedTuple):
    loss: float
    grad_norm: float                    # of the averaged gradient (what the optimizer applies)
    local_grad_norm: Optional[float]    # of this rank's own gradient; None where it is never formed apart


class Adapter(Protocol):
    """What a framework provides to the loop. Tensors never cross this interface, only numbers and
    NumPy arrays. Rank and size are not the adapter's: they are `world`'s."""

    framework: str
    checkpoint_suffix: str
    device_name: str  # where this rank computes: "cpu", "cuda:0 (NVIDIA H200)", ...
    exchange: str  # how gradients are averaged: "flat" or "overlap" (runtime.exchange_mode)

    def sum(self, values: list[float], name: str) -> list[float]: ...
    def gather_object(self, obj: Any, name: str) -> list: ...
    def broadcast_object(self, obj: Any, name: str) -> Any: ...
    def broadcast_state(self) -> None: ...
    def batches(self, rank_data, start_step: int, last_step: int) -> Iterator: ...
    def train_step(self, batch, lr: float) -> StepResult: ...
    def eval_sums(self, rank_data, metrics: MetricSet) -> list[float]:
        """[loss sum, sample count, *metrics' sums] over this rank's share of the test set."""
    def save(self, path: Path, meta: dict) -> None: ...
    def load(self, path: Path) -> dict: ...
    def exchange_state(self) -> dict[str, np.ndarray]: ...
    def load_exchange_state(self, state: dict[str, np.ndarray]) -> None: ...
    def weights_digest(self) -> str: ...
    def weights_finite(self) -> bool: ...
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
            checkpoint = done % every == 0 and done != self.last_step
            yield Tick(batch, sync=done % log_every == 0 or epoch_end or checkpoint, epoch_end=epoch_end,
                       checkpoint=checkpoint)

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


def prepare_run_dir(cfg: Config, run_dir: Path, resume: str, adapter: Adapter, metrics: JsonlLog,
                    last_step: float = float("inf")) -> Start:
    """Rank 0: load the checkpoint to resume from (if any) and reset the metrics log to match it. A
    checkpoint at or past `last_step` leaves nothing to train: refused before anything is rewritten, so a
    finished run's summary, metrics and config stay as they are."""
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
    if start.resumed_from is not None and start.step >= last_step:
        raise ConfigError(f"--run-dir {run_dir}: {Path(start.resumed_from).name} is at step {start.step} and this "
                          f"config ends at step {last_step:.0f}: nothing to train (the run's outputs are left as "
                          "they are); raise train.epochs or train.max_steps to continue it, or choose a new run "
                          "directory")
    _trim_metrics(metrics, start.step)
    write_text(run_dir / "config.yaml", to_yaml(cfg))
    return start


class ProgressReport:
    """Rank 0's progress. On a terminal, a tqdm bar; in a log file (a Slurm job's output, or any rank
    under horovodrun/mpirun, whose output is piped), a plain line at most every `LOG_SECONDS`: a redrawn
    bar would fill the log with fragments."""

    LOG_SECONDS = 30.0

    def __init__(self, total: Optional[int], initial: int, enabled: bool):
        self.enabled, self.total = enabled, total
        self.bar = (tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)
                    if enabled and sys.stderr.isatty() else None)
        self.last_line = time.perf_counter()

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def interval(self, step: int, values: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
        elif self.enabled and time.perf_counter() - self.last_line >= self.LOG_SECONDS:
            self.last_line = time.perf_counter()
            of = f"/{self.total}" if self.total else ""
            self.write(f"step {step}{of}  " + "  ".join(f"{k} {v:.4g}" for k, v in values.items()))

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Interval:
    """The steps since the last sync: sums of what the log reports, and whether any value was non-finite."""

    def __init__(self, step: int):
        self.first_step, self.count, self.nonfinite = step, 0, False
        self.loss = self.grad_norm = self.local_grad_norm = 0.0
        self.has_local = True

    def add(self, result: StepResult) -> None:
        self.count += 1
        values = [result.loss, result.grad_norm] + ([result.local_grad_norm] if result.local_grad_norm is not None else [])
        self.nonfinite |= not all(np.isfinite(values))
        self.loss += result.loss
        self.grad_norm += result.grad_norm
        self.has_local = result.local_grad_norm is not None
        self.local_grad_norm += result.local_grad_norm or 0.0

    def values(self, stop: bool, weights_bad: bool) -> list[float]:
        """This rank's part of the interval's allreduce (the same length on every rank)."""
        n = max(1, self.count)
        return [self.loss / n, float(stop), float(self.nonfinite or weights_bad), self.grad_norm / n,
                self.local_grad_norm / n]

    def agreed(self, totals: list[float], size: int) -> dict[str, float]:
        means = {"loss": totals[0] / size, "grad_norm": totals[3] / size}
        if self.has_local:
            means["grad_norm_local"] = totals[4] / size  # mean over ranks of each rank's own norm
        return means


class Diverged(Exception):
    """Raised out of the loop on every rank at the same step; Trainer.run stops or rolls back."""

    def __init__(self, first_step: int, last_step: int, loss: float, grad_norm: float):
        super().__init__(f"steps {first_step}..{last_step}")
        self.first_step, self.last_step, self.loss, self.grad_norm = first_step, last_step, loss, grad_norm


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
        self.scores = MetricSet(tasks.metric_names(cfg), dataset.num_classes)
        self.tensorboard = TensorBoard(run_dir / "tensorboard") if world.is_root else None
        self.stop = StopRequest()
        self.fault = FaultInjector()
        self.train_loss, self.record, self.train_seconds = float("nan"), {}, 0.0
        self.stopped_by: Optional[str] = None
        self.failure: Optional[UserError] = None  # rank 0's, preparing the run directory
        self.lr_scale, self.rollbacks = 1.0, 0
        self.grad_norms: dict[str, float] = {}
        self.hosts: list[str] = []
        self.devices: list[str] = []

    # start -------------------------------------------------------------------------------------
    def _prepare(self) -> tuple[Start, int]:
        """Rank 0 alone reads the run directory: what to resume from, and the exit code of its failure."""
        if not world.is_root:
            return Start(), 0
        try:
            return prepare_run_dir(self.cfg, self.run_dir, self.resume, self.adapter, self.metrics,
                                   self.schedule.last_step), 0
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
        placed = self.adapter.gather_object((socket.gethostname(), self.adapter.device_name), "hosts")
        self.hosts, self.devices = [host for host, _ in placed], [device for _, device in placed]
        if world.is_root:
            placement = ", ".join(f"rank {r} on {h}" + ("" if d == "cpu" else f" {d}")
                                  for r, (h, d) in enumerate(placed))
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
        interval = Interval(progress.step)
        interval_start, interval_samples = time.perf_counter(), 0
        lr = self._lr(progress.step)
        for tick in self.schedule.ticks(progress):
            if tick.batch is not None:
                self.fault.at_step(progress.step)
                lr = self._lr(progress.step)
                interval.add(self.adapter.train_step(tick.batch, lr))
                interval_samples += self.cfg.train.batch_size * world.size
                progress.step += 1
                self.progress_bar.step()
            stop_votes = 0.0
            if tick.sync:
                weights_bad = (tick.checkpoint or tick.epoch_end) and not self.adapter.weights_finite()
                # One allreduce: the interval's means, whether any rank was asked to stop, whether any diverged.
                totals = self.adapter.sum(interval.values(self.stop.requested, weights_bad), "log")
                stop_votes = totals[1]
                means = interval.agreed(totals, world.size)
                if totals[2] > 0:
                    raise Diverged(interval.first_step + 1, progress.step, means["loss"], means["grad_norm"])
                if interval.count:  # (an elastic epoch's end comes without a batch of its own)
                    self.train_loss = means.pop("loss")
                    self.grad_norms = means
                    self.progress_bar.interval(progress.step, {"loss": self.train_loss, "lr": lr,
                                                               "grad_norm": means["grad_norm"]})
                interval = Interval(progress.step)
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

    def _lr(self, step: int) -> float:
        return learning_rate(self.cfg.train, step, world.size, self.schedule.total_steps) * self.lr_scale

    # divergence --------------------------------------------------------------------------------
    def _last_good_checkpoint(self) -> Optional[Path]:
        """Every checkpoint on disk is good: none is written past a non-finite value. The newest intact one."""
        for path in reversed(checkpoints.existing(self.run_dir)):
            if checkpoints.damage(path) is None:
                return path
        return None

    def _after_divergence(self, diverged: Diverged) -> Progress:
        """Stop with one line (exit 3), or roll every rank back to the last good checkpoint."""
        what = f"train_loss {diverged.loss:.4g}, grad_norm {diverged.grad_norm:.4g}"
        good = self._last_good_checkpoint() if world.is_root else None
        if self.cfg.train.on_divergence == "rollback" and not self.schedule.elastic \
                and self.rollbacks < self.cfg.train.max_rollbacks:
            return self._roll_back(diverged, what)
        why = ("" if self.cfg.train.on_divergence == "stop" else
               f" after {self.rollbacks} rollback(s) (train.max_rollbacks)" if not self.schedule.elastic else
               " (elastic jobs do not roll back)")
        raise DivergenceError(f"training diverged in steps {diverged.first_step}..{diverged.last_step} ({what}){why}; "
                              f"last good checkpoint: {good or 'none'}; lower train.lr, or set "
                              "train.on_divergence=rollback", quiet=not world.is_root)

    def _roll_back(self, diverged: Diverged, what: str) -> Progress:
        start = Start()
        if world.is_root:
            good = self._last_good_checkpoint()
            meta = self.adapter.load(good)
            start = Start(int(meta["step"]), int(meta["epoch"]), str(good), int(meta["world_size"]))
        start = self.adapter.broadcast_object(start, "rollback")
        self.adapter.broadcast_state()
        self._load_rank_state(Path(start.resumed_from), start.world_size)
        self.rollbacks += 1
        self.lr_scale *= self.cfg.train.rollback_lr_factor
        if world.is_root:
            _trim_metrics(self.metrics, start.step)
            self.metrics.append({"step": start.step, "event": "rollback", "diverged_in": [diverged.first_step,
                                 diverged.last_step], "value": what, "lr_scale": self.lr_scale})
            self.progress_bar.write(f"diverged in steps {diverged.first_step}..{diverged.last_step} ({what}): rolled "
                                    f"back to step {start.step}, learning rate x{self.lr_scale:g} (rollback "
                                    f"{self.rollbacks} of {self.cfg.train.max_rollbacks})")
        return self.schedule.progress(start.step, start.epoch)

    def _evaluate(self, progress, lr: float, samples_per_s: float) -> None:
        # one allreduce: the loss, the count and every metric's sums, the same length on every rank
        totals = self.adapter.sum(self.adapter.eval_sums(self.schedule.eval_data(), self.scores), "eval")
        scores = self.scores.values(totals[2:])
        self.record = {"step": progress.step, "epoch": self.schedule.epoch_number(progress),
                       "train_loss": self.train_loss, "test_loss": totals[0] / max(totals[1], 1), **scores,
                       "samples_per_s": samples_per_s, "lr": lr,
                       "world_size": world.size, **self.grad_norms, **self.adapter.stats()}
        if self.rollbacks:
            self.record["rollbacks"] = self.rollbacks
        if world.is_root:
            self.metrics.append(self.record)
            self.tensorboard.write(progress.step, self.record)
            ranks = f" on {world.size} rank(s)" if self.schedule.elastic else ""
            shown = "  ".join(f"{name} {value:.4f}" for name, value in scores.items())
            self.progress_bar.write(f"epoch {self.record['epoch']}: train_loss {self.train_loss:.4f}  "
                                    f"grad_norm {self.record.get('grad_norm', float('nan')):.3g}  "
                                    f"test_loss {self.record['test_loss']:.4f}  {shown}  "
                                    f"{samples_per_s:.0f} samples/s{ranks}")

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
            if self.cfg.train.on_divergence == "rollback" and start.resumed_from is None:
                self._checkpoint(progress)  # the state a divergence before the first checkpoint rolls back to
        total = self.schedule.last_step if np.isfinite(self.schedule.last_step) else None
        self.progress_bar = ProgressReport(total, start.step, world.is_root)
        while True:
            try:
                self.schedule.run(self._train, progress)
                break
            except Diverged as diverged:
                progress = self._after_divergence(diverged)
        self.progress_bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

        final_checkpoint = self._checkpoint(progress)
        if self.stopped_by and world.is_root:
            print(f"checkpointed at step {progress.step} after {self.stopped_by}; continue with --resume auto",
                  flush=True)
        digests = self.adapter.gather_object(self.adapter.weights_digest(), "weights_digest")
        summary = {
            "framework": self.adapter.framework, "task": self.cfg.task, "headline": tasks.headline(self.cfg),
            "status": "stopped" if self.stopped_by else "completed",
            "stopped_by": self.stopped_by, "world_size": world.size, "elastic": self.schedule.elastic,
            "resets": self.schedule.resets, "hosts": self.hosts, "devices": self.devices,
            "precision": self.cfg.train.precision, "threads_per_rank": self.threads,
            "blas_threads": runtime.numpy_threads(),
            "horovod_collectives": world.collectives,
            "gradient_exchange": self.adapter.exchange,
            "steps": progress.step, "total_steps": self.schedule.total_steps,
            "global_batch": self.cfg.train.batch_size * world.size, "resumed_from": start.resumed_from,
            "final": self.record, "wall_seconds": time.perf_counter() - started,
            "train_seconds": self.train_seconds, "rollbacks": self.rollbacks,
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
