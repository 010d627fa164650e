"""`hvdtrain bench loader`: shard reader throughput against the sequential-read limit and a naive loader.

The limit is the fastest way to get the same bytes off the same files, no HDF5, no shuffling, no batches:
each file read front to back into one reused buffer, through the page cache (os.readv of 4 MiB, each file
requested whole first with posix_fadvise WILLNEED: `dd bs=4M`) and, from a cold cache, also around it
(O_DIRECT reads of 16 MiB: `dd bs=16M iflag=direct`), whichever is faster. Both page-cache states are
measured: cold (every file of the set evicted with posix_fadvise(DONTNEED) before each loader's pass: no
root or drop_caches needed, and `fincore` confirms nothing stayed resident) and warm (after a full read;
compared with memory bandwidth, one memcpy, too). Warm, each loader is also set against as many
sequential readers in parallel as it uses cores (its workers, or its copy threads). Ratios come from the
same run.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import queue
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

from hvdtrain.config import DataConfig
from hvdtrain.data import Dataset
from hvdtrain.atomic import write_json
from hvdtrain.bench import Targets
from hvdtrain import sources
from hvdtrain.shards import writer
from hvdtrain.shards.index import INDEX_NAME, open_set
from hvdtrain.shards.reader import copy_threads


def ensure_set(directory: Path, size_gb: float, shape: tuple[int, ...], shards: int) -> Path:
    sample_bytes = int(np.prod(shape)) * 4
    count = math.ceil(size_gb * 2**30 / sample_bytes)
    train = directory / "train"
    if (train / INDEX_NAME).is_file() and json.loads((train / INDEX_NAME).read_text())["total"] == count:
        return train
    print(f"writing {count} samples of {shape} float32 ({size_gb:g} GiB) to {train} ...", flush=True)
    # a test fraction of 1 in count + 1 leaves exactly `count` training samples
    source = sources.synthetic(shape, 10, count + 1, 0, 1 / (count + 1))["train"]
    writer.write_set(source, train, shards, "train")
    return train


def _timed(batches: Iterator, limit_s: float, sample_bytes: int,
           per_pass: float = float("inf")) -> tuple[float, float, list[float]]:
    """Samples (bytes / sample bytes) and seconds from the first batch on: start-up (worker processes) is
    reported apart. Also samples/s of each whole pass of `per_pass` samples (the first from its second
    batch on): one-time costs (maps, fresh buffers) fall in the first."""
    batches = iter(batches)
    # samples since the start, the untimed first batch included; the batch itself is not kept: a loader
    # that recycles its buffers must allocate a fresh one while a caller holds an old batch
    seen = next(batches)[0].nbytes / sample_bytes
    samples, started = 0.0, time.perf_counter()
    passes, mark_samples, mark_time = [], 0.0, started
    for x, _ in batches:
        samples += x.nbytes / sample_bytes
        seen += x.nbytes / sample_bytes
        if seen >= (len(passes) + 1) * per_pass - 0.5:
            now = time.perf_counter()
            passes.append((samples - mark_samples) / (now - mark_time))
            mark_samples, mark_time = samples, now
        if time.perf_counter() - started > limit_s:
            break
    return samples, time.perf_counter() - started, passes


def set_files(train: Path) -> list[Path]:
    shard_set = open_set(str(train))
    return [Path(shard_set.shard_path(i)) for i in range(len(shard_set.shards))]


def evict(train: Path) -> None:
    """Drop the set's files from the page cache (the next read comes from the disk)."""
    for path in set_files(train):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(train: Path) -> float | None:
    """Share of the set's bytes in the page cache (util-linux fincore), None where fincore is missing."""
    if not shutil.which("fincore"):
        return None
    files = set_files(train)
    proc = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *map(str, files)],
                          capture_output=True, text=True, check=True)
    resident, size = (sum(int(line.split()[i]) for line in proc.stdout.splitlines()) for i in (0, 1))
    return resident / max(1, size)


def _read_files(paths: list[Path], block: int) -> Iterator[np.ndarray]:
    """Each file front to back into one reused buffer (dd bs=4M), each file asked for at once first
    (posix_fadvise WILLNEED, as the reader does for each window): from a cold cache the disk then serves
    many requests at a time instead of one read-ahead window after the other."""
    buffer = np.empty(block, np.uint8)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            while n := os.readv(fd, [buffer]):
                yield buffer[:n]
        finally:
            os.close(fd)


