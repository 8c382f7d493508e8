"""Diagonal Fisher of the adapters: mean per-example squared gradient of the answer log-likelihood."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fednano_jax.data.batches import gather_batch
from fednano_jax.federated.objective import Wire, per_example_adapter_grads
from fednano_jax.models.loss import summed_answer_nll


def add_squared_example_grads(graphdef, adapters, frozen, data, total, rows, valid, wire: Wire = Wire()):
    """`total` plus the squared adapter gradient of each valid example's summed answer NLL. rows, valid: [batch]."""
    grads = per_example_adapter_grads(graphdef, frozen, adapters, gather_batch(data, rows, valid), summed_answer_nll,
                                      wire)
    weights = valid.astype(jnp.float32)
    return jax.tree.map(lambda t, g: t + jnp.tensordot(weights, jnp.square(g), axes=1), total, grads)


def diagonal_fisher(graphdef, adapters, frozen, data, rows, valid):
    """FedNano's extra pass over a client's data. rows, valid: [steps, batch]."""

    def step(total, inputs):
        return add_squared_example_grads(graphdef, adapters, frozen, data, total, *inputs), None

    total, _ = jax.lax.scan(step, jax.tree.map(jnp.zeros_like, adapters), (rows, valid))
    count = jnp.maximum(valid.sum(), 1)
    return jax.tree.map(lambda t: t / count, total)
