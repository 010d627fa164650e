"""Injected faults: a killed rank, a rank that raises or stalls, a damaged or half-written checkpoint."""
import json
import os
import random
import re
import signal
import subprocess
import time

import pytest
import torch

from conftest import BIN, REPO, hvdtrain, rank_processes, start
from hvdtrain import checkpoints

CONFIG = str(REPO / "configs/digits-torch.yaml")
LONG = ["data.source=digits", "model.name=mlp", "train.max_steps=100000", "train.epochs=1000"]


@pytest.fixture(autouse=True)
def no_job_outlives_its_test(tmp_path):
    """A failing test must not leave a 100000-step job running through the rest of the suite."""
    yield
    for rank in rank_processes(str(tmp_path)):
        rank.kill()
    for launcher in LAUNCHED:
        if launcher.poll() is None:
            launcher.kill()
    LAUNCHED.clear()


LAUNCHED = []


def launch(run_dir, *extra, controller="gloo", fault=None):
    command = [str(BIN / "horovodrun"), "-np", "2", f"--{controller}", str(BIN / "hvdtrain"), "train",
               "--config", CONFIG, "--run-dir", str(run_dir), *LONG, *extra]
    if fault:
        os.environ["HVDTRAIN_FAULT"] = fault  # start() passes the test's environment on
        try:
            proc = start(command)
        finally:
            del os.environ["HVDTRAIN_FAULT"]
    else:
        proc = start(command)
    LAUNCHED.append(proc)
    return proc


