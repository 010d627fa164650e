"""Users' data as it is on disk: layouts, dtypes, one sample per file, normalisation, tasks (no MPI).

Every file here is a real HDF5 file written by h5py; what the readers return is compared with what was
written, converted by hand.
"""
import h5py
import numpy as np
import pytest

from conftest import REPO, hvdtrain
from hvdtrain import config, entrypoints, metrics, tasks
from hvdtrain.config import DataConfig
from hvdtrain.data import Dataset
from hvdtrain.errors import ConfigError


def write(path, **datasets):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        for key, (value, options) in datasets.items():
            handle.create_dataset(key, data=value, **options)


def every_batch(rank_data):
    xs, ys = zip(*rank_data.batches(0, rank_data.steps_per_epoch))
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture
def per_file_fields(tmp_path):
    """DeepCAM's layout, small: one (16, 24, 4) float16 field and a (16, 24) mask per file, min/max stats."""
    rng = np.random.default_rng(0)
    fields, masks = [], []
    for split, count in (("train", 12), ("test", 4)):
        for i in range(count):
            x = (rng.normal(size=(16, 24, 4)) * [1, 10, 100, 1000]).astype(np.float16)
            y = rng.integers(0, 3, size=(16, 24)).astype(np.uint8)
            if split == "train":
                fields.append(x)
                masks.append(y)
            write(tmp_path / split / f"f{i:03d}.h5", **{"climate/data": (x, {}), "climate/labels_0": (y, {})})
    stacked = np.stack(fields).astype(np.float32)
    low, high = stacked.min((0, 1, 2)), stacked.max((0, 1, 2))
    write(tmp_path / "stats.h5", minval=(low, {}), maxval=(high, {}))
    return tmp_path, np.stack(fields), np.stack(masks), low, high


def deepcam_cfg(root, **extra):
    values = dict(source="hdf5", train=str(root / "train"), test=str(root / "test"), one_sample_per_file=True,
                  x_key="climate/data", y_key="climate/labels_0", layout="nhwc",
                  normalize={"method": "minmax", "stats_file": str(root / "stats.h5"), "stats_keys": ["minval", "maxval"]})
    values.update(extra)
    return DataConfig(**values)


def test_one_sample_per_file_channels_last_float16_with_minmax_stats(per_file_fields):
    root, fields, masks, low, high = per_file_fields
    dataset = Dataset(deepcam_cfg(root), seed=1, task="segmentation")
    assert dataset.sample_shape == (4, 16, 24) and dataset.label_shape == (16, 24) and dataset.num_classes == 3
    x, y = every_batch(dataset.for_rank(3, 0, 1))
    assert x.dtype == np.float32 and x.shape == (12, 4, 16, 24) and y.dtype == np.int64
    # each batch sample is one file's field, channels first, scaled by the file's statistics
    expected = (np.moveaxis(fields.astype(np.float32), -1, 1) - low[None, :, None, None]) / (high - low)[None, :, None, None]
    order = [int(np.argmin([np.abs(e - s).max() for e in expected])) for s in x]
    assert sorted(order) == list(range(12))  # every file once
    np.testing.assert_allclose(x, expected[order], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y, masks[order])
    assert x.min() >= 0 and x.max() <= 1


def test_files_of_one_sample_read_as_many_are_refused(per_file_fields):
    """The silent misread the issue measured: (16, 24, 4) read as 16 samples of (24, 4)."""
    root = per_file_fields[0]
    with pytest.raises(ConfigError, match="one_sample_per_file=true"):
        Dataset(deepcam_cfg(root, one_sample_per_file=False), seed=1, task="segmentation")
    cfg = DataConfig(source="hdf5", train=str(root / "train"), test=str(root / "test"),
                     x_key="climate/data", y_key="climate/labels_0")
    with pytest.raises(ConfigError, match="labels have shape \\(24,\\) per sample.*one_sample_per_file=true"):
        Dataset(cfg, seed=1, task="classification")
    with pytest.raises(ConfigError, match="set data.layout=nhwc"):
        Dataset(deepcam_cfg(root, layout="nchw", normalize={}), seed=1, task="segmentation")


def test_wrong_statistics_file_is_one_line(per_file_fields, tmp_path):
    root = per_file_fields[0]
    write(tmp_path / "three.h5", minval=(np.zeros(3, np.float32), {}), maxval=(np.ones(3, np.float32), {}))
    with pytest.raises(ConfigError, match="3 min value\\(s\\) for samples with 4 channel\\(s\\)"):
        Dataset(deepcam_cfg(root, normalize={"method": "minmax", "stats_file": str(tmp_path / "three.h5"),
                                             "stats_keys": ["minval", "maxval"]}), seed=1, task="segmentation")
    with pytest.raises(ConfigError, match="no dataset 'min'"):
        Dataset(deepcam_cfg(root, normalize={"method": "minmax", "stats_file": str(tmp_path / "three.h5")}),
                seed=1, task="segmentation")


