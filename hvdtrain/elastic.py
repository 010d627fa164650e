"""Elastic training, a component of the one loop: `horovodrun --min-np 1 --max-np N --host-discovery-script ...`.

The job shrinks when a worker is removed (or lost) and grows when one is added, and continues the same
epoch without repeating or skipping samples: the epoch's stream is consumed in rounds
(`ShardPlan.elastic_round`), and Horovod's elastic state (model, optimizer, epoch, stream position, step)
commits at every round boundary. A host change takes effect at the next commit; a lost rank rolls the
others back to the last one. Every size is read live from `world`, never kept: after a reset the same
process has a new rank and size. HDF5 shard sets only; launched by horovodrun's elastic mode (Gloo),
which sets HOROVOD_ELASTIC=1.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterator, Optional

from hvdtrain.atomic import JsonlLog
from hvdtrain.config import Config
from hvdtrain.errors import ConfigError
from hvdtrain.loop import Tick
from hvdtrain.world import world


class SampleAudit:
    """data.audit: the sample ids each process trained on, one JSON line per committed round."""

    def __init__(self, run_dir: Path):
        self.log = JsonlLog(run_dir / "sample-audit" / f"{socket.gethostname()}-{os.getpid()}.jsonl")

    def record(self, epoch: int, position: int, ids) -> None:
        self.log.append({"epoch": epoch, "position": position, "rank": world.rank, "size": world.size,
                         "ids": [int(i) for i in ids]})


class ElasticSchedule:
    """Rounds of the epoch's stream; the state commits after each round and at each epoch's end."""

    elastic = True

    def __init__(self, cfg: Config, dataset, adapter, run_dir: Path):
        if cfg.data.source != "hdf5":
            raise ConfigError("data.source: elastic training re-plans HDF5 shard sets when the job resizes; "
                              "write the data with `hvdtrain data shard` and set data.source: hdf5")
        if not hasattr(adapter, "elastic_state"):
            raise ConfigError(f"framework: elastic training (horovodrun --min-np/--max-np) is not available for "
                              f"framework {adapter.framework}; launch it with a fixed -np")
        self.cfg, self.dataset, self.adapter = cfg, dataset, adapter
        self.batch = cfg.train.batch_size
        whole = dataset.for_rank(self.batch, 0, 1)  # the epoch stream and reader, independent of the size
        self.plan, self.whole = whole.plan, whole
        self.state = None
        self.last_step = cfg.train.max_steps or float("inf")
        self.audit = SampleAudit(run_dir) if cfg.data.audit else None
        self.resets = 0  # counted by this process (state changed outside a commit is lost on sync)
        self._round: Optional[tuple] = None  # (window, consumed, batches trained) of the round in flight
        self._eval_shares: dict[tuple[int, int], object] = {}  # (rank, size) -> test share, files kept open

    def progress(self, start_step: int, start_epoch: int, exit_code: int):
        """Horovod's elastic state: synced from rank 0 at the start and after every reset, so rank 0's
        resume point and its failure to prepare the run directory (`exit_code`) reach every rank, joiners
        included. Exchange state (error feedback) is not restored from checkpoints in elastic jobs."""
        # The schedule's length at the starting size (a resize changes the steps per epoch, not the epochs):
        # kept in the synced state, so a worker that joins later follows the same learning-rate schedule.
        total_steps = self.cfg.train.epochs * (self.plan.total // (self.batch * world.size))
        self.state = self.adapter.elastic_state(epoch=start_epoch, position=0, step=start_step, exit_code=exit_code,
                                                total_steps=total_steps)
        self.state.register_reset_callbacks([self._on_reset])
        return self.state

    @property
    def total_steps(self) -> int:
        return self.state.total_steps

    def _on_reset(self) -> None:
        """Horovod's reset, before the state sync: no collective here (a joining worker is not in it)."""
        self.resets += 1
        if world.is_root:
            print(f"elastic: continuing on {world.size} rank(s)", flush=True)

    def run(self, body, state) -> None:
        world.horovod.elastic.run(body)(state)

    def ticks(self, state) -> Iterator[Tick]:
        if world.is_root and state.position:
            print(f"elastic: at epoch {state.epoch + 1}, sample {state.position} of the epoch, step {state.step}",
                  flush=True)
        while state.epoch < self.cfg.train.epochs and state.step < self.last_step:
            window, consumed = self.plan.elastic_round(state.epoch, state.position, world.rank, world.size)
            if window is None:
                self._round = None
                yield Tick(None, sync=True, epoch_end=True, checkpoint=True)
                continue
            x, y = self.whole.read_window(window)
            b = self.batch
            count = int(min(len(y) // b, self.last_step - state.step))
            self._round = (window, consumed, count)
            for i in range(count):
                yield Tick((x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]), sync=i == count - 1,
                           epoch_end=False, checkpoint=False)

    def advance(self, state, tick: Tick) -> None:
        """Called after each tick, before the commit."""
        if tick.epoch_end:
            state.epoch, state.position = state.epoch + 1, 0
        elif tick.sync:
            window, consumed, count = self._round
            if self.audit is not None:
                self.audit.record(state.epoch, state.position, self.plan.sample_ids(window)[:count * self.batch])
            state.position += consumed

    def epochs_done(self, state, tick: Optional[Tick] = None) -> int:
        return state.epoch + (1 if tick is not None and tick.epoch_end else 0)

    def epoch_number(self, state) -> int:
        return state.epoch + 1

    def finished(self, state) -> bool:
        return state.epoch >= self.cfg.train.epochs or state.step >= self.last_step

    def eval_data(self):
        share = (world.rank, world.size)
        if share not in self._eval_shares:
            self._eval_shares[share] = self.dataset.for_rank(self.batch, *share)
        return self._eval_shares[share]
