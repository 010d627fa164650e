"""auto: dense, top-k per tensor, or PowerSGD, decided from measurements of the job's own steps.

From `start` on (again every `auto_recheck_every` steps): `auto_trial_steps` dense steps and as many
top-k steps on every large tensor give the link's bandwidth (alpha-beta: both exchanges pay the same
fixed cost per step, and differ in volume) and each tensor's selection time; a tensor is compressed when
the wire time it saves exceeds its selection time. The chosen mix is then timed against dense for as many
steps and kept only if it is not slower. Where the model has matrices PowerSGD factorizes, it is timed
next for as many steps and replaces the choice if it was faster. All ranks agree on the times (their
maximum), so they take the same decision.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np

from hvdtrain.config import CompressionConfig
from hvdtrain.costmodel import VALUE_BYTES, ring_volume, topk_volume
from hvdtrain.exchange.collectives import Collectives
from hvdtrain.exchange.methods import AllgatherTopK, Dense, PowerSGD, entries_sent


def link_bandwidth(dense_seconds: float, dense_volume: float, sparse_seconds: float,
                   sparse_volume: float) -> Optional[float]:
    """Bytes/s implied by two measured exchanges with the same fixed cost per step (t = c + volume / beta);
    None when the dense exchange was not both larger and slower (communication is then free to us)."""
    if dense_volume <= sparse_volume or dense_seconds <= sparse_seconds:
        return None
    return (dense_volume - sparse_volume) / (dense_seconds - sparse_seconds)


def worth_compressing(counts: Sequence[int], ks: Sequence[int], select_seconds: Sequence[float], ranks: int,
                      bandwidth: Optional[float]) -> list[bool]:
    """Per tensor: does the wire time top-k saves (ring allreduce of n values vs allgather of k values and
    indices) exceed the time spent selecting?"""
    if bandwidth is None or ranks < 2:
        return [False] * len(counts)
    return [(ring_volume(VALUE_BYTES * n, ranks) - topk_volume(k, ranks)) / bandwidth > seconds
            for n, k, seconds in zip(counts, ks, select_seconds)]


class AutoPolicy:
    """The auto method: runs `dense`, `topk` (with some of its tensors turned off) or `powersgd` as measured."""

    def __init__(self, cfg: CompressionConfig, comm: Collectives, dense: Dense, topk: AllgatherTopK,
                 powersgd: Optional[PowerSGD] = None):
        self.cfg, self.comm, self.dense, self.topk, self.powersgd = cfg, comm, dense, topk, powersgd
        self.restart(0)

    def restart(self, step: int) -> None:
        """Measure again from `step` on. Every rank calls it at the same step (after a resize or a resume:
        the link may not be the one measured)."""
        self.start, self.choice, self.pending, self.record = step, None, False, {}
        self.trials: dict[str, list] = {}
        self.topk.active = [True] * len(self.topk.large)

    def report(self) -> dict:
        """The decision, for the metrics (empty before the first one)."""
        return {"compression": f"auto:{self.choice}", **self.record} if self.choice else {}

    def exchange(self, buffer: np.ndarray, step: int) -> int:
        trial, phase = self.cfg.auto_trial_steps, (step - self.start) % self.cfg.auto_recheck_every
        if phase == 0:
            self.trials = {"none": [], "topk": [], "chosen": [], "powersgd": [], "select": [], "comm": []}
        if phase < trial:
            stage, method = "none", self.dense
        elif phase < 2 * trial:
            stage, method = "topk", self.topk
            self.topk.active = [True] * len(self.topk.large)
        elif phase < 3 * trial and self.pending:
            stage, method = "chosen", self.topk
        elif 3 * trial <= phase < 4 * trial and self.powersgd is not None:
            stage, method = "powersgd", self.powersgd
        else:
            chosen = {"none": self.dense, "topk": self.topk, "powersgd": self.powersgd}[self.choice]
            return chosen.exchange(buffer, step)
        started = time.perf_counter()
        sent = method.exchange(buffer, step)
        self.trials[stage].append(time.perf_counter() - started)
        if stage == "topk":
            self.trials["select"].append(self.topk.select_seconds)
            self.trials["comm"].append(self.topk.comm_seconds)
        if phase == 2 * trial - 1:
            self._model(buffer, step)
        elif phase == 3 * trial - 1 and stage == "chosen":
            self._verify()
        elif phase == 4 * trial - 1:
            self._against_powersgd()
        return sent

    def _model(self, buffer: np.ndarray, step: int) -> None:
        trials, ranks, split = self.trials, self.comm.size, self.topk.split
        local = [np.median(trials["none"]), np.median(trials["comm"]), np.median(trials["topk"]),
                 *np.median(trials["select"], axis=0)]
        agreed = self.comm.maximum(np.array(local, np.float64), "auto.model")  # the same inputs everywhere
        dense_seconds, sparse_comm, topk_seconds, select = agreed[0], agreed[1], agreed[2], agreed[3:]
        counts = [n for _, n in self.topk.large]
        ks = [entries_sent(self.cfg, step, n) for n in counts]
        bandwidth = link_bandwidth(dense_seconds, ring_volume(buffer.nbytes, ranks), sparse_comm,
                                   topk_volume(sum(ks), ranks) + ring_volume(buffer[split:].nbytes, ranks))
        active = worth_compressing(counts, ks, select, ranks, bandwidth)
        self.topk.active = active
        self.record = {"auto_seconds": {"none": float(dense_seconds), "topk": float(topk_seconds)},
                       "auto_link_bytes_per_s": bandwidth,
                       "auto_tensors": f"{sum(active)} of {len(active)} compressed"}
        self.pending = any(active)
        if not self.pending:
            self.choice = "none"

    def _verify(self) -> None:
        """Keep the model's choice only if it measured no slower than dense."""
        local = np.array([np.median(self.trials["none"]), np.median(self.trials["chosen"])])
        dense_seconds, chosen_seconds = self.comm.maximum(local, "auto.verify")
        self.record["auto_seconds"]["chosen"] = float(chosen_seconds)
        self.pending = False
        if chosen_seconds <= dense_seconds:
            self.choice = "topk"
        else:
            self.choice, self.record["auto_tensors"] = "none", f"0 of {len(self.topk.active)} compressed"

    def _against_powersgd(self) -> None:
        """PowerSGD replaces the choice so far if its steps measured faster."""
        current = self.trials["none" if self.choice == "none" else "chosen"]
        local = np.array([np.median(current), np.median(self.trials["powersgd"])])
        current_seconds, powersgd_seconds = self.comm.maximum(local, "auto.powersgd")
        self.record["auto_seconds"]["powersgd"] = float(powersgd_seconds)
        if powersgd_seconds < current_seconds:
            self.choice = "powersgd"
            self.record["auto_tensors"] = f"{len(self.powersgd.factorized)} of {len(self.topk.large)} factorized"
