"""hvdtrain.exchange.Collectives over horovod.tensorflow (eager), for top-k, shared_topk and auto.

TensorFlow's eager Horovod ops have no handles to wait on: each runs to completion when called, so a
top-k step here takes one Horovod cycle per collective (the PyTorch side enqueues them together).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd


class HorovodCollectives:
    def __init__(self):
        self.rank, self.size = hvd.rank(), hvd.size()

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
