"""Gradient exchange with compression, framework-free: dense, top-k, shared-index top-k, PowerSGD and auto.

Every gradient sits in one flat float32 NumPy buffer (`layout`: the tensors top-k may sparsify first,
the small ones after). A framework adapter (hvdtrain.torch.exchange, hvdtrain.tf.exchange) supplies the
Horovod operations (`Collectives`) and drives one `Exchange`, which averages the buffer in place:
  layout.py       SPARSE_METHODS, STATEFUL_METHODS, layout(), optimizer_momentum()
  collectives.py  Collectives: the operations, with rank and size read live from hvdtrain.world
  methods.py      Dense (none), AllgatherTopK (topk), SharedTopK (shared_topk), PowerSGD (powersgd);
                  density(), matrix_view(), powersgd_pays()
  feedback.py     ErrorFeedback (the residual), MomentumCorrection (DGC's velocity and masking)
  auto.py         AutoPolicy (auto's trials and decision); link_bandwidth(), worth_compressing()
  core.py         Exchange: one-rank shortcut, the step, ByteCounter, state()/load_state(), on_resize()
No part keeps the number of ranks: an elastic job changes it while it runs (see `Collectives`).
"""
from hvdtrain.exchange.auto import AutoPolicy, link_bandwidth, worth_compressing
from hvdtrain.exchange.collectives import Collectives, WorldCollectives
from hvdtrain.exchange.core import ByteCounter, Exchange, FlatExchangeBase
from hvdtrain.exchange.feedback import ErrorFeedback, MomentumCorrection
from hvdtrain.exchange.layout import (LIBRARY_METHODS, SPARSE_METHODS, STATEFUL_METHODS, library_compression, layout,
                                      optimizer_momentum)
from hvdtrain.exchange.methods import AllgatherTopK, Dense, PowerSGD, SharedTopK, density, matrix_view, powersgd_pays

__all__ = ["AllgatherTopK", "AutoPolicy", "ByteCounter", "Collectives", "Dense", "ErrorFeedback", "Exchange",
           "FlatExchangeBase", "LIBRARY_METHODS", "MomentumCorrection", "PowerSGD", "SPARSE_METHODS",
           "STATEFUL_METHODS", "SharedTopK", "density", "layout", "library_compression", "link_bandwidth",
           "matrix_view", "optimizer_momentum", "powersgd_pays", "worth_compressing", "WorldCollectives"]
