"""Reading planned windows from a shard set with h5py.

Files are opened lazily in the process that reads and reopened after a fork: an h5py handle inherited
across fork shares HDF5 library state with the parent and corrupts reads. The reader pickles without
its handles, so it can be sent to DataLoader worker processes.

Samples of an unfiltered dataset (no compression, checksum or shuffle filter; contiguous, or chunked
with whole samples per chunk) are copied from a read-only memory map of the file, at the offsets HDF5
reports for its chunks. h5py serialises every call on one lock and holds the GIL while HDF5 reads, so a
read-ahead thread reading through h5py stalls the training thread; NumPy's copy releases the GIL. A
map, unlike `preadv`, costs no system call and no page-cache lookup per read once its pages are mapped
(once per process): from a warm page cache the copy then runs at the rate of a sequential read. HDF5
still opens, checks and describes every file; filtered or unusual layouts are read through h5py.
"""
from __future__ import annotations

import mmap
import os
import queue
import resource
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import h5py
import numpy as np

from hvdtrain import tasks
from hvdtrain.errors import ConfigError
from hvdtrain.shards.index import ShardSet, open_h5
from hvdtrain.shards.plan import Segment, Window
from hvdtrain.world import world

PAGE = mmap.PAGESIZE
MAX_COPY_THREADS = 4
MIN_BYTES_PER_COPY_THREAD = 8 << 20  # below this, handing a part to a thread costs more than it saves


