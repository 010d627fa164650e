"""Gradient exchange: how a rank's gradients become the average over all ranks (PyTorch).

* overlap: Horovod's DistributedOptimizer. Each gradient is allreduced from its backward hook, so
  communication overlaps with the rest of the backward pass; Horovod negotiates every tensor in its
  background thread. This pays when compute and communication use different hardware (GPUs, a NIC).
* flat: gradients live in one buffer (each .grad is a view into it: no copies) that is exchanged once
  per step after backward, optionally compressed:
  - fp16 / bf16: the buffer is cast, summed by one allreduce, and averaged back in float32 (averaging
    in half precision on CPU is what fails in Horovod's own fp16 path, its issue 2108). Horovod 0.28 has
    no bfloat16 tensors, so bf16 words are allgathered and summed in float32: its traffic grows with the
    number of ranks, prefer fp16 beyond a few ranks;
  - topk: per tensor, the largest entries of gradient + residual (error feedback) are allgathered as
    values and indices; tensors below `min_size` (biases, norms) take a dense allreduce;
  - shared_topk: a rotating leader picks the indices from its residual-corrected gradient and
    broadcasts them; every rank allreduces its values at those indices, so traffic does not grow with
    the number of ranks;
  - auto: times none and topk on the first steps (and again every `auto_recheck_every` steps) and uses
    the faster; all ranks agree on the measured times before deciding.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch
import horovod.torch as hvd

from hvdtrain.config import CompressionConfig
from hvdtrain.topk import TopK, select_with_feedback


class FP16Compressor:
    """Horovod's compressor interface: compress(tensor) -> (tensor, ctx); decompress(tensor, ctx)."""

    dtype = torch.float16

    @classmethod
    def compress(cls, tensor: torch.Tensor):
        return (tensor.to(cls.dtype) if tensor.is_floating_point() else tensor), tensor.dtype

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx):
        return tensor.to(ctx) if ctx.is_floating_point else tensor


class BF16Compressor(FP16Compressor):
    dtype = torch.bfloat16


COMPRESSORS = {"fp16": FP16Compressor, "bf16": BF16Compressor}


