"""PyTorch adapter for the data core: batches as tensors, shard windows read by DataLoader workers."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset

from hvdtrain.shards.plan import Window
from hvdtrain.shards.reader import RecycledBuffers, ShardReader, inverse_permutation


class WindowDataset(TorchDataset):
    """Item (i, x) is planned window i, read in its shuffled order into x, a shared-memory tensor the
    trainer lends, in whichever process asks for it; the item's value is the window's labels.

    A map-style dataset keeps the windows in plan order whatever the number of workers, so a run
    is reproducible and resumable independently of `data.workers`. Each sample is copied once, from the
    page cache into shared memory the trainer already has: nothing is sent back but the labels.
    """

    def __init__(self, reader: ShardReader, windows: list[Window], keep: int = 0):
        self.reader, self.windows, self.keep = reader, windows, keep
        self._lent: list[torch.Tensor] = []  # the last buffers lent to this process, kept mapped

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, item: tuple[int, torch.Tensor]) -> torch.Tensor:
        i, x = item
        # Holding a lent buffer keeps its map in this worker: the next time it is lent, torch finds it
        # by its file and the pages are already mapped.
        self._lent = [x, *(t for t in self._lent if t.data_ptr() != x.data_ptr())][:max(1, self.keep)]
        window = self.windows[i]
        n, shard_set = window.num_samples, self.reader.shard_set
        y = np.empty((n, *shard_set.label_shape), shard_set.y_dtype)
        self.reader.read_into(window.segments, x.numpy()[:n], y, inverse_permutation(window.order),
                              threads=1)  # the workers are the parallelism
        return torch.from_numpy(y.astype(self.reader.label_dtype, copy=False))


class _Lending(torch.utils.data.Sampler):
    """DataLoader's indices: (window, buffer) pairs, the buffer taken when the index is handed to a
    worker. Fresh shared memory costs more than the read (page faults, zero-fill), so buffers are
    recycled: a buffer is lent again only once no window in flight and no batch a caller holds uses it
    (RecycledBuffers)."""

    def __init__(self, windows: list[Window], pool: RecycledBuffers):
        self.windows, self.pool = windows, pool
        self.lent: dict[int, np.ndarray] = {}  # window -> its buffer, until the trainer has cut it

    def __len__(self) -> int:
        return len(self.windows)

    def __iter__(self):
        for i in range(len(self.windows)):
            (x,) = self.pool.take()
            self.lent[i] = x
            yield i, x.base  # the shared tensor behind the array: it crosses to the worker as shared memory


def windows_from_workers(reader: ShardReader, windows: list[Window], workers: int, prefetch: int = 2,
                         context="forkserver") -> Iterator[tuple[Window, np.ndarray, torch.Tensor]]:
    """(window, samples, labels) of each window in order, read by DataLoader worker processes into
    shared-memory buffers this process lends them. forkserver: workers never inherit Horovod's threads,
    MPI state or open HDF5 handles."""
    shard_set = reader.shard_set
    capacity = max(w.num_samples for w in windows)
    # windows in flight (prefetch per worker), the one being cut, and the one before (its last batch)
    count = workers * prefetch + 2
    pool = RecycledBuffers(count, lambda: (shared_empty((capacity, *shard_set.sample_shape), shard_set.x_dtype),))
    lending = _Lending(windows, pool)
    loader = DataLoader(WindowDataset(reader, windows, keep=count), batch_size=None, sampler=lending,
                        num_workers=workers, prefetch_factor=prefetch, multiprocessing_context=context)
    for i, y in enumerate(loader):
        x = lending.lent.pop(i)
        yield windows[i], x[:windows[i].num_samples], y
        del x


def _torch_dtype(dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def pinned_empty(shape, dtype) -> np.ndarray:
    """A NumPy array in page-locked memory, for host-to-GPU copies that do not block."""
    return torch.empty(tuple(shape), dtype=_torch_dtype(dtype), pin_memory=True).numpy()


def shared_empty(shape, dtype) -> np.ndarray:
    """A NumPy array in shared memory; its `.base` is the tensor that crosses to worker processes."""
    return torch.empty(tuple(shape), dtype=_torch_dtype(dtype)).share_memory_().numpy()


def train_batches(rank_data, start_step: int, last_step: int, workers: int = 0,
                  prefetch: int = 2, pin: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches for steps [start_step, last_step); with workers, windows are read ahead in other processes.
    pin (GPU nodes): the shard reader's recycled batch buffers are page-locked."""
    if pin and getattr(rank_data, "train_reader", None) is not None:
        rank_data.train_reader.allocate = pinned_empty
    if rank_data.windows is None or workers == 0:
        for x, y in rank_data.batches(start_step, last_step):
            yield torch.from_numpy(x), torch.from_numpy(y)
        return
    windows = rank_data.windows(start_step, last_step)
    for window, x, y in windows_from_workers(rank_data.train_reader, windows, workers, prefetch):
        for x_batch, y_batch in rank_data.window_batches(window, x, y, start_step, last_step):
            yield torch.as_tensor(x_batch), torch.as_tensor(y_batch)


class ShardDataset(torch.utils.data.IterableDataset):
    """Library mode: this rank's batches of an HDF5 shard set (or users' HDF5 files) for one epoch.

    The same plan as `hvdtrain train` (disjoint, balanced, shuffled shares, whole-chunk reads); rank and
    size default to the launcher's (horovodrun, mpirun, srun). Use with DataLoader(batch_size=None) and call
    set_epoch(e) before each epoch, as with DistributedSampler. `data_options` are data.* config keys
    (x_key, y_key, layout, normalize, one_sample_per_file, shuffle_buffer_mb, tail...)."""

    def __init__(self, path, batch_size: int, rank=None, size=None, seed: int = 0, task: str = "classification",
                 **data_options):
        from hvdtrain.config import DataConfig
        from hvdtrain.data import Dataset
        from hvdtrain.world import world

        super().__init__()
        dataset = Dataset(DataConfig(source="hdf5", train=path, test=path, **data_options), seed, task)
        self.rank_data = dataset.for_rank(batch_size, world.rank if rank is None else rank,
                                          world.size if size is None else size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rank_data.steps_per_epoch

    def __iter__(self):
        steps = self.rank_data.steps_per_epoch
        for x, y in self.rank_data.batches(self.epoch * steps, (self.epoch + 1) * steps):
            yield torch.from_numpy(x), torch.from_numpy(y)
