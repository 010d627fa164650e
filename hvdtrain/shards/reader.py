"""Reading planned windows from a shard set with h5py.

Files are opened lazily in the process that reads and reopened after a fork: an h5py handle inherited
across fork shares HDF5 library state with the parent and corrupts reads. The reader pickles without
its handles, so it can be sent to DataLoader worker processes.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Iterator, Optional, Sequence

import h5py
import numpy as np

from hvdtrain.errors import ConfigError
from hvdtrain.shards.index import ShardSet, open_h5
from hvdtrain.shards.plan import Segment, Window


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

    def read_into(self, segments: Sequence[Segment], x: np.ndarray, y: np.ndarray) -> int:
        """Read the segments back to back into the front of x and y; returns the sample count."""
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
        return offset

    def buffers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.empty((n, *self.shard_set.sample_shape), dtype=self.shard_set.x_dtype),
                np.empty(n, dtype=self.shard_set.y_dtype))

    def read(self, segments: Sequence[Segment], order: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.buffers(sum(len(s) for s in segments))
        self.read_into(segments, x, y)
        if order is not None:
            x, y = x[order], y[order]
        return x, y.astype(np.int64, copy=False)

    def read_window(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        return self.read(window.segments, window.order)


def split_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(y), batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]


def prefetched_batches(reader: ShardReader, windows: Sequence[Window], batch_size: int,
                       first_batch: Callable[[Window], int] = lambda w: 0,
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of the windows, in order, with the next window read by a thread while these are cut.

    Two window buffers are reused (no fresh pages per window); each batch is gathered from the read
    buffer through the window's permutation into its own array, so callers may keep batches. h5py
    reads and NumPy gathers both release the GIL, so reading and gathering overlap on two cores.
    `first_batch(window)` skips that many batches of a window (resuming mid-window).
    """
    if not windows:
        return
    capacity = max(w.num_samples for w in windows)
    free: queue.Queue = queue.Queue()
    for _ in range(2):
        free.put(reader.buffers(capacity))
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    def read_ahead() -> None:
        try:
            for window in windows:
                buffers = free.get()
                if stop.is_set():
                    return
                reader.read_into(window.segments, *buffers)
                ready.put((window, buffers))
        except BaseException as exc:  # re-raised in the consuming thread
            ready.put((None, exc))

    thread = threading.Thread(target=read_ahead, name="shard-read-ahead", daemon=True)
    thread.start()
    try:
        for _ in windows:
            window, buffers = ready.get()
            if window is None:
                raise buffers
            x, y = buffers
            for i in range(first_batch(window), window.num_samples // batch_size):
                idx = window.order[i * batch_size:(i + 1) * batch_size]
                yield np.take(x, idx, axis=0), y[idx].astype(np.int64)
            free.put(buffers)
    finally:
        stop.set()
        free.put(None)  # unblock the reader if it waits for a buffer
        thread.join()
