"""TensorFlow adapter. Horovod 0.28.1 needs Keras 2 (tf-keras): select it before TensorFlow is imported."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def require_tf_keras() -> None:
    """Fail in one line when tf-keras is missing: Horovod's TensorFlow ops break on Keras 3."""
    import importlib.util

    from hvdtrain.errors import ConfigError

    if importlib.util.find_spec("tf_keras") is None:
        raise ConfigError("framework: tensorflow needs tf-keras (pip install tf-keras==2.21.0): "
                          "Horovod 0.28.1 does not work with Keras 3")


# Library mode (stable names): DistributedGradientTape (hvdtrain.tf.exchange), a drop-in for Horovod's with
# hvdtrain's compression; shard_dataset (hvdtrain.tf.data), the shard reader as a tf.data.Dataset.
_LIBRARY = {"DistributedGradientTape": "hvdtrain.tf.exchange", "shard_dataset": "hvdtrain.tf.data"}


def __getattr__(name: str):
    if name in _LIBRARY:
        import importlib

        return getattr(importlib.import_module(_LIBRARY[name]), name)
    raise AttributeError(f"module 'hvdtrain.tf' has no attribute {name!r}")