class FlatExchange:
    def __init__(self, model: torch.nn.Module, cfg: Optional[CompressionConfig] = None):
        self.cfg = cfg or CompressionConfig()
        params = [p for p in model.parameters() if p.requires_grad]
        sparse = self.cfg.method in ("topk", "shared_topk", "auto")
        # Large tensors first: the compressed region is then one contiguous slice of the buffer.
        params.sort(key=lambda p: not (sparse and p.numel() >= self.cfg.min_size))
        self.params = params
        total = sum(p.numel() for p in params)
        self.buffer = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
        self.views, self.large = [], []
        offset = 0
        for p in params:
            view = self.buffer[offset:offset + p.numel()].view_as(p)
            p.grad = view
            self.views.append(view)
            if sparse and p.numel() >= self.cfg.min_size:
                self.large.append((offset, p.numel()))
            offset += p.numel()
        self.split = sum(n for _, n in self.large)  # buffer[:split] may be sparsified, the rest is dense
        self.residual = torch.zeros(self.split, dtype=self.buffer.dtype) if self.split else None
        self.select = TopK(seed=hvd.rank())
        self.step = 0
        self.bytes_sent, self.stats_step = 0, 0
        self.residual_pending = False  # error feedback holds gradient not yet sent
        self.auto_choice, self.auto_times, self.auto_trials = None, None, {"none": [], "topk": []}

    def zero_grad(self) -> None:
        self.buffer.zero_()
        for p, view in zip(self.params, self.views):
            p.grad = view

    # exchanges ---------------------------------------------------------------------------------
    def _dense_async(self, region: torch.Tensor) -> tuple[list, int]:
        """Start averaging `region` in place; returns the handles to wait on and the bytes sent."""
        handles = [hvd.allreduce_async_(region, op=hvd.Average, name=f"gradients.dense.{region.numel()}")
                   ] if region.numel() else []
        return handles, region.numel() * region.element_size()

    def _dense(self, region: torch.Tensor) -> int:
        handles, sent = self._dense_async(region)
        for handle in handles:
            hvd.synchronize(handle)
        return sent

    def _half(self, compressor) -> int:
        packed, ctx = compressor.compress(self.buffer)
        if packed.dtype == torch.bfloat16:
            # Horovod 0.28 has no bfloat16 tensors: gather the raw 16-bit words, sum in float32 here.
            gathered = hvd.allgather(packed.view(torch.int16), name="flat_gradients.bf16")
            parts = gathered.view(torch.bfloat16).view(hvd.size(), -1)
            self.buffer.copy_(compressor.decompress(parts, ctx).sum(0)).div_(hvd.size())
        else:
            summed = hvd.allreduce(packed, op=hvd.Sum, name="flat_gradients.half")
            self.buffer.copy_(compressor.decompress(summed, ctx)).div_(hvd.size())
        return packed.numel() * packed.element_size()

    def _flush_residual(self) -> None:
        """Back to dense exchange: what error feedback held back is sent now, not lost."""
        if self.residual_pending:
            self.buffer[:self.split].add_(self.residual)
            self.residual.zero_()
            self.residual_pending = False

    def _local_topk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Error feedback: m += g; select top-k of m per tensor; m[selected] = 0. Indices in buffer space."""
        memory, grads = self.residual.numpy(), self.buffer[:self.split].numpy()
        values, indices = [], []
        for offset, count in self.large:
            part = slice(offset, offset + count)
            v, i = select_with_feedback(memory[part], grads[part], max(1, int(count * self.cfg.ratio)), self.select)
            values.append(v)
            indices.append(i + offset)
        return torch.from_numpy(np.concatenate(values)), torch.from_numpy(np.concatenate(indices))

    def _topk(self) -> int:
        self.residual_pending = True
        values, indices = self._local_topk()
        # Enqueued together, the three collectives are negotiated in one Horovod cycle instead of three.
        gathers = [hvd.allgather_async(values, name="topk.values"),
                   hvd.allgather_async(indices.to(torch.int32), name="topk.indices")]
        dense_handles, dense_sent = self._dense_async(self.buffer[self.split:])
        all_values, all_indices = (hvd.synchronize(handle) for handle in gathers)
        for handle in dense_handles:
            hvd.synchronize(handle)
        region = self.buffer[:self.split]
        region.zero_()
        region.index_add_(0, all_indices.long(), all_values).div_(hvd.size())
        return values.numel() * 4 + indices.numel() * 4 + dense_sent

    def _shared_topk(self) -> int:
        self.residual.add_(self.buffer[:self.split])
        leader = self.step % hvd.size()  # ScaleCom-style cyclic leader
        if hvd.rank() == leader:
            memory = self.residual.numpy()
            picked = [self.select(memory[o:o + n], max(1, int(n * self.cfg.ratio)))[1] + o for o, n in self.large]
            indices = torch.from_numpy(np.concatenate(picked)).to(torch.int32)
            count = torch.tensor([indices.numel()], dtype=torch.int64)
        else:
            count = torch.zeros(1, dtype=torch.int64)
        count = hvd.broadcast(count, root_rank=leader, name="shared_topk.count")
        if hvd.rank() != leader:
            indices = torch.zeros(int(count.item()), dtype=torch.int32)
        indices = hvd.broadcast(indices, root_rank=leader, name="shared_topk.indices").long()
        values = hvd.allreduce(self.residual[indices], op=hvd.Average, name="shared_topk.values")
        self.residual[indices] = 0
        region = self.buffer[:self.split]
        region.zero_()
        region[indices] = values
        sent = values.numel() * 4 + (indices.numel() * 4 if hvd.rank() == leader else 0)
        return sent + self._dense(self.buffer[self.split:])

    def _auto(self) -> int:
        """Time none and topk on trial steps, agree on the times across ranks, use the faster."""
        period = self.cfg.auto_recheck_every
        trial = self.cfg.auto_trial_steps
        phase = self.step % period
        if phase < 2 * trial:  # measuring: first `trial` steps dense, the next `trial` top-k
            method = "none" if phase < trial else "topk"
            started = time.perf_counter()
            sent = self._run(method)
            self.auto_trials[method].append(time.perf_counter() - started)
            if phase == 2 * trial - 1:
                medians = torch.tensor([float(np.median(self.auto_trials["none"])),
                                        float(np.median(self.auto_trials["topk"]))], dtype=torch.float64)
                worst = hvd.allreduce(medians, op=hvd.Max, name="auto.times")  # the same decision everywhere
                self.auto_choice = "topk" if worst[1] < worst[0] else "none"
                self.auto_times = worst.tolist()
                self.auto_trials = {"none": [], "topk": []}
            return sent
        return self._run(self.auto_choice)

    def _run(self, method: str) -> int:
        if method == "none":
            self._flush_residual()
            return self._dense(self.buffer)
        return self._topk()

    def __call__(self) -> None:
        for p, view in zip(self.params, self.views):
            if p.grad is not view:  # autograd replaced the view (e.g. a sparse or reshaped gradient)
                view.copy_(p.grad)
                p.grad = view
        method = self.cfg.method
        if method in COMPRESSORS:
            self.bytes_sent += self._half(COMPRESSORS[method])
        elif method == "topk":
            self.bytes_sent += self._topk()
        elif method == "shared_topk":
            self.bytes_sent += self._shared_topk()
        elif method == "auto":
            self.bytes_sent += self._auto()
        else:
            self.bytes_sent += self._dense(self.buffer)
        self.step += 1

    def stats(self) -> dict:
        """Bytes this rank put on the wire per step since the last call, and the auto decision."""
        steps = max(1, self.step - self.stats_step)
        result = {"bytes_per_step": self.bytes_sent / steps, "compression": self.cfg.method}
        if self.cfg.method == "auto" and self.auto_choice:
            result.update(compression=f"auto:{self.auto_choice}", auto_seconds={"none": self.auto_times[0],
                                                                                  "topk": self.auto_times[1]})
        self.bytes_sent, self.stats_step = 0, self.step
        return result
