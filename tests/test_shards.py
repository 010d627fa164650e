"""Sharded HDF5 pipeline: plan properties, writer/reader round trips, users' files, bad input, real ranks."""
import json
import multiprocessing
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hvdtrain.cli import main
from hvdtrain.config import DataConfig
from hvdtrain.data import Dataset
from hvdtrain.errors import ConfigError
from hvdtrain.shards.index import open_set
from hvdtrain.shards.plan import Segment, ShardPlan, eval_segments
from hvdtrain.shards.reader import ShardReader, raw_layout
from conftest import REPO, run, BIN


def plan_for(counts, blocks, batch, size, seed=0, tail="drop", window_batches=3):
    return [ShardPlan(tuple(counts), tuple(blocks), batch, r, size, seed, tail, window_batches)
            for r in range(size)]


def epoch_ids(plan, epoch, start_batch=0):
    return np.concatenate([plan.sample_ids(w) for w in plan.windows(epoch, start_batch)])


@settings(max_examples=150, deadline=None)
@given(counts=st.lists(st.integers(1, 60), min_size=1, max_size=6), block=st.integers(1, 9),
       batch=st.integers(1, 8), size=st.integers(1, 5), epoch=st.integers(0, 3),
       tail=st.sampled_from(["drop", "pad"]), window_batches=st.integers(1, 4))
def test_plan_is_disjoint_complete_and_balanced(counts, block, batch, size, epoch, tail, window_batches):
    total = sum(counts)
    try:
        plans = plan_for(counts, [block] * len(counts), batch, size, 7, tail, window_batches)
    except ConfigError:
        assert total < size or (tail == "drop" and total < batch * size)
        return
    per_rank = [epoch_ids(p, epoch) for p in plans]
    assert {len(ids) for ids in per_rank} == {plans[0].batches_per_rank * batch}  # balanced
    everything = np.concatenate(per_rank)
    assert everything.min() >= 0 and everything.max() < total
    if tail == "drop":
        assert len(set(everything)) == len(everything)  # disjoint
        assert total - len(everything) < batch * size  # only the tail is left out
    else:
        assert set(everything) == set(range(total))  # complete
        assert len(everything) - total < batch * size  # padding only fills the last global batch


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(5, 40), min_size=1, max_size=4), start=st.integers(0, 20))
def test_resuming_mid_epoch_continues_the_same_order(counts, start):
    plan = plan_for(counts, [4] * len(counts), 2, 2, window_batches=3)[1]
    start = start % plan.batches_per_rank
    full = epoch_ids(plan, 1)
    windows = plan.windows(1, start)
    resumed = np.concatenate([plan.sample_ids(w) for w in windows])
    skip = (start - windows[0].first_batch) * 2
    assert np.array_equal(resumed[skip:], full[start * 2:])


def test_epochs_reshuffle_shards_blocks_and_samples():
    plan = plan_for([100, 100, 100], [10] * 3, 10, 1, window_batches=5)[0]
    first, second = epoch_ids(plan, 0), epoch_ids(plan, 1)
    assert sorted(first) == sorted(second) and not np.array_equal(first, second)
    # reads stay block-sequential: each window touches whole blocks, not scattered samples
    for window in plan.windows(0):
        assert all(len(s) % 10 == 0 for s in window.segments)


def test_eval_segments_cover_the_set_once():
    segments = [eval_segments([5, 7, 3], r, 4) for r in range(4)]
    ids = [(s.shard, i) for part in segments for s in part for i in range(s.start, s.stop)]
    assert len(ids) == len(set(ids)) == 15


def id_arrays(n, shape=(1, 2, 2), classes=3):
    """Samples whose every value is their own id, so readers can be audited."""
    ids = np.arange(n, dtype=np.float32).reshape(n, *([1] * len(shape)))
    x = np.broadcast_to(ids, (n, *shape)).copy()
    return x, (np.arange(n) % classes).astype(np.int64)


@pytest.fixture
def id_shards(tmp_path):
    x, y = id_arrays(240)
    np.savez(tmp_path / "ids.npz", x=x, y=y)
    code = main(["data", "shard", "--source", f"npz:{tmp_path / 'ids.npz'}", "--out", str(tmp_path / "ids"),
                 "--shards", "5", "--chunk-samples", "4", "--compression", "lzf", "--test-fraction", "0.25"])
    assert code == 0
    return tmp_path / "ids"


