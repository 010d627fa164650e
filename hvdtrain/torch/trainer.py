"""PyTorch adapter for the shared training loop (hvdtrain.loop): model, optimizer, Horovod collectives."""
from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import horovod
import horovod.torch as hvd

from hvdtrain import entrypoints, exchange, loop, models, runtime, tasks
from hvdtrain.atomic import atomic_open
from hvdtrain.config import Config
from hvdtrain.data import Dataset
from hvdtrain.errors import ConfigError
from hvdtrain.metrics import MetricSet
from hvdtrain.torch.data import train_batches
from hvdtrain.torch.exchange import COMPRESSORS, FlatExchange
from hvdtrain.torch import optim
from hvdtrain.world import world

LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss, "mae": F.l1_loss}


def build_model(cfg: Config, sample_shape, num_classes: int, label_shape=()) -> torch.nn.Module:
    """The configured model (hvdtrain.models), from the seed: every rank builds the same one."""
    torch.manual_seed(cfg.seed)
    model = models.build(cfg, sample_shape, num_classes, label_shape)
    return checked_model(model, models.source(cfg))


def checked_model(model, origin: str) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model: {origin} returned a {type(model).__name__}, not a torch.nn.Module "
                          "(framework: torch)")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model: {origin} has no trainable parameters")
    return model


def loss_function(cfg: Config, loss=None):
    """loss(outputs, targets) -> a scalar tensor: the task's, the configured name, or a user's callable.
    Regression outputs of the targets' size are reshaped to them ((N, 1) for scalar targets); per-sample
    losses are averaged."""
    if loss is None:
        name = tasks.loss_name(cfg)
        loss = LOSSES[name] if name in LOSSES else entrypoints.resolve(name, "train.loss")
    regression = not tasks.get(cfg.task).classes

    def scalar_loss(outputs, targets):
        if regression and outputs.shape != targets.shape and outputs.numel() == targets.numel():
            outputs = outputs.reshape(targets.shape)
        value = loss(outputs, targets)
        return value.mean() if value.dim() else value  # a loss with reduction="none": averaged
    return scalar_loss


