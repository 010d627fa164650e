"""PyTorch adapter for the shared training loop (hvdtrain.loop): model, optimizer, Horovod collectives."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import horovod
import horovod.torch as hvd

from hvdtrain import exchange, loop, runtime
from hvdtrain.config import Config
from hvdtrain.data import Dataset
from hvdtrain.atomic import atomic_open
from hvdtrain.torch.data import train_batches
from hvdtrain.torch.exchange import COMPRESSORS, FlatExchange
from hvdtrain.torch.models import build


def _optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=exchange.optimizer_momentum(cfg),
                           weight_decay=t.weight_decay)


class TorchAdapter:
    framework = "torch"
    checkpoint_suffix = "pt"

    def __init__(self, cfg: Config, dataset: Dataset):
        self.cfg = cfg
        self.rank, self.size = hvd.rank(), hvd.size()
        torch.manual_seed(cfg.seed)
        self.model = build(cfg.model, dataset.sample_shape, dataset.num_classes)
        self.optimizer = _optimizer(cfg, self.model)
        self.flat = None
        if runtime.exchange_mode(cfg, torch.cuda.is_available()) == "overlap":
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
        hvd.broadcast_optimizer_state(self.optimizer, root_rank=0)
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)

    # training ----------------------------------------------------------------------------------
    def batches(self, rank_data, start_step: int, last_step: int) -> Iterator:
        return train_batches(rank_data, start_step, last_step, self.cfg.data.workers, self.cfg.data.prefetch)

    def train_step(self, batch, lr: float) -> float:
        x, y = batch
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.flat is not None:
            self.flat.zero_grad()
        else:
            self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        if self.flat is not None:
            self.flat()
        self.optimizer.step()
        return loss.item()

    def eval_sums(self, rank_data) -> tuple[float, float, float]:
        loss_sum, correct, count = 0.0, 0.0, 0.0
        self.model.eval()
        with torch.no_grad():
            for x, y in rank_data.eval_batches():
                x, y = torch.from_numpy(x), torch.from_numpy(y)
                logits = self.model(x)
                loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
                count += len(y)
        self.model.train()
        return loss_sum, correct, count

    # state -------------------------------------------------------------------------------------
    def save(self, path: Path, meta: dict) -> None:
        with atomic_open(path, "wb") as handle:
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "torch_rng": torch.get_rng_state(), **meta}, handle)

    def load(self, path: Path) -> dict:
        # weights_only: a checkpoint is data; never unpickle code from a file.
        with open(path, "rb") as handle:
            state = torch.load(io.BytesIO(handle.read()), weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        return state

    def weights_digest(self) -> str:
        digest = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def stats(self) -> dict:
        if self.flat is not None:
            return self.flat.stats()
        # overlap sends every gradient each step, in half precision for fp16/bf16
        words = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        method = self.cfg.compression.method
        return {"bytes_per_step": words * (2 if method in COMPRESSORS else 4), "compression": method}

    def versions(self) -> dict:
        return {"torch": torch.__version__, "horovod": horovod.__version__, "numpy": np.__version__}


def train(cfg: Config, dataset: Dataset, run_dir: Path, resume: str) -> dict[str, Any]:
    from hvdtrain.torch import elastic

    if runtime.elastic_launch():
        return elastic.train(cfg, dataset, run_dir, resume)
    runtime.configure_horovod_env(cfg.horovod)
    hvd.init()
    threads = runtime.threads_per_rank(hvd.local_size())
    torch.set_num_threads(threads)
    return loop.run(cfg, dataset, run_dir, resume, TorchAdapter(cfg, dataset), threads)
