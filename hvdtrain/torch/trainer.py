"""Data-parallel training of a PyTorch model with Horovod.

Every rank runs the same sequence of collectives (one allreduce per gradient step through the
DistributedOptimizer, one per logging interval, one per evaluation): any rank-dependent branch
around a collective would hang the job.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import horovod
import horovod.torch as hvd
from tqdm import tqdm

from hvdtrain import checkpoints, runtime
from hvdtrain.config import Config, to_yaml
from hvdtrain.data import Dataset
from hvdtrain.errors import ConfigError, UserError
from hvdtrain.io import JsonlLog, atomic_open, write_json, write_text
from hvdtrain.schedule import learning_rate
from hvdtrain.torch.data import train_batches
from hvdtrain.torch.models import build


def _optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _evaluate(model: torch.nn.Module, rank_data) -> tuple[float, float]:
    """Loss and accuracy over the whole test set: each rank scores its share, sums are allreduced."""
    sums = torch.zeros(3, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for x, y in rank_data.eval_batches():
            x, y = torch.from_numpy(x), torch.from_numpy(y)
            logits = model(x)
            sums += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(),
                                  (logits.argmax(1) == y).sum().item(), float(len(y))], dtype=torch.float64)
    model.train()
    total_loss, correct, count = hvd.allreduce(sums, op=hvd.Sum, name="eval_sums").tolist()
    return total_loss / count, correct / count


def _save_checkpoint(run_dir: Path, keep: int, state: dict[str, Any]) -> Path:
    path = checkpoints.path_for(run_dir, state["step"])
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)
    checkpoints.prune(run_dir, keep)
    return path


def _load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: a checkpoint is data; never unpickle code from a file.
    with open(path, "rb") as handle:
        return torch.load(io.BytesIO(handle.read()), weights_only=True)


def _trim_metrics(log: JsonlLog, last_step: int) -> None:
    """On resume, drop records written after the checkpoint so the log has each step once."""
    if not log.path.exists():
        return
    kept = [line for line in log.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    write_text(log.path, "".join(line + "\n" for line in kept))


def _prepare_run_dir(cfg: Config, run_dir: Path, resume: str, size: int, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, metrics: JsonlLog) -> tuple[int, str | None]:
    """Rank 0: load the checkpoint to resume from (if any) and reset the metrics log to match it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    source = checkpoints.resolve(run_dir, resume)
    start_step, resumed_from = 0, None
    if source is not None:
        state = _load_checkpoint(source)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start_step, resumed_from = int(state["step"]), str(source)
        if state["world_size"] != size:
            print(f"note: resuming a {state['world_size']}-rank checkpoint on {size} ranks: "
                  "the global batch and data order change", flush=True)
    elif checkpoints.existing(run_dir):
        raise ConfigError(f"--run-dir {run_dir}: holds checkpoints of an earlier run; "
                          "continue it with --resume auto or choose a new run directory")
    _trim_metrics(metrics, start_step)
    write_text(run_dir / "config.yaml", to_yaml(cfg))
    return start_step, resumed_from


def train(cfg: Config, dataset: Dataset, run_dir: Path, resume: str) -> dict[str, Any]:
    runtime.configure_horovod_env(cfg.horovod)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    threads = runtime.threads_per_rank(hvd.local_size())
    torch.set_num_threads(threads)
    is_root = rank == 0

    torch.manual_seed(cfg.seed)
    model = build(cfg.model, dataset.sample_shape, dataset.num_classes)
    optimizer = hvd.DistributedOptimizer(_optimizer(cfg, model), named_parameters=model.named_parameters())

    rank_data = dataset.for_rank(cfg.train.batch_size, rank, size)
    steps_per_epoch = rank_data.steps_per_epoch
    global_batch = cfg.train.batch_size * size
    total_steps = cfg.train.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.train.max_steps or total_steps)

    metrics = JsonlLog(run_dir / "metrics.jsonl")
    start_step = 0
    resumed_from = None
    failure = None
    if is_root:
        try:
            start_step, resumed_from = _prepare_run_dir(cfg, run_dir, resume, size, model, optimizer, metrics)
        except UserError as exc:
            failure = exc
    # Rank 0 alone reads the run directory; the others learn its outcome here instead of hanging.
    start_step, exit_code = hvd.broadcast_object(
        (start_step, failure.exit_code if failure else 0), root_rank=0, name="start")
    if failure is not None:
        raise failure
    if exit_code:
        error = UserError("rank 0 could not prepare the run directory", quiet=True)
        error.exit_code = exit_code
        raise error
    # Rank 0's state (fresh or resumed) becomes every rank's state.
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    progress = tqdm(total=last_step, initial=start_step, disable=not is_root, unit="step",
                    dynamic_ncols=True, mininterval=1.0)
    running_loss, running_count = 0.0, 0
    interval_start, interval_samples, train_seconds = time.perf_counter(), 0, 0.0
    train_loss = float("nan")
    record: dict[str, Any] = {}
    started = time.perf_counter()

    def checkpoint(step: int) -> None:
        if is_root:
            _save_checkpoint(run_dir, cfg.checkpoint.keep, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "epoch": step // steps_per_epoch, "seed": cfg.seed,
                "world_size": size, "torch_rng": torch.get_rng_state(),
            })

    batches = train_batches(rank_data, start_step, last_step, cfg.data.workers, cfg.data.prefetch)
    for step, (x, y) in zip(range(start_step, last_step), batches):
        epoch = step // steps_per_epoch
        lr = learning_rate(cfg.train, step, size, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        running_count += 1
        interval_samples += global_batch
        done = step + 1
        progress.update(1)

        end_of_epoch = done % steps_per_epoch == 0 or done == last_step
        if done % cfg.train.log_every == 0 or end_of_epoch:
            train_loss = hvd.allreduce(torch.tensor(running_loss / running_count), name="train_loss").item()
            running_loss, running_count = 0.0, 0
            progress.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.4g}")
        if end_of_epoch:
            train_seconds += time.perf_counter() - interval_start
            samples_per_s = interval_samples / (time.perf_counter() - interval_start)
            test_loss, test_accuracy = _evaluate(model, rank_data)
            record = {"step": done, "epoch": epoch + 1, "train_loss": train_loss, "test_loss": test_loss,
                      "test_accuracy": test_accuracy, "samples_per_s": samples_per_s, "lr": lr}
            if is_root:
                metrics.append(record)
                progress.write(f"epoch {epoch + 1}: train_loss {train_loss:.4f}  test_loss {test_loss:.4f}  "
                               f"test_accuracy {test_accuracy:.4f}  {samples_per_s:.0f} samples/s")
            interval_start, interval_samples = time.perf_counter(), 0
        if done % cfg.checkpoint.every_steps == 0 and done != last_step:
            checkpoint(done)
    progress.close()

    checkpoint(last_step)
    digests = hvd.allgather_object(weights_digest(model), name="weights_digest")
    summary = {
        "framework": "torch", "world_size": size, "threads_per_rank": threads,
        "steps": last_step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "global_batch": global_batch, "resumed_from": resumed_from,
        "final": record, "wall_seconds": time.perf_counter() - started, "train_seconds": train_seconds,
        "weights_digests": digests, "weights_identical": len(set(digests)) == 1,
        "checkpoint": str(checkpoints.path_for(run_dir, last_step)),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "horovod": horovod.__version__,
                     "numpy": np.__version__},
        "horovod_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("HOROVOD_")},
    }
    if is_root:
        write_json(run_dir / "summary.json", summary)
    return summary
