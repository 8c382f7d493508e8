"""Heterogeneous adapter ranks: client k trains only the first r_k rank components of the rank-R NanoAdapters.

`model.adapter.client_ranks` is a tuple of ranks cycled over the clients (client k has
`client_ranks[k % len]`, each at most R = `model.adapter.rank`). Every client still holds one
rank-R adapter, so all clients run in one vmapped program: a 0/1 mask over the rank axis
(columns of `down` [d, R], rows of `up` [R, d]) zeroes the components beyond r_k in the
adapters it starts from, in every step's direction, and in what it uploads. Its adapter
computes `x + (alpha / R) * x down[:, :r] up[:r]`: an unmasked rank-r adapter with alpha
scaled by r / R (the scale stays the server adapter's, so a client's model is exactly the
global one truncated to its rank).

The server aggregates under the same masks (`aggregation.fedavg` / `fisher_merge` with
`masks`): each rank slice is averaged over the clients that hold it, a slice no usable client
holds keeps its value. `fed.rank_aggregation="zero_pad"` is HetLoRA's alternative: average the
zero-padded uploads as they are (a slice few clients hold shrinks toward zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

RANK_AXIS_FROM_END = {"down": 1, "up": 2}  # down [..., d, R], up [..., R, d]


def client_ranks(adapter_section, num_clients: int) -> np.ndarray | None:
    """[num_clients] each client's rank, model.adapter.client_ranks (settings.Adapter) cycled; None when every
    client has the full rank."""
    ranks = adapter_section.client_ranks
    if not ranks:
        return None
    return np.array([ranks[k % len(ranks)] for k in range(num_clients)], np.int32)


def rank_axis(path, leaf) -> int:
    """The rank axis of an adapter leaf at `path` (a pure dict's, or an nnx.State's ending in `.value`)."""
    names = [getattr(key, "key", None) for key in path]
    name = next((n for n in reversed(names) if n in RANK_AXIS_FROM_END), None)
    if name is None:
        raise ValueError(f"Rank masks apply to NanoAdapter weights ('down', 'up'), not {jax.tree_util.keystr(path)}.")
    return leaf.ndim - RANK_AXIS_FROM_END[name]


def rank_mask(adapters, rank):
    """One client's 0/1 mask tree, shaped like `adapters`: 1 on the first `rank` components (rank: a scalar)."""

    def one(path, leaf):
        axis = rank_axis(path, leaf)
        keep = jnp.arange(leaf.shape[axis]) < rank
        shape = [1] * leaf.ndim
        shape[axis] = leaf.shape[axis]
        return jnp.broadcast_to(keep.reshape(shape), leaf.shape).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, adapters)


def stacked_masks(adapters, ranks: jax.Array):
    """Masks [K, ...] for clients of `ranks` [K], shaped like one client's `adapters` with a leading axis."""
    return jax.vmap(lambda rank: rank_mask(adapters, rank))(ranks)


def apply_mask(tree, mask):
    return jax.tree.map(lambda x, m: x * m.astype(x.dtype), tree, mask)


def truncate(adapters, rank: int):
    """The adapters a client of `rank` uses: the components beyond it zeroed."""
    return apply_mask(adapters, rank_mask(adapters, rank))


def rank_bytes(adapters, rank: int | None) -> int:
    """Bytes of one adapter tree a client of `rank` holds (its nonzero slice); the full tree for None."""
    leaves = jax.tree.leaves(adapters)
    if rank is None:
        return sum(x.size * x.dtype.itemsize for x in leaves)
    mask = rank_mask(adapters, rank)
    return sum(int(np.asarray(m).sum()) * x.dtype.itemsize for x, m in zip(leaves, jax.tree.leaves(mask)))
