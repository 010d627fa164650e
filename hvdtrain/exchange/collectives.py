"""The collective operations the exchange runs, which each framework supplies with Horovod's ops."""
from __future__ import annotations

from typing import Any, Optional, Protocol

import numpy as np

from hvdtrain.world import world


class Collectives(Protocol):
    """Horovod's operations on NumPy arrays (hvdtrain.torch.exchange, hvdtrain.tf.exchange).

    `rank` and `size` are properties that read the world (hvdtrain.world) on every access and are never
    stored: an elastic job changes size while it runs, and a copied size of 1 once made the old rank skip
    the allreduce a newly joined rank had entered, which hung the job."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def allreduce_async(self, array: np.ndarray, name: str) -> Any:
        """Start averaging `array` in place."""

    def allgather_async(self, array: np.ndarray, name: str) -> Any:
        """Start concatenating every rank's `array`."""

    def wait(self, handle: Any) -> Optional[np.ndarray]:
        """Finish an operation; an allgather's result."""

    def broadcast(self, array: np.ndarray, root: int, name: str) -> np.ndarray: ...

    def maximum(self, array: np.ndarray, name: str) -> np.ndarray: ...


class WorldCollectives:
    """Base of both frameworks' Horovod collectives: rank and size read live from `world`."""

    @property
    def rank(self) -> int:
        return world.rank

    @property
    def size(self) -> int:
        return world.size
