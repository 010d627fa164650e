"""PyTorch adapter: models and the Horovod training loop. Imports torch lazily via its modules."""
