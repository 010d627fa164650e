"""Elastic training under horovodrun's elastic mode: remove a worker, add it back, no sample repeated or skipped;
grow a one-rank job to two ranks without a stall."""
import json
import signal
import threading
import time
from collections import defaultdict

import pytest

from conftest import BIN, REPO, rank_processes, start
from hvdtrain.cli import main
from hvdtrain.config import DataConfig
from hvdtrain.data import Dataset


class Lines:
    """The job's output, collected line by line by a reader thread (so waiting never blocks on the pipe)."""

    def __init__(self, proc):
        self.seen, self.checked = [], 0
        self.reader = threading.Thread(target=lambda: self.seen.extend(proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, fragment, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            while self.checked < len(self.seen):
                self.checked += 1
                if fragment in self.seen[self.checked - 1]:
                    return
            time.sleep(0.2)
        raise AssertionError(f"no line with {fragment!r} within {timeout} s:\n{''.join(self.seen[-40:])}")

    def text(self) -> str:
        self.reader.join(timeout=30)
        return "".join(self.seen)


def elastic_job(tmp_path, slots: int, *overrides: str):
    """An elastic job on the digits shards whose host discovery reads hosts.txt (localhost:SLOTS)."""
    assert main(["data", "shard", "--source", "digits", "--out", str(tmp_path / "digits"), "--shards", "4",
                 "--chunk-samples", "16"]) == 0
    hosts = tmp_path / "hosts.txt"
    hosts.write_text(f"localhost:{slots}\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    run_dir = tmp_path / "run"
    proc = start([str(BIN / "horovodrun"), "-np", str(slots), "--min-np", "1", "--max-np", "2",
                  "--host-discovery-script", str(discover), "--network-interface", "lo", str(BIN / "hvdtrain"), "train",
                  "--config", str(REPO / "configs/digits-torch.yaml"), "--run-dir", str(run_dir),
                  "data.source=hdf5", f"data.train={tmp_path / 'digits/train'}", f"data.test={tmp_path / 'digits/test'}",
                  "data.shuffle_buffer_mb=0.05", "model.name=mlp", "train.epochs=100000",
                  "horovod.stall_warning_seconds=20", "horovod.stall_shutdown_seconds=40", *overrides])
    return proc, hosts, run_dir


def stop_job(proc, run_dir) -> None:
    """SIGTERM to every rank (preemption): they checkpoint and the job exits 0."""
    for rank in rank_processes(str(run_dir)):
        rank.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def kill_job(proc, run_dir) -> None:
    if proc.poll() is None:
        proc.kill()
    for rank in rank_processes(str(run_dir)):
        rank.kill()


@pytest.mark.parametrize("method", ["none", "topk"])
def test_a_one_rank_job_grows_to_two_and_keeps_training(method, tmp_path):
    """The original rank must see the new size at once: with a copied size of 1 it skipped the allreduce
    the new rank entered, and the job stalled until Horovod shut it down."""
    proc, hosts, run_dir = elastic_job(tmp_path, 1, f"compression.method={method}", "compression.min_size=1000")
    try:
        lines = Lines(proc)
        lines.wait_for("epoch 1:")
        hosts.write_text("localhost:2\n")  # a second worker joins
        lines.wait_for("continuing on 2 rank(s)")
        lines.wait_for("on 2 rank(s)\n", timeout=90)  # an epoch trained by both: no stall
        lines.wait_for("on 2 rank(s)\n", timeout=90)
        stop_job(proc, run_dir)
    finally:
        kill_job(proc, run_dir)
    output = lines.text()
    assert proc.returncode == 0, output[-3000:]
    assert "Missing ranks" not in output and "stalled" not in output, output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["resets"] >= 1, summary
    assert summary["weights_identical"], summary["weights_digests"]
    after = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    grown = [record for record in after if record["world_size"] == 2]
    assert grown and all(record["bytes_per_step"] > 0 for record in grown), after[-3:]
    assert all(record["compression"] == method for record in grown)
    print(f"{method}: {len(after) - len(grown)} epoch(s) on 1 rank, {len(grown)} on 2, bytes/step after the "
          f"resize {grown[-1]['bytes_per_step']:.0f}, test accuracy {grown[-1]['test_accuracy']:.3f}")


def test_workers_leave_and_join_without_repeating_or_skipping_samples(tmp_path):
    # rounds of one batch: a commit point (where a resize takes effect) after every step, so the resizes
    # land inside an epoch however fast the epochs run
    proc, hosts, run_dir = elastic_job(tmp_path, 2, "data.audit=true", "data.shuffle_buffer_mb=0.005")
    try:
        lines = Lines(proc)
        lines.wait_for("epoch 2:")
        hosts.write_text("localhost:1\n")  # the worker on slot 1 is removed
        lines.wait_for("continuing on 1 rank(s)")
        lines.wait_for("on 1 rank(s)")  # an epoch finished by the remaining rank
        hosts.write_text("localhost:2\n")  # and a new worker joins
        lines.wait_for("continuing on 2 rank(s)")
        lines.wait_for("on 2 rank(s)\n")
        stop_job(proc, run_dir)
    finally:
        kill_job(proc, run_dir)
    output = lines.text()
    assert proc.returncode == 0, output[-3000:]
    assert "checkpointed at step" in output, output[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resets"] == 2 and summary["world_size"] == 2 and summary["weights_identical"], output[-4000:]

    # The audit: which samples each process trained on, per committed round.
    train = Dataset(DataConfig(source="hdf5", train=str(tmp_path / "digits/train"), test=str(tmp_path / "digits/test")),
                    seed=0).train
    by_epoch, sizes = defaultdict(list), defaultdict(set)
    for log in (run_dir / "sample-audit").glob("*.jsonl"):
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            by_epoch[entry["epoch"]] += entry["ids"]
            sizes[entry["epoch"]].add(entry["size"])
    resized = [e for e in by_epoch if len(sizes[e]) > 1]
    assert resized, "no epoch ran on two world sizes"
    repeated = sum(len(ids) - len(set(ids)) for ids in by_epoch.values())
    complete = sorted(by_epoch)[:-1]  # the last epoch was cut short by the stop
    skipped = {e: train.total - len(by_epoch[e]) for e in complete}
    print(f"epochs {len(by_epoch)}, resized epochs {resized}, samples repeated {repeated}, "
          f"left out per complete epoch {sorted(set(skipped.values()))} (< one global batch of 64)")
    assert repeated == 0
    assert all(0 <= left < 2 * 32 for left in skipped.values())
