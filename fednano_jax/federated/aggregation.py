"""Aggregation as sums: every aggregate the paper and its baselines use is a ratio of sums over clients.

A client's contribution is a dict of trees, per unit of its weight w_k (its example count), computed from
its update Δ_k = θ_k − θ (its uploaded adapters minus the round's global ones):

    FedAvg:            {"delta": Δ_k,            "weight": 1}
    FedNano (Eq. 1):   {"delta": F̃_k ⊙ Δ_k,     "weight": F̃_k}     F̃_k = max(F_k, floor)

Under heterogeneous ranks both are multiplied by the client's rank mask m_k (an entry a client does not
hold has zero weight). An aggregator adds up w_k times each contribution (plain sums here; rank-masked
ones are these with masks; secure aggregation and DP are in `federated/secure.py` and `privacy/dp.py`),
and `apply_sums` finishes the ratio:

    θ_new = θ + Σ_k w_k c_k["delta"] / Σ_k w_k c_k["weight"]      (θ where no client holds an entry)

which is FedAvg's example-weighted mean, and the paper's Eq. 1, θ_i = Σ w F θ_k / Σ w F, per parameter.
Equal Fishers reduce it exactly to FedAvg. This module is the one place Eq. 1 is written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FISHER_FLOOR = 1e-6  # Matena & Raffel's floor: a parameter no client's Fisher cares about gets the weighted mean
DELTA, WEIGHT = "delta", "weight"
# Optional terms added to the two sums before the ratio: FedNano's Fisher under DP, split as F̂ = 1 + G so that
# its sums are FedAvg's plus corrections the DP server can shrink toward zero (`privacy/dp.py`).
CORRECTIONS = {DELTA: "delta_correction", WEIGHT: "weight_correction"}


def update_of(uploaded, global_adapters):
    """Δ_k = θ_k − θ, in float32."""
    return jax.tree.map(lambda up, g: up.astype(jnp.float32) - g.astype(jnp.float32), uploaded, global_adapters)


def _masked(tree, mask):
    return tree if mask is None else jax.tree.map(lambda x, m: x * m.astype(jnp.float32), tree, mask)


def mean_contribution(delta, mask=None) -> dict:
    """FedAvg's terms: the update and a unit weight (per entry under a rank mask)."""
    weight = jnp.ones((), jnp.float32) if mask is None else jax.tree.map(lambda m: m.astype(jnp.float32), mask)
    return {DELTA: _masked(delta, mask), WEIGHT: weight}


def fisher_contribution(delta, fisher, floor: float = FISHER_FLOOR, mask=None) -> dict:
    """Eq. 1's terms: the floored Fisher times the update, and the floored Fisher (zero where not held)."""
    importance = _masked(jax.tree.map(lambda f: jnp.maximum(f.astype(jnp.float32), floor), fisher), mask)
    return {DELTA: jax.tree.map(jnp.multiply, importance, delta), WEIGHT: importance}


def weighted(contribution: dict, weight, unweighted: tuple[str, ...] = ()) -> dict:
    """One client's contribution times its weight w_k (the names in `unweighted` are summed as they are)."""
    return {name: tree if name in unweighted else jax.tree.map(lambda x: weight * x, tree)
            for name, tree in contribution.items()}


def plain_sums(stacked: dict) -> dict:
    """Σ over the leading clients axis of weighted contributions [K, ...]."""
    return jax.tree.map(lambda x: x.sum(axis=0), stacked)


def _ratio(numerator, denominator):
    """numerator / denominator, 0 where the denominator is not positive (an entry no client holds)."""
    held = denominator > 0
    return jnp.where(held, numerator / jnp.where(held, denominator, 1.0), 0.0)


def _term(sums: dict, name: str, like):
    """A sum, with its correction added when there is one; a scalar weight broadcast to every entry."""
    value = sums[name]
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(value)):  # one weight for every entry (FedAvg, no masks)
        value = jax.tree.map(lambda _: value, like)
    if CORRECTIONS[name] in sums:
        value = jax.tree.map(jnp.add, value, sums[CORRECTIONS[name]])
    return value


def apply_sums(global_adapters, sums: dict):
    """θ + Σ w c["delta"] / Σ w c["weight"]: the weighted mean, or Eq. 1, of the clients' adapters."""
    return jax.tree.map(lambda g, d, w: (g.astype(jnp.float32) + _ratio(d, w)).astype(g.dtype), global_adapters,
                        _term(sums, DELTA, global_adapters), _term(sums, WEIGHT, global_adapters))


# ------------------------------------------------- the two aggregates as functions of stacked uploads
def fedavg(params, num_examples, masks=None, previous=None):
    """The example-weighted mean of params [K, ...]; under `masks`, of each entry over the clients that hold it
    (an entry nobody holds keeps `previous`)."""
    return _aggregate(params, num_examples, previous, lambda delta, mask: mean_contribution(delta, mask), masks)


def fisher_merge(params, fishers, num_examples, fisher_floor: float = FISHER_FLOOR, masks=None, previous=None):
    """Paper Eq. 1 over stacked uploads: θ_i = Σ_k w_k F_ki θ_ki / Σ_k w_k F_ki, F floored."""
    return _aggregate(params, num_examples, previous,
                      lambda delta, mask, fisher: fisher_contribution(delta, fisher, fisher_floor, mask),
                      masks, fishers)


def _aggregate(params, num_examples, previous, contribution, masks, *extra):
    previous = jax.tree.map(lambda p: jnp.zeros(p.shape[1:], p.dtype), params) if previous is None else previous
    weights = jnp.asarray(num_examples, jnp.float32)
    stacked = jax.vmap(lambda w, p, m, *more: weighted(contribution(update_of(p, previous), m, *more), w),
                       in_axes=(0, 0, None if masks is None else 0) + (0,) * len(extra))(weights, params, masks, *extra)
    return apply_sums(previous, plain_sums(stacked))
