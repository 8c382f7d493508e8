"""A round's server update under secure aggregation (`fed.secure_aggregation`, `privacy/secagg.py`).

Clients turn their uploads into the contributions the aggregate sums (FedAvg: w_k θ_k; FedNano's Fisher
merge: w_k F_k θ_k and w_k F_k, F floored), mask them, and send only masked vectors; the server unmasks
their sum and its program (`server_from_sums`) sees only that sum and the public weights' sum.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from fednano_jax.federated import server_optimizer
from fednano_jax.privacy.secagg import SecureRound


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _unflat(vector: np.ndarray, template):
    leaves, treedef = jax.tree.flatten(template)
    out, start = [], 0
    for leaf in leaves:
        out.append(jnp.asarray(vector[start: start + leaf.size].reshape(leaf.shape), jnp.float32))
        start += leaf.size
    return jax.tree.unflatten(treedef, out)


def contribution(kind: str, upload: dict, weight: float, fisher_floor: float) -> np.ndarray:
    """One client's vector to be summed, computed on the client from its own upload."""
    if kind == "mean":
        return weight * _flat(upload["adapters"])
    fisher = np.maximum(_flat(upload["fisher"]), fisher_floor)
    return np.concatenate([weight * fisher * _flat(upload["adapters"]), weight * fisher])


def sums_of(kind: str, vector: np.ndarray, adapters_template) -> dict:
    """The unmasked sum as the server program takes it."""
    if kind == "mean":
        return {"weighted": _unflat(vector, adapters_template)}
    half = vector.size // 2
    return {"numerator": _unflat(vector[:half], adapters_template),
            "denominator": _unflat(vector[half:], adapters_template)}


def server_from_sums(method, server_state, sums: dict, weight_total, any_used, optimizer=None):
    """The server program under secure aggregation: the aggregate from the sums alone."""
    if "weighted" in sums:
        merged = jax.tree.map(lambda s: s / jnp.maximum(weight_total, 1e-12), sums["weighted"])
    else:
        merged = jax.tree.map(lambda a, b: a / b, sums["numerator"], sums["denominator"])
    old = server_state["adapters"]
    updated = {**server_state, "adapters": jax.tree.map(lambda m, o: m.astype(o.dtype), merged, old)}
    updated = server_optimizer.step(optimizer, server_state, updated)
    return jax.tree.map(lambda new, prev: jnp.where(any_used, new, prev), updated, server_state)


def _finite(upload: dict) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(upload))


def secure_round(method, program, server_state, uploads: dict, num_examples: np.ndarray, reporting: np.ndarray,
                 client_ids, fed, seed: int, round_index: int):
    """-> (server state, used [K], {extra bytes per client, protocol seconds}). `uploads`: the cohort's host trees
    [K, ...]; each client masks its own row; only masked vectors reach the server's unmasking."""
    started = time.perf_counter()
    kind = method.dp_aggregate
    count = len(client_ids)
    threshold = fed.get("secagg_threshold", 0) or (count // 2 + 1)
    protocol = SecureRound(count, threshold, seed, round_index, client_ids)
    used = np.array([reporting[k] and _finite(jax.tree.map(lambda x: x[k], uploads)) for k in range(count)])
    floor = fed.get("fisher_floor", 1e-6)
    masked = {k: protocol.mask(k, contribution(kind, jax.tree.map(lambda x: np.asarray(x[k]), uploads),
                                               float(num_examples[k]), floor))
              for k in range(count) if used[k]}
    length = next(iter(masked.values())).size if masked else 0
    total = protocol.unmask(masked, length) if masked else None
    cost = {"secagg_extra_bytes_per_client": protocol.extra_bytes_per_client(length),
            "secagg_seconds": time.perf_counter() - started}  # keys, shares, masking and unmasking, on the host
    if total is None:  # too few survivors (or none): the round is void
        return server_state, np.zeros(count, bool), cost
    sums = sums_of(kind, total, jax.tree.map(np.asarray, server_state["adapters"]))
    new = program(server_state, sums, jnp.asarray(float(num_examples[used].sum())), jnp.asarray(True))
    return new, used, cost
