"""The server's side of a round: what crosses from clients, and how faulty clients are left out.

A client uploads its adapters, (for FedNano) its diagonal Fisher, and its example
count; nothing else reaches `aggregate_uploads`. A client whose upload holds NaN or
Inf, or that did not report (dropout), gets weight zero; a round in which no client
reports keeps the previous global adapters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ClientUploads:
    adapters: object  # tree, leaves [K, ...]
    fishers: object | None  # tree like adapters, or None
    num_examples: jax.Array  # [K]


def finite_clients(uploads: ClientUploads) -> jax.Array:
    """[K] bool: the client's adapters (and Fisher) are all finite."""
    trees = [uploads.adapters] + ([uploads.fishers] if uploads.fishers is not None else [])
    per_leaf = [jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1) for t in trees for x in jax.tree.leaves(t)]
    return jnp.stack(per_leaf).all(axis=0)


def _zero_out(tree, keep):
    return jax.tree.map(lambda x: jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0), tree)


def aggregate_uploads(aggregate, uploads: ClientUploads, reporting: jax.Array, previous):
    """-> (new global adapters, [K] bool of the clients that were used).

    `aggregate(adapters, fishers, counts)` sees only reporting clients with finite
    uploads: the others get zero weight, and their values are zeroed first because
    0 * NaN is NaN. With no usable client the previous global adapters are kept.
    """
    keep = reporting & finite_clients(uploads)
    adapters = _zero_out(uploads.adapters, keep)
    fishers = None if uploads.fishers is None else _zero_out(uploads.fishers, keep)
    merged = aggregate(adapters, fishers, jnp.where(keep, uploads.num_examples, 0))
    return jax.tree.map(lambda new, old: jnp.where(keep.any(), new, old), merged, previous), keep


def reporting_clients(num_clients: int, dropout: float, seed: int, round_index: int) -> np.ndarray:
    """[K] bool: which clients report this round when each drops out with probability `dropout`."""
    rng = np.random.default_rng([seed, round_index, 0xD20])
    return rng.random(num_clients) >= dropout
