"""Exchange: the one object a framework adapter drives; it picks the method, keeps the step and the bytes."""
from __future__ import annotations

from typing import Optional, Protocol

import numpy as np

from hvdtrain.config import CompressionConfig
from hvdtrain.errors import ConfigError
from hvdtrain.exchange.auto import AutoPolicy
from hvdtrain.exchange.collectives import Collectives
from hvdtrain.exchange.feedback import ErrorFeedback, MomentumCorrection
from hvdtrain.exchange.layout import STATEFUL_METHODS
from hvdtrain.exchange.methods import AllgatherTopK, Dense, PowerSGD, SharedTopK


class Method(Protocol):
    def exchange(self, buffer: np.ndarray, step: int) -> int:
        """Average `buffer` in place over all ranks; the bytes this rank sent."""


class ByteCounter:
    """Bytes this rank put on the wire, per step, between two reports. Every exchange counts here: each method
    through `Exchange` (a framework's own too, PyTorch's fp16/bf16), and exchanges run inside a compiled
    graph (TensorFlow's none/fp16/bf16) by `add` after their step."""

    def __init__(self) -> None:
        self.bytes, self.steps = 0, 0

    def add(self, sent: int) -> None:
        """One step done, `sent` bytes sent."""
        self.bytes += sent
        self.steps += 1

    def take(self) -> float:
        """Bytes per step since the last call."""
        per_step = self.bytes / max(1, self.steps)
        self.bytes, self.steps = 0, 0
        return per_step


class Exchange:
    """Averages the flat gradient buffer over all ranks with the configured method."""

    def __init__(self, large: list[tuple[int, int]], cfg: CompressionConfig, comm: Collectives, total: int,
                 momentum: float = 0.0, method: Optional[Method] = None,
                 matrices: Optional[list[Optional[tuple[int, int]]]] = None):
        """`large`: (offset, count) of the compressed tensors (`layout`); `total`: the buffer's length;
        `momentum`: SGD's, applied here under momentum_correction; `method`: a framework's own exchange for
        a method the core does not run (fp16, bf16); `matrices`: each large tensor's 2-D view
        (`matrix_view`), which powersgd factorizes (and auto may), None for vectors."""
        self.matrices = matrices if matrices is not None else [None] * len(large)
        self.cfg, self.comm = cfg, comm
        split = sum(n for _, n in large)
        self.feedback = ErrorFeedback(split)
        self.momentum = MomentumCorrection(momentum if cfg.momentum_correction else 0.0, total, split)
        self.sent = ByteCounter()
        self.step = 0  # exchanges done: top-k's share, shared_topk's leader, auto's trials and the selection follow it
        self.method = method if method is not None else self._method(large)
        self.auto = self.method if isinstance(self.method, AutoPolicy) else None
        self.powersgd = (self.auto.powersgd if self.auto is not None else
                         self.method if isinstance(self.method, PowerSGD) else None)

    def _method(self, large: list[tuple[int, int]]) -> Method:
        dense = Dense(self.comm, self.feedback)
        if self.cfg.method not in STATEFUL_METHODS or not large:
            return dense
        if self.cfg.method == "powersgd":
            return PowerSGD(large, self.matrices, self.cfg, self.comm, self.feedback)
        kind = SharedTopK if self.cfg.method == "shared_topk" else AllgatherTopK
        method = kind(large, self.cfg, self.comm, self.feedback, self.momentum)
        if self.cfg.method != "auto":
            return method
        powersgd = PowerSGD(large, self.matrices, self.cfg, self.comm, self.feedback)
        return AutoPolicy(self.cfg, self.comm, dense, method, powersgd if powersgd.factorized else None)

    def __call__(self, buffer: np.ndarray) -> None:
        """Average `buffer` (float32, laid out by `layout`) over all ranks, in place."""
        if self.comm.size == 1:  # the average of one rank is its gradient: no Horovod cycle to wait for
            self.momentum.accelerate(buffer, slice(None))
            self.feedback.release(buffer)  # held back before the job shrank to this rank: sent now
            self.sent.add(0)
        else:
            self.sent.add(self.method.exchange(buffer, self.step))
        self.step += 1

    def stats(self) -> dict:
        """Bytes this rank put on the wire per step since the last call, and the auto decision."""
        result = {"bytes_per_step": self.sent.take(), "compression": self.cfg.method}
        if self.auto is not None:
            result.update(self.auto.report())
        return result

    # elastic jobs and checkpoints ------------------------------------------------------------------
    def on_resize(self) -> None:
        """After an elastic job changed size, before its next step; every rank calls it (it broadcasts).

        Per-rank state that must agree comes from rank 0: the step (top-k's share, shared_topk's leader
        and auto's trial phase follow it; a joining rank starts at 0) and the dense tail's momentum-
        correction velocity (applied to the average, so equal on every rank; a joining rank has zeros).
        Residuals and the sparsified region's velocity are each rank's own and stay. auto measures again."""
        self.step = int(self.comm.broadcast(np.array([self.step], np.int64), 0, "exchange.step")[0])
        self.momentum.sync(self.comm)
        if self.powersgd is not None:
            self.powersgd.sync()
        if self.auto is not None:
            self.auto.restart(self.step)

    def state(self) -> dict[str, np.ndarray]:
        """This rank's exchange state (one file per rank), so a resumed run continues exactly as this one
        would: the step, the residual, under momentum correction the velocity, and PowerSGD's warm-start
        factors. Empty for methods that keep nothing between steps (none, fp16, bf16)."""
        if self.cfg.method not in STATEFUL_METHODS:
            return {}
        state = {"step": np.array([self.step], np.int64), "residual": self.feedback.residual.copy()}
        if self.momentum.momentum:
            state["velocity"] = self.momentum.velocity.copy()
        if self.powersgd is not None:
            state["powersgd_q"] = self.powersgd.state()
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Continue from an earlier `state()`. What this exchange keeps but `state` lacks starts fresh; what
        it does not keep (another method's) is ignored. auto measures again: a resumed job may run on other
        nodes, or on another number of ranks."""
        for name, target in (("residual", self.feedback.residual), ("velocity", self.momentum.velocity)):
            if name in state and target.size:
                saved = np.asarray(state[name], np.float32)
                if saved.shape != target.shape:
                    raise ConfigError(f"compression: the checkpoint's exchange {name} has {saved.size} entries, "
                                      f"this model's {target.size} (the model or compression.min_size changed)")
                target[:] = saved
        if self.cfg.method in STATEFUL_METHODS and "step" in state:
            self.step = int(np.asarray(state["step"]).reshape(-1)[0])
        if self.powersgd is not None and "powersgd_q" in state:
            self.powersgd.load_state(np.asarray(state["powersgd_q"], np.float32))
        self.feedback.pending = bool(self.feedback.residual.any())
        if self.auto is not None:
            self.auto.restart(self.step)


class FlatExchangeBase:
    """What both frameworks' FlatExchange hand straight to their core `Exchange` (`self.core`)."""

    core: Exchange

    def stats(self) -> dict:
        return self.core.stats()

    def state(self) -> dict[str, np.ndarray]:
        """This rank's exchange state for a checkpoint (see Exchange.state)."""
        return self.core.state()

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.core.load_state(state)

    def on_resize(self) -> None:
        """Elastic reset: every rank calls it once the job has its new size (see Exchange.on_resize)."""
        self.core.on_resize()
