"""Server-side aggregation: tree maps over the leading clients axis.

Inputs are adapter trees (and Fisher trees) whose leaves are stacked [K, ...] and
per-client example counts; nothing else crosses to the server. With heterogeneous ranks
(`models/adapter_ranks.py`) `masks` [K, ...] say which entries each client holds: an entry is averaged
over its holders only, and one no usable client holds keeps its `previous` value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def client_weights(num_examples) -> jax.Array:
    """w_k = |D_k| / sum |D|."""
    counts = jnp.asarray(num_examples, jnp.float32)
    return counts / counts.sum()


def _weighted_sum(weights, stacked):
    return jnp.tensordot(weights, stacked, axes=1)


def _ratio(numerator, denominator, previous):
    """numerator / denominator, or `previous` where the denominator is zero (an entry no client holds)."""
    if previous is None:
        return numerator / denominator
    held = denominator > 0
    return jnp.where(held, numerator / jnp.where(held, denominator, 1.0), previous.astype(jnp.float32))


def fedavg(params, num_examples, masks=None, previous=None):
    """The example-weighted mean; under `masks`, of each entry over the clients that hold it."""
    weights = client_weights(num_examples)
    if masks is None:
        return jax.tree.map(lambda p: _weighted_sum(weights, p).astype(p.dtype), params)

    def masked_mean(p, m, old):
        m = m.astype(jnp.float32)
        return _ratio(_weighted_sum(weights, m * p), _weighted_sum(weights, m), old).astype(p.dtype)

    return jax.tree.map(masked_mean, params, masks, previous)


def fisher_merge(params, fishers, num_examples, fisher_floor: float = 1e-6, masks=None, previous=None):
    """Paper Eq. 1: theta_i = sum_k w_k F_ki theta_ki / sum_k w_k F_ki, with F floored.

    The floor keeps a parameter no client's Fisher cares about at the weighted mean,
    and equal Fishers reduce to FedAvg. Under `masks` an entry a client does not hold has
    zero Fisher (the floor applies only where it is held).
    """
    weights = client_weights(num_examples)

    def merge(p, f, m=None, old=None):
        importance = jnp.maximum(f.astype(jnp.float32), fisher_floor)
        if m is not None:
            importance = importance * m.astype(jnp.float32)
        numerator = _weighted_sum(weights, importance * p)
        return _ratio(numerator, _weighted_sum(weights, importance), old).astype(p.dtype)

    if masks is None:
        return jax.tree.map(merge, params, fishers)
    return jax.tree.map(merge, params, fishers, masks, previous)
