"""Gradient exchange, PyTorch side: how a rank's gradients become the average over all ranks.

* overlap: Horovod's DistributedOptimizer. Each gradient is allreduced from its backward hook, so
  communication overlaps with the rest of the backward pass; Horovod negotiates every tensor in its
  background thread. This pays when compute and communication use different hardware (GPUs, a NIC).
  fp16 goes through the compressor here. Horovod 0.28.1 has no bfloat16 allreduce (neither binding
  accepts the dtype), so bf16 has no overlapped form: it needs the flat exchange.
* flat: gradients live in one buffer (each .grad is a view into it: no copies) that `FlatExchange`
  exchanges once per step after backward, through the framework-free `hvdtrain.exchange` (none, topk,
  shared_topk, powersgd, auto) working on the buffer's memory, or through the two half-precision methods here:
  - fp16 (`HalfSum`): the buffer is cast, summed by one allreduce and averaged back in float32
    (averaging in half precision is what failed in Horovod's own CPU fp16 path, its issue 2108);
  - bf16 (`BFloat16Gather`): the bfloat16 words are allgathered as int16 and summed in float32 here, so
    its traffic grows with the number of ranks: prefer fp16 beyond a few ranks.
The number of ranks is read from hvdtrain.world on every use. hvdtrain/tf/exchange.py mirrors this file.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import horovod.torch as hvd

from hvdtrain import exchange
from hvdtrain.config import CompressionConfig
from hvdtrain.world import world


class FP16Compressor:
    """Horovod's compressor interface: compress(tensor) -> (tensor, ctx); decompress(tensor, ctx).

    The cast goes into a kept buffer of the tensor's shape, and the average comes back into the gradient
    itself: a fresh half-precision copy and a fresh float32 result per gradient per step cost page faults
    on every byte on CPU (as the flat exchange found). A buffer is in one gradient's flight at a time."""

    dtype = torch.float16
    _free: dict = {}  # (shape, device) -> buffers not in flight

    @classmethod
    def compress(cls, tensor: torch.Tensor):
        if not tensor.is_floating_point():
            return tensor, None
        free = cls._free.setdefault((tensor.shape, tensor.device, cls.dtype), [])
        half = free.pop() if free else torch.empty(tensor.shape, dtype=cls.dtype, device=tensor.device)
        return half.copy_(tensor), tensor

    @classmethod
    def decompress(cls, tensor: torch.Tensor, ctx):
        if ctx is None:
            return tensor
        ctx.copy_(tensor)
        cls._free.setdefault((tensor.shape, tensor.device, cls.dtype), []).append(tensor)
        return ctx


class BF16Compressor(FP16Compressor):
    dtype = torch.bfloat16


# For Horovod's overlapped exchange, which refuses bf16 tensors: the config refuses overlap with bf16 and
# runtime.exchange_mode keeps bf16 on the flat exchange, so only fp16 reaches Horovod's optimizer.
COMPRESSORS = {"fp16": FP16Compressor, "bf16": BF16Compressor}


class HorovodCollectives(exchange.WorldCollectives):
    """hvdtrain.exchange.Collectives over horovod.torch; NumPy arrays are shared with tensors, not copied."""

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


class _HalfCopy:
    """The buffer's half-precision copy, kept from step to step: a fresh one each step costs the kernel's
    page faults on every byte (large blocks come from mmap), which measured more than the cast itself."""

    dtype = FP16Compressor.dtype

    def __init__(self) -> None:
        self.packed: Optional[torch.Tensor] = None

    def pack(self, flat: torch.Tensor) -> torch.Tensor:
        if self.packed is None or self.packed.numel() != flat.numel():
            self.packed = torch.empty(flat.numel(), dtype=self.dtype)
        return self.packed.copy_(flat)


class HalfSum(_HalfCopy):
    """fp16, a method of hvdtrain.exchange: sum in half precision (in place), average in float32."""

    def exchange(self, buffer: np.ndarray, step: int) -> int:
        flat = torch.from_numpy(buffer)
        packed = hvd.allreduce_(self.pack(flat), op=hvd.Sum, name="flat_gradients.fp16")
        flat.copy_(packed).div_(world.size)
        return packed.numel() * packed.element_size()


class BFloat16Gather(_HalfCopy):
    """bf16, a method of hvdtrain.exchange: every rank's bfloat16 words, added one rank at a time straight
    into the float32 buffer and averaged there."""

    dtype = BF16Compressor.dtype

    def exchange(self, buffer: np.ndarray, step: int) -> int:
        flat = torch.from_numpy(buffer)
        packed = self.pack(flat)
        gathered = hvd.allgather(packed.view(torch.int16), name="flat_gradients.bf16")
        parts = gathered.view(torch.bfloat16).view(-1, flat.numel())
        flat.copy_(parts[0])  # rank by rank: torch.sum over the ranks' axis measured 5x slower
        for part in parts[1:]:
            flat.add_(part)
        flat.div_(world.size)
        return packed.numel() * packed.element_size()


