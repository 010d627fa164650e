"""TensorFlow adapter for the shared training loop (hvdtrain.loop): a custom step in tf.function.

A custom step (rather than Keras' fit with Horovod's callbacks) lets the same loop drive both frameworks:
the same schedule, metrics, checkpoints and stop handling, and the same gradient exchanges as the
PyTorch adapter (hvdtrain.tf.exchange: flat, one allreduce of all gradients inside the compiled step, or
top-k, shared_topk and auto between two compiled halves of it; overlap: hvd.DistributedGradientTape).
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

from hvdtrain import entrypoints, exchange, loop, models, runtime, tasks
from hvdtrain.config import Config
from hvdtrain.data import Dataset
from hvdtrain.atomic import atomic_open, atomic_path
from hvdtrain.errors import ConfigError
from hvdtrain.metrics import MetricSet
from hvdtrain.tf.data import train_dataset
from hvdtrain.tf.exchange import COMPRESSORS, FlatExchange
from hvdtrain.tf import optim
from hvdtrain.world import world

keras = tf.keras
LOSSES = {"cross_entropy": lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
          "mse": keras.losses.MeanSquaredError, "mae": keras.losses.MeanAbsoluteError}


POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def build_model(cfg: Config, sample_shape, num_classes: int, label_shape=()) -> keras.Model:
    """The configured model (hvdtrain.models), from the seed: every rank builds the same one, under the
    mixed-precision policy of train.precision (layers compute in bf16/fp16, variables stay float32)."""
    keras.mixed_precision.set_global_policy(POLICIES[cfg.train.precision])
    keras.utils.set_random_seed(cfg.seed)
    return checked_model(models.build(cfg, sample_shape, num_classes, label_shape), models.source(cfg))


def checked_model(model, origin: str) -> keras.Model:
    if not isinstance(model, keras.Model):
        raise ConfigError(f"model: {origin} returned a {type(model).__name__}, not a Keras model "
                          "(framework: tensorflow; build it with tf.keras, which is tf-keras here)")
    if not model.trainable_variables:
        raise ConfigError(f"model: {origin} has no trainable variables (build it with an Input shape)")
    return model


def loss_function(cfg: Config, loss=None):
    """The loss as hvdtrain's loop calls it, loss(outputs, targets) -> a scalar tensor. `loss` (or the
    configured entry point) follows Keras' convention, loss(y_true, y_pred), so users' Keras losses plug in
    as they are; per-sample losses are averaged. Regression outputs of the targets' size are reshaped to them ((N, 1) for scalar targets)."""
    if loss is None:
        name = tasks.loss_name(cfg)
        loss = LOSSES[name]() if name in LOSSES else entrypoints.resolve(name, "train.loss")
    regression = not tasks.get(cfg.task).classes

    def keras_order(outputs, targets):
        outputs = tf.cast(outputs, tf.float32)  # mixed precision: the loss in float32, as Keras advises
        if regression and outputs.shape.rank != targets.shape.rank:
            outputs = tf.reshape(outputs, tf.shape(targets))
        return tf.reduce_mean(loss(targets, outputs))  # Keras loss functions return one loss per sample
    return keras_order


