"""Local client updates: `lax.scan` over steps, `vmap` over the leading clients axis.

A client's data arrive as row indices `[steps, batch]` into a dataset shared by
all clients (broadcast, never copied per client) plus a validity mask. Clients
with fewer batches are padded; a step with no valid example leaves adapters and
optimizer state exactly as they were.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from fednano_jax.federated.objective import adapter_value_and_grad


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


def local_update(graphdef, optimizer: optax.GradientTransformation, global_adapters, frozen, data, rows, valid):
    """One client's local training from the global adapters. rows, valid: [steps, batch]."""
    step_active = valid.any(axis=1)

    def step(carry, inputs):
        adapters, opt_state = carry
        step_rows, step_valid, active = inputs
        batch = gather_batch(data, step_rows, step_valid)
        loss, grads = adapter_value_and_grad(graphdef, frozen, adapters, batch)
        updates, new_opt_state = optimizer.update(grads, opt_state, adapters)
        new_carry = (optax.apply_updates(adapters, updates), new_opt_state)
        return tree_select(active, new_carry, carry), loss

    carry = (global_adapters, optimizer.init(global_adapters))
    (adapters, _), losses = jax.lax.scan(step, carry, (rows, valid, step_active))
    mean_loss = jnp.sum(losses * step_active) / jnp.maximum(step_active.sum(), 1)
    return adapters, mean_loss


def make_client_updates(graphdef, optimizer):
    """-> (vmapped, sequential): both map (global, frozen, data, rows[K], valid[K]) to stacked
    client adapters [K, ...] and losses [K]. The sequential one loops clients in Python."""
    single = functools.partial(local_update, graphdef, optimizer)
    vmapped = jax.jit(jax.vmap(single, in_axes=(None, None, None, 0, 0)))
    single_jit = jax.jit(single)

    def sequential(global_adapters, frozen, data, rows, valid):
        results = [single_jit(global_adapters, frozen, data, rows[k], valid[k]) for k in range(rows.shape[0])]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *results)

    return vmapped, sequential
