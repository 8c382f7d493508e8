"""NanoAdapter: `x + (alpha / r) * up(down(x))`, with `up` zero so it starts as the identity.

Its weights are `AdapterParam`s, a Variable type of their own, so
`nnx.split(model, AdapterParam, ...)` separates exactly what clients train and upload.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class AdapterParam(nnx.Param):
    """A trainable, uploadable NanoAdapter weight."""


class NanoAdapter(nnx.Module):
    def __init__(self, dim: int, rank: int, alpha: float, rngs: nnx.Rngs):
        if rank <= 0:
            raise ValueError(f"NanoAdapter rank must be a positive integer, got {rank}.")
        # Kaiming-uniform down projection as in LoRA; zero up projection -> identity at start.
        bound = 1.0 / jnp.sqrt(dim)
        self.down = AdapterParam(jax.random.uniform(rngs.params(), (dim, rank), minval=-bound, maxval=bound))
        self.up = AdapterParam(jnp.zeros((rank, dim)))
        self.scale = alpha / rank

    def __call__(self, x):
        delta = (x @ self.down[...].astype(x.dtype)) @ self.up[...].astype(x.dtype)
        return x + self.scale * delta
