"""TensorFlow adapter for the shared training loop (hvdtrain.loop): a custom step in tf.function.

A custom step (rather than Keras' fit with Horovod's callbacks) lets the same loop drive both frameworks:
the same schedule, metrics, checkpoints and stop handling, and the same gradient exchanges as the
PyTorch adapter (flat: one allreduce of all gradients; overlap: hvd.DistributedGradientTape; top-k,
shared_topk and auto: the framework-free hvdtrain.exchange between two compiled halves of the step).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

import hvdtrain.tf  # noqa: F401  (tf-keras before TensorFlow)
import numpy as np
import tensorflow as tf
import horovod
import horovod.tensorflow as hvd

from hvdtrain import exchange, loop, runtime
from hvdtrain.config import Config
from hvdtrain.data import Dataset
from hvdtrain.errors import ConfigError
from hvdtrain.atomic import atomic_open, atomic_path
from hvdtrain.tf.data import train_dataset
from hvdtrain.tf.exchange import HorovodCollectives
from hvdtrain.tf.models import build

keras = tf.keras


def _optimizer(cfg: Config):
    if cfg.train.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=cfg.train.lr)
    return keras.optimizers.SGD(learning_rate=cfg.train.lr, momentum=exchange.optimizer_momentum(cfg))


def _flatten(grads):
    return tf.concat([tf.reshape(g, [-1]) for g in grads], 0)


def _unflatten(flat, variables) -> list:
    parts = tf.split(flat, [v.shape.num_elements() for v in variables])
    return [tf.reshape(part, v.shape) for part, v in zip(parts, variables)]


class TensorFlowAdapter:
    framework = "tensorflow"
    checkpoint_suffix = "npz"

    def __init__(self, cfg: Config, dataset: Dataset):
        self.cfg, self.sample_shape = cfg, tuple(dataset.sample_shape)
        self.rank, self.size = hvd.rank(), hvd.size()
        tf.keras.utils.set_random_seed(cfg.seed)
        self.model = build(cfg.model, self.sample_shape, dataset.num_classes)
        self.optimizer = _optimizer(cfg)
        self.optimizer.build(self.model.trainable_variables)  # slots exist before they are broadcast
        self.lr = tf.Variable(cfg.train.lr, dtype=tf.float32, trainable=False)
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        has_gpu = bool(tf.config.list_physical_devices("GPU"))
        self.overlap = runtime.exchange_mode(cfg, has_gpu) == "overlap"
        self.half = {"fp16": tf.float16, "bf16": tf.bfloat16}.get(cfg.compression.method)
        signature = [tf.TensorSpec((None, *self.sample_shape), tf.float32), tf.TensorSpec((None,), tf.int64)]
        self._step = tf.function(self._train_step, input_signature=signature)
        self.sparse = None
        if cfg.compression.method in exchange.SPARSE_METHODS:  # gradients leave the graph for NumPy
            sizes = [v.shape.num_elements() for v in self.model.trainable_variables]
            order, large = exchange.layout(sizes, cfg.compression)
            self.sparse_variables = [self.model.trainable_variables[i] for i in order]
            self.sparse = exchange.Exchange(large, cfg.compression, HorovodCollectives(), sum(sizes),
                                            cfg.train.momentum)
            self._flat_gradients = tf.function(self._gradients, input_signature=signature)
            self._apply_flat = tf.function(self._apply, input_signature=[tf.TensorSpec((None,), tf.float32)])

    def _train_step(self, x, y):
        with tf.GradientTape() as tape:
            loss = self.loss(y, self.model(x, training=True))
        variables = self.model.trainable_variables
        if self.overlap:
            compression = hvd.Compression.fp16 if self.half is not None else hvd.Compression.none
            grads = hvd.DistributedGradientTape(tape, compression=compression).gradient(loss, variables)
        elif self.size == 1:  # the average of one rank is its gradient: no Horovod cycle to wait for
            grads = tape.gradient(loss, variables)
        else:
            flat = _flatten(tape.gradient(loss, variables))
            if self.half is None:
                flat = hvd.allreduce(flat, op=hvd.Average, name="flat_gradients")
            else:  # sum in half precision, average in float32 (as the PyTorch adapter does)
                summed = hvd.allreduce(tf.cast(flat, self.half), op=hvd.Sum, name="flat_gradients.half")
                flat = tf.cast(summed, tf.float32) / self.size
            grads = _unflatten(flat, variables)
        self._update(grads, variables)
        return loss

    def _update(self, grads, variables) -> None:
        if self.cfg.train.weight_decay:  # L2 in the gradient, as torch.optim.SGD's weight_decay
            grads = [g + self.cfg.train.weight_decay * v for g, v in zip(grads, variables)]
        self.optimizer.learning_rate.assign(self.lr)
        self.optimizer.apply_gradients(zip(grads, variables))

    def _gradients(self, x, y):
        """Sparse exchanges: the loss and this rank's gradients, flat in the exchange's layout."""
        with tf.GradientTape() as tape:
            loss = self.loss(y, self.model(x, training=True))
        return loss, _flatten(tape.gradient(loss, self.sparse_variables))

    def _apply(self, flat):
        self._update(_unflatten(flat, self.sparse_variables), self.sparse_variables)

    # collectives -------------------------------------------------------------------------------
    def sum(self, values: list[float], name: str) -> list[float]:
        return hvd.allreduce(tf.constant(values, tf.float64), op=hvd.Sum, name=name).numpy().tolist()

    def gather_object(self, obj: Any, name: str) -> list:
        return hvd.allgather_object(obj, name=name)

    def broadcast_object(self, obj: Any, name: str) -> Any:
        return hvd.broadcast_object(obj, root_rank=0, name=name)

    def broadcast_state(self) -> None:
        hvd.broadcast_variables(self.model.variables, root_rank=0)
        hvd.broadcast_variables(self.optimizer.variables, root_rank=0)

    # training ----------------------------------------------------------------------------------
    def batches(self, rank_data, start_step: int, last_step: int) -> Iterator:
        return iter(train_dataset(rank_data, start_step, last_step, self.sample_shape,
                                  prefetch=self.cfg.data.prefetch))

    def train_step(self, batch, lr: float) -> float:
        self.lr.assign(lr)
        if self.sparse is None:
            return float(self._step(*batch))
        loss, flat = self._flat_gradients(*batch)
        buffer = np.array(flat)  # writable: the exchange averages it in place
        self.sparse(buffer)
        self._apply_flat(buffer)
        return float(loss)

    def eval_sums(self, rank_data) -> tuple[float, float, float]:
        loss_sum, correct, count = 0.0, 0.0, 0.0
        for x, y in rank_data.eval_batches():
            logits = self.model(x, training=False)
            loss_sum += float(self.loss(y, logits)) * len(y)
            correct += float(np.sum(np.argmax(logits.numpy(), 1) == y))
            count += len(y)
        return loss_sum, correct, count

    # state -------------------------------------------------------------------------------------
    def save(self, path: Path, meta: dict) -> None:
        arrays = {f"model/{i:04d}": w for i, w in enumerate(self.model.get_weights())}
        arrays.update({f"optimizer/{i:04d}": v.numpy() for i, v in enumerate(self.optimizer.variables)})
        arrays.update({f"meta/{k}": np.asarray(v) for k, v in meta.items()})
        with atomic_open(path, "wb") as handle:
            np.savez(handle, **arrays)

    def load(self, path: Path) -> dict:
        with np.load(path, allow_pickle=False) as state:  # data only: no pickled objects
            keys = sorted(state.files)
            self.model.set_weights([state[k] for k in keys if k.startswith("model/")])
            for variable, key in zip(self.optimizer.variables, [k for k in keys if k.startswith("optimizer/")]):
                variable.assign(state[key])
            return {k.split("/", 1)[1]: state[k].item() for k in keys if k.startswith("meta/")}

    def weights_digest(self) -> str:
        digest = hashlib.sha256()
        for weight in self.model.get_weights():
            digest.update(np.ascontiguousarray(weight).tobytes())
        return digest.hexdigest()

    def stats(self) -> dict:
        if self.sparse is not None:
            return self.sparse.stats()
        # dense exchanges send every gradient each step (none on one rank), in half precision for fp16/bf16
        words = sum(v.shape.num_elements() for v in self.model.trainable_variables) if self.size > 1 else 0
        return {"bytes_per_step": words * (2 if self.half is not None else 4), "compression": self.cfg.compression.method}

    def versions(self) -> dict:
        return {"tensorflow": tf.__version__, "horovod": horovod.__version__, "numpy": np.__version__}

    def export(self, run_dir: Path) -> None:
        """The trained model for `hvdtrain quantize` (rank 0), written atomically."""
        with atomic_path(run_dir / "model.keras", suffix=".keras") as tmp:
            self.model.save(tmp)


def train(cfg: Config, dataset: Dataset, run_dir: Path, resume: str) -> dict[str, Any]:
    if runtime.elastic_launch():
        raise ConfigError("framework: elastic training (horovodrun --min-np/--max-np) is available for "
                          "framework torch; launch TensorFlow runs with a fixed -np")
    runtime.configure_horovod_env(cfg.horovod)
    hvd.init()
    threads = runtime.threads_per_rank(hvd.local_size())
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    adapter = TensorFlowAdapter(cfg, dataset)
    summary = loop.run(cfg, dataset, run_dir, resume, adapter, threads)
    if adapter.rank == 0:
        adapter.export(run_dir)
    return summary