def sequential_read(train: Path, epochs: int = 1, block: int = 4 << 20,
                    readers: int = 1) -> Iterator[tuple[np.ndarray, None]]:
    """The limit: every file of the set read sequentially (`_read_files`). With `readers` > 1, that many
    threads each read every readers-th file at once (`dd` per file in parallel; os.readv releases the
    GIL), the limit for a loader using that many cores."""
    files = set_files(train) * epochs
    if readers <= 1:
        for block_read in _read_files(files, block):
            yield block_read, None
        return
    done: queue.Queue = queue.Queue()

    def read(part: list[Path]) -> None:
        try:
            for block_read in _read_files(part, block):
                done.put(block_read)
        finally:
            done.put(None)

    threads = [threading.Thread(target=read, args=(files[i::readers],), daemon=True) for i in range(readers)]
    for thread in threads:
        thread.start()
    finished = 0
    while finished < readers:
        block_read = done.get()
        if block_read is None:
            finished += 1
        else:
            yield block_read, None  # only its size is counted; the thread reuses the buffer
    for thread in threads:
        thread.join()


def direct_read(train: Path, block: int = 16 << 20) -> Iterator[tuple[memoryview, None]]:
    """The disk's own rate: every file front to back with O_DIRECT (no page cache) into one reused,
    page-aligned buffer (dd iflag=direct). Raises OSError where the file system refuses O_DIRECT."""
    buffer = mmap.mmap(-1, block)  # anonymous maps are page-aligned, as O_DIRECT requires
    for path in set_files(train):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            while n := os.readv(fd, [buffer]):
                yield np.frombuffer(buffer, np.uint8, n), None
        finally:
            os.close(fd)


def memcpy_bytes_per_s(size: int = 256 << 20) -> float:
    """Memory bandwidth as one memcpy sees it (bytes copied per second; median of 5)."""
    source, target = np.ones(size, np.uint8), np.empty(size, np.uint8)
    np.copyto(target, source)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - started)
    return size / statistics.median(times)


class PerSampleDataset:
    """What users write first: a map-style Dataset doing `ds[i]` per sample (files opened lazily)."""

    def __init__(self, train: Path):
        self.shard_set = open_set(str(train))
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_set.counts)])
        self.files: dict[int, h5py.File] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        import torch

        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        if shard not in self.files:
            self.files[shard] = h5py.File(self.shard_set.shard_path(shard), "r")
        handle, local = self.files[shard], i - int(self.offsets[shard])
        return torch.from_numpy(handle["x"][local]), int(handle["y"][local])


def naive_loader(train: Path, batch: int, workers: int):
    """The naive dataset shuffled by a DataLoader, as in most tutorials."""
    import torch

    return torch.utils.data.DataLoader(PerSampleDataset(train), batch_size=batch, shuffle=True,
                                       num_workers=workers, multiprocessing_context="forkserver" if workers else None)


def hvdtrain_loader(train: Path, batch: int, workers: int, buffer_mb: float, epochs: int = 1):
    from hvdtrain.torch.data import train_batches

    dataset = Dataset(DataConfig(source="hdf5", train=str(train), test=str(train), workers=workers,
                                 shuffle_buffer_mb=buffer_mb), seed=0)
    rank_data = dataset.for_rank(batch, 0, 1)
    return train_batches(rank_data, 0, epochs * rank_data.steps_per_epoch, workers=workers)


SEQUENTIAL = "sequential read"            # through the page cache: the limit when warm
DIRECT = "sequential read, O_DIRECT"      # around it: a candidate when cold


def _later_passes(result: dict) -> float:
    """samples/s over the passes after the first (NaN with one pass): what a long training run sees once
    the first pass has paid for maps and buffers."""
    later = result["passes_samples_per_s"][1:]
    return len(later) / sum(1 / rate for rate in later) if later else float("nan")