def test_writer_index_and_verify(id_shards, capsys):
    train = open_set(str(id_shards / "train"))
    assert train.total == 180 and len(train.shards) == 5 and train.num_classes == 3
    assert all(s.sha256 and s.chunk_samples == 4 for s in train.shards)
    assert main(["data", "verify", str(id_shards)]) == 0
    assert main(["data", "inspect", str(id_shards / "train")]) == 0
    out = capsys.readouterr().out
    assert "verified train: 5 shards, 180 samples" in out and "(1, 2, 2) float32" in out
    with h5py.File(id_shards / "train/shard-00000.h5") as handle:
        assert handle["x"].chunks == (4, 1, 2, 2) and handle["x"].compression == "lzf"
        assert handle.attrs["count"] == 36


def test_reader_returns_each_train_sample_once_per_epoch(id_shards):
    dataset = Dataset(DataConfig(source="hdf5", train=str(id_shards / "train"), test=str(id_shards / "test"),
                                 shuffle_buffer_mb=0.001), seed=1)
    seen, labels = [], {}
    for rank in range(3):
        rank_data = dataset.for_rank(6, rank, 3)
        for x, y in rank_data.batches(0, rank_data.steps_per_epoch):
            seen += x[:, 0, 0, 0].astype(int).tolist()
            labels.update(zip(x[:, 0, 0, 0].astype(int).tolist(), y.tolist()))
    assert len(seen) == len(set(seen)) == 180  # 180 = 10 global batches of 18: nothing dropped
    assert all(labels[i] == i % 3 for i in labels)
    test_ids = sorted(int(v) for rank in range(3)
                      for x, _ in dataset.for_rank(6, rank, 3).eval_batches() for v in x[:, 0, 0, 0])
    assert len(test_ids) == 60 and not set(test_ids) & set(seen)


def test_workers_forked_after_reading_reopen_their_files(id_shards):
    """A reader used in the parent, then forked into DataLoader workers, reads the same windows."""
    from hvdtrain.torch.data import windows_from_workers

    dataset = Dataset(DataConfig(source="hdf5", train=str(id_shards / "train"), test=str(id_shards / "test"),
                                 shuffle_buffer_mb=0.001), seed=1)
    rank_data = dataset.for_rank(4, 0, 1)
    windows = 3 * rank_data.windows(0, rank_data.steps_per_epoch)  # more windows than lent buffers
    expected = [rank_data.train_reader.read_window(w) for w in windows]  # opens handles in the parent
    assert rank_data.train_reader._open
    got = [(x.copy(), y.numpy()) for _, x, y in windows_from_workers(rank_data.train_reader, windows, workers=2,
                                                                     context=multiprocessing.get_context("fork"))]
    assert len(got) == len(expected)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(expected, got))


def test_buffers_lent_to_workers_are_recycled_but_never_while_a_caller_holds_a_batch(id_shards, monkeypatch):
    """Fresh shared memory per window costs more than the read: the buffers go round, except one whose
    batches a caller still holds, which is replaced and left as it was."""
    import torch
    from hvdtrain.torch.data import windows_from_workers

    made = []
    share = torch.Tensor.share_memory_
    monkeypatch.setattr(torch.Tensor, "share_memory_", lambda self: made.append(1) or share(self))
    dataset = Dataset(DataConfig(source="hdf5", train=str(id_shards / "train"), test=str(id_shards / "test"),
                                 shuffle_buffer_mb=0.001), seed=1)
    rank_data = dataset.for_rank(4, 0, 1)
    windows = 6 * rank_data.windows(0, rank_data.steps_per_epoch)
    expected = [rank_data.train_reader.read_window(w)[0] for w in windows]
    kept = []
    for k, (window, x, _) in enumerate(windows_from_workers(rank_data.train_reader, windows, workers=1, prefetch=1)):
        assert np.array_equal(x, expected[k])
        if k % 5 == 0:
            kept.append((k, x[:2]))  # a batch the caller keeps
    # buffers: 1 worker x 1 window in flight, the one being cut and the one before; one more per kept window
    assert len(windows) >= 18 and len(made) <= 3 + len(kept) < len(windows)
    assert all(np.array_equal(batch, expected[k][:2]) for k, batch in kept)


