"""Training data for one rank: in-memory arrays or HDF5 shard sets (framework-free, no MPI).

In-memory sources (digits, synthetic, npz) come from hvdtrain.sources, as `hvdtrain data shard` does.
Samples are read as stored and converted per batch by hvdtrain.transform (float32, channels first,
normalised); labels are checked against the task (hvdtrain.tasks) when they are read.

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

from hvdtrain import tasks
from hvdtrain.config import DataConfig
from hvdtrain.errors import ConfigError
from hvdtrain.shards.index import open_set, verify
from hvdtrain.shards.plan import Segment, ShardPlan, Window, eval_segments
from hvdtrain.shards.reader import ShardReader, prefetched_batches
from hvdtrain.sources import open_source
from hvdtrain.transform import SampleTransform, model_shape

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

    @property
    def label_shape(self) -> tuple[int, ...]:
        return tuple(self.y_train.shape[1:])


def load_arrays(cfg: DataConfig, seed: int, task: str = "classification") -> Arrays:
    """The config's in-memory source, split and loaded: the samples `hvdtrain data shard` would write."""
    splits = open_source(cfg.source, cfg.test_fraction, seed, cfg.synthetic_shape, cfg.synthetic_classes,
                         cfg.synthetic_samples, origin="data.source", task=task)
    (x_train, y_train), (x_test, y_test) = splits["train"].arrays(), splits["test"].arrays()
    return Arrays(x_train, y_train, x_test, y_test, splits["train"].num_classes)


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


EVAL_BATCH_BYTES = 16 << 20