def run(directory: Path, size_gb: float, batch: int, workers: list[int], naive_seconds: float,
        buffer_mb: float, epochs: int, out: Path | None) -> dict:
    import torch

    torch.set_num_threads(1)
    shape = (3, 64, 64)
    sample_bytes = int(np.prod(shape)) * 4
    train = ensure_set(directory, size_gb, shape, 8)
    targets = Targets()
    report = {"set": str(train), "size_gb": size_gb, "batch": batch, "shuffle_buffer_mb": buffer_mb, "epochs": epochs,
              "results": {"cold": {}, "warm": {}}, "ratios": {"cold": {}, "warm": {}}}

    set_samples = sum(path.stat().st_size for path in set_files(train)) / sample_bytes  # the limit's pass
    loader_samples = open_set(str(train)).total // batch * batch  # one rank's epoch: whole batches

    def measure(state: str, name: str, make: Callable[[], Iterator], limit_s: float = float("inf"),
                per_pass: float = float("inf")) -> None:
        resident = None
        if state == "cold":
            evict(train)
            resident = resident_fraction(train)
        samples, seconds, passes = _timed(make(), limit_s, sample_bytes, per_pass)
        report["results"][state][name] = {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
                                          "resident_before": resident, "passes_samples_per_s": passes}
        cached = f", {100 * resident:.0f}% of the set cached before" if resident is not None else ""
        by_pass = f"; by pass: {', '.join(f'{rate:.0f}' for rate in passes)}" if len(passes) > 1 else ""
        print(f"{state} {name:34s} {samples / seconds:10.0f} samples/s  ({samples:.0f} samples in {seconds:.1f} s"
              f"{cached}{by_pass})", flush=True)

    # Cold: one pass each (a second would read from the cache the first filled).
    measure("cold", SEQUENTIAL, lambda: sequential_read(train))
    try:
        measure("cold", DIRECT, lambda: direct_read(train))
    except OSError as exc:
        print(f"cold {DIRECT}: left out ({exc.strerror or exc})", flush=True)
    for w in workers:
        measure("cold", f"hvdtrain shuffled, workers={w}", lambda w=w: hvdtrain_loader(train, batch, w, buffer_mb))
    # Warm: several epochs, as in training: one-time costs (buffers, worker start-up) are amortised alike.
    _timed(sequential_read(train), float("inf"), sample_bytes)
    measure("warm", SEQUENTIAL, lambda: sequential_read(train, epochs), per_pass=set_samples)
    # The target's limit is one reader (dd); each loader is also set against as many readers as it
    # uses cores: its worker processes, or in-process its copy threads.
    readers = report["readers"] = {f"workers={w}": w or copy_threads() for w in workers}
    for count in sorted({count for count in readers.values() if count > 1}):
        measure("warm", f"{SEQUENTIAL}, {count} readers", lambda count=count: sequential_read(train, epochs, readers=count),
                per_pass=set_samples)
    for w in workers:
        measure("warm", f"hvdtrain shuffled, workers={w}",
                lambda w=w: hvdtrain_loader(train, batch, w, buffer_mb, epochs), per_pass=loader_samples)
    for w in workers:
        measure("warm", f"naive ds[i], workers={w}", lambda w=w: naive_loader(train, batch, w), naive_seconds)
    memcpy = memcpy_bytes_per_s()
    report["memcpy_samples_per_s"] = memcpy / sample_bytes
    print(f"memory bandwidth (one memcpy): {memcpy / 1e9:.1f} GB/s = {memcpy / sample_bytes:.0f} samples/s", flush=True)
    report["limits"] = {}
    for state in ("cold", "warm"):
        results = report["results"][state]
        name = max((n for n in (SEQUENTIAL, DIRECT) if n in results), key=lambda n: results[n]["samples_per_s"])
        report["limits"][state] = name
        limit = results[name]["samples_per_s"]
        for w in workers:
            ours = results[f"hvdtrain shuffled, workers={w}"]["samples_per_s"]
            ratios = report["ratios"][state][f"workers={w}"] = {"vs_limit": ours / limit}
            line = (f"{state} workers={w}: hvdtrain / {name} = {ours / limit:.2f}x "
                    f"{targets.check(f'{state} workers={w} hvdtrain / sequential read', ours / limit, '>=', 0.9)}")
            if state == "warm":
                ours_later = _later_passes(results[f"hvdtrain shuffled, workers={w}"])
                later = ours_later / _later_passes(results[name])
                if later == later:  # not NaN: both ran more than one pass
                    ratios["vs_limit_after_first_pass"] = later
                    line += f"; after the first pass {later:.2f}x"
                count = readers[f"workers={w}"]
                if count > 1:
                    same = results[f"{SEQUENTIAL}, {count} readers"]
                    ratios["vs_same_readers"] = ours / same["samples_per_s"]
                    line += f"; / {count} readers = {ratios['vs_same_readers']:.2f}x"
                    later = ours_later / _later_passes(same)
                    if later == later:
                        ratios["vs_same_readers_after_first_pass"] = later
                        line += f" ({later:.2f}x after the first pass)"
                ratios["vs_memcpy"] = ours / report["memcpy_samples_per_s"]
                ratios["vs_naive_same_workers"] = ours / results[f"naive ds[i], workers={w}"]["samples_per_s"]
                line += (f", / memcpy = {ratios['vs_memcpy']:.2f}x, / naive = {ratios['vs_naive_same_workers']:.1f}x "
                         f"{targets.check(f'workers={w} hvdtrain / naive loader', ratios['vs_naive_same_workers'], '>=', 10)}")
            print(line, flush=True)
        if DIRECT in results:
            print(f"{state}: sequential read through the page cache / O_DIRECT = "
                  f"{results[SEQUENTIAL]['samples_per_s'] / results[DIRECT]['samples_per_s']:.2f}x", flush=True)
        print(f"{state}: {name} / memcpy = {limit / report['memcpy_samples_per_s']:.2f}x", flush=True)
    report["targets"] = targets.checked
    if out:
        write_json(out, report)
    return report
