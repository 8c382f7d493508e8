"""Vision-to-language connectors: LLaVA's mlp2x_gelu projector and a linear one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _linear(rngs, d_in, d_out, dtype):
    return nnx.Linear(d_in, d_out, dtype=dtype, rngs=rngs, kernel_init=nnx.initializers.normal(0.02))


class MlpConnector(nnx.Module):
    """Linear, GELU, Linear (HF `multi_modal_projector.linear_1` / `linear_2`)."""

    def __init__(self, vision_dim: int, text_dim: int, rngs: nnx.Rngs, dtype=jnp.float32):
        self.linear_1 = _linear(rngs, vision_dim, text_dim, dtype)
        self.linear_2 = _linear(rngs, text_dim, text_dim, dtype)

    def __call__(self, x):
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


class LinearConnector(nnx.Module):
    def __init__(self, vision_dim: int, text_dim: int, rngs: nnx.Rngs, dtype=jnp.float32):
        self.linear = _linear(rngs, vision_dim, text_dim, dtype)

    def __call__(self, x):
        return self.linear(x)


CONNECTORS = {"mlp2x_gelu": MlpConnector, "linear": LinearConnector}


def make_connector(kind: str, vision_dim: int, text_dim: int, rngs: nnx.Rngs, dtype=jnp.float32):
    if kind not in CONNECTORS:
        raise ValueError(f"Unknown connector {kind!r}; expected one of {sorted(CONNECTORS)}.")
    return CONNECTORS[kind](vision_dim, text_dim, rngs, dtype)
