"""Gradient exchange, TensorFlow side: how a rank's gradients become the average over all ranks.

* overlap: Horovod's DistributedGradientTape, fp16 through the compressor here. Horovod 0.28.1 has no
  bfloat16 allreduce (its TensorFlow op does not accept the dtype), so bf16 needs the flat exchange.
* flat: `FlatExchange` lays the gradients out in one flat tensor as hvdtrain.exchange does (`layout`).
  none, fp16 and bf16 average it inside the compiled step (`average`), as the PyTorch side does: none
  and fp16 by one allreduce summing in that precision, averaged in float32; bf16 by an allgather of
  the bfloat16 words as int16, summed in float32 (its traffic grows with the number of ranks).
  topk, shared_topk and auto take it out of the graph to the framework-free `hvdtrain.exchange`
  (`__call__`), between two compiled halves of the step.
The number of ranks is read from hvdtrain.world, and inside the graph from Horovod's size op on every
step: no trace bakes it in (TensorFlow runs are not elastic today, nothing here relies on that).
TensorFlow's eager Horovod ops have no handles to wait on: each runs to completion when called, so a
top-k step here takes one Horovod cycle per collective (the PyTorch side enqueues them together).
hvdtrain/torch/exchange.py is this file's twin.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd

from hvdtrain import exchange
from hvdtrain.config import CompressionConfig
from hvdtrain.world import world


class FP16Compressor:
    """Horovod's compressor interface: compress(tensor) -> (tensor, ctx); decompress(tensor, ctx).

    Unlike the torch adapter's, it keeps no buffers: inside TensorFlow's graph the cast's output is the
    graph's to allocate."""

    dtype = tf.float16

    @classmethod
    def compress(cls, tensor: tf.Tensor):
        return (tf.cast(tensor, cls.dtype) if tensor.dtype.is_floating else tensor), tensor.dtype

    @staticmethod
    def decompress(tensor: tf.Tensor, ctx):
        return tf.cast(tensor, ctx) if ctx.is_floating else tensor


class BF16Compressor(FP16Compressor):
    dtype = tf.bfloat16


# For Horovod's overlapped exchange, which refuses bf16 tensors: that run fails loudly rather than
# quietly sending float32 (runtime.exchange_mode should keep bf16 on the flat exchange).
COMPRESSORS = {"fp16": FP16Compressor, "bf16": BF16Compressor}


class HorovodCollectives(exchange.WorldCollectives):
    """hvdtrain.exchange.Collectives over horovod.tensorflow (eager)."""

    def allreduce_async(self, array, name):
        np.copyto(array, hvd.allreduce(tf.constant(array), op=hvd.Average, name=name).numpy())

    def allgather_async(self, array, name):
        return hvd.allgather(tf.constant(array), name=name).numpy()

    def wait(self, handle):
        return handle  # already complete (see the module docstring)

    def broadcast(self, array, root, name):
        return hvd.broadcast(tf.constant(array), root_rank=root, name=name).numpy()

    def maximum(self, array, name):
        return hvd.allreduce(tf.constant(array), op=hvd.Max, name=name).numpy()


