"""Which samples each rank reads, in which order, computed from (shard counts, rank, size, epoch, seed).

No MPI is involved: every rank computes the same plan and takes its own part.

* Each shard is cut into read blocks (whole HDF5 chunks). Per epoch, the shard order and the block order
  inside each shard are shuffled with a seed; the concatenation of blocks is the epoch's *stream*.
* Rank r takes the r-th contiguous share of the stream, `batches_per_rank x batch_size` samples; every
  rank gets the same number of batches. `tail=drop` leaves the stream's last (< size x batch) samples out
  (different ones each epoch); `tail=pad` wraps around to the stream's start to fill the last batches.
* A rank's share is read in windows of whole batches; samples are shuffled inside a window, so memory
  is bounded by one window and reads stay sequential inside blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Optional, Sequence

import numpy as np

from hvdtrain.errors import ConfigError

Tail = Literal["drop", "pad"]


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard, read in one call."""
    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Window:
    epoch: int
    first_batch: int      # rank-local batch number of the window's first batch (0 for an elastic round)
    segments: tuple[Segment, ...]
    order: np.ndarray     # permutation applied to the samples read from the segments

    @property
    def num_samples(self) -> int:
        return len(self.order)


@dataclass(frozen=True)
class ShardPlan:
    counts: tuple[int, ...]          # samples per shard
    block_samples: tuple[int, ...]   # read-block size per shard (a multiple of its chunk length)
    batch_size: int
    rank: int
    size: int
    seed: int
    tail: Tail = "drop"
    window_batches: int = 16

    def __post_init__(self) -> None:
        total = self.total
        if total < self.size:
            raise ConfigError(f"data: {total} samples cannot be shared by {self.size} ranks")
        if self.batches_per_rank == 0:
            raise ConfigError(f"train.batch_size: {self.batch_size} x {self.size} ranks exceeds the "
                              f"{total} training samples; lower the batch size or use data.tail=pad")

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def batches_per_rank(self) -> int:
        global_batch = self.batch_size * self.size
        if self.tail == "pad":
            return -(-self.total // global_batch)
        return self.total // global_batch

    @property
    def samples_per_rank(self) -> int:
        return self.batches_per_rank * self.batch_size

    @property
    def windows_per_epoch(self) -> int:
        return -(-self.batches_per_rank // self.window_batches)

    @cached_property
    def shard_offsets(self) -> np.ndarray:
        """Global id of each shard's first sample (ids number the samples shard by shard)."""
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def _stream_blocks(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's block sequence as arrays (shard, start, stop)."""
        rng = np.random.default_rng([self.seed, epoch])
        shards, starts, stops = [], [], []
        for shard in rng.permutation(len(self.counts)):
            count, block = self.counts[shard], self.block_samples[shard]
            block_starts = np.arange(0, count, block, dtype=np.int64)
            block_starts = block_starts[rng.permutation(len(block_starts))]
            shards.append(np.full(len(block_starts), shard, dtype=np.int64))
            starts.append(block_starts)
            stops.append(np.minimum(block_starts + block, count))
        return np.concatenate(shards), np.concatenate(starts), np.concatenate(stops)

    def _segments(self, blocks: tuple[np.ndarray, np.ndarray, np.ndarray], first: int, last: int) -> list[Segment]:
        """Stream positions [first, last) as shard segments, wrapping past the end (tail=pad)."""
        shards, starts, stops = blocks
        ends = np.cumsum(stops - starts)  # stream position where each block ends
        segments: list[Segment] = []
        while first < last:
            position = first % self.total
            b = int(np.searchsorted(ends, position, side="right"))
            block_begin = int(ends[b] - (stops[b] - starts[b]))
            take = min(int(ends[b]) - position, last - first)
            start = int(starts[b]) + position - block_begin
            segment = Segment(int(shards[b]), start, start + take)
            if segments and segments[-1].shard == segment.shard and segments[-1].stop == segment.start:
                segment = Segment(segment.shard, segments.pop().start, segment.stop)
            segments.append(segment)
            first += take
        return segments

    def windows(self, epoch: int, start_batch: int = 0) -> list[Window]:
        """This rank's windows for `epoch`, from the one holding rank-local batch `start_batch`."""
        blocks = self._stream_blocks(epoch)
        rank_first = self.rank * self.samples_per_rank
        result = []
        for index in range(start_batch // self.window_batches, self.windows_per_epoch):
            first_batch = index * self.window_batches
            n_batches = min(self.window_batches, self.batches_per_rank - first_batch)
            first = rank_first + first_batch * self.batch_size
            segments = self._segments(blocks, first, first + n_batches * self.batch_size)
            n = n_batches * self.batch_size
            order = np.random.default_rng([self.seed, epoch, self.rank, index]).permutation(n)
            result.append(Window(epoch, first_batch, tuple(segments), order))
        return result

    def elastic_round(self, epoch: int, position: int, rank: int, size: int) -> tuple[Optional[Window], int]:
        """Elastic training: the round of the epoch's stream that starts at `position`, on `size` ranks.

        A round gives each rank `window_batches` batches (fewer at the end of the epoch) as one
        contiguous, window-shuffled slice of the stream: rank r reads
        [position + r x n, position + (r + 1) x n). Training state commits at round boundaries, so
        a resize (or a rank lost mid-round, which rolls back to the commit) continues at `position`
        with the new size: no sample of the epoch is repeated or skipped, whatever the sizes were;
        only the last (< size x batch) samples are left out, as with `tail=drop`. Returns this
        rank's window and the stream samples the round consumes, or (None, 0) when the epoch is done.
        """
        per_rank = min(self.window_batches, (self.total - position) // (size * self.batch_size)) * self.batch_size
        if per_rank <= 0:
            return None, 0
        first = position + rank * per_rank
        segments = self._segments(self._stream_blocks(epoch), first, first + per_rank)
        order = np.random.default_rng([self.seed, epoch, position, rank]).permutation(per_rank)
        return Window(epoch, 0, tuple(segments), order), size * per_rank

    def sample_ids(self, window: Window) -> np.ndarray:
        """Global ids of the window's samples in the order they are yielded (for tests and audits)."""
        ids = np.concatenate([np.arange(s.start, s.stop) + self.shard_offsets[s.shard] for s in window.segments])
        return ids[window.order]


def eval_segments(counts: Sequence[int], rank: int, size: int) -> list[Segment]:
    """Evaluation: rank r reads the r-th contiguous share of the set in shard order, no shuffle, no padding.

    Shares differ by at most one sample; evaluation sums are allreduced once, so uneven shares are safe.
    """
    total = sum(counts)
    first, last = total * rank // size, total * (rank + 1) // size
    offsets = np.concatenate([[0], np.cumsum(counts)])
    segments = []
    for shard, count in enumerate(counts):
        start, stop = max(first, offsets[shard]), min(last, offsets[shard] + count)
        if start < stop:
            segments.append(Segment(shard, int(start - offsets[shard]), int(stop - offsets[shard])))
    return segments
