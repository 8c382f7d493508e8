"""The server's side of a round, as sums: clients' contributions, an aggregator adds them up, the method
finalizes, the server optimizer steps.

A client uploads the trees its method names (adapters; a Fisher; a control change) and its example count.
`client_contributions` turns each usable client's upload into its weighted contribution (`Method.contribution`,
`aggregation.py`), clipped and, under distributed noise, noised on the client's side (`privacy/dp.py`);
`finalize_round` takes the sums (plain here, or unmasked by secure aggregation, `secure.py`), releases them
under central noise, and calls the method's `finalize` and the server optimizer. A client whose upload holds
NaN or Inf, or that did not report (dropout), contributes nothing; a round in which no client is usable keeps
the previous server state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fednano_jax.federated import server_optimizer
from fednano_jax.federated.aggregation import plain_sums, weighted
from fednano_jax.models import adapter_ranks as ranks
from fednano_jax.privacy import dp as client_dp
from fednano_jax.settings import MASKED
from fednano_jax.streams import Purpose, generator


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ClientUploads:
    trees: dict  # name -> tree, leaves [K, ...]: what the method's clients send
    num_examples: jax.Array  # [K]
    ranks: jax.Array | None = None  # [K] each client's adapter rank (heterogeneous ranks), or None: all full rank


@dataclasses.dataclass(frozen=True)
class Aggregation:
    """How a run adds up its clients' contributions (static under jit): under rank masks or as zero-padded
    uploads (`models/adapter_ranks.py`), and with client-level DP or without."""

    rank_aggregation: str = MASKED
    dp: client_dp.DpSettings | None = None


def finite_clients(uploads: ClientUploads) -> jax.Array:
    """[K] bool: every uploaded value of the client is finite."""
    count = uploads.num_examples.shape[0]
    per_leaf = [jnp.isfinite(x).reshape(count, -1).all(axis=1) for x in jax.tree.leaves(uploads.trees)]
    return jnp.stack(per_leaf).all(axis=0) if per_leaf else jnp.ones(count, bool)


def _rows_where(keep, tree):
    return jax.tree.map(lambda x: jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0), tree)


def client_contributions(method, server_state, uploads: ClientUploads, reporting: jax.Array,
                         aggregation: Aggregation = Aggregation(), client_keys: jax.Array | None = None):
    """-> (weighted contributions, leaves [K, ...], zero for a client not used; used [K]). Each row is what that
    client computes and sends: under DP its contribution clipped, and under distributed noise its noise share
    added (`client_keys` [K])."""
    keep = reporting & finite_clients(uploads)
    weights = jnp.where(keep, method.client_weight(uploads.num_examples), 0).astype(jnp.float32)
    trees = _rows_where(keep, uploads.trees)  # 0 * NaN is NaN: unusable uploads are zeroed first
    broadcast = method.broadcast(server_state)
    masks = None
    if uploads.ranks is not None and aggregation.rank_aggregation == MASKED:
        masks = ranks.stacked_masks(server_state["adapters"], uploads.ranks)
    dp = aggregation.dp

    def one(upload, weight, used, mask, key):
        if dp is None:
            return weighted(method.contribution(upload, broadcast, mask), weight, method.unweighted)
        clip_norm = server_state[client_dp.STATE]["clip_norm"]
        bounds = method.dp_bounds(clip_norm, server_state["adapters"])
        clipped, norm = client_dp.clip_contribution(method.private_contribution(upload, broadcast, mask), bounds)
        terms = weighted(clipped, weight, method.unweighted)
        terms[client_dp.WITHIN] = (norm <= clip_norm).astype(jnp.float32)
        if dp.distributed:
            stds = client_dp.noise_stds(dp, bounds, method.unweighted)
            share = client_dp.client_share_scale(dp)
            terms = client_dp.add_noise(key, terms, stds, share)
            if dp.adaptive:
                terms[client_dp.WITHIN] = terms[client_dp.WITHIN] + client_dp.count_noise(dp, key, share)
        return jax.tree.map(lambda x: jnp.where(used, x, 0.0), terms)  # the unweighted entries of a dropped client

    keys = client_keys if client_keys is not None else jnp.zeros(keep.shape[0], jnp.uint32)
    stacked = jax.vmap(one, in_axes=(0, 0, 0, None if masks is None else 0, 0))(trees, weights, keep, masks, keys)
    return stacked, keep


def finalize_round(method, server_state, sums: dict, used_count: jax.Array, aggregation: Aggregation = Aggregation(),
                   key: jax.Array | None = None, optimizer=None, public_weight=None):
    """The new server state from the sums of `used_count` clients' contributions: released (central noise),
    post-processed and finalized by the method, the server optimizer's step, and, under DP, C adapted.
    `public_weight`: under DP, the expected sum of the public unit weights, q Σ_all w_k (a tree under rank
    masks); None: DP's scalar expectation. No client summed: the state is kept."""
    dp = aggregation.dp
    if dp is not None and sums:
        bounds = method.dp_bounds(server_state[client_dp.STATE]["clip_norm"], server_state["adapters"])
        stds = client_dp.noise_stds(dp, bounds, method.unweighted)
        dp_state = server_state[client_dp.STATE]
        released = client_dp.release(dp, sums, stds, key, dp_state)
        expected = dp.expected_weight if public_weight is None else public_weight
        in_sums = client_dp.noise_in_sums(dp, stds, used_count, dp_state)
        updated = method.finalize(server_state, client_dp.finish(released, in_sums, expected))
        updated[client_dp.STATE] = client_dp.next_state(dp, dp_state, released[client_dp.WITHIN])
    else:
        updated = method.finalize(server_state, sums)
    updated = server_optimizer.step(optimizer, server_state, updated)
    return jax.tree.map(lambda new, old: jnp.where(used_count > 0, new, old), updated, server_state)


def server_round(method, server_state, uploads: ClientUploads, reporting: jax.Array, key: jax.Array | None = None,
                 client_keys: jax.Array | None = None, optimizer=None, aggregation: Aggregation = Aggregation(),
                 public_weight=None):
    """-> (new server state, [K] bool of the clients that were used): contributions, plain sums, finalize.
    `key`: the server's DP noise key; `client_keys` [K]: the clients' keys for distributed noise."""
    stacked, used = client_contributions(method, server_state, uploads, reporting, aggregation, client_keys)
    new = finalize_round(method, server_state, plain_sums(stacked), used.sum(), aggregation, key, optimizer,
                         public_weight)
    return new, used


def reporting_clients(client_ids, dropout: float, seed: int, round_index: int) -> np.ndarray:
    """[K] bool: which of the clients `client_ids` report this round, each failing with probability `dropout`.

    Each client's draw is its own stream (seed, round, client id): whether client 7 reports in
    round 3 does not depend on which other clients were sampled with it.
    """
    return np.array([generator(seed, Purpose.DROPOUT, round_index, int(k)).random() >= dropout
                     for k in client_ids], bool)
