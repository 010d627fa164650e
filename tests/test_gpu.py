"""The GPU suite (marker `gpu`): NCCL build, placement, training equivalence, AMP, top-k on GPU tensors.

Every test skips, with the reason, where CUDA is absent; on a GPU node (`pytest -m gpu`) they run for real.
A node with one GPU runs the one-rank forms."""
import json
import subprocess

import pytest
import torch

from conftest import BIN, REPO, hvdtrain

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA device here (torch.cuda.is_available() is False): run on a GPU node")]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
RANKS = min(2, GPUS) or 1
CONFIG = str(REPO / "configs/digits-torch.yaml")


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_horovod_is_built_with_nccl():
    check = subprocess.run([str(BIN / "horovodrun"), "--check-build"], capture_output=True, text=True).stdout
    assert "[X] NCCL" in check, check


def test_each_rank_trains_on_its_own_gpu(tmp_path):
    hvdtrain("train", "--config", CONFIG, "--run-dir", str(tmp_path / "run"), "data.source=digits", "device=cuda",
             np=RANKS, timeout=900)
    result = summary(tmp_path / "run")
    assert [d.split(" ")[0] for d in result["devices"]] == [f"cuda:{r}" for r in range(RANKS)] or GPUS == 1
    assert result["weights_identical"] and result["final"]["test_accuracy"] >= 0.97


def test_gpu_training_matches_cpu_training(tmp_path):
    exact = ["data.source=digits", "model.name=mlp", "train.optimizer=sgd", "train.scale_lr=none",
             "train.warmup_steps=0", "train.lr=0.1", "train.max_steps=40", "horovod.gradient_exchange=flat"]
    for device in ("cuda", "cpu"):
        hvdtrain("train", "--config", CONFIG, "--run-dir", str(tmp_path / device), *exact, f"device={device}",
                 np=RANKS, timeout=900)
    gpu = torch.load(summary(tmp_path / "cuda")["checkpoint"], map_location="cpu", weights_only=True)["model"]
    cpu = torch.load(summary(tmp_path / "cpu")["checkpoint"], weights_only=True)["model"]
    for name in cpu:
        assert torch.allclose(gpu[name], cpu[name], atol=1e-3), name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("exchange", ["overlap", "flat"])
def test_amp_on_gpu_reaches_the_bar(precision, exchange, tmp_path):
    hvdtrain("train", "--config", CONFIG, "--run-dir", str(tmp_path / "run"), "data.source=digits", "device=cuda",
             f"train.precision={precision}", f"horovod.gradient_exchange={exchange}", np=RANKS, timeout=900)
    result = summary(tmp_path / "run")
    assert result["weights_identical"] and result["final"]["test_accuracy"] >= 0.97
    if precision == "fp16":
        assert result["final"]["loss_scale"] > 0


def test_topk_on_gpu_tensors(tmp_path):
    hvdtrain("train", "--config", CONFIG, "--run-dir", str(tmp_path / "run"), "data.source=digits", "device=cuda",
             "compression.method=topk", "compression.min_size=256", "compression.ratio=0.05", np=RANKS, timeout=900)
    result = summary(tmp_path / "run")
    assert result["weights_identical"] and result["final"]["test_accuracy"] >= 0.95


def test_bench_scaling_on_gpu_against_ddp_over_nccl(tmp_path):
    hvdtrain("bench", "scaling", "--np", str(RANKS), "--modes", "horovod,ddp", "--device", "cuda", "--repeats", "1",
             "--steps", "30", "--model", "resnet", "--shape", "3", "32", "32", "--out", str(tmp_path), timeout=900)
    rows = json.loads((tmp_path / "scaling.json").read_text())["rows"]
    assert {r["mode"] for r in rows} == {"horovod", "ddp"} and all(r["samples_per_s"] > 0 for r in rows)
    devices = {json.loads(p.read_text())["device"] for p in (tmp_path / "raw").glob("*.json")}
    assert all(d.startswith("cuda") for d in devices), devices
    ratio = next(r for r in rows if r["mode"] == "horovod")["samples_per_s"] / next(
        r for r in rows if r["mode"] == "ddp")["samples_per_s"]
    print(f"GPU np={RANKS}: hvdtrain (Horovod, NCCL) / DDP (NCCL) = {ratio:.2f}x")