def test_tf_data_adapter_yields_the_torch_batches(id_shards):
    from hvdtrain.tf.data import train_dataset
    from hvdtrain.torch.data import train_batches

    dataset = Dataset(DataConfig(source="hdf5", train=str(id_shards / "train"), test=str(id_shards / "test"),
                                 shuffle_buffer_mb=0.001), seed=4)
    rank_data = dataset.for_rank(5, 1, 2)
    steps = 2 * rank_data.steps_per_epoch
    torch_batches = [(x.numpy(), y.numpy()) for x, y in train_batches(rank_data, 3, steps, workers=1)]
    tf_batches = [(x.numpy(), y.numpy()) for x, y in train_dataset(rank_data, 3, steps, dataset.sample_shape)]
    assert len(tf_batches) == len(torch_batches) == steps - 3
    for (tx, ty), (fx, fy) in zip(torch_batches, tf_batches):
        assert np.array_equal(tx, fx) and np.array_equal(ty, fy)


def test_users_hdf5_files_any_layout(tmp_path):
    x, y = id_arrays(90, shape=(3,))
    layouts = [dict(), dict(chunks=(7, 3), compression="gzip"), dict(chunks=(1, 3))]  # contiguous, odd, tiny
    for i, layout in enumerate(layouts):
        with h5py.File(tmp_path / f"user-{i}.h5", "w") as handle:
            handle.create_dataset("images", data=x[i * 30:(i + 1) * 30].astype(np.float64), **layout)
            handle.create_dataset("meta/labels", data=y[i * 30:(i + 1) * 30].astype(np.int32))
    users = open_set(str(tmp_path / "user-*.h5"), x_key="images", y_key="meta/labels")
    assert users.counts == (30, 30, 30) and users.x_dtype == "float64" and users.num_classes == 3
    assert [s.chunk_samples for s in users.shards] == [None, 7, 1]
    plan = ShardPlan(users.counts, users.block_samples(), 10, 0, 1, seed=0)
    reader = ShardReader(users)
    ids = np.concatenate([reader.read_window(w)[0][:, 0] for w in plan.windows(0)])
    assert sorted(ids.astype(int)) == list(range(90))


