"""PyTorch training under real Horovod ranks (horovodrun over Gloo and MPI)."""
import json

import pytest
import torch

from conftest import REPO, hvdtrain

CONFIG = str(REPO / "configs/digits-torch.yaml")
# Plain SGD settings that make 2 ranks x batch b comparable with 1 rank x batch 2b.
EXACT = ["data.source=digits", "model.name=mlp", "model.width=32", "train.optimizer=sgd", "train.scale_lr=false", "train.warmup_steps=0",
         "train.schedule=constant", "train.lr=0.1", "train.log_every=5"]


def final_weights(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    state = torch.load(summary["checkpoint"], weights_only=True)
    return summary, state["model"]


def assert_same_weights(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=tol, rtol=0), \
            f"{name}: max difference {(a[name] - b[name]).abs().max().item():.3g}"


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_two_ranks_equal_one_rank_with_double_batch(controller, tmp_path):
    steps = "train.max_steps=30"
    hvdtrain("train", "--config", CONFIG, "--run-dir", str(tmp_path / "np2"),
             *EXACT, "train.batch_size=8", steps, np=2, controller=controller)
    hvdtrain("train", "--config", CONFIG, "--run-dir", str(tmp_path / "np1"),
             *EXACT, "train.batch_size=16", steps)
    summary2, weights2 = final_weights(tmp_path / "np2")
    summary1, weights1 = final_weights(tmp_path / "np1")
    assert summary2["world_size"] == 2 and summary1["world_size"] == 1
    assert summary2["steps"] == summary1["steps"] == 30
    assert summary2["global_batch"] == summary1["global_batch"] == 16
    # two ranks on this node: NumPy's BLAS (PowerSGD's products) kept to each rank's share of the cores
    assert summary2["blas_threads"] == summary2["threads_per_rank"]
    # auto: Horovod's overlapped exchange over Gloo (its waits block), one flat allreduce over Open MPI
    assert (summary2["horovod_collectives"], summary2["gradient_exchange"]) == \
        (controller, "overlap" if controller == "gloo" else "flat")
    assert summary1["blas_threads"] == summary1["threads_per_rank"]
    assert summary2["weights_identical"], summary2["weights_digests"]
    assert_same_weights(weights2, weights1)
    # Metrics are global: the test set is scored once across the ranks, whatever their number.
    assert summary2["final"]["test_accuracy"] == pytest.approx(summary1["final"]["test_accuracy"], abs=1 / 360)


TOPK = ["compression.method=topk", "compression.momentum_correction=true", "compression.min_size=100",
        "compression.ratio=0.05"]


@pytest.mark.parametrize("compression", ["none", "topk+momentum_correction", "powersgd"])
def test_resume_equals_a_straight_run(compression, tmp_path):
    """Top-k's error-feedback residuals and corrected momentum, and PowerSGD's residuals and factors, are
    checkpointed per rank, so a resumed run matches the uninterrupted one bit for bit, as a dense run does."""
    method = {"none": [], "topk+momentum_correction": TOPK,
              "powersgd": ["compression.method=powersgd", "compression.min_size=100",
                           "compression.powersgd_start_step=3", "compression.powersgd_rank=2"]}[compression]
    common = ["--config", CONFIG, *EXACT, "train.schedule=cosine", "train.warmup_steps=5",
              "train.batch_size=16", "checkpoint.every_steps=7", *method]
    # 44 steps per epoch at np=2: stopping at 30 resumes mid-epoch, inside the data order.
    hvdtrain("train", "--run-dir", str(tmp_path / "split"), *common, "train.max_steps=30", np=2,
             controller="mpi")
    resumed = hvdtrain("train", "--run-dir", str(tmp_path / "split"), *common, "train.max_steps=60",
                       "--resume", "auto", np=2, controller="mpi")
    hvdtrain("train", "--run-dir", str(tmp_path / "straight"), *common, "train.max_steps=60", np=2,
             controller="mpi")
    summary, resumed_weights = final_weights(tmp_path / "split")
    _, straight_weights = final_weights(tmp_path / "straight")
    assert summary["resumed_from"].endswith("ckpt-00000030.pt"), resumed.stdout
    assert_same_weights(resumed_weights, straight_weights, tol=0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "metrics.jsonl repeats steps after resume"
    kept = sorted(p.name for p in (tmp_path / "split/checkpoints").glob("*.pt"))
    assert kept == ["ckpt-00000049.pt", "ckpt-00000056.pt", "ckpt-00000060.pt"]
    rank_files = sorted(p.name for p in (tmp_path / "split/checkpoints").glob("*.rank-*.npz"))
    if compression == "none":
        assert rank_files == []
    else:  # one per rank beside each kept checkpoint; the pruned ones went with their checkpoint
        assert rank_files == [f"ckpt-000000{s}.rank-0000{r}.npz" for s in (49, 56, 60) for r in (0, 1)]


def test_fresh_run_refuses_a_used_run_dir(tmp_path):
    args = ["train", "--config", CONFIG, "--run-dir", str(tmp_path), *EXACT, "train.max_steps=3"]
    hvdtrain(*args)
    proc = hvdtrain(*args, "--resume", "none", np=2, check=False)
    assert proc.returncode != 0
    assert "holds checkpoints of an earlier run" in proc.stdout + proc.stderr


def test_rerunning_a_finished_run_is_refused_and_leaves_its_outputs(tmp_path):
    """A checkpoint at or past the config's last step leaves nothing to train: one line, exit 2, and the
    finished run's summary, metrics and config are not replaced (they used to be, with an empty result)."""
    args = ["train", "--config", CONFIG, "--run-dir", str(tmp_path), *EXACT, "train.max_steps=4"]
    hvdtrain(*args)
    outputs = {name: (tmp_path / name).read_bytes() for name in ("summary.json", "metrics.jsonl", "config.yaml")}
    for extra, np in (([], 1), (["train.max_steps=3"], 2)):  # the same config again; fewer steps, 2 ranks
        proc = hvdtrain(*args, *extra, np=np, controller="mpi", check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "ckpt-00000004.pt is at step 4 and this config ends at step" in proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        assert {name: (tmp_path / name).read_bytes() for name in outputs} == outputs
    hvdtrain(*args[:-1], "train.max_steps=6")  # more steps: it continues
    assert json.loads((tmp_path / "summary.json").read_text())["resumed_from"].endswith("ckpt-00000004.pt")


# SIGTERM takes the same handler (hvdtrain/loop.py registers both signals in one loop): CI time
@pytest.mark.parametrize("signame", ["SIGUSR1"])
def test_stop_signal_checkpoints_then_resume_matches_a_straight_run(signame, tmp_path):
    import signal
    import time
    from conftest import BIN, rank_processes, start

    common = ["--config", CONFIG, *EXACT, "train.schedule=cosine", "train.batch_size=16",
              "train.max_steps=400", "checkpoint.every_steps=20"]
    stopped = tmp_path / "stopped"
    proc = start([str(BIN / "horovodrun"), "-np", "2", "--gloo", str(BIN / "hvdtrain"), "train",
                  "--run-dir", str(stopped), *common])
    deadline = time.time() + 120
    while not (stopped / "checkpoints").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    ranks = rank_processes(str(stopped))
    assert len(ranks) == 2, "both ranks should be running"
    for rank in ranks:
        rank.send_signal(getattr(signal, signame))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["stopped_by"] == signame
    assert 20 <= summary["steps"] < 400
    assert f"checkpointed at step {summary['steps']} after {signame}" in output
    hvdtrain("train", "--run-dir", str(stopped), *common, np=2)
    hvdtrain("train", "--run-dir", str(tmp_path / "straight"), *common, np=2)
    resumed_summary, resumed = final_weights(stopped)
    _, straight = final_weights(tmp_path / "straight")
    assert resumed_summary["status"] == "completed" and resumed_summary["steps"] == 400
    assert_same_weights(resumed, straight, tol=0)
