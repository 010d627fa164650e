"""Gradient exchange, PyTorch side: how a rank's gradients become the average over all ranks.

* overlap: Horovod's DistributedOptimizer. Each gradient is allreduced from its backward hook, so
  communication overlaps with the rest of the backward pass; Horovod negotiates every tensor in its
  background thread. This pays when compute and communication use different hardware (GPUs, a NIC).
* flat: gradients live in one buffer (each .grad is a view into it: no copies) that is exchanged once
  per step after backward, either by the framework-free `hvdtrain.exchange` (none, topk, shared_topk,
  auto) working on the buffer's memory, or here in half precision:
  - fp16 / bf16: the buffer is cast, summed by one allreduce, and averaged back in float32 (averaging
    in half precision on CPU is what fails in Horovod's own fp16 path, its issue 2108). Horovod 0.28 has
    no bfloat16 tensors, so bf16 words are allgathered and summed in float32: its traffic grows with the
    number of ranks, prefer fp16 beyond a few ranks.
"""
from __future__ import annotations

from typing import Optional

import torch
import horovod.torch as hvd

from hvdtrain import exchange
from hvdtrain.config import CompressionConfig


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


class HorovodCollectives:
    """hvdtrain.exchange.Collectives over horovod.torch; NumPy arrays are shared with tensors, not copied."""

    def __init__(self):
        self.rank, self.size = hvd.rank(), hvd.size()

    def allreduce_async(self, array, name):
        return hvd.allreduce_async_(torch.from_numpy(array), op=hvd.Average, name=name)

    def allgather_async(self, array, name):
        return hvd.allgather_async(torch.from_numpy(array), name=name)

    def wait(self, handle):
        return hvd.synchronize(handle).numpy()

    def broadcast(self, array, root, name):
        return hvd.broadcast(torch.from_numpy(array), root_rank=root, name=name).numpy()

    def maximum(self, array, name):
        return hvd.allreduce(torch.from_numpy(array), op=hvd.Max, name=name).numpy()


class FlatExchange:
    def __init__(self, model: torch.nn.Module, cfg: Optional[CompressionConfig] = None, momentum: float = 0.0):
        self.cfg = cfg or CompressionConfig()
        params = [p for p in model.parameters() if p.requires_grad]
        order, large = exchange.layout([p.numel() for p in params], self.cfg)
        self.params = [params[i] for i in order]
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32)
        self.views, offset = [], 0
        for p in self.params:
            view = self.buffer[offset:offset + p.numel()].view_as(p)
            p.grad = view
            self.views.append(view)
            offset += p.numel()
        self.core = exchange.Exchange(large, self.cfg, HorovodCollectives(), self.buffer.numel(), momentum)

    def zero_grad(self) -> None:
        self.buffer.zero_()
        for p, view in zip(self.params, self.views):
            p.grad = view

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

    def __call__(self) -> None:
        for p, view in zip(self.params, self.views):
            if p.grad is not view:  # autograd replaced the view (e.g. a sparse or reshaped gradient)
                view.copy_(p.grad)
                p.grad = view
        if self.cfg.method in COMPRESSORS:
            self.core.count(self._half(COMPRESSORS[self.cfg.method]))
        else:
            self.core(self.buffer.numpy())

    def stats(self) -> dict:
        return self.core.stats()
