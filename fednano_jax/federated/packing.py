"""Packed clients: several clients run one after another in one vmap lane, so uneven clients waste few steps.

Unpacked, every client's schedule is padded to the largest client of the population, and a
round of unequal clients spends many of its vmapped steps on padding. Packed, the cohort's
clients are laid end to end into lanes (largest first onto the shortest lane), as many
lanes as keep the padding within `fed.pack_padding` of the real steps, each lane as long as
its longest (rounded up by `step_bucket`, so a run compiles a bounded number of times).

In the program a lane's carry (adapters, optimizer state, the method's sums) restarts from
the client's own starting adapters at each client's first step, and each client's slot of a
result buffer holds its carry after its last step. The method's extra pass (FedNano's Fisher
over the client's first epoch) is packed the same way, at each client's trained adapters,
and `client_final` then runs per client. Each client gets the adapters, sums and upload it
gets unpacked: its steps are the same, in the same order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fednano_jax.federated.client import (ClientOutputs, LocalResult, Model, client_mask, extra_pass_rows,
                                          initial_carry, masked_upload, train_step, tree_select)
from fednano_jax.models.adapter_ranks import apply_mask
from fednano_jax.federated.schedule import client_schedule
from fednano_jax.streams import Purpose


def step_bucket(steps: int) -> int:
    """`steps` rounded up to m * 2^e with 16 <= m < 32 (exact up to 32): padding at most 1/16 of a lane."""
    if steps <= 32:
        return max(steps, 1)
    scale = 2 ** (steps.bit_length() - 5)
    return -(-steps // scale) * scale


def pack_lanes(steps: list[int], lanes: int) -> list[list[int]]:
    """Clients (by their step counts) into `lanes` lanes, largest first onto the shortest lane (LPT)."""
    packed, totals = [[] for _ in range(lanes)], [0] * lanes
    for k in sorted(range(len(steps)), key=lambda k: (-steps[k], k)):
        lane = totals.index(min(totals))
        packed[lane].append(k)
        totals[lane] += steps[k]
    return [sorted(lane) for lane in packed]


def lane_length(steps: list[int], packed: list[list[int]]) -> int:
    return step_bucket(max(sum(steps[k] for k in lane) for lane in packed))


def choose_lanes(steps: list[int], devices: int, max_padding: float) -> list[list[int]]:
    """The most lanes (a multiple of `devices`, about one per client at most) whose padded steps stay within
    `max_padding` of the real steps; `devices` lanes if none does."""
    total = max(sum(steps), 1)
    best = None
    for lanes in range(devices, -(-len(steps) // devices) * devices + 1, devices):
        packed = pack_lanes(steps, lanes)
        if best is None or lanes * lane_length(steps, packed) - total <= max_padding * total:
            best = packed
    return best


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedLanes:
    """A round's cohort as lanes (leaves lead with [lanes]); P clients per lane, dummies where a lane has fewer."""

    rows: jax.Array  # [L, S, batch] row indices
    valid: jax.Array  # [L, S, batch]
    slot: jax.Array  # [L, S] which of the lane's clients the step trains
    first: jax.Array  # [L, S] the step is that client's first
    members: jax.Array  # [L, P] bool: the slot holds a client (not a dummy)
    extra_rows: jax.Array  # [L, X, batch]: each client's first epoch (or its first fed.fisher_examples), packed
    extra_valid: jax.Array  # [L, X, batch]
    extra_slot: jax.Array  # [L, X]
    state: Any = None  # the clients' states [L, P, ...] (None when the method keeps none)
    rank: jax.Array | None = None  # [L, P] the clients' adapter ranks (None: all at the full rank)


@dataclasses.dataclass(frozen=True)
class PackedRound:
    lanes: PackedLanes
    members: np.ndarray  # [L, P] the cohort position each slot holds, -1 for a dummy
    client_steps: int  # real steps of the cohort
    padded_client_steps: int  # steps the lanes run: L x S

    def order(self) -> np.ndarray:
        """Flat slot index [K] of each cohort position, to gather outputs [L * P] back into cohort order."""
        flat = self.members.reshape(-1)
        return np.array([int(np.flatnonzero(flat == c)[0]) for c in range(int(flat.max()) + 1)])


def _lay_out(pieces: list[tuple[np.ndarray, np.ndarray]], packed: list[list[int]], batch_size: int):
    """Each lane's clients' (rows, valid) end to end -> rows, valid [L, S, batch], slot [L, S], first [L, S]."""
    lengths = [len(rows) for rows, _ in pieces]
    length = lane_length(lengths, packed)
    rows = np.zeros((len(packed), length, batch_size), np.int32)
    valid = np.zeros_like(rows, bool)
    slot = np.zeros((len(packed), length), np.int32)
    first = np.zeros((len(packed), length), bool)
    for l, lane in enumerate(packed):
        at = 0
        for p, k in enumerate(lane):
            end = at + lengths[k]
            rows[l, at:end], valid[l, at:end], slot[l, at:end] = pieces[k][0], pieces[k][1], p
            first[l, at:end][:1] = True
            at = end
        slot[l, at:] = len(lane) - 1  # padding steps change nothing; they point at the lane's last client
    return rows, valid, slot, first


