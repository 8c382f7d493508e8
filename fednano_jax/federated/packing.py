"""Packed clients: several clients run one after another in one vmap lane, so uneven clients waste few steps.

Unpacked, every client's schedule is padded to the largest client of the population, and a
round of unequal clients spends many of its vmapped steps on padding. Packed, the cohort's
clients are laid end to end into lanes (largest first onto the shortest lane), as many
lanes as keep the padding within `fed.pack_padding` of the real steps, each lane as long as
its longest (rounded up by `step_bucket`, so a run compiles a bounded number of times).

This module lays the lanes out; the program that trains a lane is the one client program
(`client.lane_update`; an unpacked client is a lane of one). Each client gets the adapters, sums
and upload it gets unpacked: its steps are the same, in the same order.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from fednano_jax.federated.client import PackedLanes, extra_pass_rows
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
