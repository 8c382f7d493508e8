"""Diagonal Fisher of the adapters: mean per-example squared gradient of the answer log-likelihood."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fednano_jax.data.batches import gather_batch
from fednano_jax.federated.objective import adapter_value_and_grad
from fednano_jax.models.loss import summed_answer_nll


def diagonal_fisher(graphdef, adapters, frozen, data, rows, valid):
    """FedNano's extra pass over a client's data. rows, valid: [steps, batch]."""

    def example_grad(example):
        one = jax.tree.map(lambda x: x[None], example)
        return adapter_value_and_grad(graphdef, frozen, adapters, one, summed_answer_nll)[1]

    def step(total, inputs):
        step_rows, step_valid = inputs
        grads = jax.vmap(example_grad)(gather_batch(data, step_rows, step_valid))
        weights = step_valid.astype(jnp.float32)
        squared = jax.tree.map(lambda g: jnp.tensordot(weights, jnp.square(g), axes=1), grads)
        return jax.tree.map(jnp.add, total, squared), None

    zeros = jax.tree.map(jnp.zeros_like, adapters)
    total, _ = jax.lax.scan(step, zeros, (rows, valid))
    count = jnp.maximum(valid.sum(), 1)
    return jax.tree.map(lambda t: t / count, total)

