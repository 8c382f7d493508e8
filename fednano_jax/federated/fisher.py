"""Diagonal Fisher of the adapters: mean per-example squared gradient of the answer log-likelihood."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fednano_jax.data.batches import gather_batch
from fednano_jax.federated.objective import adapter_value_and_grad
from fednano_jax.models.loss import summed_answer_nll


def add_squared_example_grads(graphdef, adapters, frozen, data, total, rows, valid):
    """`total` plus the squared adapter gradient of each valid example's summed answer NLL. rows, valid: [batch]."""

    def example_grad(example):
        one = jax.tree.map(lambda x: x[None], example)
        return adapter_value_and_grad(graphdef, frozen, adapters, one, summed_answer_nll)[1]

    grads = jax.vmap(example_grad)(gather_batch(data, rows, valid))
    weights = valid.astype(jnp.float32)
    return jax.tree.map(lambda t, g: t + jnp.tensordot(weights, jnp.square(g), axes=1), total, grads)


def diagonal_fisher(graphdef, adapters, frozen, data, rows, valid):
    """FedNano's extra pass over a client's data. rows, valid: [steps, batch]."""

    def step(total, inputs):
        return add_squared_example_grads(graphdef, adapters, frozen, data, total, *inputs), None

    total, _ = jax.lax.scan(step, jax.tree.map(jnp.zeros_like, adapters), (rows, valid))
    count = jnp.maximum(valid.sum(), 1)
    return jax.tree.map(lambda t: t / count, total)