HALF_METHODS = {"fp16": HalfSum, "bf16": BFloat16Gather}


class FlatExchange(exchange.FlatExchangeBase):
    """The model's gradients in one flat buffer, averaged over all ranks once per step by `hvdtrain.exchange`."""

    def __init__(self, model, cfg: Optional[CompressionConfig] = None, momentum: float = 0.0):
        """`model`: an nn.Module or its parameters."""
        self.cfg = cfg or CompressionConfig()
        params = model.parameters() if isinstance(model, torch.nn.Module) else model
        params = [p for p in params if p.requires_grad]
        order, large = exchange.layout([p.numel() for p in params], self.cfg)
        # PyTorch keeps output channels first: each large tensor as (outputs, the rest)
        matrices = [exchange.matrix_view(params[i].shape, 0) for i in order[:len(large)]]
        self.params = [params[i] for i in order]
        # on the parameters' device; a GPU buffer is exchanged through a host copy (see __call__)
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)
        self.views, offset = [], 0
        for p in self.params:
            view = self.buffer[offset:offset + p.numel()].view_as(p)
            p.grad = view
            self.views.append(view)
            offset += p.numel()
        half = HALF_METHODS[self.cfg.method]() if self.cfg.method in HALF_METHODS else None
        self.core = exchange.Exchange(large, self.cfg, HorovodCollectives(), self.buffer.numel(), momentum, half,
                                      matrices)

    def zero_grad(self) -> None:
        self.buffer.zero_()
        for p, view in zip(self.params, self.views):
            p.grad = view

    def __call__(self) -> None:
        """Average the gradients over all ranks, in place."""
        for p, view in zip(self.params, self.views):
            if p.grad is None:  # zero_grad(set_to_none=True), or a parameter this step did not use
                view.zero_()
                p.grad = view
            elif p.grad is not view:  # autograd replaced the view (e.g. a sparse or reshaped gradient)
                view.copy_(p.grad)
                p.grad = view
        if self.buffer.is_cuda:  # the framework-free exchange works on host memory
            host = self.buffer.cpu()
            self.core(host.numpy())
            self.buffer.copy_(host, non_blocking=False)
        else:
            self.core(self.buffer.numpy())


# Library mode -------------------------------------------------------------------------------------------
class _FlatDistributedOptimizer(torch.optim.Optimizer):
    """The user's optimizer class with hvdtrain's flat exchange before each step (see DistributedOptimizer)."""

    def __init__(self, params, compression: CompressionConfig):
        super(self.__class__, self).__init__(params)
        parameters = [p for group in self.param_groups for p in group["params"]]
        self._exchange = FlatExchange(parameters, compression)
        self._synchronized = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the flat buffer the gradients live in (set_to_none would detach them from it)."""
        self._exchange.zero_grad()

    def synchronize(self) -> None:
        """Average the gradients over all ranks now (e.g. before clipping); step() then skips it."""
        self._exchange()
        self._synchronized = True

    def step(self, closure=None):
        if not self._synchronized:
            self._exchange()
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    def exchange_stats(self) -> dict:
        """Bytes this rank sent per step since the last call, and the method (auto: its decision)."""
        return self._exchange.stats()


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters=None, compression=hvd.Compression.none,
                         backward_passes_per_step: int = 1, op=hvd.Average, **horovod_kwargs):
    """A drop-in for horovod.torch.DistributedOptimizer that adds hvdtrain's compression.

    `compression` takes what Horovod's does (hvd.Compression.none / .fp16: Horovod's own optimizer is
    returned, all other arguments passed on) or an hvdtrain method: "none", "fp16", "bf16", "topk",
    "shared_topk", "powersgd", "auto", or a hvdtrain.config.CompressionConfig for its options (ratio, min_size,
    warm-up...). hvdtrain's methods exchange all gradients once per step in one flat buffer after backward
    (with error feedback for the sparse ones) and need op=Average and one backward pass per step. The
    result is an instance of the optimizer's own class, as with Horovod: learning-rate schedulers work.
    """
    config = exchange.library_compression(compression)
    if config is None:
        return hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters, compression=compression,
                                        backward_passes_per_step=backward_passes_per_step, op=op, **horovod_kwargs)
    if backward_passes_per_step != 1 or op != hvd.Average or horovod_kwargs:
        raise ValueError("hvdtrain's compression methods average once per step: backward_passes_per_step=1 and "
                         f"op=Average only, and no {sorted(horovod_kwargs)}")
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_FlatDistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, config)
