"""Who trains on what in a round: the cohort, and each client's batches as row indices.

Every choice is a pure function of (seed, round, client id) through `streams`, so a run
resumed from a round checkpoint continues exactly as the uninterrupted run would have,
and a client's batches do not depend on which other clients share its round.
"""

from __future__ import annotations

import numpy as np

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

