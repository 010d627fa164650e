"""Device placement and mixed precision, everything a CPU can prove: placement rules, bf16 autocast at np=2
in both frameworks, fp16 loss scaling with its state in checkpoints and across a resume, one-line errors.
The GPU side is tests/test_gpu.py (marker `gpu`)."""
import json

import numpy as np
import pytest
import torch

from conftest import REPO, hvdtrain
from hvdtrain.errors import ConfigError
from hvdtrain.runtime import device_for_rank


def test_one_gpu_per_local_rank():
    assert device_for_rank("auto", 0, 0, 2) == "cpu"
    assert device_for_rank("cpu", 4, 1, 4) == "cpu"
    assert [device_for_rank("auto", 4, r, 4) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert device_for_rank("cuda", 1, 3, 4) == "cuda:0"  # the launcher gave each rank its own GPU
    with pytest.raises(ConfigError, match="device: cuda, but rank 1 on this node sees no CUDA device"):
        device_for_rank("cuda", 0, 1, 2)
    with pytest.raises(ConfigError, match="local rank 2 of 4 has no GPU of its own \\(2 visible"):
        device_for_rank("auto", 2, 2, 4)


@pytest.mark.parametrize("override, message", [
    ("train.precision=fp8", "train.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
    ("device=cuda", "device: cuda, but rank 0 on this node sees no CUDA device"),
    ("device=gpu", "device: Input should be 'auto', 'cpu' or 'cuda'"),
])
def test_precision_and_device_errors_are_one_line(override, message, tmp_path):
    proc = hvdtrain("train", "--config", str(REPO / "configs/digits-torch.yaml"), "--run-dir", str(tmp_path / "run"),
                    "data.source=digits", "train.max_steps=2", override, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_bf16_at_two_ranks_reaches_the_digits_bar(framework, tmp_path):
    run_dir = tmp_path / "run"
    hvdtrain("train", "--config", str(REPO / f"configs/digits-{framework}.yaml"), "--run-dir", str(run_dir),
             "data.source=digits", "train.precision=bf16", np=2, timeout=900)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"{framework} bf16 np=2: test_accuracy {summary['final']['test_accuracy']:.4f}")
    assert summary["precision"] == "bf16" and summary["devices"] == ["cpu", "cpu"]
    assert summary["weights_identical"] and summary["final"]["test_accuracy"] >= 0.97


EXACT = ["data.source=digits", "model.name=mlp", "model.width=32", "train.optimizer=sgd", "train.scale_lr=none",
         "train.warmup_steps=0", "train.lr=0.1", "train.log_every=5", "train.batch_size=16", "checkpoint.every_steps=7"]


def split_and_straight(tmp_path, framework: str, precision: str):
    common = ["--config", str(REPO / f"configs/digits-{framework}.yaml"), *EXACT, f"train.precision={precision}"]
    hvdtrain("train", "--run-dir", str(tmp_path / "split"), *common, "train.max_steps=30", np=2, controller="mpi")
    hvdtrain("train", "--run-dir", str(tmp_path / "split"), *common, "train.max_steps=60", np=2, controller="mpi")
    hvdtrain("train", "--run-dir", str(tmp_path / "straight"), *common, "train.max_steps=60", np=2, controller="mpi")
    return [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("split", "straight")]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_torch_resume_with_mixed_precision(precision, tmp_path):
    """fp16's loss scale and growth tracker are in the checkpoint: a resumed run continues with them."""
    split, straight = split_and_straight(tmp_path, "torch", precision)
    assert split["resumed_from"].endswith("ckpt-00000030.pt")
    a = torch.load(split["checkpoint"], weights_only=True)
    b = torch.load(straight["checkpoint"], weights_only=True)
    for name in a["model"]:
        assert torch.allclose(a["model"][name], b["model"][name], atol=1e-4, rtol=0), name
    if precision == "fp16":
        assert a["scaler"]["scale"] == b["scaler"]["scale"] and a["scaler"]["_growth_tracker"] == b["scaler"]["_growth_tracker"]
        saved = torch.load(tmp_path / "split/checkpoints/ckpt-00000049.pt", weights_only=True)["scaler"]
        assert saved["scale"] > 0 and "loss_scale" in split["final"]
    else:
        assert a["scaler"] == {}  # no scaler without fp16


def test_tf_fp16_keeps_its_loss_scale_in_checkpoints(tmp_path):
    split, straight = split_and_straight(tmp_path, "tf", "fp16")
    with np.load(split["checkpoint"]) as a, np.load(straight["checkpoint"]) as b:
        scaler = sorted(k for k in a.files if k.startswith("scaler/"))
        assert len(scaler) == 2 and all(np.array_equal(a[k], b[k]) for k in scaler)
        for key in (k for k in a.files if k.startswith("model/")):
            np.testing.assert_allclose(a[key], b[key], atol=2e-3, rtol=0)
    assert split["final"]["loss_scale"] == straight["final"]["loss_scale"] > 0
