"""Server-side aggregation: tree maps over the leading clients axis.

Inputs are adapter trees (and Fisher trees) whose leaves are stacked [K, ...] and
per-client example counts; nothing else crosses to the server.
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


def fedavg(params, num_examples):
    weights = client_weights(num_examples)
    return jax.tree.map(lambda p: _weighted_sum(weights, p).astype(p.dtype), params)


def fisher_merge(params, fishers, num_examples, fisher_floor: float = 1e-6):
    """Paper Eq. 1: theta_i = sum_k w_k F_ki theta_ki / sum_k w_k F_ki, with F floored.

    The floor keeps a parameter no client's Fisher cares about at the weighted mean,
    and equal Fishers reduce to FedAvg.
    """
    weights = client_weights(num_examples)

    def merge(p, f):
        importance = jnp.maximum(f.astype(jnp.float32), fisher_floor)
        numerator = _weighted_sum(weights, importance * p)
        return (numerator / _weighted_sum(weights, importance)).astype(p.dtype)

    return jax.tree.map(merge, params, fishers)
