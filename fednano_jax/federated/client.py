"""Local client updates: `lax.scan` over steps, `vmap` over the leading clients axis.

A client's data arrive as row indices `[steps, batch]` into a dataset shared by
all clients (broadcast, never copied per client) plus a validity mask. Clients
with fewer batches are padded; a step with no valid example leaves adapters and
optimizer state exactly as they were.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fednano_jax.data.prompts import TokenizedSet
from fednano_jax.federated.objective import adapter_value_and_grad


def device_dataset(tokens: TokenizedSet, images: np.ndarray) -> dict:
    """A tokenized set and its image table on the device, shared by all clients; rows index into it."""
    return {
        "input_ids": jnp.asarray(tokens.input_ids),
        "attention_mask": jnp.asarray(tokens.attention_mask),
        "loss_mask": jnp.asarray(tokens.loss_mask),
        "image_index": jnp.asarray(tokens.image_index),
        "images": jnp.asarray(images),
    }


def gather_batch(data: dict, rows: jax.Array, valid: jax.Array) -> dict:
    """Rows [B] of the shared dataset; invalid (padding) rows are masked out of attention and loss."""
    valid = valid[:, None]
    return {
        "input_ids": data["input_ids"][rows],
        "attention_mask": data["attention_mask"][rows] & valid,
        "loss_mask": data["loss_mask"][rows] & valid,
        "images": data["images"][data["image_index"][rows]],
    }


def tree_select(predicate, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(predicate, a, b), on_true, on_false)


@dataclasses.dataclass(frozen=True)
class LocalOptions:
    """How a method's clients train locally (static: part of the compiled program)."""

    prox_mu: float = 0.0  # FedProx: adds mu/2 * ||adapters - start||^2 to the loss
    accumulate_fisher: bool = False  # FedNano-EF: sum of squared mini-batch gradients


def train_step(graphdef, optimizer: optax.GradientTransformation, options: LocalOptions, start_adapters, frozen,
               data, carry, step_rows, step_valid):
    """One optimizer step on one batch: carry (adapters, optimizer state, squared-gradient sums | None)
    -> (new carry, loss)."""
    adapters, opt_state, squares = carry
    batch = gather_batch(data, step_rows, step_valid)
    loss, grads = adapter_value_and_grad(graphdef, frozen, adapters, batch)
    if options.prox_mu:
        grads = jax.tree.map(lambda g, a, s: g + options.prox_mu * (a - s), grads, adapters, start_adapters)
    if options.accumulate_fisher:
        squares = jax.tree.map(lambda total, g: total + jnp.square(g), squares, grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, adapters)
    return (optax.apply_updates(adapters, updates), new_opt_state, squares), loss


def initial_carry(optimizer: optax.GradientTransformation, options: LocalOptions, start_adapters):
    squares = jax.tree.map(jnp.zeros_like, start_adapters) if options.accumulate_fisher else None
    return start_adapters, optimizer.init(start_adapters), squares


def local_update(graphdef, optimizer: optax.GradientTransformation, options: LocalOptions, start_adapters, frozen,
                 data, rows, valid):
    """One client's local training from `start_adapters`. rows, valid: [steps, batch].

    -> (adapters, mean loss over real steps, summed squared gradients or None).
    """
    step_active = valid.any(axis=1)

    def step(carry, inputs):
        step_rows, step_valid, active = inputs
        new_carry, loss = train_step(graphdef, optimizer, options, start_adapters, frozen, data, carry, step_rows,
                                     step_valid)
        return tree_select(active, new_carry, carry), loss

    carry = initial_carry(optimizer, options, start_adapters)
    (adapters, _, squares), losses = jax.lax.scan(step, carry, (rows, valid, step_active))
    mean_loss = jnp.sum(losses * step_active) / jnp.maximum(step_active.sum(), 1)
    return adapters, mean_loss, squares


def make_client_updates(graphdef, optimizer, options: LocalOptions = LocalOptions(), personal: bool = False):
    """-> (vmapped, sequential): both map (start, frozen, data, rows[K], valid[K]) to stacked
    (client adapters [K, ...], losses [K], squared-gradient sums [K, ...] or None).

    `start` is the global adapters, broadcast, or with `personal` each client's own [K, ...].
    The sequential one loops clients in Python through the same jitted single-client update.
    """
    single = functools.partial(local_update, graphdef, optimizer, options)
    start_axis = 0 if personal else None
    vmapped = jax.jit(jax.vmap(single, in_axes=(start_axis, None, None, 0, 0)))
    single_jit = jax.jit(single)

    def sequential(start, frozen, data, rows, valid):
        pick = (lambda k: jax.tree.map(lambda x: x[k], start)) if personal else (lambda k: start)
        results = [single_jit(pick(k), frozen, data, rows[k], valid[k]) for k in range(rows.shape[0])]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *results)

    return vmapped, sequential
