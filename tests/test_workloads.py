"""Users' own models and science data under real Horovod ranks (np=2): the two reference workloads in both
frameworks, a factory in a file outside the package, TensorBoard events, and the U-Net's int8 export."""
import json

import h5py
import numpy as np
import pytest

from conftest import REPO, hvdtrain


@pytest.fixture(scope="module")
def deepcam(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "deepcam"
    hvdtrain("data", "synth", "--kind", "deepcam", "--out", str(out), "--samples", "128", "--test-samples", "32",
             "--dtype", "float16")
    return out


@pytest.fixture(scope="module")
def cosmoflow(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "cosmoflow"
    hvdtrain("data", "synth", "--kind", "cosmoflow", "--out", str(out), "--samples", "256", "--test-samples", "64")
    return out


def deepcam_args(root):
    return [f"data.train={root}/train", f"data.test={root}/test", f"data.normalize.stats_file={root}/stats.h5"]


def summary_of(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def majority_iou(root) -> float:
    """Mean IoU of predicting the most common class everywhere (classes present in the labels)."""
    masks = np.concatenate([h5py.File(p, "r")["climate/labels_0"][()].ravel() for p in sorted((root / "test").glob("*.h5"))])
    counts = np.bincount(masks, minlength=3)
    return float(counts.max() / counts.sum() / np.count_nonzero(counts))


def mean_predictor_mse(root) -> float:
    def targets(split):
        return np.concatenate([h5py.File(p, "r")["unitPar"][()] for p in sorted((root / split).glob("*.h5"))])
    return float(np.mean((targets("test") - targets("train").mean(0)) ** 2))


def unet_run(framework, deepcam, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(f"deepcam-{framework}") / "run"
    hvdtrain("train", "--config", str(REPO / f"configs/deepcam-{framework}.yaml"), "--run-dir", str(run_dir),
             *deepcam_args(deepcam), np=2, timeout=600)
    return run_dir


@pytest.fixture(scope="module")
def unet_runs(deepcam, tmp_path_factory):
    return {framework: unet_run(framework, deepcam, tmp_path_factory) for framework in ("torch", "tf")}


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_deepcam_unet_beats_the_majority_class(framework, deepcam, unet_runs):
    summary, baseline = summary_of(unet_runs[framework]), majority_iou(deepcam)
    final = summary["final"]
    print(f"deepcam {framework} np=2: test_mean_iou {final['test_mean_iou']:.4f} (majority class {baseline:.4f}), "
          f"pixel accuracy {final['test_pixel_accuracy']:.4f}")
    assert summary["weights_identical"] and summary["world_size"] == 2 and summary["headline"] == "test_mean_iou"
    assert final["test_mean_iou"] > baseline + 0.15


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_cosmoflow_cnn3d_beats_the_mean(framework, cosmoflow, tmp_path):
    run_dir = tmp_path / "run"
    hvdtrain("train", "--config", str(REPO / f"configs/cosmoflow-{framework}.yaml"), "--run-dir", str(run_dir),
             f"data.train={cosmoflow}/train", f"data.test={cosmoflow}/test", np=2, timeout=600)
    summary, baseline = summary_of(run_dir), mean_predictor_mse(cosmoflow)
    print(f"cosmoflow {framework} np=2: test_mse {summary['final']['test_mse']:.4f} (the mean predicts "
          f"{baseline:.4f}), test_mae {summary['final']['test_mae']:.4f}")
    assert summary["weights_identical"] and summary["headline"] == "test_mse"
    assert summary["final"]["test_mse"] < 0.5 * baseline


USER_TORCH = '''
import torch
from torch import nn


def tiny_net(sample_shape, num_classes, hidden=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(sample_shape).prod()), hidden), nn.Tanh(),
                         nn.Linear(hidden, num_classes))


def smooth_cross_entropy(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, label_smoothing=0.05)


def top2(outputs, targets):
    return float((outputs.argsort(1)[:, -2:] == targets[:, None]).any(1).mean())
'''

USER_KERAS = '''
import tensorflow as tf


def tiny_net(sample_shape, num_classes, hidden=16):
    inputs = tf.keras.Input(sample_shape)
    x = tf.keras.layers.Dense(hidden, activation="tanh")(tf.keras.layers.Flatten()(inputs))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(num_classes)(x))


def smooth_cross_entropy(y_true, y_pred):
    return tf.keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


def top2(outputs, targets):
    return float((outputs.argsort(1)[:, -2:] == targets[:, None]).any(1).mean())
'''


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_a_users_factory_loss_and_metric_from_files_outside_the_package(framework, tmp_path):
    user = tmp_path / "user_code" / "my_model.py"
    user.parent.mkdir()
    user.write_text(USER_TORCH if framework == "torch" else USER_KERAS)
    run_dir = tmp_path / "run"
    hvdtrain("train", "--run-dir", str(run_dir), f"framework={framework}", "data.source=digits",
             f"model.factory={user}:tiny_net", "model.kwargs={hidden: 24}", f"train.loss={user}:smooth_cross_entropy",
             f"metrics=[accuracy, '{user}:top2']", "train.epochs=4", "train.optimizer=adam", "train.lr=0.01",
             np=2, timeout=400)
    summary = summary_of(run_dir)
    final = summary["final"]
    assert summary["weights_identical"] and final["test_accuracy"] > 0.85 and final["test_top2"] >= final["test_accuracy"]
    # TensorBoard events from rank 0 beside metrics.jsonl, with the record's numbers as scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "test_loss", "test_accuracy", "test_top2", "lr", "samples_per_s", "bytes_per_step"} <= tags
    assert [e.step for e in events.Scalars("test_accuracy")] == [r["step"] for r in map(
        json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    # the saved config names the factory by its absolute path, so later stages find it from anywhere
    assert f"{user}:tiny_net" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_quantized_unet_keeps_its_iou(framework, unet_runs):
    """The U-Net to int8: ONNX (onnxruntime) from the torch run, TFLite (LiteRT) from the Keras run."""
    run_dir = unet_runs[framework]
    proc = hvdtrain("quantize", "--run-dir", str(run_dir), "--calibration", "64", "--max-metric-drop", "3")
    report = json.loads((run_dir / "quantize/quantize_report.json").read_text())
    fmt = report["formats"][0]
    print(proc.stdout.strip())
    assert report["metric"] == "mean_iou" and fmt["format"] == ("onnx" if framework == "torch" else "tflite")
    # TFLite: the tiny U-Net's GroupNorms become many small float ops, whose overhead keeps it at about half
    # (measured 0.52; the ONNX export 0.40)
    assert fmt["within_bound"] and fmt["metric_drop"] <= 3 and fmt["size_ratio"] < (0.5 if framework == "torch" else 0.6)
    assert fmt["int8"]["agreement"] > 0.9
    assert "mean_iou" in (run_dir / "quantize/quantize_report.md").read_text()