def packed_schedule(client_rows: list[np.ndarray], batch_size: int, epochs: int, seed: int, round_index: int,
                    client_ids, extra_pass_examples: int = 0, devices: int = 1, max_padding: float = 0.1,
                    states=None, ranks=None) -> PackedRound:
    """The cohort's lanes. Each client's batches are the ones `client_schedule` gives it (same shuffles), without
    the padding to the largest client; its extra pass sees its first epoch, or its first `extra_pass_examples`.
    `states`: the cohort's client states [K, ...] (None when the method keeps none); `ranks`: their adapter
    ranks [K] (None: all at the full rank)."""
    own = [client_own_schedule(rows, batch_size, epochs, seed, round_index, cid)
           for rows, cid in zip(client_rows, client_ids)]
    steps = [len(rows) for rows, _ in own]
    packed = choose_lanes(steps, devices, max_padding)
    rows, valid, slot, first = _lay_out(own, packed, batch_size)
    extra = [tuple(np.asarray(x) for x in extra_pass_rows(r[: n // epochs], v[: n // epochs], extra_pass_examples))
             for (r, v), n in zip(own, steps)]
    extra_rows, extra_valid, extra_slot, _ = _lay_out(extra, packed, batch_size)
    width = max(len(lane) for lane in packed)
    members = np.full((len(packed), width), -1)
    for l, lane in enumerate(packed):
        members[l, : len(lane)] = lane
    state = None
    if states is not None:
        state = jax.tree.map(lambda x: np.asarray(x)[np.maximum(members, 0)], states)
    rank = None if ranks is None else np.asarray(ranks)[np.maximum(members, 0)]
    lanes = PackedLanes(rows, valid, slot, first, members >= 0, extra_rows, extra_valid, extra_slot, state, rank)
    return PackedRound(lanes, members, sum(steps), rows.shape[0] * rows.shape[1])


def client_own_schedule(rows: np.ndarray, batch_size: int, epochs: int, seed: int, round_index: int, client_id):
    """-> (rows, valid) [epochs * own steps, batch]: the client's batches, padded only within its last batch of
    each epoch (the unpacked schedule without the steps that pad it to the largest client)."""
    if not len(rows):
        return np.zeros((0, batch_size), np.int32), np.zeros((0, batch_size), bool)
    own_rows, own_valid = client_schedule([rows], batch_size, epochs, seed, round_index, [client_id],
                                          -(-len(rows) // batch_size), Purpose.SHUFFLE)
    return own_rows[0], own_valid[0]


def _at(tree, index):
    return jax.tree.map(lambda x: x[index], tree)


def packed_lane(graphdef, optimizer: optax.GradientTransformation, method, frozen, data, broadcast,
                lane: PackedLanes) -> ClientOutputs:
    """One lane's clients trained one after another, then their extra passes -> their ClientOutputs [P]."""
    width = lane.members.shape[0]
    states = lane.state
    if states is None:
        starts = jax.tree.map(lambda x: jnp.broadcast_to(x, (width,) + x.shape), method.local_start(broadcast, None))
    else:
        starts = jax.vmap(lambda state: method.local_start(broadcast, state))(states)
    masks = None if lane.rank is None else jax.vmap(client_mask)(starts, lane.rank)
    starts = starts if masks is None else apply_mask(starts, masks)
    mask_at = (lambda slot: None) if masks is None else (lambda slot: _at(masks, slot))

    def fresh(slot):
        adapters, opt_state, sums = initial_carry(optimizer, method, _at(starts, slot))
        return adapters, opt_state, sums, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)

    def kept(carry):  # what a client's slot keeps of its carry (its optimizer state is not needed after)
        adapters, _, sums, loss_sum, steps = carry
        return adapters, sums, loss_sum, steps

    def step(state, inputs):
        carry, buffers = state
        step_rows, step_valid, slot, first = inputs
        carry = tree_select(first, fresh(slot), carry)
        core, loss = train_step(graphdef, optimizer, method, frozen, data, broadcast,
                                None if states is None else _at(states, slot), _at(starts, slot),
                                carry[:3], step_rows, step_valid, mask_at(slot))
        carry = tree_select(step_valid.any(), (*core, carry[3] + loss, carry[4] + 1), carry)
        buffers = jax.tree.map(lambda buffer, value: buffer.at[slot].set(value), buffers, kept(carry))
        return (carry, buffers), None

    buffers = jax.vmap(lambda p: kept(fresh(p)))(jnp.arange(width))
    (_, buffers), _ = jax.lax.scan(step, (fresh(0), buffers), (lane.rows, lane.valid, lane.slot, lane.first))
    adapters, sums, loss_sums, steps = buffers
    extras = packed_extra_pass(method, Model(graphdef, frozen, data), adapters, lane)

    def final(start, adapters, sums, loss_sum, steps, extra, state, mask):
        loss = loss_sum / jnp.maximum(steps, 1)
        upload, new_state = method.client_final(LocalResult(start, adapters, sums, steps, loss, extra), broadcast,
                                                state)
        return ClientOutputs(masked_upload(upload, mask), new_state, loss)

    return jax.vmap(final)(starts, adapters, sums, loss_sums, steps, extras, states, masks)


def packed_extra_pass(method, model: Model, adapters, lane: PackedLanes):
    """The method's extra pass for each of the lane's clients, at its trained adapters [P] -> totals [P] (or None)."""
    totals = jax.vmap(method.extra_pass_init)(adapters)
    if totals is None:
        return None

    def step(totals, inputs):
        rows, valid, slot = inputs
        mine = _at(totals, slot)
        added = method.extra_pass_step(mine, model, _at(adapters, slot), rows, valid)
        added = tree_select(valid.any(), added, mine)
        return jax.tree.map(lambda total, value: total.at[slot].set(value), totals, added), None

    return jax.lax.scan(step, totals, (lane.extra_rows, lane.extra_valid, lane.extra_slot))[0]


def make_packed_program(graphdef, optimizer, method):
    """(frozen, data, broadcast, PackedLanes [L]) -> ClientOutputs [L, P], vmapped over lanes."""

    def lane(frozen, data, broadcast, one: PackedLanes):
        return packed_lane(graphdef, optimizer, method, frozen, data, broadcast, one)

    return jax.vmap(lane, in_axes=(None, None, None, 0))