class FlatExchange(exchange.FlatExchangeBase):
    """The model's gradients as one flat tensor, averaged over all ranks once per step."""

    def __init__(self, variables: list, cfg: CompressionConfig, momentum: float = 0.0):
        self.cfg = cfg
        sizes = [v.shape.num_elements() for v in variables]
        order, large = exchange.layout(sizes, cfg)
        self.variables = [variables[i] for i in order]  # the order of their gradients in the flat tensor
        # Keras keeps output channels last: each large tensor as (the rest, outputs)
        matrices = [exchange.matrix_view(variables[i].shape, -1) for i in order[:len(large)]]
        self.sparse = cfg.method in exchange.STATEFUL_METHODS  # the gradients leave the graph for NumPy
        self.words = sum(sizes)
        self.core = exchange.Exchange(large, cfg, HorovodCollectives(), self.words, momentum, None, matrices)

    def flatten(self, grads: list) -> tf.Tensor:
        """Gradients of `self.variables`, in that order, as one flat tensor."""
        return tf.concat([tf.reshape(g, [-1]) for g in grads], 0)

    def unflatten(self, flat: tf.Tensor) -> list:
        parts = tf.split(flat, [v.shape.num_elements() for v in self.variables])
        return [tf.reshape(part, v.shape) for part, v in zip(parts, self.variables)]

    def average(self, flat: tf.Tensor) -> tf.Tensor:
        """none, fp16, bf16, inside the compiled step: the average over all ranks of `flat` (float32)."""
        size = hvd.size_op()
        # the average of one rank is its gradient: no Horovod cycle to wait for
        return tf.cond(size > 1, lambda: self._sum(flat) / tf.cast(size, tf.float32), lambda: flat)

    def _sum(self, flat: tf.Tensor) -> tf.Tensor:
        if self.cfg.method == "bf16":  # every rank's bfloat16 words, gathered as int16, summed in float32
            packed, ctx = BF16Compressor.compress(flat)
            gathered = hvd.allgather(tf.bitcast(packed, tf.int16), name="flat_gradients.bf16")
            parts = tf.bitcast(tf.reshape(gathered, [-1, self.words]), tf.bfloat16)
            return tf.reduce_sum(BF16Compressor.decompress(parts, ctx), 0)
        compressor = COMPRESSORS.get(self.cfg.method, hvd.Compression.none)
        packed, ctx = compressor.compress(flat)
        return compressor.decompress(hvd.allreduce(packed, op=hvd.Sum, name="flat_gradients"), ctx)

    def count_average(self) -> None:
        """`average` ran for a step: count the bytes it sent (none on one rank)."""
        word = 2 if self.cfg.method in COMPRESSORS else 4
        self.core.sent.add(self.words * word if world.size > 1 else 0)

    def __call__(self, flat: tf.Tensor) -> np.ndarray:
        """topk, shared_topk, powersgd, auto: the average over all ranks of `flat`, a NumPy array."""
        buffer = np.array(flat)  # writable: the exchange averages it in place
        self.core(buffer)
        return buffer


# Library mode -------------------------------------------------------------------------------------------
# One exchange per (variables, method): a user's loop makes a new tape every step, but the residuals of
# error feedback and the step count must live on.
_EXCHANGES: dict = {}


class _FlatGradientTape:
    """A GradientTape whose gradient() returns the average over all ranks, through hvdtrain's exchange."""

    def __init__(self, tape: tf.GradientTape, compression: CompressionConfig):
        self._tape, self._cfg = tape, compression

    def __getattr__(self, name):
        return getattr(self._tape, name)

    def _exchange(self, variables: list) -> FlatExchange:
        key = (tuple(id(v) for v in variables), self._cfg.model_dump_json())
        if key not in _EXCHANGES:
            _EXCHANGES[key] = FlatExchange(variables, self._cfg)
        return _EXCHANGES[key]

    def gradient(self, target, sources, output_gradients=None, **kwargs):
        variables = list(sources)
        grads = self._tape.gradient(target, variables, output_gradients, **kwargs)
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
        flat_exchange = self._exchange(variables)
        position = {id(v): i for i, v in enumerate(variables)}
        order = [position[id(v)] for v in flat_exchange.variables]
        flat = flat_exchange.flatten([grads[i] for i in order])
        if flat_exchange.sparse:  # the framework-free exchange works on NumPy, also inside a tf.function
            averaged = tf.py_function(flat_exchange, [flat], tf.float32)
            averaged.set_shape(flat.shape)
        else:
            averaged = flat_exchange.average(flat)
        result = [None] * len(variables)
        for part, i in zip(flat_exchange.unflatten(averaged), order):
            result[i] = part
        return result


def DistributedGradientTape(gradtape: tf.GradientTape, device_dense: str = "", device_sparse: str = "",
                            compression=hvd.Compression.none, sparse_as_dense: bool = False, op=hvd.Average,
                            **horovod_kwargs):
    """A drop-in for horovod.tensorflow.DistributedGradientTape that adds hvdtrain's compression.

    `compression` takes what Horovod's does (its compressors: Horovod's own tape is returned, every
    argument passed on) or an hvdtrain method: "none", "fp16", "bf16", "topk", "shared_topk", "powersgd", "auto", or a
    hvdtrain.config.CompressionConfig for its options. hvdtrain's methods average all gradients in one flat
    tensor (sparse ones with error feedback, outside the graph through tf.py_function), op=Average only.
    """
    config = exchange.library_compression(compression)
    if config is None:
        return hvd.DistributedGradientTape(gradtape, device_dense=device_dense, device_sparse=device_sparse,
                                           compression=compression, sparse_as_dense=sparse_as_dense, op=op,
                                           **horovod_kwargs)
    if op != hvd.Average or horovod_kwargs:
        raise ValueError(f"hvdtrain's compression methods average: op=Average only, and no {sorted(horovod_kwargs)}")
    return _FlatGradientTape(gradtape, config)
