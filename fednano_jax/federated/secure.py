"""The sums of a round under secure aggregation (`fed.secure_aggregation`, `privacy/secagg.py`).

Each client computes its weighted contribution (`server.client_contributions`: FedAvg's w_k Δ_k and w_k, Eq. 1's
w_k F̃_k ⊙ Δ_k and w_k F̃_k, a DP-clipped one with its noise share, ...), flattens it into one vector, and sends
only that vector masked; the server unmasks the survivors' sum, and its program (`server.finalize_round`) sees
only that sum. Any method's contributions, any aggregator's: the protocol adds vectors.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from fednano_jax.privacy.secagg import SecureRound


def flat(tree) -> np.ndarray:
    """One client's contribution as the vector it masks (float64 on the host, as a client would)."""
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def unflat(vector: np.ndarray, template):
    """The unmasked sum, shaped like one client's contribution."""
    leaves, treedef = jax.tree.flatten(template)
    out, start = [], 0
    for leaf in leaves:
        size = int(np.prod(leaf.shape))
        out.append(jnp.asarray(vector[start: start + size].reshape(leaf.shape), jnp.float32))
        start += size
    return jax.tree.unflatten(treedef, out)


def secure_sums(stacked: dict, used: np.ndarray, client_ids, threshold: int, seed: int, round_index: int):
    """-> (the used clients' summed contributions, or None when fewer than `threshold` survive; used [K];
    {extra bytes per client, protocol seconds}). `stacked`: the cohort's contributions [K, ...] on the host;
    each client masks its own row; only masked vectors reach the server's unmasking."""
    started = time.perf_counter()
    count = len(client_ids)
    protocol = SecureRound(count, threshold, seed, round_index, client_ids)
    masked = {k: protocol.mask(k, flat(jax.tree.map(lambda x: x[k], stacked))) for k in range(count) if used[k]}
    length = next(iter(masked.values())).size if masked else 0
    total = protocol.unmask(masked, length) if masked else None
    cost = {"secagg_extra_bytes_per_client": protocol.extra_bytes_per_client(length),
            "secagg_seconds": time.perf_counter() - started}  # keys, shares, masking and unmasking, on the host
    if total is None:  # too few survivors (or none): the round is void
        return None, np.zeros(count, bool), cost
    return unflat(total, jax.tree.map(lambda x: x[0], stacked)), used, cost
