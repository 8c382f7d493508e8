"""FedDPA-F (Yang et al., 2024): a global adapter (FedAvg) plus a local one, mixed per test instance.

After federated training each client fine-tunes a local adapter starting from the
global one. At inference the test input and N of the client's training inputs are
embedded (final hidden state of the last prompt token, local adapter active, as the
authors' code does) and the mean cosine similarity, clipped to [0, 1] and scaled by
`max_weight` (0.5 by default), is the weight w of the *local* adapter; the global
adapter gets 1 - w. The local adapter receives w because w measures how much the
input resembles the client's own data: the more it does, the more the personalised
adapter is trusted, while the global one keeps at least half the say (w <= 0.5),
which is what protects FedDPA under test-time distribution shift.

Both adapters are NanoAdapters, so the mixture `(1 - w) up_g(down_g x) + w up_l(down_l x)`
is itself one adapter of twice the rank: down = [down_g, down_l], up = [(1 - w) up_g; w up_l].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mix_adapters(global_adapters, local_adapters, local_weight):
    """The rank-2r adapter state equal to (1 - w) * global + w * local on every input."""

    def mix(path, g, l):
        name = [entry.key for entry in path if hasattr(entry, "key")][-1]
        if name == "down":
            return jnp.concatenate([g, l], axis=-1)
        return jnp.concatenate([(1.0 - local_weight) * g, local_weight * l], axis=-2)

    return jax.tree_util.tree_map_with_path(mix, global_adapters, local_adapters)


def instance_weights(test_features: jax.Array, reference_features: jax.Array, max_weight: float) -> jax.Array:
    """[num_test] local-adapter weights in [0, max_weight] from mean cosine similarity to the references."""
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    similarity = (unit(test_features) @ unit(reference_features).T).mean(axis=-1)
    return max_weight * jnp.clip(similarity, 0.0, 1.0)
