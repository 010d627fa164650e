"""Reading planned windows from a shard set with h5py.

Files are opened lazily in the process that reads and reopened after a fork: an h5py handle inherited
across fork shares HDF5 library state with the parent and corrupts reads. The reader pickles without
its handles, so it can be sent to DataLoader worker processes.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

import h5py
import numpy as np

from hvdtrain.errors import ConfigError
from hvdtrain.shards.index import ShardSet, open_h5
from hvdtrain.shards.plan import Segment, ShardPlan, Window


class ShardReader:
    def __init__(self, shard_set: ShardSet):
        self.shard_set = shard_set
        self._files: dict[int, h5py.File] = {}
        self._pid: Optional[int] = None

    def __getstate__(self) -> dict:
        return {"shard_set": self.shard_set, "_files": {}, "_pid": None}

    def _datasets(self, shard: int) -> tuple[h5py.Dataset, h5py.Dataset]:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()  # never use handles from another process
        handle = self._files.get(shard)
        if handle is None:
            info = self.shard_set.shards[shard]
            chunk_bytes = (info.chunk_samples or 1) * self.shard_set.sample_bytes
            # A chunk cache of a few chunks serves the partial chunks at block and window edges;
            # whole-chunk reads bypass it.
            handle = open_h5(self.shard_set.shard_path(shard), rdcc_nbytes=max(1 << 20, 4 * chunk_bytes),
                             rdcc_nslots=10007)
            self._files[shard] = handle
        return handle[self.shard_set.x_key], handle[self.shard_set.y_key]

    def read(self, segments: Sequence[Segment], order: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        n = sum(len(s) for s in segments)
        x = np.empty((n, *self.shard_set.sample_shape), dtype=self.shard_set.x_dtype)
        y = np.empty(n, dtype=self.shard_set.y_dtype)
        offset = 0
        for segment in segments:
            x_ds, y_ds = self._datasets(segment.shard)
            dest = np.s_[offset:offset + len(segment)]
            try:
                x_ds.read_direct(x, np.s_[segment.start:segment.stop], dest)
                y_ds.read_direct(y, np.s_[segment.start:segment.stop], dest)
            except (OSError, ValueError) as exc:
                path = self.shard_set.shard_path(segment.shard)
                raise ConfigError(f"{path}: cannot read samples {segment.start}..{segment.stop} "
                                  f"(corrupt or truncated shard: {exc})") from None
            labels = y[offset:offset + len(segment)]
            if labels.min() < 0 or labels.max() >= self.shard_set.num_classes:
                raise ConfigError(f"{self.shard_set.shard_path(segment.shard)}: labels outside "
                                  f"[0, {self.shard_set.num_classes}) in samples {segment.start}..{segment.stop}")
            offset += len(segment)
        if order is not None:
            x, y = x[order], y[order]
        return x, y.astype(np.int64, copy=False)

    def read_window(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        return self.read(window.segments, window.order)


def split_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(y), batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]


def iter_batches(reader: ShardReader, plan: ShardPlan, epoch: int,
                 start_batch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This rank's batches of `epoch` from rank-local batch `start_batch`, read window by window."""
    for window in plan.windows(epoch, start_batch):
        x, y = reader.read_window(window)
        skip = max(0, start_batch - window.first_batch) * plan.batch_size
        yield from split_batches(x[skip:], y[skip:], plan.batch_size)