def test_unfiltered_shards_are_read_raw_and_match_hdf5(tmp_path):
    """Copies from the file's map at HDF5's chunk offsets return exactly what h5py returns, edge chunks included."""
    x, y = id_arrays(101, shape=(3, 2))
    layouts = [dict(chunks=(8, 3, 2)), dict(), dict(chunks=(8, 3, 2), compression="gzip"), dict(chunks=(8, 1, 2))]
    for i, layout in enumerate(layouts):
        with h5py.File(tmp_path / f"part-{i}.h5", "w") as handle:
            handle.create_dataset("x", data=x, **layout)
            handle.create_dataset("y", data=y)
    shard_set = open_set(str(tmp_path / "part-*.h5"))
    reader = ShardReader(shard_set)
    raw = [reader._shard(i).x_layout is not None for i in range(4)]
    assert raw == [True, True, False, False]  # chunked, contiguous; gzip and split samples go through HDF5
    assert all(reader._shard(i).y_layout is not None for i in range(4))  # contiguous labels: raw too
    plan = ShardPlan(shard_set.counts, shard_set.block_samples(), 7, 0, 1, seed=3, window_batches=2)
    for window in plan.windows(0):
        got, labels = reader.read_window(window)
        ids = plan.sample_ids(window)
        assert np.array_equal(got, x[ids % 101]) and np.array_equal(labels, y[ids % 101])
    with h5py.File(tmp_path / "part-0.h5") as handle:
        layout = raw_layout(handle, handle["x"], np.dtype("float32"))
        assert len(layout.offsets) == 13 and (layout.offsets > 0).all()
        assert raw_layout(handle, handle["x"], np.dtype("float64")) is None  # h5py converts dtypes


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_copy_threads_read_exactly_what_one_thread_reads(tmp_path, monkeypatch, threads):
    """A window split across copy threads (raw maps and HDF5-filtered files mixed) gives the same rows as
    one thread, each thread copying its own run of the file order; a thread's failure is the one-line error."""
    import threading

    from hvdtrain.shards import reader as reader_module

    x, y = id_arrays(101, shape=(3, 2))
    for i, layout in enumerate([dict(chunks=(8, 3, 2)), dict(chunks=(8, 3, 2), compression="gzip"), dict()]):
        with h5py.File(tmp_path / f"part-{i}.h5", "w") as handle:
            handle.create_dataset("x", data=x, **layout)
            handle.create_dataset("y", data=y)
    shard_set = open_set(str(tmp_path / "part-*.h5"))
    monkeypatch.setattr(reader_module, "MIN_BYTES_PER_COPY_THREAD", 1)
    reader = ShardReader(shard_set)
    reader.read_threads = threads
    names = []  # the thread of each part read
    copy = reader._read_pieces

    def recording(*args):
        names.append(threading.current_thread().name)
        return copy(*args)

    monkeypatch.setattr(reader, "_read_pieces", recording)
    plan = ShardPlan(shard_set.counts, shard_set.block_samples(), 7, 0, 1, seed=5, window_batches=5)
    for window in plan.windows(0):
        assert reader._threads_for(window.segments) == threads
        names.clear()
        got, labels = reader.read_window(window)
        assert len(names) == threads and names.count(threading.current_thread().name) == 1
        assert sum(name.startswith("shard-copy") for name in names) == threads - 1
        ids = plan.sample_ids(window)
        assert np.array_equal(got, x[ids % 101]) and np.array_equal(labels, y[ids % 101])
        single_x, single_y = reader.buffers(window.num_samples)
        reader.read_into(window.segments, single_x, single_y, reader_module.inverse_permutation(window.order),
                         threads=1)
        assert np.array_equal(single_x, got) and np.array_equal(single_y, labels)

    # a forked child (the parent's pool threads do not exist there) starts threads of its own
    window = plan.windows(0)[0]
    child = os.fork()
    if child == 0:
        got, _ = reader.read_window(window)
        os._exit(0 if np.array_equal(got, x[plan.sample_ids(window) % 101]) and reader._pool is not None else 1)
    assert os.waitpid(child, 0)[1] == 0

    monkeypatch.setattr(reader_module, "MIN_BYTES_PER_COPY_THREAD", 10**9)
    assert reader._threads_for(plan.windows(0)[0].segments) == 1  # too few bytes to split
    monkeypatch.setattr(reader_module, "MIN_BYTES_PER_COPY_THREAD", 1)
    monkeypatch.setattr(reader_module, "open_shard_limit", lambda: 2)
    assert reader._threads_for([Segment(0, 0, 8), Segment(1, 0, 8), Segment(2, 0, 8)]) == 1  # more files than stay open
    monkeypatch.undo()

    reader = ShardReader(shard_set)
    opened = reader._shard(2)
    opened.bytes = opened.bytes[:int(opened.x_layout.offsets[-1]) + 8]  # the last file, read by the last thread
    with pytest.raises(ConfigError, match=r"part-2.h5: cannot read samples .*the file ends at byte"):
        reader.read_into([Segment(0, 0, 101), Segment(1, 0, 101), Segment(2, 0, 101)],
                         *reader.buffers(303), threads=3)


@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.integers(1, 5))
def test_split_evenly_cuts_the_file_order_into_equal_runs(lengths, parts):
    from hvdtrain.shards.reader import split_evenly

    pieces, first = [], 0
    for shard, n in enumerate(lengths):
        pieces.append((Segment(shard, 3, 3 + n), np.arange(first, first + n)))
        first += n
    runs = split_evenly(pieces, parts)
    total = sum(lengths)
    sizes = [sum(len(segment) for segment, _ in run) for run in runs]
    assert len(runs) == min(parts, total) and sum(sizes) == total and max(sizes) - min(sizes) <= 1
    flat = [(segment.shard, sample, row) for run in runs for segment, rows in run
            for sample, row in zip(range(segment.start, segment.stop), rows)]
    assert flat == [(segment.shard, sample, row) for segment, rows in pieces
                    for sample, row in zip(range(segment.start, segment.stop), rows)]  # same order, nothing lost


