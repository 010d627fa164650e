"""Reading planned windows from a shard set with h5py.

Files are opened lazily in the process that reads and reopened after a fork: an h5py handle inherited
across fork shares HDF5 library state with the parent and corrupts reads. The reader pickles without
its handles, so it can be sent to DataLoader worker processes.

Samples of an unfiltered dataset (no compression, checksum or shuffle filter; contiguous, or chunked
with whole samples per chunk) are read with `os.preadv` at the file offsets HDF5 reports for its chunks.
h5py serialises every call on one lock and holds the GIL while HDF5 reads, so a read-ahead thread
reading through h5py stalls the training thread; `preadv` releases the GIL. HDF5 still opens, checks
and describes every file; filtered or unusual layouts are read through h5py.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import h5py
import numpy as np

from hvdtrain import tasks
from hvdtrain.errors import ConfigError
from hvdtrain.shards.index import ShardSet, open_h5
from hvdtrain.shards.plan import Segment, Window


@dataclass(frozen=True)
class RawLayout:
    """Where an unfiltered dataset's samples lie in its file: chunk i starts at `offsets[i]`."""
    chunk_samples: int   # samples per chunk (the whole dataset when contiguous)
    offsets: np.ndarray  # byte offset of each chunk in the file; -1 where a chunk was never written