def _optimizer(cfg: Config):
    t = cfg.train
    if t.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=t.lr)
    if t.optimizer == "lars":
        return optim.Lars(learning_rate=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "lamb":
        return optim.Lamb(learning_rate=t.lr, weight_decay=t.weight_decay)
    return keras.optimizers.SGD(learning_rate=t.lr, momentum=exchange.optimizer_momentum(cfg))


def _norm(grads) -> tf.Tensor:
    return tf.linalg.global_norm(grads)


class TensorFlowAdapter:
    framework = "tensorflow"
    checkpoint_suffix = "npz"

    def __init__(self, cfg: Config, model: keras.Model, sample_shape: tuple[int, ...], label_shape=(), loss=None,
                 device_name: str | None = None):
        """device_name: where start_horovod placed this rank (placement must precede building the model)."""
        self.cfg, self.sample_shape, self.label_shape = cfg, tuple(sample_shape), tuple(label_shape)
        self.task = tasks.get(cfg.task)
        self.model = model
        self.device_name = device_name or place_device(cfg)
        self.scaling = cfg.train.precision == "fp16"  # dynamic loss scaling, Keras' LossScaleOptimizer
        self.skipped = 0
        self.optimizer = _optimizer(cfg)
        if self.scaling:
            self.optimizer = keras.mixed_precision.LossScaleOptimizer(self.optimizer)
        self.optimizer.build(self.model.trainable_variables)  # slots exist before they are broadcast
        self.lr = tf.Variable(cfg.train.lr, dtype=tf.float32, trainable=False)
        self.loss = loss_function(cfg, loss)
        self.flat = None
        self.exchange = runtime.exchange_mode(cfg, self.device_name != "cpu", world.collectives == "gloo")
        if self.exchange == "flat":
            self.flat = FlatExchange(self.model.trainable_variables, cfg.compression, cfg.train.momentum)
        self.label_dtype = tf.as_dtype(self.task.label_dtype)
        signature = [tf.TensorSpec((None, *self.sample_shape), tf.float32),
                     tf.TensorSpec((None, *self.label_shape), self.label_dtype)]
        if self.flat is not None and self.flat.sparse:  # the gradients leave the graph for NumPy
            self._gradients = tf.function(self._flat_gradients, input_signature=signature)
            self._apply = tf.function(self._apply_flat, input_signature=[tf.TensorSpec((None,), tf.float32)])
        else:
            self._step = tf.function(self._train_step, input_signature=signature)

    def _scaled(self, loss):
        return self.optimizer.get_scaled_loss(loss) if self.scaling else loss

    def _unscaled(self, grads: list) -> list:
        """The average of scaled gradients is the scaled average: unscale after the exchange."""
        return self.optimizer.get_unscaled_gradients(grads) if self.scaling else grads

    def _train_step(self, x, y):
        with tf.GradientTape() as tape:
            loss = self.loss(self.model(x, training=True), y)
            scaled = self._scaled(loss)
        if self.flat is None:
            variables = self.model.trainable_variables
            compression = COMPRESSORS.get(self.cfg.compression.method, hvd.Compression.none)
            grads = hvd.DistributedGradientTape(tape, compression=compression).gradient(scaled, variables)
            local_norm = tf.constant(-1.0)  # averaged inside the tape: this rank's own norm is never seen
        else:
            variables = self.flat.variables
            local = self.flat.flatten(tape.gradient(scaled, variables))
            local_norm = tf.norm(self._unscaled([local])[0])
            grads = self.flat.unflatten(self.flat.average(local))
        grads = self._unscaled(grads)
        self._update(grads, variables)
        return loss, _norm(grads), local_norm

    def _update(self, grads, variables) -> None:
        if self.cfg.train.weight_decay and self.cfg.train.optimizer not in ("lars", "lamb"):
            # L2 in the gradient, as torch.optim.SGD's weight_decay (LARS and LAMB apply their own)
            grads = [g + self.cfg.train.weight_decay * v for g, v in zip(grads, variables)]
        self.optimizer.learning_rate.assign(self.lr)
        self.optimizer.apply_gradients(zip(grads, variables))

    def _flat_gradients(self, x, y):
        """Sparse exchanges: the loss and this rank's gradients, flat in the exchange's layout."""
        with tf.GradientTape() as tape:
            loss = self.loss(self.model(x, training=True), y)
            scaled = self._scaled(loss)
        return loss, self.flat.flatten(tape.gradient(scaled, self.flat.variables))

    def _apply_flat(self, flat):
        self._update(self.flat.unflatten(self._unscaled([flat])[0]), self.flat.variables)

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
        if self._scale_state():
            hvd.broadcast_variables(self._scale_state(), root_rank=0)

    # training ----------------------------------------------------------------------------------
    def batches(self, rank_data, start_step: int, last_step: int) -> Iterator:
        return iter(train_dataset(rank_data, start_step, last_step, self.sample_shape,
                                  prefetch=self.cfg.data.prefetch, label_shape=self.label_shape,
                                  label_dtype=self.task.label_dtype))

    def train_step(self, batch, lr: float) -> loop.StepResult:
        self.lr.assign(lr)
        if self.flat is not None and self.flat.sparse:
            loss, flat = self._gradients(*batch)
            scale = float(self.optimizer.loss_scale) if self.scaling else 1.0
            local_norm = float(np.linalg.norm(flat)) / scale
            averaged = self.flat(flat)
            self._apply(averaged)
            return loop.StepResult(float(loss), self._after_step(float(np.linalg.norm(averaged)) / scale), local_norm)
        loss, norm, local_norm = self._step(*batch)
        if self.flat is not None:
            self.flat.count_average()
        return loop.StepResult(float(loss), self._after_step(float(norm)),
                               float(local_norm) if local_norm >= 0 else None)

    def _after_step(self, norm: float) -> float:
        """fp16: a step with non-finite scaled gradients was skipped by the LossScaleOptimizer (which lowered
        its scale): counted, not a divergence; a loss that stays non-finite still is."""
        if self.scaling and not np.isfinite(norm):
            self.skipped += 1
            return 0.0
        return norm

    def eval_sums(self, rank_data, metrics: MetricSet) -> list[float]:
        loss_sum, count, totals = 0.0, 0.0, metrics.zeros()
        for x, y in rank_data.eval_batches():
            outputs = tf.cast(self.model(x, training=False), tf.float32)
            loss_sum += float(self.loss(outputs, tf.constant(y))) * len(y)
            count += len(y)
            outputs = outputs.numpy()
            if self.task.name == "segmentation":  # Keras' logits are channels-last; metrics take classes at axis 1
                outputs = np.moveaxis(outputs, -1, 1)
            totals += metrics.sums(outputs, y)
        return [loss_sum, count, *totals]

    # state -------------------------------------------------------------------------------------
    def save(self, path: Path, meta: dict) -> None:
        arrays = {f"model/{i:04d}": w for i, w in enumerate(self.model.get_weights())}
        arrays.update({f"optimizer/{i:04d}": v.numpy() for i, v in enumerate(self.optimizer.variables)})
        arrays.update({f"scaler/{i:04d}": v.numpy() for i, v in enumerate(self._scale_state())})
        arrays.update({f"meta/{k}": np.asarray(v) for k, v in meta.items()})
        with atomic_open(path, "wb") as handle:
            np.savez(handle, **arrays)

    def load(self, path: Path) -> dict:
        with np.load(path, allow_pickle=False) as state:  # data only: no pickled objects
            keys = sorted(state.files)
            self.model.set_weights([state[k] for k in keys if k.startswith("model/")])
            for variable, key in zip(self.optimizer.variables, [k for k in keys if k.startswith("optimizer/")]):
                variable.assign(state[key])
            for variable, key in zip(self._scale_state(), [k for k in keys if k.startswith("scaler/")]):
                variable.assign(state[key])
            return {k.split("/", 1)[1]: state[k].item() for k in keys if k.startswith("meta/")}

    def weights_finite(self) -> bool:
        return all(np.isfinite(w).all() for w in self.model.get_weights())

    def weights_digest(self) -> str:
        digest = hashlib.sha256()
        for weight in self.model.get_weights():
            digest.update(np.ascontiguousarray(weight).tobytes())
        return digest.hexdigest()

    def exchange_state(self) -> dict[str, np.ndarray]:
        """This rank's gradient-exchange state (hvdtrain.exchange.Exchange.state), for its own checkpoint
        file; empty when the exchange keeps nothing between steps."""
        return self.flat.state() if self.flat is not None else {}

    def load_exchange_state(self, state: dict[str, np.ndarray]) -> None:
        if self.flat is not None:
            self.flat.load_state(state)

    def _scale_state(self) -> list:
        """fp16: the loss scale and its growth counter. Keras keeps them outside optimizer.variables (the
        LossScaleOptimizer's are its inner optimizer's), in its loss-scale state."""
        if not self.scaling:
            return []
        state = self.optimizer._loss_scale  # no public accessor for the scale variable itself
        return [state.current_loss_scale, state.counter]

    def stats(self) -> dict:
        extra = {}
        if self.cfg.train.precision != "fp32":
            extra["precision"] = self.cfg.train.precision
        if self.scaling:
            extra.update(loss_scale=float(self.optimizer.loss_scale), amp_skipped_steps=self.skipped)
        return {**self._exchange_stats(), **extra}

    def _exchange_stats(self) -> dict:
        if self.flat is not None:
            return self.flat.stats()
        # overlap sends every gradient each step (none on one rank), in half precision for fp16/bf16
        words = sum(v.shape.num_elements() for v in self.model.trainable_variables) if world.size > 1 else 0
        method = self.cfg.compression.method
        return {"bytes_per_step": words * (2 if method in COMPRESSORS else 4), "compression": method}

    def versions(self) -> dict:
        return {"tensorflow": tf.__version__, "horovod": horovod.__version__, "numpy": np.__version__}

    def export(self, run_dir: Path) -> None:
        """The trained model for `hvdtrain quantize` (rank 0), written atomically."""
        with atomic_path(run_dir / "model.keras", suffix=".keras") as tmp:
            self.model.save(tmp)


def place_device(cfg: Config) -> str:
    """One GPU per local rank (hvdtrain.runtime.device_for_rank): only that GPU is visible to this process,
    with memory growth, so ranks neither place ops on GPU 0 together nor reserve every GPU's memory."""
    gpus = tf.config.list_physical_devices("GPU")
    device = runtime.device_for_rank(cfg.device, len(gpus), world.local_rank, world.local_size)
    try:
        if device == "cpu":
            if gpus:
                tf.config.set_visible_devices([], "GPU")
        else:
            gpu = gpus[int(device.split(":")[1])]
            tf.config.set_visible_devices(gpu, "GPU")
            tf.config.experimental.set_memory_growth(gpu, True)
            device = f"{device} ({tf.config.experimental.get_device_details(gpu).get('device_name', 'GPU')})"
    except RuntimeError:  # TensorFlow already initialised by the user's script (hvdtrain.fit): as it is
        pass
    return device


def start_horovod(cfg: Config) -> int:
    """Horovod up with hvdtrain's settings, `world` answering from it; returns the threads per rank."""
    runtime.configure_horovod_env(cfg.horovod, elastic=runtime.elastic_launch())
    hvd.init()
    world.attach(hvd)
    threads = world.cores
    runtime.limit_numpy_threads(threads)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # the user's script (hvdtrain.fit) built its model first: TensorFlow keeps its own pools
        threads = tf.config.threading.get_intra_op_parallelism_threads() or threads
    return threads


def train(cfg: Config, dataset: Dataset, run_dir: Path, resume: str, model=None, loss=None) -> dict[str, Any]:
    """Train the configured model (or `model`, a user's Keras model, with `loss`) on `dataset`."""
    threads = start_horovod(cfg)
    device = place_device(cfg)  # before any model exists: TensorFlow fixes its devices when it starts
    if model is None:
        model = build_model(cfg, dataset.sample_shape, dataset.num_classes, dataset.label_shape)
    adapter = TensorFlowAdapter(cfg, checked_model(model, "model"), dataset.sample_shape, dataset.label_shape, loss,
                                device)
    summary = loop.run(cfg, dataset, run_dir, resume, adapter, threads)
    if world.is_root:
        adapter.export(run_dir)
    return summary