def test_mask_label_outside_the_class_range_stops_the_read(per_file_fields):
    root = per_file_fields[0]
    dataset = Dataset(deepcam_cfg(root, num_classes=2), seed=1, task="segmentation")
    with pytest.raises(ConfigError, match="label 2 outside the class range \\[0, 2\\)"):
        every_batch(dataset.for_rank(3, 0, 1))


def test_uint8_channels_last_gzip_with_odd_chunks(tmp_path):
    """Detector images: uint8 (N, H, W, C), gzip, chunks of 7 samples and half an image: read through
    HDF5's filters, converted to float32 / 255, channels first, labels intact."""
    rng = np.random.default_rng(3)
    images, labels = [], []
    for i, n in enumerate((40, 23)):
        x = rng.integers(0, 256, size=(n, 10, 12, 3), dtype=np.uint8)
        y = rng.integers(0, 5, size=n).astype(np.int16)
        write(tmp_path / f"det{i}.h5", images=(x, {"compression": "gzip", "chunks": (7, 5, 12, 3)}),
              classes=(y, {"chunks": (5,)}))
        images.append(x)
        labels.append(y)
    images, labels = np.concatenate(images), np.concatenate(labels)
    cfg = DataConfig(source="hdf5", train=str(tmp_path / "*.h5"), test=str(tmp_path / "det1.h5"), x_key="images",
                     y_key="classes", layout="nhwc", normalize={"method": "divide", "divisor": 255})
    dataset = Dataset(cfg, seed=0, task="classification")
    assert dataset.sample_shape == (3, 10, 12) and dataset.num_classes == 5
    for rank in range(2):
        x, y = every_batch(dataset.for_rank(4, rank, 2))
        assert x.dtype == np.float32 and y.dtype == np.int64
        ids = [int(np.argmin(np.abs(images.astype(np.float32) / 255 - np.moveaxis(s, 0, -1)).reshape(len(images), -1).max(1)))
               for s in x]
        np.testing.assert_allclose(x, np.moveaxis(images[ids], -1, 1) / np.float32(255), rtol=1e-6)
        np.testing.assert_array_equal(y, labels[ids])


