"""Elastic training: `horovodrun --min-np 1 --max-np N --host-discovery-script ... hvdtrain train ...`.

The job shrinks when a worker is removed (or lost) and grows when one is added, and continues the same
epoch without repeating or skipping samples: the epoch's stream is consumed in rounds
(`ShardPlan.elastic_round`), and Horovod's elastic state (model, optimizer, epoch, stream position,
step) commits at every round boundary. A host change takes effect at the next commit; a lost rank rolls
the others back to the last one. PyTorch on HDF5 shard sets; launched by horovodrun's elastic mode
(Gloo), which sets HOROVOD_ELASTIC=1.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import horovod.torch as hvd
import torch

from hvdtrain import checkpoints, runtime
from hvdtrain.config import Config
from hvdtrain.data import Dataset
from hvdtrain.errors import ConfigError
from hvdtrain.atomic import JsonlLog, write_json
from hvdtrain.loop import StopRequest, prepare_run_dir
from hvdtrain.schedule import learning_rate


class SampleAudit:
    """data.audit: the sample ids each process trained on, one JSON line per committed round."""

    def __init__(self, run_dir: Path):
        self.log = JsonlLog(run_dir / "sample-audit" / f"{socket.gethostname()}-{os.getpid()}.jsonl")

    def record(self, epoch: int, position: int, rank: int, size: int, ids) -> None:
        self.log.append({"epoch": epoch, "position": position, "rank": rank, "size": size,
                         "ids": [int(i) for i in ids]})


def _create_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer its state with a step of learning rate 0 (parameters unchanged).

    Horovod's optimizer sync fills an empty optimizer's state by stepping it on zero gradients after the
    model was synced; with weight decay that step moves a joining worker's weights away from rank 0's."""
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, rates):
        group["lr"] = lr


def train(cfg: Config, dataset: Dataset, run_dir: Path, resume: str) -> dict[str, Any]:
    from hvdtrain.torch.trainer import TorchAdapter

    if cfg.data.source != "hdf5":
        raise ConfigError("data.source: elastic training re-plans HDF5 shard sets when the job resizes; "
                          "write the data with `hvdtrain data shard` and set data.source: hdf5")
    runtime.configure_horovod_env(cfg.horovod, elastic=True)
    hvd.init()
    torch.set_num_threads(runtime.threads_per_rank(hvd.local_size()))
    adapter = TorchAdapter(cfg, dataset)
    batch = cfg.train.batch_size
    whole = dataset.for_rank(batch, 0, 1)  # the epoch stream and reader, independent of the world size
    plan, reader = whole.plan, whole.train_reader
    # The schedule's length at the starting size; a resize changes the steps per epoch, not the epochs.
    total_steps = cfg.train.epochs * (plan.total // (batch * hvd.size()))
    last_step = cfg.train.max_steps or float("inf")
    metrics = JsonlLog(run_dir / "metrics.jsonl")
    stop = StopRequest()
    audit = SampleAudit(run_dir) if cfg.data.audit else None

    start_step, start_epoch, resumed_from = 0, 0, None
    if hvd.rank() == 0:
        start_step, start_epoch, resumed_from = prepare_run_dir(cfg, run_dir, resume, adapter, metrics)
    _create_optimizer_state(adapter.optimizer)
    state = hvd.elastic.TorchState(model=adapter.model, optimizer=adapter.optimizer, epoch=start_epoch,
                                   position=0, step=start_step)
    # resets: counted by this process (state attributes changed outside a commit are lost on sync)
    started, record, outcome = time.perf_counter(), {}, {"stopped_by": None, "resets": 0}

    def say(message: str) -> None:
        if hvd.rank() == 0:
            print(f"elastic: {message}", flush=True)

    def on_reset() -> None:
        adapter.rank, adapter.size = hvd.rank(), hvd.size()
        outcome["resets"] += 1
        say(f"continuing on {hvd.size()} rank(s) at epoch {state.epoch}, sample {state.position} of the epoch, "
            f"step {state.step}")

    state.register_reset_callbacks([on_reset])

    eval_shares: dict[tuple[int, int], Any] = {}  # (rank, size) -> that rank's test share, files kept open

    def end_of_epoch(loss: float) -> None:
        nonlocal record
        world = (hvd.rank(), hvd.size())
        if world not in eval_shares:
            eval_shares[world] = dataset.for_rank(batch, *world)
        loss_total, correct, count = adapter.sum(list(adapter.eval_sums(eval_shares[world])), "eval")
        record = {"step": state.step, "epoch": state.epoch + 1, "train_loss": loss, "test_loss": loss_total / count,
                  "test_accuracy": correct / count, "world_size": hvd.size()}
        if hvd.rank() == 0:
            metrics.append(record)
            say(f"epoch {state.epoch + 1}: test_accuracy {record['test_accuracy']:.4f} on {hvd.size()} rank(s)")
            save_checkpoint(epoch=state.epoch + 1)

    def save_checkpoint(epoch: int) -> Path:
        return checkpoints.write(run_dir, state.step, adapter.checkpoint_suffix, adapter.save,
                                 {"epoch": epoch, "seed": cfg.seed, "world_size": hvd.size()}, cfg.checkpoint.keep)

    @hvd.elastic.run
    def rounds(state) -> None:
        loss = float("nan")
        while state.epoch < cfg.train.epochs and state.step < last_step:
            window, consumed = plan.elastic_round(state.epoch, state.position, hvd.rank(), hvd.size())
            if window is None:
                end_of_epoch(loss)
                state.epoch, state.position = state.epoch + 1, 0
                state.commit()
                continue
            x, y = reader.read_window(window)
            losses = []
            for i in range(0, int(min(len(y), (last_step - state.step) * batch)), batch):
                lr = learning_rate(cfg.train, state.step, hvd.size(), total_steps)
                losses.append(adapter.train_step((torch.from_numpy(x[i:i + batch]), torch.from_numpy(y[i:i + batch])), lr))
                state.step += 1
            loss_sum, stop_votes = adapter.sum([sum(losses) / len(losses), float(stop.requested)], "round")
            loss = loss_sum / hvd.size()
            if audit is not None:
                audit.record(state.epoch, state.position, hvd.rank(), hvd.size(),
                             plan.sample_ids(window)[:len(losses) * batch])
            state.position += consumed
            state.commit()
            if stop_votes > 0:
                outcome["stopped_by"] = stop.signal_name or "a signal to another rank"
                return

    rounds(state)
    final_checkpoint = None
    if hvd.rank() == 0:
        final_checkpoint = save_checkpoint(epoch=state.epoch)
        if outcome["stopped_by"]:
            print(f"checkpointed at step {state.step} after {outcome['stopped_by']}; continue with --resume auto",
                  flush=True)
    digests = adapter.gather_object(adapter.weights_digest(), "weights_digest")
    summary = {"framework": "torch", "elastic": True, "status": "stopped" if outcome["stopped_by"] else "completed",
               "stopped_by": outcome["stopped_by"], "world_size": hvd.size(), "resets": outcome["resets"],
               "steps": state.step, "resumed_from": resumed_from, "final": record,
               "wall_seconds": time.perf_counter() - started, "weights_digests": digests,
               "weights_identical": len(set(digests)) == 1, "checkpoint": str(final_checkpoint),
               "versions": adapter.versions()}
    if hvd.rank() == 0:
        write_json(run_dir / "summary.json", summary)
        print(json.dumps({"elastic_summary": {k: summary[k] for k in ("status", "world_size", "resets", "steps")}}),
              flush=True)
    return summary