def small_page_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array in its own anonymous map, the default for window buffers. NumPy asks for
    transparent huge pages for large arrays, and filling fresh huge pages can stall (compaction on a
    fragmented node; on this project's VM, far longer than 4 KiB pages: benchmarks/README.md): the first
    pass over the data paid it for every window buffer. The copies are no faster into huge pages."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(1, count * dtype.itemsize)), dtype, count).reshape(shape)


def _madvise(mapping: mmap.mmap, advice: int, position: int, length: int) -> None:
    """madvise on the pages holding bytes [position, position + length) of a map, clipped to its end."""
    start, end = position // PAGE * PAGE, min(position + length, len(mapping))
    if start < end:
        mapping.madvise(advice, start, end - start)


def map_budget_bytes() -> int:
    """How much of its shard set a reader may keep mapped: an eighth of the node's memory, shared by the
    ranks on the node. Mapped pages count in a process's RSS (top, Slurm's MaxRSS, RSS-based memory
    limits), though they are the page cache's; beyond the budget each window's pages are unmapped once
    copied, which costs a page fault per page at the next read (benchmarks/README.md has the cost)."""
    return os.sysconf("SC_PHYS_PAGES") * PAGE // (8 * max(1, world.local_size))


def open_shard_limit() -> int:
    """Shards one reader keeps open at a time. Each holds two file descriptors (HDF5's and its map's), and
    a process may have few (1024 is a common limit on clusters): one-sample-per-file sets have thousands."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1024 if soft == resource.RLIM_INFINITY else max(8, min(1024, soft // 8))


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


def inverse_permutation(order: np.ndarray) -> np.ndarray:
    """rows with rows[order[t]] = t: where each sample read goes for the samples to come out in `order`."""
    rows = np.empty_like(order)
    rows[order] = np.arange(len(order), dtype=order.dtype)
    return rows


def _as_slice(rows: np.ndarray) -> Optional[slice]:
    """rows as a slice when they follow each other (an unshuffled read), else None."""
    first = int(rows[0])
    if len(rows) == 1 or (int(rows[-1]) - first == len(rows) - 1 and (np.diff(rows) == 1).all()):
        return slice(first, first + len(rows))
    return None


def _read_hdf5(dataset: h5py.Dataset, source, target: np.ndarray, place) -> None:
    """dataset[source] into target[place] through HDF5: directly for a slice, through a copy for rows."""
    if isinstance(place, slice):
        dataset.read_direct(target, source, place)
    else:
        target[place] = dataset[source]


def copy_threads(configured: int = 0) -> int:
    """Threads a reader copies a large window with: `data.read_threads`, or (0) the rank's cores, at most
    MAX_COPY_THREADS."""
    return configured or min(MAX_COPY_THREADS, world.cores)


def split_evenly(pieces: Sequence[tuple[Segment, np.ndarray]], parts: int) -> list[list[tuple[Segment, np.ndarray]]]:
    """(segment, rows) pieces, in their order, cut into `parts` runs of equal sample counts (within one),
    segments split where a run ends."""
    total = sum(len(segment) for segment, _ in pieces)
    runs: list[list[tuple[Segment, np.ndarray]]] = [[]]
    ends = [total * k // parts for k in range(1, parts + 1)]
    done = 0
    for segment, rows in pieces:
        start = segment.start
        while start < segment.stop:
            while done == ends[len(runs) - 1]:  # this run is full (or empty: fewer samples than parts)
                runs.append([])
            take = min(segment.stop - start, ends[len(runs) - 1] - done)
            offset = start - segment.start
            runs[-1].append((Segment(segment.shard, start, start + take), rows[offset:offset + take]))
            start, done = start + take, done + take
    return [run for run in runs if run]  # fewer samples than parts


class _OpenShard:
    """One shard's open handles in this process: HDF5's, and a map of the file where samples or labels
    can be copied raw."""

    def __init__(self, handle: h5py.File, x: h5py.Dataset, y: h5py.Dataset, x_dtype: np.dtype, y_dtype: np.dtype,
                 one_sample: bool):
        self.handle, self.x, self.y, self.one_sample = handle, x, y, one_sample
        self.x_layout = raw_layout(handle, x, x_dtype, one_sample)
        self.y_layout = raw_layout(handle, y, y_dtype, one_sample)
        self.mapping: Optional[mmap.mmap] = None  # the whole file, read-only
        if self.x_layout is not None or self.y_layout is not None:
            with open(handle.filename, "rb") as raw:
                if os.fstat(raw.fileno()).st_size:
                    self.mapping = mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ)
        self.bytes = None if self.mapping is None else np.frombuffer(self.mapping, np.uint8)

    def close(self) -> None:
        self.bytes = None  # the map's only view: it must go before the map closes
        if self.mapping is not None:
            self.mapping.close()
        self.handle.close()


class ShardReader:
    """Reads samples as stored (dtype, layout) and labels as the task has them (int64 classes, float32 values),
    checking every label read against the task (class range, finite targets)."""

    def __init__(self, shard_set: ShardSet, task: str = "classification", num_classes: Optional[int] = None):
        self.shard_set = shard_set
        self.task = tasks.get(task)
        self.num_classes = shard_set.num_classes if num_classes is None else num_classes
        self.allocate = small_page_empty  # the window buffers' allocator (page-locked memory on GPU nodes)
        self.read_threads = 0  # data.read_threads: threads copying a window (0: see copy_threads)
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()  # least recently used first
        self._opening = threading.Lock()  # guards _open and _pool
        self._pid: Optional[int] = None
        self._keep: Optional[bool] = None  # see _keep_mapped
        self._pool: Optional[ThreadPoolExecutor] = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict(), "_opening": None, "_pid": None, "_keep": None,
                "_pool": None, "allocate": small_page_empty}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _opening=threading.Lock())

    @property
    def label_dtype(self) -> np.dtype:
        return self.task.label_dtype

    def _own_process(self) -> None:
        """Never use handles, or threads, from another process (a forked child has the parent's copies)."""
        if self._pid != os.getpid():
            self._open, self._pid, self._pool = OrderedDict(), os.getpid(), None

    def _copy_pool(self) -> ThreadPoolExecutor:
        with self._opening:
            self._own_process()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(MAX_COPY_THREADS - 1, thread_name_prefix="shard-copy")
            return self._pool

    def _shard(self, shard: int) -> _OpenShard:
        with self._opening:  # copy threads open shards too
            self._own_process()
            opened = self._open.get(shard)
            if opened is not None:
                self._open.move_to_end(shard)
                return opened
            info = self.shard_set.shards[shard]
            chunk_bytes = (info.chunk_samples or 1) * self.shard_set.sample_bytes
            # A chunk cache of a few chunks serves the partial chunks at block and window edges;
            # whole-chunk reads bypass it.
            handle = open_h5(self.shard_set.shard_path(shard), rdcc_nbytes=max(1 << 20, 4 * chunk_bytes),
                             rdcc_nslots=10007)
            opened = _OpenShard(handle, handle[self.shard_set.x_key], handle[self.shard_set.y_key],
                                np.dtype(self.shard_set.x_dtype), np.dtype(self.shard_set.y_dtype),
                                self.shard_set.one_sample)
            self._open[shard] = opened
            while len(self._open) > open_shard_limit():
                self._open.popitem(last=False)[1].close()
            return opened

    @staticmethod
    def _raw_ranges(opened: _OpenShard, layout: Optional[RawLayout], item_bytes: int,
                    segment: Segment) -> Optional[list[tuple[int, int]]]:
        """(file offset, bytes) of the segment's samples (or labels: `layout` and `item_bytes` say which),
        chunk by chunk (adjacent chunks merged), in sample order; None when some chunk must go through
        HDF5 (a filtered or unwritten one)."""
        if layout is None or opened.bytes is None:
            return None
        chunk = layout.chunk_samples
        first, last = segment.start // chunk, (segment.stop - 1) // chunk
        if (layout.offsets[first:last + 1] < 0).any():
            return None  # unwritten chunks read as the fill value, which only HDF5 knows
        ranges, start = [], segment.start
        while start < segment.stop:
            c = start // chunk
            stop = min((c + 1) * chunk, segment.stop)
            position, length = int(layout.offsets[c]) + (start - c * chunk) * item_bytes, (stop - start) * item_bytes
            if ranges and sum(ranges[-1]) == position:  # chunks that follow each other in the file: one range
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
            else:
                ranges.append((position, length))
            start = stop
        return ranges

    def _read_raw(self, opened: _OpenShard, layout: Optional[RawLayout], segment: Segment, target: np.ndarray,
                  rows: np.ndarray) -> bool:
        """Copy the segment's samples (or labels) from the file's map straight into rows `rows` of target,
        one NumPy copy per run of adjacent chunks; False when some chunk must go through HDF5."""
        item_bytes = target[:1].nbytes
        ranges = self._raw_ranges(opened, layout, item_bytes, segment) if target.flags.c_contiguous else None
        if ranges is None:
            return False
        dest = target.reshape(len(target), -1).view(np.uint8)
        done = 0
        for position, want in ranges:
            if position + want > len(opened.bytes):  # a map read past the end would be SIGBUS, not an error
                raise OSError(f"the file ends at byte {len(opened.bytes)}, its data go to {position + want} "
                              f"(truncated?)")
            count = want // item_bytes
            part = rows[done:done + count]
            run = _as_slice(part)
            dest[part if run is None else run] = opened.bytes[position:position + want].reshape(count, item_bytes)
            done += count
            if not self._keep_mapped():
                _madvise(opened.mapping, mmap.MADV_DONTNEED, position, want)  # the page cache keeps them
        return True

    def _keep_mapped(self) -> bool:
        """Whether copied pages stay mapped (the set fits map_budget_bytes), decided once per process."""
        if self._keep is None:
            self._keep = self.shard_set.total * self.shard_set.sample_bytes <= map_budget_bytes()
        return self._keep

    def advise(self, segments: Sequence[Segment]) -> None:
        """madvise(WILLNEED) on the segments' samples: from a cold page cache the kernel then reads them
        all at once, in its own order, instead of one page fault at a time (no-op where cached). Skipped where
        the segments span more files than stay open (small one-sample files): each would be opened twice."""
        if len({segment.shard for segment in segments}) > open_shard_limit():
            return
        for segment in segments:
            opened = self._shard(segment.shard)
            for position, length in self._raw_ranges(opened, opened.x_layout, self.shard_set.sample_bytes,
                                                     segment) or ():
                _madvise(opened.mapping, mmap.MADV_WILLNEED, position, length)  # a truncated file: the read reports it

    def _threads_for(self, segments: Sequence[Segment]) -> int:
        """Copy threads for these segments: as configured, bounded by their bytes, one where the segments span
        more files than stay open (a thread could close a map another is copying from)."""
        if len({segment.shard for segment in segments}) > open_shard_limit():
            return 1
        wanted = copy_threads(self.read_threads)
        total = sum(len(segment) for segment in segments) * self.shard_set.sample_bytes
        return max(1, min(wanted, total // MIN_BYTES_PER_COPY_THREAD))

    def read_into(self, segments: Sequence[Segment], x: np.ndarray, y: np.ndarray,
                  rows: Optional[np.ndarray] = None, threads: Optional[int] = None) -> int:
        """Read the segments' samples into x and y: sample j of the segments (back to back) lands in row
        rows[j] (default: row j), so a shuffled window is read in its shuffled order without a second copy.
        Returns the sample count. The reads go in file order (each to its own place), which a disk serves
        fastest. With `threads` (default: `_threads_for`) above one, each thread copies its own run of
        that order, of about equal bytes: one core's copy falls short of the memory's bandwidth."""
        starts = np.concatenate([[0], np.cumsum([len(s) for s in segments])]).astype(int)
        if rows is None:
            rows = np.arange(starts[-1])
        self.advise(segments)
        order = sorted(range(len(segments)), key=lambda i: (segments[i].shard, segments[i].start))
        pieces = [(segments[i], rows[starts[i]:starts[i + 1]]) for i in order]
        threads = self._threads_for(segments) if threads is None else threads
        if threads <= 1:
            self._read_pieces(pieces, x, y)
            return int(starts[-1])
        parts, pool = split_evenly(pieces, threads), self._copy_pool()
        futures = [pool.submit(self._read_pieces, part, x, y) for part in parts[1:]]
        try:
            self._read_pieces(parts[0], x, y)
        finally:
            failures = [future.exception() for future in futures]  # waits: all of them write into x
        for failure in failures:
            if failure is not None:
                raise failure
        return int(starts[-1])

    def _read_pieces(self, pieces: Sequence[tuple[Segment, np.ndarray]], x: np.ndarray, y: np.ndarray) -> None:
        """Each segment's samples into its rows of x and y."""
        for segment, seg_rows in pieces:
            place = _as_slice(seg_rows)
            place = seg_rows if place is None else place  # a slice reads and checks in place, no copies
            opened = self._shard(segment.shard)
            path = self.shard_set.shard_path(segment.shard)
            try:
                if opened.one_sample:  # the file's whole dataset is one sample
                    if not self._read_raw(opened, opened.x_layout, segment, x, seg_rows):
                        x[seg_rows[0]] = opened.x[()]
                    if not self._read_raw(opened, opened.y_layout, segment, y, seg_rows):
                        y[seg_rows[0]] = opened.y[()]
                else:
                    source = np.s_[segment.start:segment.stop]
                    if not self._read_raw(opened, opened.x_layout, segment, x, seg_rows):
                        _read_hdf5(opened.x, source, x, place)
                    if not self._read_raw(opened, opened.y_layout, segment, y, seg_rows):
                        _read_hdf5(opened.y, source, y, place)
            except (OSError, ValueError, TypeError) as exc:
                raise ConfigError(f"{path}: cannot read samples {segment.start}..{segment.stop} "
                                  f"(corrupt or truncated shard: {exc})") from None
            tasks.check_labels(self.task, y[place], self.num_classes,
                               f"{path}: samples {segment.start}..{segment.stop}")

    def buffers(self, n: int, allocate: Callable = np.empty) -> tuple[np.ndarray, np.ndarray]:
        """Arrays for n samples and labels; `allocate` makes the samples' (the batch allocator: `self.allocate`)."""
        return (allocate((n, *self.shard_set.sample_shape), self.shard_set.x_dtype),
                np.empty((n, *self.shard_set.label_shape), dtype=self.shard_set.y_dtype))

    def read(self, segments: Sequence[Segment], order: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """The segments' samples and labels, in `order` if given (sample order[t] of the segments at row t)."""
        x, y = self.buffers(sum(len(s) for s in segments))
        self.read_into(segments, x, y, None if order is None else inverse_permutation(order))
        return x, y.astype(self.label_dtype, copy=False)

    def read_window(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        return self.read(window.segments, window.order)


class RecycledBuffers:
    """Window buffers (x, y), reused round-robin, but only once nobody outside holds them.

    Fresh arrays cost a page fault and a kernel zero-fill per page, as much as the read itself. Batches are
    views of a window's buffers: a batch the caller still holds (or a view of it, or a tensor made from it)
    keeps a reference to its buffer, which is then never overwritten: a fresh one takes its place.
    """

    def __init__(self, count: int, make: Callable[[], tuple[np.ndarray, ...]]):
        self._make = make
        self._pool: list[Optional[tuple[np.ndarray, ...]]] = [None] * count
        self._next = 0

    def take(self) -> tuple[np.ndarray, ...]:
        i = self._next
        self._next = (i + 1) % len(self._pool)
        held = self._pool[i]
        # references to each array: the pool's tuple and getrefcount's argument; anything more is a caller's
        if held is None or any(sys.getrefcount(held[j]) > 2 for j in range(len(held))):
            self._pool[i] = self._make()
        return self._pool[i]


def prefetched_batches(reader: ShardReader, windows: Sequence[Window], batch_size: int,
                       first_batch: Callable[[Window], int] = lambda w: 0,
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of the windows, in order, with the next window read by a thread while these are cut.

    Each window is read in its shuffled order (`read_into`'s rows): every sample is copied straight from
    the page cache into its batch row, and the batches are views of the window buffer, so a sample is
    copied once. Three window buffers rotate (RecycledBuffers: callers may keep batches): the one being
    cut, the one being read, and the one before, whose last batch the caller may still hold. The copy
    releases the GIL, so reading overlaps training. `first_batch(window)` skips that many batches of a
    window (resuming mid-window).
    """
    if not windows:
        return
    capacity = max(w.num_samples for w in windows)
    pool = RecycledBuffers(3, lambda: reader.buffers(capacity, reader.allocate))
    # Hand-over: the next window is read while this one is cut, and no further, so a buffer is taken
    # only once the caller has moved past the window before (it may still hold that window's last batch).
    ready: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def read_ahead() -> None:
        try:
            for window in windows:
                if stop.is_set():
                    return
                x, y = pool.take()
                reader.read_into(window.segments, x, y, inverse_permutation(window.order))
                ready.put((window, (x, y)))
                del x, y
                ready.join()  # until the consumer has taken it
        except BaseException as exc:  # re-raised in the consuming thread
            ready.put((None, exc))

    thread = threading.Thread(target=read_ahead, name="shard-read-ahead", daemon=True)
    thread.start()
    try:
        for _ in windows:
            window, buffers = ready.get()
            ready.task_done()
            if window is None:
                raise buffers
            x, y = buffers
            del buffers
            n = window.num_samples
            labels = y[:n] if y.dtype == reader.label_dtype else y[:n].astype(reader.label_dtype)
            for i in range(first_batch(window), n // batch_size):
                yield x[i * batch_size:(i + 1) * batch_size], labels[i * batch_size:(i + 1) * batch_size]
            del x, y, labels
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting to hand over a window
            try:
                ready.get_nowait()
                ready.task_done()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