def finish(proc, run_dir, within=60):
    """Wait for the job; returns (output, seconds). Fails if it outlives `within` or leaves a rank."""
    started = time.time()
    try:
        output, _ = proc.communicate(timeout=within + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the job was still running {within + 60} s later: a hang")
    assert not rank_processes(str(run_dir)), "a rank was left behind"
    return output, time.time() - started


def wait_for_ranks(marker, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        ranks = rank_processes(str(marker))
        if len(ranks) == 2 and (marker / "config.yaml").exists():
            return sorted(ranks, key=lambda p: p.pid)
        time.sleep(0.2)
    output = proc.communicate(timeout=60)[0] if proc.poll() is not None else "(still starting)"
    raise AssertionError(f"ranks did not start:\n{output[-3000:]}")


def test_killed_rank_ends_the_job_fast_with_nothing_left(tmp_path):
    rng = random.Random(7)
    worst = 0.0
    for trial in range(3):
        run_dir = tmp_path / f"trial{trial}"
        proc = launch(run_dir)
        ranks = wait_for_ranks(run_dir, proc)
        time.sleep(rng.uniform(0.5, 4.0))  # a random step
        victim = ranks[rng.randrange(2)]
        victim_rank = victim.environ()["HOROVOD_RANK"]
        killed_at = time.time()
        victim.send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
        detection = time.time() - killed_at
        worst = max(worst, detection)
        assert proc.returncode != 0
        assert detection < 60, f"job took {detection:.0f} s to end"
        assert "exited with non-zero status" in output, output[-2000:]
        assert f"Process name: {victim_rank}\nExit code: 137" in output, output[-2000:]  # the dead rank, by name
        assert not rank_processes(str(run_dir)), "a rank was left behind"
    print(f"worst detection time {worst:.1f} s")


def test_rank_raising_is_named_by_rank_0_and_the_job_ends(tmp_path):
    rng = random.Random(11)
    worst = 0.0
    for trial in range(3):
        run_dir, step = tmp_path / f"trial{trial}", rng.randrange(5, 60)
        proc = launch(run_dir, fault=f"raise@1:{step}")
        output, seconds = finish(proc, run_dir)
        worst = max(worst, seconds)
        assert proc.returncode != 0
        relayed = f"hvdtrain: rank 0: rank 1 failed: InjectedFault: injected fault at step {step} (HVDTRAIN_FAULT)"
        # rank 0's line (its progress bar may precede it on the same line)
        assert re.search(r"\[0\]<stderr>:[^\n]*" + re.escape(relayed), output), output[-3000:]
    print(f"worst time from launch to the end of the job: {worst:.1f} s")


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_stalled_rank_is_named_and_the_job_ends(tmp_path, controller):
    """Horovod's stall inspector on rank 0 names the missing rank and tensor, then shuts the job down."""
    proc = launch(tmp_path, "horovod.stall_warning_seconds=2", "horovod.stall_shutdown_seconds=6",
                  controller=controller, fault="stall@1:15")
    output, seconds = finish(proc, tmp_path)
    assert proc.returncode != 0
    assert "stalling at step 15" in output
    # rank 0's report, each line prefixed by the launcher: "Missing ranks:\n1: [allreduce.gradients.dense.N]"
    # over MPI (the flat exchange), "1: [allreduce.1.bias, ...]" over Gloo (Horovod's per-tensor hooks)
    name = "gradients" if controller == "mpi" else "1.bias"
    assert re.search(r"Missing ranks:\n[^\n]*?<stderr>:1!?: \[allreduce\." + re.escape(name), output), output[-3000:]
    assert "Will shutdown" in output, output[-3000:]
    assert "the job stopped because a collective could not complete" in output, output[-3000:]
    print(f"{controller}: job ended {seconds:.1f} s after launch (stall shutdown after 6 s)")


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    common = ["--config", CONFIG, "data.source=digits", "model.name=mlp", "checkpoint.every_steps=10",
              "train.log_every=5"]
    hvdtrain("train", "--run-dir", str(tmp_path / "run"), *common, "train.max_steps=30", np=2)
    newest = tmp_path / "run/checkpoints/ckpt-00000030.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a write cut short by a crash
    resumed = hvdtrain("train", "--run-dir", str(tmp_path / "run"), *common, "train.max_steps=40", np=2)
    assert "skipping checkpoint ckpt-00000030.pt: digest mismatch" in resumed.stdout
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["resumed_from"].endswith("ckpt-00000020.pt")
    hvdtrain("train", "--run-dir", str(tmp_path / "straight"), *common, "train.max_steps=40", np=2)
    straight = json.loads((tmp_path / "straight/summary.json").read_text())
    a = torch.load(summary["checkpoint"], weights_only=True)["model"]
    b = torch.load(straight["checkpoint"], weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_while_checkpointing_leaves_an_intact_previous_checkpoint(tmp_path):
    # a large model checkpointed every step: the kill lands inside a write most of the time
    proc = launch(tmp_path, "model.width=1024", "checkpoint.every_steps=1", "checkpoint.keep=2")
    ranks = wait_for_ranks(tmp_path, proc)
    deadline = time.time() + 60
    while not list((tmp_path / "checkpoints").glob("*.sha256")):
        assert time.time() < deadline
        time.sleep(0.1)
    time.sleep(1.5)
    ranks[0].send_signal(signal.SIGKILL)  # rank 0 writes the checkpoints
    proc.communicate(timeout=120)
    resumed = hvdtrain("train", "--config", CONFIG, "--run-dir", str(tmp_path), *LONG[:2], "model.width=1024",
                       "checkpoint.every_steps=1", "checkpoint.keep=2", "train.max_steps=1", "train.epochs=1000",
                       check=False)
    # max_steps=1 is below the checkpoint: it must load an intact checkpoint (a damaged newest one is
    # skipped with a warning), then refuse to train, naming the checkpoint it loaded
    assert resumed.returncode == 2, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    loaded = re.search(r"(ckpt-\d+\.pt) is at step (\d+) and this config ends at step 1: nothing to train",
                       resumed.stderr)
    assert loaded, resumed.stderr[-2000:]
    assert checkpoints.damage(tmp_path / "checkpoints" / loaded[1]) is None
    assert "Traceback" not in resumed.stdout + resumed.stderr

