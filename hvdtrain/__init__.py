"""hvdtrain: data-parallel training with Horovod, and int8 export for edge devices."""
import os

# Horovod 0.28.1's TensorFlow ops need Keras 2 (tf-keras); TensorFlow reads this once, at its import.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def __getattr__(name: str):
    """hvdtrain.fit, imported on first use (the frameworks load only when a job needs them)."""
    if name == "fit":
        from hvdtrain.api import fit

        return fit
    raise AttributeError(f"module 'hvdtrain' has no attribute {name!r}")