def test_regression_targets_of_shape_4_and_int16_volumes(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.integers(0, 30, size=(20, 8, 8, 8, 4)).astype(np.int16)
    y = rng.uniform(-1, 1, size=(20, 4)).astype(np.float32)
    write(tmp_path / "cosmo.h5", full=(x, {"compression": "gzip", "chunks": (3, 4, 8, 8, 4)}), unitPar=(y, {}))
    cfg = DataConfig(source="hdf5", train=str(tmp_path / "cosmo.h5"), test=str(tmp_path / "cosmo.h5"),
                     x_key="full", y_key="unitPar", layout="nhwc")
    dataset = Dataset(cfg, seed=0, task="regression")
    assert dataset.sample_shape == (4, 8, 8, 8) and dataset.label_shape == (4,) and dataset.num_classes == 0
    got_x, got_y = every_batch(dataset.for_rank(5, 0, 1))
    ids = [int(np.argmin(np.abs(y - t).max(1))) for t in got_y]
    np.testing.assert_array_equal(got_y, y[ids])
    np.testing.assert_array_equal(got_x, np.moveaxis(x[ids], -1, 1).astype(np.float32))
    with pytest.raises(ConfigError, match="must be integers \\(class ids\\), found float32; use task: regression"):
        Dataset(cfg, seed=0, task="classification")


def test_metrics_over_sums_equal_the_whole_set():
    rng = np.random.default_rng(5)
    outputs, targets = rng.normal(size=(30, 3, 4, 5)), rng.integers(0, 3, size=(30, 4, 5))
    scores = metrics.MetricSet(["mean_iou", "pixel_accuracy"], 3)
    split = scores.values(scores.sums(outputs[:11], targets[:11]) + scores.sums(outputs[11:], targets[11:]))
    predicted = outputs.argmax(1)
    ious = [np.sum((predicted == c) & (targets == c)) / np.sum((predicted == c) | (targets == c)) for c in range(3)]
    assert split["test_mean_iou"] == pytest.approx(np.mean(ious))
    assert split["test_pixel_accuracy"] == pytest.approx(np.mean(predicted == targets))
    regression = metrics.MetricSet(["mse", "mae"])
    values, truth = rng.normal(size=(9, 4)), rng.normal(size=(9, 4))
    result = regression.values(regression.sums(values, truth))
    assert result == {"test_mse": pytest.approx(np.mean((values - truth) ** 2)),
                      "test_mae": pytest.approx(np.mean(np.abs(values - truth)))}


def test_config_keys_for_tasks_models_and_losses(tmp_path):
    def error(*overrides):
        with pytest.raises(ConfigError) as caught:
            config.load(None, list(overrides))
        return str(caught.value)

    assert "train.loss: cross_entropy needs class labels" in error("task=regression", "train.loss=cross_entropy")
    assert "metrics: accuracy does not apply to task segmentation" in error("task=segmentation", "metrics=[accuracy]")
    assert "model.factory:" in error("model.factory=not-an-entry-point")
    assert "data.normalize.method: meanstd needs" in error("data.normalize.method=meanstd")
    cfg = config.load(None, [f"model.factory={tmp_path}/../x/model.py:build", "train.loss=mylosses:focal"])
    assert cfg.model.factory == f"{(tmp_path.parent / 'x/model.py').resolve()}:build"  # absolute for later runs
    assert tasks.headline(config.load(None, ["task=regression"])) == "test_mse"


def test_entry_points_fail_in_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_module\n")
    (tmp_path / "fine.py").write_text("def build(**kwargs):\n    return kwargs\n")
    with pytest.raises(ConfigError, match="model.factory: .*nothere.py: file not found"):
        entrypoints.resolve(f"{tmp_path}/nothere.py:build", "model.factory")
    with pytest.raises(ConfigError, match="importing .*broken.py raised ModuleNotFoundError"):
        entrypoints.resolve(f"{tmp_path}/broken.py:build", "model.factory")
    with pytest.raises(ConfigError, match="has no function 'other'"):
        entrypoints.resolve(f"{tmp_path}/fine.py:other", "model.factory")
    with pytest.raises(ConfigError, match="cannot import no.such.package"):
        entrypoints.resolve("no.such.package:f", "train.loss")
    assert entrypoints.resolve(f"{tmp_path}/fine.py:build", "model.factory")(a=1) == {"a": 1}


@pytest.mark.parametrize("case", ["missing_file", "factory_raises", "wrong_type", "bad_layout", "bad_stats"])
def test_cli_input_errors_are_one_line_exit_2(case, per_file_fields, tmp_path):
    root = per_file_fields[0]
    (tmp_path / "user_model.py").write_text(
        "def raises(**kwargs):\n    raise ValueError('width must be even')\n"
        "def not_a_model(**kwargs):\n    return 'a string'\n")
    common = ["--config", str(REPO / "configs/deepcam-torch.yaml"), f"data.train={root}/train",
              f"data.test={root}/test", f"data.normalize.stats_file={root}/stats.h5",
              "data.normalize.stats_keys=[minval, maxval]", "train.max_steps=1"]
    extra, expected = {
        "missing_file": ([f"model.factory={tmp_path}/absent.py:build"], "model.factory: "),
        "factory_raises": ([f"model.factory={tmp_path}/user_model.py:raises"], "raised ValueError: width must be even"),
        "wrong_type": ([f"model.factory={tmp_path}/user_model.py:not_a_model"], "returned a str, not a torch.nn.Module"),
        "bad_layout": (["data.layout=nchw", "data.normalize.method=none"], "set data.layout=nhwc"),
        "bad_stats": ([f"data.normalize.stats_file={tmp_path}/user_model.py"], "not a readable HDF5 file"),
    }[case]
    proc = hvdtrain("train", "--run-dir", str(tmp_path / "run"), *common, *extra, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and lines[0].startswith("hvdtrain: ") and "error:" in lines[0], proc.stderr


def test_data_shard_converts_users_files_once(per_file_fields, tmp_path):
    """`hvdtrain data shard --source hdf5:DIR` writes one-sample files as chunked shards, samples as stored."""
    root, fields, masks, _, _ = per_file_fields
    out = tmp_path / "shards"
    hvdtrain("data", "shard", "--source", f"hdf5:{root}/train", "--x-key", "climate/data", "--y-key",
             "climate/labels_0", "--one-sample-per-file", "--task", "segmentation", "--out", str(out), "--shards", "2",
             "--test-fraction", "0.25")
    hvdtrain("data", "verify", str(out), "--task", "segmentation")
    written_x, written_y = [], []
    for split in ("train", "test"):
        for path in sorted((out / split).glob("*.h5")):
            with h5py.File(path, "r") as handle:
                assert handle["x"].dtype == np.float16 and handle["y"].dtype == np.uint8
                written_x.append(handle["x"][()])
                written_y.append(handle["y"][()])
    written_x, written_y = np.concatenate(written_x), np.concatenate(written_y)
    assert written_x.shape == (12, 16, 24, 4) and written_y.shape == (12, 16, 24)
    ids = [int(np.argmin(np.abs(fields.astype(np.float32) - x.astype(np.float32)).reshape(12, -1).max(1))) for x in written_x]
    assert sorted(ids) == list(range(12))
    np.testing.assert_array_equal(written_x, fields[ids])
    np.testing.assert_array_equal(written_y, masks[ids])
    dataset = Dataset(DataConfig(source="hdf5", train=str(out / "train"), test=str(out / "test"), layout="nhwc"),
                      seed=0, task="segmentation")
    assert dataset.sample_shape == (4, 16, 24) and dataset.num_classes == 3
