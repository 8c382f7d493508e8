"""Label-skewed client partitions: per category, Dirichlet(alpha) shares over clients.

The proportions are drawn apart from their application so that one draw can be applied to
both the train and the test pool, giving every client a test set that follows its own train
distribution.
"""

from collections.abc import Sequence

import numpy as np

from fednano_jax.streams import Purpose, generator


def _check_clients_and_alpha(num_clients: int, alpha: float) -> None:
    if num_clients < 1:
        raise ValueError(f"Expected num_clients >= 1, got {num_clients}.")
    if not alpha > 0:
        raise ValueError(f"Expected a Dirichlet alpha > 0, got {alpha}.")


def dirichlet_proportions(num_categories: int, num_clients: int, alpha: float, seed: int) -> np.ndarray:
    """[num_categories, num_clients]; row i is category i's share per client, summing to 1."""
    _check_clients_and_alpha(num_clients, alpha)
    if num_categories < 1:
        raise ValueError(f"Expected num_categories >= 1, got {num_categories}.")
    rng = generator(seed, Purpose.PARTITION)
    return rng.dirichlet(np.full(num_clients, float(alpha)), size=num_categories)


def _indices_by_row(categories: Sequence, category_order: Sequence) -> list[list[int]]:
    row_of = {category: row for row, category in enumerate(category_order)}
    if len(row_of) != len(category_order):
        raise ValueError("Expected category_order to list each category once.")
    missing = set(categories) - row_of.keys()
    if missing:
        raise ValueError(f"Expected every category to be in category_order, missing {sorted(map(str, missing))}.")
    rows = [[] for _ in category_order]
    for index, category in enumerate(categories):
        rows[row_of[category]].append(index)
    return rows


def _split_by_shares(indices: np.ndarray, shares: np.ndarray) -> list[np.ndarray]:
    boundaries = np.floor(np.cumsum(shares) * len(indices)).astype(np.int64)
    # The last part ends at len(indices) whatever the rounding of cumsum.
    return np.split(indices, np.minimum(boundaries[:-1], len(indices)))


def partition_by_proportions(categories: Sequence, proportions: np.ndarray, category_order: Sequence,
                             seed: int, split_index: int = 0) -> list[np.ndarray]:
    """Per client, the sorted int64 indices into `categories` it receives (`split_index`: which split, so
    each split is shuffled by a stream of its own)."""
    proportions = np.asarray(proportions, dtype=np.float64)
    if proportions.ndim != 2 or proportions.shape[0] != len(category_order):
        raise ValueError(f"Expected proportions of shape [{len(category_order)}, num_clients], "
                         f"got {proportions.shape}.")
    if np.any(proportions < 0) or not np.allclose(proportions.sum(axis=1), 1.0):
        raise ValueError("Expected every row of proportions to be >= 0 and sum to 1.")
    rng = generator(seed, Purpose.PARTITION, split_index + 1)
    per_client = [[np.empty(0, np.int64)] for _ in range(proportions.shape[1])]
    for indices, shares in zip(_indices_by_row(categories, category_order), proportions):
        shuffled = rng.permutation(np.asarray(indices, dtype=np.int64))
        for client, part in enumerate(_split_by_shares(shuffled, shares)):
            per_client[client].append(part)
    return [np.sort(np.concatenate(parts)) for parts in per_client]


def dirichlet_partition(categories: Sequence, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Splits example indices over clients; the smaller alpha, the more skewed the clients."""
    _check_clients_and_alpha(num_clients, alpha)
    category_order = sorted(set(categories))
    proportions = dirichlet_proportions(len(category_order), num_clients, alpha, seed)
    return partition_by_proportions(categories, proportions, category_order, seed)
