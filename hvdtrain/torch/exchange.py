"""Gradient exchange: how a rank's gradients become the average over all ranks.

* overlap: Horovod's DistributedOptimizer. Each gradient is allreduced from its backward hook, so
  communication overlaps with the rest of the backward pass; Horovod negotiates every tensor in its
  background thread. This pays when compute and communication use different hardware (GPUs, a NIC).
* flat: after backward, one allreduce of a single buffer that the gradients live in (each .grad is a
  view into it, so there is no copy). One negotiation per step instead of one per tensor. On CPU nodes,
  where the cores that would overlap are busy computing, this measured faster (see README, Performance).
"""
from __future__ import annotations

import torch
import horovod.torch as hvd


class FlatExchange:
    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        total = sum(p.numel() for p in self.params)
        self.buffer = torch.zeros(total, dtype=self.params[0].dtype, device=self.params[0].device)
        self.views = []
        offset = 0
        for p in self.params:
            view = self.buffer[offset:offset + p.numel()].view_as(p)
            p.grad = view
            self.views.append(view)
            offset += p.numel()

    def zero_grad(self) -> None:
        self.buffer.zero_()
        for p, view in zip(self.params, self.views):
            p.grad = view

    def __call__(self) -> None:
        for p, view in zip(self.params, self.views):
            if p.grad is not view:  # autograd replaced the view (e.g. a sparse or reshaped gradient)
                view.copy_(p.grad)
                p.grad = view
        hvd.allreduce_(self.buffer, op=hvd.Average, name="flat_gradients")
