"""In-memory sources: the same samples trained in memory or sharded first, one split, bad input in one line."""
import h5py
import numpy as np
import pytest

from hvdtrain.cli import main
from hvdtrain.config import DataConfig
from hvdtrain.data import load_arrays
from hvdtrain.errors import ConfigError
from hvdtrain.shards.index import open_set
from hvdtrain.sources import open_source, split_indices, synthetic


def stored(directory):
    """A written set's samples, in shard order."""
    shard_set = open_set(str(directory))
    xs, ys = [], []
    for i in range(len(shard_set.shards)):
        with h5py.File(shard_set.shard_path(i)) as handle:
            xs.append(handle["x"][...])
            ys.append(handle["y"][...])
    return np.concatenate(xs), np.concatenate(ys)


def shard(tmp_path, source, *options):
    out = tmp_path / "shards"
    # shards of odd sizes and 5-sample chunks: reads that line up with nothing in the source
    assert main(["data", "shard", "--source", source, "--out", str(out), "--shards", "3",
                 "--chunk-samples", "5", *options]) == 0
    return out


def assert_same_samples(arrays, out):
    for split, x, y in (("train", arrays.x_train, arrays.y_train), ("test", arrays.x_test, arrays.y_test)):
        x_stored, y_stored = stored(out / split)
        assert x_stored.shape == x.shape and y_stored.dtype == y.dtype == np.int64
        assert np.array_equal(x_stored, x) and np.array_equal(y_stored, y), split


def test_synthetic_sharded_is_what_training_generates(tmp_path):
    cfg = DataConfig(source="synthetic", synthetic_shape=[4, 32, 32], synthetic_classes=3, synthetic_samples=300,
                     test_fraction=0.25)
    arrays = load_arrays(cfg, 7)
    assert arrays.x_train.shape == (225, 4, 32, 32) and arrays.x_test.shape == (75, 4, 32, 32)
    out = shard(tmp_path, "synthetic", "--synthetic-shape", "4,32,32", "--synthetic-classes", "3",
                "--synthetic-count", "300", "--seed", "7", "--test-fraction", "0.25")
    assert_same_samples(arrays, out)


def test_synthetic_samples_do_not_depend_on_how_they_are_read():
    # 64 samples of 4x32x32 float32 per generated block: these reads straddle blocks
    train = synthetic((4, 32, 32), 3, 300, seed=7, test_fraction=0.25)["train"]
    x, y = train.arrays()
    for start, stop in ((0, 1), (63, 65), (100, 225)):
        part_x, part_y = train.read(start, stop)
        assert np.array_equal(part_x, x[start:stop]) and np.array_equal(part_y, y[start:stop])
    bigger = synthetic((4, 32, 32), 3, 3000, seed=7, test_fraction=0.25)["train"]  # a larger set extends it
    assert np.array_equal(bigger.read(0, 225)[0], x)
    assert set(np.unique(y)) == {0, 1, 2} and x.dtype == np.float32


def test_digits_sharded_is_what_training_splits(tmp_path):
    arrays = load_arrays(DataConfig(source="digits", test_fraction=0.2), 3)
    assert arrays.x_train.shape[1:] == (1, 8, 8) and len(arrays.y_train) + len(arrays.y_test) == 1797
    assert_same_samples(arrays, shard(tmp_path, "digits", "--seed", "3", "--test-fraction", "0.2"))


def test_npz_grey_images_get_a_channel_axis_on_both_paths(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "grey.npz", x=rng.random((40, 5, 6), dtype=np.float32), y=np.arange(40) % 4)
    arrays = load_arrays(DataConfig(source=f"npz:{tmp_path / 'grey.npz'}", test_fraction=0.25), 1)
    assert arrays.x_train.shape == (30, 1, 5, 6) and arrays.num_classes == 4
    assert_same_samples(arrays, shard(tmp_path, f"npz:{tmp_path / 'grey.npz'}", "--seed", "1",
                                      "--test-fraction", "0.25"))