def _optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "lars":
        return optim.Lars(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "lamb":
        return optim.Lamb(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=exchange.optimizer_momentum(cfg),
                           weight_decay=t.weight_decay)


class TorchAdapter:
    framework = "torch"
    checkpoint_suffix = "pt"

    def __init__(self, cfg: Config, model: torch.nn.Module, loss=None):
        self.cfg = cfg
        self.device = torch.device(runtime.device_for_rank(cfg.device, torch.cuda.device_count(), world.local_rank,
                                                           world.local_size))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL and every implicit CUDA call use this rank's GPU
        self.model = model.to(self.device)  # before the optimizer: it holds the parameters where they live
        self.loss = loss_function(cfg, loss)
        self.optimizer = _optimizer(cfg, self.model)
        self.precision = Precision(cfg.train.precision, self.device.type)
        self.flat = None
        self.exchange = runtime.exchange_mode(cfg, self.device.type == "cuda", world.collectives == "gloo")
        if self.exchange == "overlap":
            compression = COMPRESSORS.get(cfg.compression.method, hvd.Compression.none)
            self.optimizer = hvd.DistributedOptimizer(self.optimizer, named_parameters=self.model.named_parameters(),
                                                      compression=compression)
        else:
            self.flat = FlatExchange(self.model, cfg.compression, cfg.train.momentum)

    # collectives -------------------------------------------------------------------------------
    def sum(self, values: list[float], name: str) -> list[float]:
        return hvd.allreduce(torch.tensor(values, dtype=torch.float64), op=hvd.Sum, name=name).tolist()

    def gather_object(self, obj: Any, name: str) -> list:
        return hvd.allgather_object(obj, name=name)

    def broadcast_object(self, obj: Any, name: str) -> Any:
        return hvd.broadcast_object(obj, root_rank=0, name=name)

    def broadcast_state(self) -> None:
        """Rank 0's parameters and optimizer state become every rank's. Not Horovod's
        broadcast_optimizer_state: on an optimizer without state (a fresh run, SGD without momentum) it
        steps on zero gradients first, which with weight decay moves the weights."""
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        state = hvd.broadcast_object(self.optimizer.state_dict(), root_rank=0, name="optimizer_state")
        if world.rank != 0:
            self.optimizer.load_state_dict(state)
        if self.precision.scaler.is_enabled():  # fp16: rank 0's loss scale (fresh, or from its checkpoint)
            scaler_state = hvd.broadcast_object(self.precision.scaler.state_dict(), root_rank=0, name="scaler_state")
            if world.rank != 0:
                self.precision.scaler.load_state_dict(scaler_state)

    # training ----------------------------------------------------------------------------------
    @property
    def device_name(self) -> str:
        return str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else "")

    def batches(self, rank_data, start_step: int, last_step: int) -> Iterator:
        return train_batches(rank_data, start_step, last_step, self.cfg.data.workers, self.cfg.data.prefetch,
                             pin=self.device.type == "cuda")

    def _to_device(self, part) -> torch.Tensor:
        # from pinned memory (the reader's batch buffers on GPU nodes) the copy runs beside the host;
        # the buffer is not reused before loss.item() at the step's end has waited for it
        return torch.as_tensor(part).to(self.device, non_blocking=True)

    def train_step(self, batch, lr: float) -> loop.StepResult:
        x, y = (self._to_device(part) for part in batch)  # NumPy batches (elastic rounds) without a copy
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.flat is not None:
            self.flat.zero_grad()
        else:
            self.optimizer.zero_grad()
        scaler = self.precision.scaler
        started = time.perf_counter()
        with self.precision.autocast():
            loss = self.loss(self.model(x), y)
        scaler.scale(loss).backward()
        computed = time.perf_counter()
        if self.flat is not None:
            # one rank's gradient is the average (unless momentum correction turns it into a velocity):
            # one norm, not two passes over the buffer
            alone = world.size == 1 and not self.flat.cfg.momentum_correction
            local_norm = None if alone else float(torch.linalg.vector_norm(self.flat.buffer)) / scaler.get_scale()
            self.flat()  # the average of scaled gradients is the scaled average
            scaler.unscale_(self.optimizer)
            norm = float(torch.linalg.vector_norm(self.flat.buffer))
            local_norm = norm if alone else local_norm
            scaler.step(self.optimizer)
        else:  # overlap: the allreduces ran from backward's hooks, into the gradients themselves
            # Horovod's AMP recipe: synchronize, unscale, then step without a second synchronize
            local_norm = None
            self.optimizer.synchronize()
            scaler.unscale_(self.optimizer)
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None]))
            with self.optimizer.skip_synchronize():
                scaler.step(self.optimizer)
        if self.precision.skipped_step(norm):  # fp16: the scaler skipped it; no norm to report
            norm, local_norm = 0.0, (None if local_norm is None else 0.0)
        # where the step's time went, for `bench scaling` (overlap's exchange partly hides in backward)
        self.phase_seconds = {"forward_backward": computed - started, "update": time.perf_counter() - computed}
        return loop.StepResult(loss.item(), norm, local_norm)

    def eval_sums(self, rank_data, metrics: MetricSet) -> list[float]:
        loss_sum, count, totals = 0.0, 0.0, metrics.zeros()
        self.model.eval()
        with torch.no_grad():
            for x, y in rank_data.eval_batches():
                x, y = self._to_device(x), self._to_device(y)
                with self.precision.autocast():
                    outputs = self.model(x)
                    loss_sum += float(self.loss(outputs, y)) * len(y)
                count += len(y)
                # class axis 1, as torch has it
                totals += metrics.sums(outputs.float().cpu().numpy(), y.cpu().numpy())
        self.model.train()
        return [loss_sum, count, *totals]

    # state -------------------------------------------------------------------------------------
    def save(self, path: Path, meta: dict) -> None:
        with atomic_open(path, "wb") as handle:
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "torch_rng": torch.get_rng_state(), "scaler": self.precision.scaler.state_dict(), **meta},
                       handle)

    def load(self, path: Path) -> dict:
        # weights_only: a checkpoint is data; never unpickle code from a file.
        with open(path, "rb") as handle:
            state = torch.load(io.BytesIO(handle.read()), weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("scaler") and self.precision.scaler.is_enabled():  # fp16: the loss scale and its counters
            self.precision.scaler.load_state_dict(state["scaler"])
        return state

    def exchange_state(self) -> dict[str, np.ndarray]:
        """This rank's own exchange state (error feedback, corrected momentum) for its checkpoint file."""
        return self.flat.state() if self.flat is not None else {}

    def load_exchange_state(self, state: dict[str, np.ndarray]) -> None:
        if self.flat is not None:
            self.flat.load_state(state)

    # elastic -----------------------------------------------------------------------------------
    def elastic_state(self, **counters) -> hvd.elastic.TorchState:
        """Horovod's elastic state over this model and optimizer, with the loop's counters."""
        if not self.optimizer.state:
            _create_optimizer_state(self.optimizer)
        return hvd.elastic.TorchState(model=self.model, optimizer=self.optimizer, **counters)

    def resync_exchange(self) -> None:
        """After a resize: state the exchange keeps equal on every rank comes from rank 0 again."""
        if self.flat is not None:
            self.flat.on_resize()

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def weights_digest(self) -> str:
        digest = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def stats(self) -> dict:
        return {**self._exchange_stats(), **self.precision.stats()}

    def _exchange_stats(self) -> dict:
        if self.flat is not None:
            return self.flat.stats()
        # overlap sends every gradient each step (none on one rank), in half precision for fp16/bf16
        words = sum(p.numel() for p in self.model.parameters() if p.requires_grad) if world.size > 1 else 0
        method = self.cfg.compression.method
        return {"bytes_per_step": words * (2 if method in COMPRESSORS else 4), "compression": method}

    def versions(self) -> dict:
        return {"torch": torch.__version__, "horovod": horovod.__version__, "numpy": np.__version__}


class Precision:
    """train.precision: autocast to bf16 or fp16 around forward and loss; fp16 with a gradient scaler.

    Weights, optimizer state and the exchanged gradients stay float32. A step the scaler skips (non-finite
    scaled gradients, its way of finding the loss scale) is not a divergence: it reports a gradient norm
    of 0 and is counted; a loss that stays non-finite is still caught by the loop."""

    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, precision: str, device_type: str):
        self.precision, self.device_type = precision, device_type
        self.scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
        self.skipped = 0

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.DTYPES.get(self.precision, torch.bfloat16),
                              enabled=self.precision != "fp32")

    def skipped_step(self, norm: float) -> bool:
        """After the optimizer step: update the scale; whether the scaler skipped the step (non-finite
        unscaled gradients: it lowers its scale and tries again)."""
        if not self.scaler.is_enabled():
            return False
        self.scaler.update()
        if np.isfinite(norm):
            return False
        self.skipped += 1
        return True

    def stats(self) -> dict:
        if not self.scaler.is_enabled():
            return {"precision": self.precision} if self.precision != "fp32" else {}
        return {"precision": self.precision, "loss_scale": float(self.scaler.get_scale()),
                "amp_skipped_steps": self.skipped}


def _create_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer its state with a step of learning rate 0 (parameters unchanged).

    Horovod's elastic sync fills an empty optimizer's state by stepping it on zero gradients after the
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


def start_horovod(cfg: Config) -> int:
    """Horovod up with hvdtrain's settings, `world` answering from it; returns the threads per rank."""
    runtime.configure_horovod_env(cfg.horovod, elastic=runtime.elastic_launch())
    hvd.init()
    world.attach(hvd)
    threads = world.cores
    torch.set_num_threads(threads)
    runtime.limit_numpy_threads(threads)
    return threads


def train(cfg: Config, dataset: Dataset, run_dir: Path, resume: str, model=None, loss=None) -> dict[str, Any]:
    """Train the configured model (or `model`, a user's module, with `loss`) on `dataset`."""
    threads = start_horovod(cfg)
    if model is None:
        model = build_model(cfg, dataset.sample_shape, dataset.num_classes, dataset.label_shape)
    adapter = TorchAdapter(cfg, checked_model(model, "model"), loss)
    return loop.run(cfg, dataset, run_dir, resume, adapter, threads)