class InMemoryRankData:
    """A rank's view of an in-memory data set (digits, synthetic, npz, or arrays given to hvdtrain.fit)."""

    windows = None  # nothing for worker processes to read

    def __init__(self, arrays: Arrays, plan: BatchPlan, transform: SampleTransform):
        self.arrays, self.plan, self.transform = arrays, plan, transform
        self.steps_per_epoch = plan.steps_per_epoch

    def batches(self, start_step: int, last_step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for step in range(start_step, last_step):
            idx = self.plan.indices(*divmod(step, self.steps_per_epoch))
            yield self.transform(self.arrays.x_train[idx]), self.arrays.y_train[idx]

    def eval_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        idx = eval_indices(len(self.arrays.y_test), self.plan.rank, self.plan.size)
        sample_bytes = max(1, self.arrays.x_test[:1].nbytes * 4)
        per_batch = max(1, EVAL_BATCH_BYTES // sample_bytes)
        for start in range(0, max(len(idx), 1), per_batch):
            part = idx[start:start + per_batch]
            if len(part):
                yield self.transform(self.arrays.x_test[part]), self.arrays.y_test[part]


class ShardRankData:
    """A rank's view of HDF5 shard sets: planned windows of whole chunks, shuffled inside each window."""

    def __init__(self, train: ShardReader, test: ShardReader, plan: ShardPlan, transform: SampleTransform):
        self.train_reader, self.test_reader, self.plan, self.transform = train, test, plan, transform
        self.steps_per_epoch = plan.batches_per_rank

    def read_window(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """A window's samples, converted, and labels (elastic rounds)."""
        x, y = self.train_reader.read_window(window)
        return self.transform(x), y

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
        x = np.asarray(x)
        for i in range(len(y) // b):
            if start_step <= first_step + i < last_step:
                yield self.transform(x[i * b:(i + 1) * b]), y[i * b:(i + 1) * b]

    def _step_of(self, window: Window) -> int:
        return window.epoch * self.steps_per_epoch + window.first_batch

    def batches(self, start_step: int, last_step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        windows = self.windows(start_step, last_step)
        batches = prefetched_batches(self.train_reader, windows, self.plan.batch_size,
                                     first_batch=lambda w: max(0, start_step - self._step_of(w)))
        # the last window may run past last_step
        for x, y in itertools.islice(batches, last_step - start_step):
            yield self.transform(x), y

    def eval_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        segments = eval_segments(self.test_reader.shard_set.counts, self.plan.rank, self.plan.size)
        per_read = max(1, EVAL_READ_BYTES // self.test_reader.shard_set.sample_bytes)
        for segment in segments:
            for start in range(segment.start, segment.stop, per_read):
                x, y = self.test_reader.read([Segment(segment.shard, start, min(segment.stop, start + per_read))])
                yield self.transform(x), y


class Dataset:
    """Data opened and checked before any rank starts Horovod; `for_rank` plans one rank's share.

    sample_shape is what the model sees (channels first); label_shape is per sample: () for a class id,
    the spatial shape for a segmentation mask, the targets' shape for regression."""

    def __init__(self, cfg: DataConfig, seed: int, task: str = "classification", arrays: Arrays | None = None):
        self.cfg, self.seed, self.task = cfg, seed, tasks.get(task)
        hint = ""
        if arrays is not None or cfg.source != "hdf5":
            self.arrays = arrays if arrays is not None else load_arrays(cfg, seed, task)
            stored, x_dtype, self.label_shape = self.arrays.sample_shape, self.arrays.x_train.dtype, self.arrays.label_shape
            found_classes, origin = self.arrays.num_classes, f"data.source {cfg.source}" if arrays is None else "data"
        else:
            count = self.task.classes and cfg.num_classes is None
            sets = [open_set(spec, cfg.x_key, cfg.y_key, split, origin=f"data.{split}", one_sample=cfg.one_sample_per_file,
                             count_classes=count) for split, spec in (("train", cfg.train), ("test", cfg.test))]
            self.train, self.test = sets
            if (self.train.sample_shape, self.train.x_dtype, self.train.label_shape) != \
                    (self.test.sample_shape, self.test.x_dtype, self.test.label_shape):
                raise ConfigError(f"data.test: samples {self.test.sample_shape} {self.test.x_dtype} / labels "
                                  f"{self.test.label_shape} disagree with data.train ({self.train.sample_shape} "
                                  f"{self.train.x_dtype} / {self.train.label_shape})")
            if cfg.verify:
                verify(self.train)
                verify(self.test)
            stored, x_dtype, self.label_shape = self.train.sample_shape, self.train.x_dtype, self.train.label_shape
            found_classes, origin = max(self.train.num_classes, self.test.num_classes), "data.train"
            if not cfg.one_sample_per_file:
                hint = "; if each file holds one sample, set data.one_sample_per_file=true"
        if cfg.layout == "nchw" and self.task.name == "segmentation" and self.label_shape == tuple(stored[:-1]):
            hint += "; if the channels are last, set data.layout=nhwc"
        tasks.check_shapes(self.task, model_shape(stored, cfg.layout), self.label_shape, origin, hint)
        self.transform = SampleTransform(cfg, stored, x_dtype, origin="data")
        self.sample_shape = self.transform.sample_shape
        self.num_classes = 0
        if self.task.classes:
            self.num_classes = cfg.num_classes or found_classes
            if found_classes > self.num_classes:
                raise ConfigError(f"data.num_classes: {self.num_classes}, but the labels go up to {found_classes - 1}")
            if self.num_classes < 2:
                raise ConfigError(f"{origin}: every label is 0; {self.task.name} needs at least 2 classes")

    def readers(self) -> tuple[ShardReader, ShardReader]:
        readers = (ShardReader(self.train, self.task.name, self.num_classes),
                   ShardReader(self.test, self.task.name, self.num_classes))
        for reader in readers:
            reader.read_threads = self.cfg.read_threads
        return readers

    def for_rank(self, batch_size: int, rank: int, size: int):
        if not hasattr(self, "train"):
            return InMemoryRankData(self.arrays, BatchPlan(len(self.arrays.y_train), batch_size, rank, size, self.seed),
                                    self.transform)
        window_batches = max(1, int(self.cfg.shuffle_buffer_mb * 2**20) // (batch_size * self.train.sample_bytes))
        plan = ShardPlan(self.train.counts, self.train.block_samples(), batch_size, rank, size, self.seed,
                         tail=self.cfg.tail, window_batches=window_batches)
        return ShardRankData(*self.readers(), plan, self.transform)