def test_a_map_shorter_than_the_samples_is_one_clear_error_not_a_crash(tmp_path):
    """A read past the end of a file's map would kill the process (SIGBUS); it is checked first."""
    x, y = id_arrays(40, shape=(3, 2))
    with h5py.File(tmp_path / "part.h5", "w") as handle:
        handle.create_dataset("x", data=x, chunks=(8, 3, 2))
        handle.create_dataset("y", data=y)
    reader = ShardReader(open_set(str(tmp_path / "part.h5")))
    opened = reader._shard(0)
    opened.bytes = opened.bytes[:int(opened.x_layout.offsets[-1]) + 8]  # as if cut inside the last chunk
    with pytest.raises(ConfigError, match=r"part.h5: cannot read samples 32..40 .*the file ends at byte"):
        reader.read([Segment(0, 32, 40)])


def _mapped_kib(path) -> int:
    """Resident KiB of this process's maps of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.parametrize("budget", ["fits", "exceeded"])
def test_copied_pages_stay_mapped_only_while_the_set_fits_the_budget(tmp_path, monkeypatch, budget):
    """Mapped pages count in RSS: a set larger than the budget is unmapped window by window (the page
    cache keeps it), one within it stays mapped for the next epoch."""
    from hvdtrain.shards import reader as reader_module

    x, y = id_arrays(256, shape=(32, 32))  # 4 KiB a sample, 1 MiB in all
    with h5py.File(tmp_path / "part.h5", "w") as handle:
        handle.create_dataset("x", data=x, chunks=(8, 32, 32))
        handle.create_dataset("y", data=y)
    set_bytes = x.nbytes
    monkeypatch.setattr(reader_module, "map_budget_bytes", lambda: set_bytes if budget == "fits" else set_bytes - 1)
    reader = ShardReader(open_set(str(tmp_path / "part.h5")))
    got, labels = reader.read([Segment(0, 0, 256)])
    assert np.array_equal(got, x) and np.array_equal(labels, y)
    resident = _mapped_kib(tmp_path / "part.h5")
    if budget == "fits":
        assert resident >= set_bytes // 1024
    else:
        assert resident <= 128  # what the kernel maps around a fault at the ends of the dropped ranges


def test_batches_a_caller_keeps_are_never_overwritten(tmp_path):
    x, y = id_arrays(400)
    np.savez(tmp_path / "ids.npz", x=x, y=y)
    assert main(["data", "shard", "--source", f"npz:{tmp_path / 'ids.npz'}", "--out", str(tmp_path / "ids"),
                 "--shards", "3", "--chunk-samples", "8", "--test-fraction", "0.1"]) == 0
    dataset = Dataset(DataConfig(source="hdf5", train=str(tmp_path / "ids/train"), test=str(tmp_path / "ids/test"),
                                 shuffle_buffer_mb=0.0005), seed=2)
    rank_data = dataset.for_rank(4, 0, 1)
    kept = list(rank_data.batches(0, rank_data.steps_per_epoch))  # every batch held at once
    allocated = []  # window buffers: recycled when the caller lets its batches go
    rank_data.train_reader.allocate = lambda shape, dtype: allocated.append(shape) or np.empty(shape, dtype)
    streamed = [x[:, 0, 0, 0].copy() for x, _ in rank_data.batches(0, rank_data.steps_per_epoch)]
    assert len(allocated) <= 3 < len(rank_data.windows(0, rank_data.steps_per_epoch))
    ids = np.concatenate([x[:, 0, 0, 0] for x, _ in kept])
    assert len(set(ids.tolist())) == len(ids) == rank_data.steps_per_epoch * 4
    assert all(np.array_equal(k[0][:, 0, 0, 0], s) for k, s in zip(kept, streamed))
    assert all(np.array_equal(k[1], k[0][:, 0, 0, 0].astype(int) % 3) for k in kept)


def test_a_small_test_set_gets_at_most_one_shard_per_sample_and_no_temporary_file_stays(tmp_path):
    from hvdtrain.shards.writer import write_splits
    from hvdtrain.sources import synthetic

    written = write_splits(synthetic((2,), 2, 20, seed=0, test_fraction=0.1), tmp_path, shards=4)
    assert [len(written[split].shards) for split in ("train", "test")] == [4, 2]
    assert not [p.name for p in tmp_path.rglob(".*")]  # shards are renamed into place (hvdtrain.atomic)


# ---- bad input: one line, exit code 2 -------------------------------------------------------------

def train_args(tmp_path, train, test, *extra):
    return ["train", "--config", str(REPO / "configs/digits-torch.yaml"), "--run-dir", str(tmp_path / "run"),
            f"data.train={train}", f"data.test={test}", *extra]


def expect_exit_2(args, capsys, fragment):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_shard_set(tmp_path, capsys):
    expect_exit_2(train_args(tmp_path, tmp_path / "nope", tmp_path / "nope2"), capsys, "nope: no such file or directory")


def test_corrupt_shard_checksum_and_hdf5_error(id_shards, tmp_path, capsys):
    shard = id_shards / "train/shard-00002.h5"
    data = bytearray(shard.read_bytes())
    shard.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    expect_exit_2(["data", "verify", str(id_shards)], capsys, "shard-00002.h5: checksum mismatch")
    dataset = Dataset(DataConfig(source="hdf5", train=str(id_shards / "train"), test=str(id_shards / "test")), 0)
    rank_data = dataset.for_rank(4, 0, 1)
    with pytest.raises(ConfigError, match="shard-00002.h5: (not a readable HDF5 file|cannot read samples)"):
        list(rank_data.batches(0, rank_data.steps_per_epoch))


def test_disagreeing_missing_and_empty_shards(tmp_path, capsys):
    def make(name, **datasets):
        with h5py.File(tmp_path / name, "w") as handle:
            for key, value in datasets.items():
                handle.create_dataset(key, data=value)
    make("a.h5", x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.int64))
    make("b.h5", x=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int64))
    expect_exit_2(train_args(tmp_path, tmp_path / "*.h5", tmp_path / "a.h5"), capsys, "b.h5: samples (3,)")
    os.remove(tmp_path / "b.h5")
    make("c.h5", x=np.zeros((4, 2), np.float32))
    expect_exit_2(train_args(tmp_path, tmp_path / "c.h5", tmp_path / "a.h5"), capsys, "c.h5: no dataset 'y'")
    make("d.h5", x=np.zeros((0, 2), np.float32), y=np.zeros(0, np.int64))
    expect_exit_2(train_args(tmp_path, tmp_path / "d.h5", tmp_path / "a.h5"), capsys, "d.h5: empty shard")
    make("e.h5", x=np.zeros((4, 2), np.float32), y=np.array([0, 1, -1, 2]))
    expect_exit_2(train_args(tmp_path, tmp_path / "e.h5", tmp_path / "a.h5"), capsys, "e.h5: negative label")
    (tmp_path / "f.h5").write_text("not hdf5")
    expect_exit_2(train_args(tmp_path, tmp_path / "f.h5", tmp_path / "a.h5"), capsys, "f.h5: not a readable HDF5")


def test_labels_out_of_range_and_too_many_ranks(id_shards, capsys):
    with h5py.File(id_shards / "test/shard-00000.h5", "r+") as handle:
        handle["y"][0] = 7  # the index says 3 classes
    expect_exit_2(["data", "verify", str(id_shards / "test")], capsys, "shard-00000.h5: checksum mismatch")
    index = json.loads((id_shards / "test/index.json").read_text())
    index["shards"][0]["sha256"] = None  # an index without checksums still catches the labels
    (id_shards / "test/index.json").write_text(json.dumps(index))
    expect_exit_2(["data", "verify", str(id_shards / "test")], capsys, "labels outside [0, 3)")
    test_set = Dataset(DataConfig(source="hdf5", train=str(id_shards / "test"), test=str(id_shards / "test")), 0)
    rank_data = test_set.for_rank(4, 0, 1)
    with pytest.raises(ConfigError, match=r"shard-00000.h5: samples 0..12: label 7 outside the class range \[0, 3\)"):
        list(rank_data.batches(0, rank_data.steps_per_epoch))
    dataset = Dataset(DataConfig(source="hdf5", train=str(id_shards / "test"), test=str(id_shards / "test")), 0)
    with pytest.raises(ConfigError, match="60 samples cannot be shared by 64 ranks"):
        dataset.for_rank(1, 0, 64)


@pytest.mark.parametrize("workers", [0, 1])
def test_two_ranks_see_every_sample_once(id_shards, tmp_path, workers):
    out = tmp_path / "seen.json"
    run([str(BIN / "horovodrun"), "-np", "2", "--gloo", sys.executable, str(REPO / "tests/ranks/seen_samples.py"),
         str(id_shards / "train"), str(id_shards / "test"), "9", str(workers), str(out)], timeout=180)
    reports = json.loads(out.read_text())
    per_rank = [[i for batch in r["batches"] for i in batch] for r in sorted(reports, key=lambda r: r["rank"])]
    assert len(per_rank[0]) == len(per_rank[1]) == 90  # 180 samples, global batch 18: 10 steps each
    train = open_set(str(id_shards / "train"))
    stored = []
    for i in range(len(train.shards)):
        with h5py.File(train.shard_path(i)) as handle:
            stored += handle["x"][:, 0, 0, 0].astype(int).tolist()
    assert sorted(per_rank[0] + per_rank[1]) == sorted(stored)  # every sample once, none twice


def test_index_cannot_point_outside_its_set(id_shards, capsys):
    index = id_shards / "train/index.json"
    raw = json.loads(index.read_text())
    for bad in ("../../outside.h5", "/etc/passwd"):
        raw["shards"][0]["path"] = bad
        index.write_text(json.dumps(raw))
        expect_exit_2(["data", "verify", str(id_shards / "train")], capsys,
                      f"shard path {bad!r} leaves the shard set's directory")


@settings(max_examples=150, deadline=None)
@given(counts=st.lists(st.integers(1, 60), min_size=1, max_size=5), block=st.integers(1, 9),
       batch=st.integers(1, 6), window_batches=st.integers(1, 4), epoch=st.integers(0, 3),
       sizes=st.lists(st.integers(1, 4), min_size=1, max_size=12))
def test_elastic_rounds_never_repeat_or_skip_across_resizes(counts, block, batch, window_batches, epoch, sizes):
    """Any sequence of world sizes, one per round (a resize at every commit): each sample of the epoch
    is trained at most once, and only a tail smaller than the last global batch is left out."""
    if sum(counts) < batch:
        return  # the plan itself refuses a batch larger than the data
    base = ShardPlan(tuple(counts), (block,) * len(counts), batch, 0, 1, seed=9, window_batches=window_batches)
    position, seen = 0, []
    for round_number in range(10_000):
        size = sizes[round_number % len(sizes)]
        windows = [base.elastic_round(epoch, position, r, size) for r in range(size)]
        if windows[0][0] is None:
            break
        assert len({w.num_samples for w, _ in windows}) == 1  # balanced: the same steps on every rank
        seen += [i for w, _ in windows for i in base.sample_ids(w)]
        position += windows[0][1]
    assert len(seen) == len(set(seen))
    assert sum(counts) - len(seen) < size * batch  # the epoch ended: what is left cannot fill one global batch


def test_thousands_of_one_sample_files_are_read_within_a_small_descriptor_limit(tmp_path):
    """One-sample-per-file sets (DeepCAM's layout) have more files than a process may open (1024 is a
    common limit): the reader keeps a bounded number open and reads every file once per epoch."""
    for i in range(300):
        with h5py.File(tmp_path / f"s{i:04d}.h5", "w") as handle:
            handle["x"] = np.full((2, 3), i, np.float32)
            handle["y"] = np.int64(i % 3)
    script = f"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from hvdtrain.config import DataConfig
from hvdtrain.data import Dataset
from hvdtrain.shards.reader import open_shard_limit
dataset = Dataset(DataConfig(source="hdf5", train={str(tmp_path)!r}, test={str(tmp_path)!r}, one_sample_per_file=True), 0)
rank_data = dataset.for_rank(10, 0, 1)
ids = [int(v) for x, y in rank_data.batches(0, rank_data.steps_per_epoch) for v in x[:, 0, 0]]
labels = [int(v) for x, y in rank_data.batches(0, rank_data.steps_per_epoch) for v in y]
assert sorted(ids) == list(range(300)), sorted(ids)[:10]
assert sorted(labels) == sorted(i % 3 for i in range(300))
print("limit", open_shard_limit(), "open", len(rank_data.train_reader._open))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["limit", "8", "open", "8"]
