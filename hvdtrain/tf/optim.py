"""Large-batch optimizers, TensorFlow side: LARS (You et al. 2017) and LAMB (You et al. 2019) for tf-keras.

The same update rules as hvdtrain/torch/optim.py, whose docstrings state them in full; this file's twin.
Each weight tensor's step is scaled by a layer-wise trust ratio; variables of rank <= 1 (biases, norm
scales and shifts) get no trust ratio and no weight decay; a trust ratio whose numerator or denominator
norm is 0 is 1, so zero gradients produce no NaN.

These are Keras 2 "new" optimizers (tf-keras 2.21): `build(var_list)` creates one slot per variable with
`add_variable_from_reference`, `update_step` runs inside the caller's `tf.function`. `optimizer.variables`
is the step counter, then the slots in build order: hvdtrain's checkpoints save and assign that list.
The weight decay is part of the layer-wise rule (the paper's L2 term inside the trust ratio), not Keras's
decoupled decay: `weight_decay` is never applied by the base class, and `exclude_from_weight_decay` has no
effect (the exclusion is by rank).
"""
from __future__ import annotations

import hvdtrain.tf  # noqa: F401  (tf-keras before TensorFlow)
import tensorflow as tf

keras = tf.keras


def _adapted(variable) -> bool:
    """Whether a variable gets the trust ratio and weight decay: matrices and kernels yes, vectors no."""
    return len(variable.shape) > 1


def _trust(numerator, denominator, w_norm, u_norm):
    """numerator / denominator, or 1 where the weight's or the update's norm is 0; nothing divided by 0."""
    defined = tf.logical_and(w_norm > 0, u_norm > 0)
    one = tf.ones_like(numerator)
    return tf.where(defined, numerator / tf.where(defined, denominator, one), one)


def _dense(gradient):
    """The norms need the whole gradient: an IndexedSlices (embedding lookup) becomes a dense tensor."""
    return tf.convert_to_tensor(gradient) if isinstance(gradient, tf.IndexedSlices) else gradient


class _LayerwiseOptimizer(keras.optimizers.Optimizer):
    """What both share: the learning rate, the L2 weight decay kept out of Keras's decoupled decay."""

    def __init__(self, learning_rate, weight_decay: float, name: str, **kwargs):
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        super().__init__(name=name, **kwargs)
        self._learning_rate = self._build_learning_rate(learning_rate)
        self.weight_decay = weight_decay

    def _apply_weight_decay(self, variables):
        """No decoupled decay: `weight_decay` is applied inside `update_step`, by the layer-wise rule."""

    def _slot(self, slots: list, variable):
        return slots[self._index_dict[self._var_key(variable)]]

    def get_config(self):
        config = super().get_config()
        config.update(learning_rate=self._serialize_hyperparameter(self._learning_rate),
                      weight_decay=self.weight_decay)
        return config


@keras.saving.register_keras_serializable(package="hvdtrain")
class Lars(_LayerwiseOptimizer):
    """LARS (arXiv:1708.03888), the rule of hvdtrain.torch.optim.Lars, per variable w with gradient g:

        if rank(w) > 1:  local_lr = eta * ||w|| / (||g|| + wd * ||w||)   (1 if ||w|| = 0 or ||g|| = 0)
                         d = (g + wd * w) * local_lr
        else:            d = g
        v = momentum * v + d;  w = w - lr * v          (eta = trust_coefficient, wd = weight_decay)

    Slot: one momentum buffer per variable ("velocity").
    """

    def __init__(self, learning_rate=1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3, name: str = "Lars", **kwargs):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum {momentum}")
        if trust_coefficient <= 0.0:
            raise ValueError(f"invalid trust_coefficient {trust_coefficient}")
        super().__init__(learning_rate, weight_decay, name, **kwargs)
        self.momentum = momentum
        self.trust_coefficient = trust_coefficient

    def build(self, var_list):
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self._built = True
        self._velocities = [self.add_variable_from_reference(model_variable=var, variable_name="velocity")
                            for var in var_list]

    def update_step(self, gradient, variable):
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        d = _dense(gradient)
        if _adapted(variable):
            wd, eta = tf.cast(self.weight_decay, dtype), tf.cast(self.trust_coefficient, dtype)
            w_norm, g_norm = tf.norm(variable), tf.norm(d)
            local_lr = _trust(eta * w_norm, g_norm + wd * w_norm, w_norm, g_norm)
            d = (d + wd * variable) * local_lr
        v = self._slot(self._velocities, variable)
        v.assign(tf.cast(self.momentum, dtype) * v + d)
        variable.assign_sub(lr * v)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, trust_coefficient=self.trust_coefficient)
        return config


@keras.saving.register_keras_serializable(package="hvdtrain")
class Lamb(_LayerwiseOptimizer):
    """LAMB (arXiv:1904.00962, Algorithm 2), the rule of hvdtrain.torch.optim.Lamb, per variable w, step t:

        m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g * g
        r = (m / (1 - b1 ** t)) / (sqrt(v / (1 - b2 ** t)) + eps)
        if rank(w) > 1:  r = r + wd * w;  trust = ||w|| / ||r||   (1 if ||w|| = 0 or ||r|| = 0)
        else:            trust = 1
        w = w - lr * trust * r                          (b1, b2 = beta_1, beta_2; wd = weight_decay)

    t is the optimizer's `iterations` + 1 (one counter for all variables, as Keras's Adam). Slots: "m"
    for every variable, then "v" for every variable.
    """

    def __init__(self, learning_rate=1e-3, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-6,
                 weight_decay: float = 0.0, name: str = "Lamb", **kwargs):
        if not (0.0 <= beta_1 < 1.0 and 0.0 <= beta_2 < 1.0):
            raise ValueError(f"invalid betas {(beta_1, beta_2)}")
        if epsilon <= 0.0:
            raise ValueError(f"invalid epsilon {epsilon}")
        super().__init__(learning_rate, weight_decay, name, **kwargs)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon

    def build(self, var_list):
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self._built = True
        self._momentums = [self.add_variable_from_reference(model_variable=var, variable_name="m")
                           for var in var_list]
        self._velocities = [self.add_variable_from_reference(model_variable=var, variable_name="v")
                            for var in var_list]

    def update_step(self, gradient, variable):
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        b1, b2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        t = tf.cast(self.iterations + 1, dtype)
        g = _dense(gradient)
        m, v = self._slot(self._momentums, variable), self._slot(self._velocities, variable)
        m.assign(b1 * m + (1 - b1) * g)
        v.assign(b2 * v + (1 - b2) * g * g)
        r = (m / (1 - tf.pow(b1, t))) / (tf.sqrt(v / (1 - tf.pow(b2, t))) + tf.cast(self.epsilon, dtype))
        if _adapted(variable):
            r = r + tf.cast(self.weight_decay, dtype) * variable
            w_norm, r_norm = tf.norm(variable), tf.norm(r)
            r = r * _trust(w_norm, r_norm, w_norm, r_norm)
        variable.assign_sub(lr * r)

    def get_config(self):
        config = super().get_config()
        config.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon)
        return config
