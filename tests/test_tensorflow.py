"""TensorFlow/Keras training under real Horovod ranks: the PyTorch path's guarantees, same loop.

TensorFlow takes seconds to import, so each run here does several checks.
"""
import json

import numpy as np
import pytest

from hvdtrain.cli import main
from conftest import REPO, hvdtrain

CONFIG = str(REPO / "configs/digits-tf.yaml")
EXACT = ["data.source=digits", "model.name=mlp", "model.width=32", "train.optimizer=sgd", "train.scale_lr=false", "train.warmup_steps=0",
         "train.schedule=constant", "train.lr=0.1", "train.log_every=5", "train.weight_decay=0"]


def final_weights(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    with np.load(summary["checkpoint"]) as state:
        return summary, [state[k] for k in sorted(state.files) if k.startswith("model/")]


def assert_same(a, b, tol):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert np.allclose(x, y, atol=tol, rtol=0), f"weight {i}: max difference {np.abs(x - y).max():.3g}"


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_two_ranks_equal_one_rank_with_double_batch(controller, tmp_path):
    hvdtrain("train", "--config", CONFIG, "--run-dir", str(tmp_path / "np2"), *EXACT, "train.batch_size=8",
             "train.max_steps=30", np=2, controller=controller)
    hvdtrain("train", "--config", CONFIG, "--run-dir", str(tmp_path / "np1"), *EXACT, "train.batch_size=16",
             "train.max_steps=30")
    summary2, weights2 = final_weights(tmp_path / "np2")
    summary1, weights1 = final_weights(tmp_path / "np1")
    assert summary2["framework"] == "tensorflow" and summary2["world_size"] == 2 and summary2["steps"] == 30
    assert summary2["weights_identical"], summary2["weights_digests"]
    assert_same(weights2, weights1, 1e-5)
    # the exported Keras model is what `hvdtrain quantize` reads
    assert (tmp_path / "np2/model.keras").stat().st_size > 0


def test_resume_equals_a_straight_run_and_overlap_exchange(tmp_path):
    common = ["--config", CONFIG, *EXACT, "train.schedule=cosine", "train.warmup_steps=5", "train.batch_size=16",
              "checkpoint.every_steps=7", "train.weight_decay=0.001"]
    hvdtrain("train", "--run-dir", str(tmp_path / "split"), *common, "train.max_steps=30", np=2, controller="mpi")
    hvdtrain("train", "--run-dir", str(tmp_path / "split"), *common, "train.max_steps=60", np=2, controller="mpi")
    hvdtrain("train", "--run-dir", str(tmp_path / "straight"), *common, "train.max_steps=60", np=2, controller="mpi")
    summary, resumed = final_weights(tmp_path / "split")
    _, straight = final_weights(tmp_path / "straight")
    assert summary["resumed_from"].endswith("ckpt-00000030.npz")
    assert_same(resumed, straight, 0)
    # Horovod's DistributedGradientTape (overlap) averages the same gradients as the flat exchange
    hvdtrain("train", "--run-dir", str(tmp_path / "overlap"), *common, "train.max_steps=60",
             "horovod.gradient_exchange=overlap", np=2, controller="gloo")
    overlap_summary, overlap = final_weights(tmp_path / "overlap")
    assert overlap_summary["weights_identical"]
    assert_same(overlap, straight, 1e-5)


def test_missing_tf_keras_is_one_clear_line(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf_keras" else real(name, *a))
    assert main(["train", "--config", CONFIG, "--run-dir", str(tmp_path), "data.source=digits"]) == 2
    assert "framework: tensorflow needs tf-keras" in capsys.readouterr().err


def test_topk_sending_everything_equals_the_dense_average(tmp_path):
    """The TensorFlow path through hvdtrain.exchange: at ratio 1 top-k must reproduce 1 rank x 2b exactly."""
    sparse = ["compression.method=topk", "compression.ratio=1", "compression.min_size=1000"]
    hvdtrain("train", "--config", CONFIG, "--run-dir", str(tmp_path / "topk"), *EXACT, *sparse,
             "train.batch_size=8", "train.max_steps=20", np=2, controller="gloo")
    hvdtrain("train", "--config", CONFIG, "--run-dir", str(tmp_path / "np1"), *EXACT, "train.batch_size=16",
             "train.max_steps=20")
    summary, weights = final_weights(tmp_path / "topk")
    assert summary["weights_identical"], summary["weights_digests"]
    assert_same(weights, final_weights(tmp_path / "np1")[1], 1e-5)


@pytest.mark.parametrize("method", ["topk", "shared_topk", "auto"])
def test_sparse_exchanges_keep_ranks_identical_and_count_bytes(method, tmp_path):
    hvdtrain("train", "--config", CONFIG, "--run-dir", str(tmp_path), *EXACT, f"compression.method={method}",
             "compression.min_size=1000", "compression.auto_trial_steps=3", "compression.auto_recheck_every=12",
             "train.max_steps=20", np=2, controller="gloo")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["weights_identical"], summary["weights_digests"]
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    dense_bytes = 4 * (64 * 32 + 32 + 32 * 10 + 10)
    assert 0 < record["bytes_per_step"] < dense_bytes / 2 or method == "auto", record
    assert record["compression"].startswith(method)
