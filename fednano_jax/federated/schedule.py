"""Who trains on what in a round: the cohort, and each client's batches as row indices.

Every choice is a pure function of (seed, round, client id) through `streams`, so a run
resumed from a round checkpoint continues exactly as the uninterrupted run would have,
and a client's batches do not depend on which other clients share its round.
"""

from __future__ import annotations

import numpy as np

from fednano_jax.settings import CYCLIC, POISSON
from fednano_jax.streams import Purpose, generator


def steps_per_epoch(client_rows: list[np.ndarray], batch_size: int) -> int:
    """Batches in the largest client's epoch: every client's epochs are padded to it, every round,
    so the round program compiles once."""
    return max(-(-len(r) // batch_size) for r in client_rows)


def client_schedule(client_rows: list[np.ndarray], batch_size: int, epochs: int, seed: int, round_index: int,
                    client_ids=None, epoch_steps: int | None = None, purpose: Purpose = Purpose.SHUFFLE):
    """-> rows, valid [K, epochs * S, batch]: epoch e of each client fills steps [e S, (e + 1) S), its shuffled
    examples first and invalid padding after, so the first S steps are one epoch (the Fisher pass reads them)."""
    epoch_steps = epoch_steps or steps_per_epoch(client_rows, batch_size)
    client_ids = range(len(client_rows)) if client_ids is None else client_ids
    rows = np.zeros((len(client_rows), epochs, epoch_steps * batch_size), np.int32)
    valid = np.zeros_like(rows, bool)
    for k, (client_id, client) in enumerate(zip(client_ids, client_rows)):
        rng = generator(seed, purpose, round_index, int(client_id))
        for epoch in range(epochs):
            rows[k, epoch, : len(client)] = rng.permutation(client)
            valid[k, epoch, : len(client)] = True
    shape = (len(client_rows), epochs * epoch_steps, batch_size)
    return rows.reshape(shape), valid.reshape(shape)


def sample_cohort(num_clients: int, cohort_size: int, seed: int, round_index: int) -> np.ndarray:
    """Sorted ids of the clients taking part in a round (all of them when cohort_size is 0)."""
    if cohort_size in (0, num_clients):
        return np.arange(num_clients)
    rng = generator(seed, Purpose.COHORT, round_index)
    return np.sort(rng.choice(num_clients, size=cohort_size, replace=False))



def round_cohort(fed, num_clients: int, seed: int, round_index: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids [slots], sampled [slots]): the round's clients under `fed.cohort_sampling`, in the round program's
    slots. A slot not sampled (Poisson cohorts smaller than the capacity) holds a client that takes no part."""
    if fed.cohort_sampling == POISSON:
        return poisson_cohort(num_clients, fed.expected_cohort / num_clients, fed.cohort_size, seed, round_index)
    if fed.cohort_sampling == CYCLIC:
        cohort = cyclic_groups(num_clients, fed.cycle, seed)[round_index % fed.cycle]
    else:
        cohort = sample_cohort(num_clients, fed.clients_per_round, seed, round_index)
    return cohort, np.ones(len(cohort), bool)


def poisson_cohort(num_clients: int, probability: float, capacity: int, seed: int, round_index: int):
    """Each client independently with `probability`; a draw larger than `capacity` keeps a random subset of that
    size (truncated Poisson sampling); the slots left over hold the lowest ids not drawn, marked not sampled."""
    rng = generator(seed, Purpose.COHORT, round_index)
    drawn = np.flatnonzero(rng.random(num_clients) < probability)
    if len(drawn) > capacity:
        drawn = np.sort(rng.choice(drawn, size=capacity, replace=False))
    fillers = np.setdiff1d(np.arange(num_clients), drawn)[: capacity - len(drawn)]
    sampled = np.arange(capacity) < len(drawn)
    return np.concatenate([drawn, fillers]).astype(np.int64), sampled


def cyclic_groups(num_clients: int, cycle: int, seed: int) -> np.ndarray:
    """[cycle, num_clients / cycle]: the clients in a seeded random order, cut into equal groups; round t's cohort
    is group t mod cycle, so each client takes part exactly once every `cycle` rounds."""
    order = generator(seed, Purpose.COHORT, 0, 1).permutation(num_clients)
    return np.sort(order.reshape(cycle, -1), axis=1)