def raw_layout(handle: h5py.File, ds: h5py.Dataset, dtype: np.dtype, one_sample: bool = False) -> Optional[RawLayout]:
    """The dataset's raw layout when its bytes are exactly the samples in `dtype`, else None.
    one_sample: the dataset is one sample (no sample axis): raw-read only when contiguous."""
    plist = ds.id.get_create_plist()
    if (ds.dtype != dtype or plist.get_nfilters() or plist.get_external_count() or handle.userblock_size
            or plist.get_layout() not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED)):
        return None
    if ds.chunks is None:
        offset = ds.id.get_offset()
        samples = 1 if one_sample else max(1, ds.shape[0])
        return None if offset is None else RawLayout(samples, np.array([offset], np.int64))
    if one_sample:
        return None
    if tuple(ds.chunks[1:]) != tuple(ds.shape[1:]):
        return None  # a sample is split across chunks
    chunk = ds.chunks[0]
    offsets = np.full(-(-ds.shape[0] // chunk), -1, np.int64)

    def visit(info) -> None:
        offsets[info.chunk_offset[0] // chunk] = info.byte_offset

    ds.id.chunk_iter(visit)
    return RawLayout(chunk, offsets)


class _OpenShard:
    """One shard's open handles in this process."""

    def __init__(self, handle: h5py.File, x: h5py.Dataset, y: h5py.Dataset, dtype: np.dtype, one_sample: bool):
        self.handle, self.x, self.y, self.one_sample = handle, x, y, one_sample
        self.layout = raw_layout(handle, x, dtype, one_sample)
        self.raw = open(handle.filename, "rb", buffering=0) if self.layout is not None else None


class ShardReader:
    """Reads samples as stored (dtype, layout) and labels as the task has them (int64 classes, float32 values),
    checking every label read against the task (class range, finite targets)."""

    def __init__(self, shard_set: ShardSet, task: str = "classification", num_classes: Optional[int] = None):
        self.shard_set = shard_set
        self.task = tasks.get(task)
        self.num_classes = shard_set.num_classes if num_classes is None else num_classes
        self.allocate = np.empty  # the batch buffers' allocator (page-locked memory on GPU nodes)
        self._open: dict[int, _OpenShard] = {}
        self._pid: Optional[int] = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}, "_pid": None, "allocate": np.empty}

    @property
    def label_dtype(self) -> np.dtype:
        return self.task.label_dtype

    def _shard(self, shard: int) -> _OpenShard:
        if self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()  # never use handles from another process
        opened = self._open.get(shard)
        if opened is None:
            info = self.shard_set.shards[shard]
            chunk_bytes = (info.chunk_samples or 1) * self.shard_set.sample_bytes
            # A chunk cache of a few chunks serves the partial chunks at block and window edges;
            # whole-chunk reads bypass it.
            handle = open_h5(self.shard_set.shard_path(shard), rdcc_nbytes=max(1 << 20, 4 * chunk_bytes),
                             rdcc_nslots=10007)
            opened = _OpenShard(handle, handle[self.shard_set.x_key], handle[self.shard_set.y_key],
                                np.dtype(self.shard_set.x_dtype), self.shard_set.one_sample)
            self._open[shard] = opened
        return opened

    def _raw_ranges(self, opened: _OpenShard, segment: Segment) -> Optional[list[tuple[int, int]]]:
        """(file offset, bytes) of the segment's samples, chunk by chunk, in sample order; None when some
        chunk must go through HDF5 (a filtered or unwritten one)."""
        layout, sample_bytes = opened.layout, self.shard_set.sample_bytes
        if layout is None:
            return None
        chunk = layout.chunk_samples
        first, last = segment.start // chunk, (segment.stop - 1) // chunk
        if (layout.offsets[first:last + 1] < 0).any():
            return None  # unwritten chunks read as the fill value, which only HDF5 knows
        ranges, start = [], segment.start
        while start < segment.stop:
            c = start // chunk
            stop = min((c + 1) * chunk, segment.stop)
            ranges.append((int(layout.offsets[c]) + (start - c * chunk) * sample_bytes, (stop - start) * sample_bytes))
            start = stop
        return ranges

    def _read_raw(self, opened: _OpenShard, segment: Segment, x: np.ndarray, offset: int) -> bool:
        """preadv the segment's samples into x[offset:]; False when some chunk must go through HDF5."""
        ranges = self._raw_ranges(opened, segment) if x.flags.c_contiguous else None
        if ranges is None:
            return False
        dest = memoryview(x.reshape(-1).view(np.uint8))[offset * self.shard_set.sample_bytes:]
        for position, want in ranges:
            got = os.preadv(opened.raw.fileno(), [dest[:want]], position)
            if got != want:
                raise OSError(f"short read: {got} of {want} bytes (file truncated?)")
            dest = dest[want:]
        return True

    def advise(self, segments: Sequence[Segment]) -> None:
        """posix_fadvise(WILLNEED) on the segments' bytes: from a cold page cache the kernel then reads
        them all at once, in its own order, instead of one preadv at a time (no-op where cached)."""
        for segment in segments:
            opened = self._shard(segment.shard)
            for position, length in self._raw_ranges(opened, segment) or ():
                os.posix_fadvise(opened.raw.fileno(), position, length, os.POSIX_FADV_WILLNEED)

    def read_into(self, segments: Sequence[Segment], x: np.ndarray, y: np.ndarray) -> int:
        """Read the segments back to back into the front of x and y; returns the sample count. The reads
        go in file order (each to its own place), which a disk serves fastest."""
        starts = np.concatenate([[0], np.cumsum([len(s) for s in segments])]).astype(int)
        self.advise(segments)
        for i in sorted(range(len(segments)), key=lambda i: (segments[i].shard, segments[i].start)):
            segment, offset = segments[i], int(starts[i])
            opened = self._shard(segment.shard)
            dest = np.s_[offset:offset + len(segment)]
            path = self.shard_set.shard_path(segment.shard)
            try:
                if opened.one_sample:  # the file's whole dataset is sample `offset`
                    if not self._read_raw(opened, segment, x, offset):
                        x[offset] = opened.x[()]
                    y[offset] = opened.y[()]
                else:
                    if not self._read_raw(opened, segment, x, offset):
                        opened.x.read_direct(x, np.s_[segment.start:segment.stop], dest)
                    opened.y.read_direct(y, np.s_[segment.start:segment.stop], dest)
            except (OSError, ValueError, TypeError) as exc:
                raise ConfigError(f"{path}: cannot read samples {segment.start}..{segment.stop} "
                                  f"(corrupt or truncated shard: {exc})") from None
            tasks.check_labels(self.task, y[offset:offset + len(segment)], self.num_classes,
                               f"{path}: samples {segment.start}..{segment.stop}")
        return int(starts[-1])

    def buffers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.empty((n, *self.shard_set.sample_shape), dtype=self.shard_set.x_dtype),
                np.empty((n, *self.shard_set.label_shape), dtype=self.shard_set.y_dtype))

    def read(self, segments: Sequence[Segment], order: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.buffers(sum(len(s) for s in segments))
        self.read_into(segments, x, y)
        if order is not None:
            x, y = x[order], y[order]
        return x, y.astype(self.label_dtype, copy=False)

    def read_window(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        return self.read(window.segments, window.order)


class BatchBuffers:
    """Batch arrays reused round-robin, but only once nobody outside holds them.

    Gathering into fresh arrays costs a page fault and a kernel zero-fill per page, as much as the
    gather itself. A batch the caller still holds (or a view of it, or a tensor made from it) keeps a
    reference, so it is never overwritten: a fresh array takes its place in the rotation.
    """

    def __init__(self, count: int, make: Callable[[], np.ndarray]):
        self._make = make
        self._pool = [make() for _ in range(count)]
        self._next = 0

    def take(self) -> np.ndarray:
        i = self._next
        self._next = (i + 1) % len(self._pool)
        # references: the pool, the getrefcount argument; anything more is a caller's batch
        if sys.getrefcount(self._pool[i]) > 2:
            self._pool[i] = self._make()
        return self._pool[i]


def prefetched_batches(reader: ShardReader, windows: Sequence[Window], batch_size: int,
                       first_batch: Callable[[Window], int] = lambda w: 0,
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of the windows, in order, with the next window read by a thread while these are cut.

    Two window buffers are reused (no fresh pages per window); each batch is gathered from the read
    buffer through the window's permutation into a recycled batch array (see BatchBuffers), so callers
    may keep batches. Raw reads (preadv) and NumPy gathers both release the GIL, so reading and
    gathering overlap on two cores. `first_batch(window)` skips that many batches of a window (resuming mid-window).
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
    x_batches = BatchBuffers(3, lambda: reader.allocate((batch_size, *reader.shard_set.sample_shape),
                                                        reader.shard_set.x_dtype))
    try:
        for _ in windows:
            window, buffers = ready.get()
            if window is None:
                raise buffers
            x, y = buffers
            labels = y[window.order].astype(reader.label_dtype)  # the whole window's labels in one gather
            for i in range(first_batch(window), window.num_samples // batch_size):
                idx = window.order[i * batch_size:(i + 1) * batch_size]
                # mode="clip": with mode="raise" NumPy gathers into a temporary first, then copies to out
                yield (np.take(x, idx, axis=0, out=x_batches.take(), mode="clip"),
                       labels[i * batch_size:(i + 1) * batch_size])
            free.put(buffers)
    finally:
        stop.set()
        free.put(None)  # unblock the reader if it waits for a buffer
        thread.join()
