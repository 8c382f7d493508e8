"""The server's side of a round: what crosses from clients, and how faulty clients are left out.

A client uploads the trees its method names (adapters; a Fisher; a control change)
and its example count; nothing else reaches `server_round`, the one program the
server runs. A client whose upload holds NaN or Inf, or that did not report (dropout),
gets weight zero and its upload is zeroed (0 * NaN is NaN); a round in which no client
is usable keeps the previous server state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fednano_jax.federated import server_optimizer
from fednano_jax.models import adapter_ranks as ranks
from fednano_jax.privacy import dp as privacy
from fednano_jax.streams import Purpose, generator


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ClientUploads:
    trees: dict  # name -> tree, leaves [K, ...]: what the method's clients send
    num_examples: jax.Array  # [K]
    ranks: jax.Array | None = None  # [K] each client's adapter rank (heterogeneous ranks), or None: all full rank


def finite_clients(uploads: ClientUploads) -> jax.Array:
    """[K] bool: every uploaded value of the client is finite."""
    count = uploads.num_examples.shape[0]
    per_leaf = [jnp.isfinite(x).reshape(count, -1).all(axis=1) for x in jax.tree.leaves(uploads.trees)]
    return jnp.stack(per_leaf).all(axis=0) if per_leaf else jnp.ones(count, bool)


def _zero_out(tree, keep):
    return jax.tree.map(lambda x: jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0), tree)


def server_round(method, server_state, uploads: ClientUploads, reporting: jax.Array, key: jax.Array | None = None,
                 optimizer=None, rank_aggregation: str = ranks.MASKED, dp: privacy.DpSettings | None = None):
    """-> (new server state, [K] bool of the clients that were used). `optimizer`: the server optimizer
    that steps the global adapters along the round's pseudo-gradient (`server_optimizer.py`), or None.
    Clients of heterogeneous ranks are aggregated under their rank masks, or as zero-padded uploads
    (`rank_aggregation`, `models/adapter_ranks.py`). With `dp`, the adapters' update is DP-FedAvg's clipped
    and noised mean (`privacy/dp.py`, noise from `key`) instead of the method's aggregate."""
    keep = reporting & finite_clients(uploads)
    weights = jnp.where(keep, uploads.num_examples, 0).astype(jnp.float32)
    masks = None
    if uploads.ranks is not None and rank_aggregation == ranks.MASKED:
        masks = ranks.stacked_masks(server_state["adapters"], uploads.ranks)
    trees = _zero_out(uploads.trees, keep)
    if dp is not None:
        fishers = trees["fisher"] if method.dp_aggregate == "fisher" else None
        updated = privacy.private_update(dp, server_state, trees["adapters"], weights, key, fishers,
                                         method.fed.get("fisher_floor", 1e-6))
    else:
        updated = method.server_update(server_state, trees, weights, masks)
    updated = server_optimizer.step(optimizer, server_state, updated)
    return jax.tree.map(lambda new, old: jnp.where(keep.any(), new, old), updated, server_state), keep


def reporting_clients(client_ids, dropout: float, seed: int, round_index: int) -> np.ndarray:
    """[K] bool: which of the clients `client_ids` report this round, each failing with probability `dropout`.

    Each client's draw is its own stream (seed, round, client id): whether client 7 reports in
    round 3 does not depend on which other clients were sampled with it.
    """
    return np.array([generator(seed, Purpose.DROPOUT, round_index, int(k)).random() >= dropout
                     for k in client_ids], bool)