def test_npy_pairs_are_the_concatenated_arrays(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.random((50, 3), dtype=np.float32), np.arange(50) % 5
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for name, part in (("a", slice(0, 20)), ("b", slice(20, 50))):
        np.save(pairs / f"{name}_x.npy", x[part])
        np.save(pairs / f"{name}_y.npy", y[part])
    np.savez(tmp_path / "all.npz", x=x, y=y)
    from_pairs = open_source(f"npy:{pairs}", 0.2, 5)
    from_npz = open_source(f"npz:{tmp_path / 'all.npz'}", 0.2, 5)
    for split in ("train", "test"):
        assert all(np.array_equal(a, b) for a, b in zip(from_pairs[split].arrays(), from_npz[split].arrays()))
    out = shard(tmp_path, str(pairs), "--seed", "5")  # `data shard` also takes the bare directory
    assert np.array_equal(stored(out / "train")[0], from_pairs["train"].arrays()[0])


# ---- the split ------------------------------------------------------------------------------------

def test_split_is_stratified_when_every_class_can_be(capsys):
    y = np.random.default_rng(0).permutation(np.repeat(np.arange(4), 25))
    train, test = split_indices(y, 0.2, 0, "data.source")
    assert np.bincount(y[test]).tolist() == [5, 5, 5, 5] and np.bincount(y[train]).tolist() == [20] * 4
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("y, fraction, reason", [
    (np.array([0] * 20 + [1] * 20 + [2]), 0.25, "class 2 has 1 sample"),
    (np.repeat(np.arange(10), 2), 0.2, "a test set of 4 samples cannot hold all 10 classes"),
])
def test_split_falls_back_to_a_seeded_shuffle_and_says_why(y, fraction, reason, capsys):
    train, test = split_indices(y, fraction, 3, "data.source: mine.npz")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err and "mine.npz" in err and "shuffle" in err
    assert len(test) == int(np.ceil(fraction * len(y))) and sorted([*train, *test]) == list(range(len(y)))
    again = split_indices(y, fraction, 3, "data.source: mine.npz")
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)


def test_a_class_too_small_to_stratify_still_trains_in_memory(tmp_path, capsys):
    np.savez(tmp_path / "rare.npz", x=np.zeros((41, 2), np.float32), y=np.array([0] * 20 + [1] * 20 + [2]))
    arrays = load_arrays(DataConfig(source=f"npz:{tmp_path / 'rare.npz'}", test_fraction=0.25), 0)
    assert len(arrays.y_train) == 30 and len(arrays.y_test) == 11 and arrays.num_classes == 3
    assert "rare.npz: class 2 has 1 sample" in capsys.readouterr().err


def test_labels_stored_as_whole_floats_are_class_ids(tmp_path):
    np.savez(tmp_path / "floats.npz", x=np.zeros((10, 2), np.float32), y=np.arange(10.0) % 2)
    arrays = load_arrays(DataConfig(source=f"npz:{tmp_path / 'floats.npz'}"), 0)
    assert arrays.y_train.dtype == np.int64 and arrays.num_classes == 2


# ---- bad input: ConfigError naming the file, one line and exit code 2 from the CLI ------------------

def _bad_sources(tmp_path):
    def npz(name, **arrays):
        np.savez(tmp_path / name, **arrays)
        return f"npz:{tmp_path / name}"
    x = np.zeros((10, 3), np.float32)
    (tmp_path / "text.npz").write_text("not an npz file")
    (tmp_path / "pairs").mkdir()
    np.save(tmp_path / "pairs/x.npy", x)
    return [
        (f"npz:{tmp_path / 'nope.npz'}", "nope.npz: file not found"),
        (f"npz:{tmp_path / 'text.npz'}", "text.npz: not a readable .npz file"),
        (npz("no_y.npz", x=x), "no_y.npz: missing array(s) ['y']"),
        (npz("short.npz", x=x, y=np.zeros(9, np.int64)), "short.npz: x has 10 samples but y has 9"),
        (npz("negative.npz", x=x, y=np.array([0, 1, -1] + [0] * 7)), "negative.npz: negative label -1"),
        (npz("fractional.npz", x=x, y=np.linspace(0, 1, 10)), "fractional.npz: labels y must be integers"),
        (npz("one.npz", x=x[:1], y=np.zeros(1, np.int64)), "one.npz: needs at least 2 samples, found 1"),
        (f"npy:{tmp_path / 'pairs'}", "pairs/x.npy: no matching y.npy"),
    ]


def test_bad_inputs_are_config_errors_naming_the_file(tmp_path, capsys):
    for spec, message in _bad_sources(tmp_path):
        with pytest.raises(ConfigError) as raised:
            open_source(spec, 0.2, 0)
        assert message in str(raised.value) and "\n" not in str(raised.value)
        for argv in (["data", "shard", "--source", spec, "--out", str(tmp_path / "out")],
                     ["check", f"data.source={spec}"]):
            if argv[0] == "check" and spec.startswith("npy:"):
                continue  # data.source takes digits, synthetic, npz:PATH and hdf5
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith("hvdtrain: error: ") and message in err, err
            assert err.count("\n") == 1 and "Traceback" not in err


def test_a_split_that_leaves_a_set_empty_is_a_config_error(capsys):
    with pytest.raises(ConfigError, match="a test fraction of 0.95 of 10 samples leaves no training samples"):
        open_source("synthetic", 0.95, 0, (1, 2, 2), 2, 10)
    assert main(["data", "shard", "--source", "nonsense", "--out", "unused"]) == 2
    assert "--source: 'nonsense': use digits, synthetic, npz:PATH" in capsys.readouterr().err
