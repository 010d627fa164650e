"""hvdtrain: data-parallel training with Horovod, and int8 export for edge devices."""
import os

# Horovod 0.28.1's TensorFlow ops need Keras 2 (tf-keras); TensorFlow reads this once, at its import.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
