"""Training data for one rank: in-memory arrays or HDF5 shard sets (framework-free, no MPI).

In-memory sources (digits, synthetic, npz) come from hvdtrain.sources, as `hvdtrain data shard` does.

The in-memory plan (BatchPlan) makes data-parallel training equal to single-process training with the global batch:
each epoch draws one seeded permutation; global batch s is a contiguous slice of it and rank r
takes the r-th per-rank slice of that global batch. The tail that does not fill a global batch is
dropped, so every rank takes the same number of steps (an uneven count would hang Horovod).
Shard sets use hvdtrain.shards.plan, which has the same guarantees but reads whole chunks.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np

from hvdtrain.config import DataConfig
from hvdtrain.errors import ConfigError
from hvdtrain.shards.index import ShardSet, open_set, verify
from hvdtrain.shards.plan import Segment, ShardPlan, Window, eval_segments
from hvdtrain.shards.reader import ShardReader, prefetched_batches
from hvdtrain.sources import open_source

EVAL_READ_BYTES = 16 << 20


@dataclass
class Arrays:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_arrays(cfg: DataConfig, seed: int) -> Arrays:
    """The config's in-memory source, split and loaded: the samples `hvdtrain data shard` would write."""
    splits = open_source(cfg.source, cfg.test_fraction, seed, cfg.synthetic_shape, cfg.synthetic_classes,
                         cfg.synthetic_samples, origin="data.source")
    (x_train, y_train), (x_test, y_test) = splits["train"].arrays(), splits["test"].arrays()
    return Arrays(x_train.astype(np.float32, copy=False), y_train, x_test.astype(np.float32, copy=False), y_test,
                  splits["train"].num_classes)


@dataclass(frozen=True)
class BatchPlan:
    num_samples: int
    batch_size: int  # per rank
    rank: int
    size: int
    seed: int

    def __post_init__(self) -> None:
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train.batch_size: {self.batch_size} x {self.size} ranks exceeds the "
                f"{self.num_samples} training samples; lower the batch size")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @lru_cache(maxsize=2)
    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def indices(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        order = self.epoch_order(epoch)
        start = step_in_epoch * self.global_batch + self.rank * self.batch_size
        return order[start:start + self.batch_size]


def eval_indices(num_samples: int, rank: int, size: int) -> np.ndarray:
    """This rank's disjoint share of the test set; shares cover it exactly once."""
    return np.arange(rank, num_samples, size)


class InMemoryRankData:
    """A rank's view of an in-memory data set (digits, synthetic, npz)."""

    windows = None  # nothing for worker processes to read

    def __init__(self, arrays: Arrays, plan: BatchPlan):
        self.arrays, self.plan = arrays, plan
        self.steps_per_epoch = plan.steps_per_epoch

    def batches(self, start_step: int, last_step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for step in range(start_step, last_step):
            idx = self.plan.indices(*divmod(step, self.steps_per_epoch))
            yield self.arrays.x_train[idx], self.arrays.y_train[idx]

    def eval_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        idx = eval_indices(len(self.arrays.y_test), self.plan.rank, self.plan.size)
        yield self.arrays.x_test[idx], self.arrays.y_test[idx]


class ShardRankData:
    """A rank's view of HDF5 shard sets: planned windows of whole chunks, shuffled inside each window."""

    def __init__(self, train: ShardSet, test: ShardSet, plan: ShardPlan):
        self.train_reader, self.test_reader, self.plan = ShardReader(train), ShardReader(test), plan
        self.steps_per_epoch = plan.batches_per_rank

    def windows(self, start_step: int, last_step: int) -> list[Window]:
        """Windows covering steps [start_step, last_step), across epochs."""
        result = []
        for epoch in range(start_step // self.steps_per_epoch, -(-last_step // self.steps_per_epoch)):
            first = max(0, start_step - epoch * self.steps_per_epoch)
            result += [w for w in self.plan.windows(epoch, first)
                       if epoch * self.steps_per_epoch + w.first_batch < last_step]
        return result

    def window_batches(self, window: Window, x: np.ndarray, y: np.ndarray, start_step: int,
                       last_step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Cut a read window into the batches that fall in [start_step, last_step)."""
        b = self.plan.batch_size
        first_step = window.epoch * self.steps_per_epoch + window.first_batch
        for i in range(len(y) // b):
            if start_step <= first_step + i < last_step:
                yield x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]

    def _step_of(self, window: Window) -> int:
        return window.epoch * self.steps_per_epoch + window.first_batch

    def batches(self, start_step: int, last_step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        windows = self.windows(start_step, last_step)
        batches = prefetched_batches(self.train_reader, windows, self.plan.batch_size,
                                     first_batch=lambda w: max(0, start_step - self._step_of(w)))
        # the last window may run past last_step
        yield from itertools.islice(batches, last_step - start_step)

    def eval_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        segments = eval_segments(self.test_reader.shard_set.counts, self.plan.rank, self.plan.size)
        per_read = max(1, EVAL_READ_BYTES // self.test_reader.shard_set.sample_bytes)
        for segment in segments:
            for start in range(segment.start, segment.stop, per_read):
                yield self.test_reader.read([Segment(segment.shard, start, min(segment.stop, start + per_read))])


class Dataset:
    """Data opened and checked before any rank starts Horovod; `for_rank` plans one rank's share."""

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        if cfg.source == "hdf5":
            self.train = open_set(cfg.train, cfg.x_key, cfg.y_key, "train", origin="data.train")
            self.test = open_set(cfg.test, cfg.x_key, cfg.y_key, "test", origin="data.test")
            if (self.train.sample_shape, self.train.x_dtype) != (self.test.sample_shape, self.test.x_dtype):
                raise ConfigError(f"data.test: samples {self.test.sample_shape} {self.test.x_dtype} disagree "
                                  f"with data.train ({self.train.sample_shape} {self.train.x_dtype})")
            if cfg.verify:
                verify(self.train)
                verify(self.test)
            self.sample_shape = self.train.sample_shape
            self.num_classes = max(self.train.num_classes, self.test.num_classes)
        else:
            self.arrays = load_arrays(cfg, seed)
            self.sample_shape, self.num_classes = self.arrays.sample_shape, self.arrays.num_classes

    def for_rank(self, batch_size: int, rank: int, size: int):
        if self.cfg.source != "hdf5":
            return InMemoryRankData(self.arrays, BatchPlan(len(self.arrays.y_train), batch_size, rank, size, self.seed))
        window_batches = max(1, int(self.cfg.shuffle_buffer_mb * 2**20) // (batch_size * self.train.sample_bytes))
        plan = ShardPlan(self.train.counts, self.train.block_samples(), batch_size, rank, size, self.seed,
                         tail=self.cfg.tail, window_batches=window_batches)
        return ShardRankData(self.train, self.test, plan)
