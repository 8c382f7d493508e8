"""Client partitions, as flwr-datasets offers them: a [categories, clients] matrix of shares, then cut.

`data.partition` chooses the matrix:
- `dirichlet` (default): per category, Dirichlet(alpha) shares over clients, redrawn until every
  client has `data.min_client_size` training examples;
- `iid`: every category split evenly over the clients;
- `pathological`: each client holds `data.categories_per_client` categories, each category split
  evenly over the clients that hold it;
- `size_skew`: every category split in the same power-law shares, client k (in a seeded order)
  getting a share proportional to (k + 1) ** -`data.size_exponent`: sizes skewed, labels not;
- `natural`: the dataset's own groups (`data.natural_key`: ScienceQA `subject` or `grade`, IconQA
  `subtask`), each wholly on one client, the largest first to the client with the fewest examples.

The proportions are drawn apart from their application so that one draw can be applied to
both the train and the test pool, giving every client a test set that follows its own train
distribution.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from fednano_jax.settings import Data
from fednano_jax.streams import Purpose, generator


DIRICHLET_ATTEMPTS = 100  # draws tried for a Dirichlet partition whose every client meets the minimum size


@dataclasses.dataclass(frozen=True)
class Partition:
    """How to split the examples over clients (the config's `data` section)."""

    kind: str = Data.partition  # the defaults are settings.Data's
    alpha: float = Data.dirichlet_alpha  # dirichlet
    min_client_size: int = Data.min_client_size  # dirichlet: training examples every client gets at least
    categories_per_client: int = Data.categories_per_client  # pathological
    size_exponent: float = Data.size_exponent  # size_skew
    natural_key: str = Data.natural_key  # natural: the per-example metadata field that names a client's group

    @classmethod
    def of(cls, data: Data) -> "Partition":
        """From the config's `data` section."""
        return cls(data.partition, data.dirichlet_alpha, data.min_client_size, data.categories_per_client,
                   data.size_exponent, data.natural_key)

    def describe(self) -> str:
        return {"dirichlet": f"Dirichlet alpha {self.alpha}", "iid": "IID",
                "pathological": f"pathological, {self.categories_per_client} categories per client",
                "size_skew": f"size skew, exponent {self.size_exponent}",
                "natural": f"natural, by {self.natural_key}"}[self.kind]


def _check_clients_and_alpha(num_clients: int, alpha: float) -> None:
    if num_clients < 1:
        raise ValueError(f"Expected num_clients >= 1, got {num_clients}.")
    if not alpha > 0:
        raise ValueError(f"Expected a Dirichlet alpha > 0, got {alpha}.")


def dirichlet_proportions(num_categories: int, num_clients: int, alpha: float, seed: int,
                          attempt: int = 0) -> np.ndarray:
    """[num_categories, num_clients]; row i is category i's share per client, summing to 1. Each
    `attempt` (a redraw) has a stream of its own; attempt 0 is the first draw."""
    _check_clients_and_alpha(num_clients, alpha)
    if num_categories < 1:
        raise ValueError(f"Expected num_categories >= 1, got {num_categories}.")
    rng = generator(seed, Purpose.PARTITION, 0, attempt)
    return rng.dirichlet(np.full(num_clients, float(alpha)), size=num_categories)


def iid_proportions(num_categories: int, num_clients: int) -> np.ndarray:
    return np.full((num_categories, num_clients), 1.0 / num_clients)


def pathological_proportions(num_categories: int, num_clients: int, per_client: int, seed: int) -> np.ndarray:
    """Client i holds `per_client` consecutive categories of a seeded shuffle, wrapping round, so
    every category is held when num_clients * per_client >= num_categories."""
    if not 1 <= per_client <= num_categories:
        raise ValueError(f"Expected data.categories_per_client between 1 and the {num_categories} categories, "
                         f"got {per_client}.")
    if num_clients * per_client < num_categories:
        raise ValueError(f"{num_clients} clients x {per_client} categories each cannot hold all {num_categories} "
                         "categories; raise data.categories_per_client or fed.num_clients.")
    order = generator(seed, Purpose.PARTITION).permutation(num_categories)
    held = np.zeros((num_categories, num_clients))
    for client in range(num_clients):
        held[order[(client * per_client + np.arange(per_client)) % num_categories], client] = 1.0
    return held / held.sum(axis=1, keepdims=True)


def size_skew_proportions(num_categories: int, num_clients: int, exponent: float, seed: int) -> np.ndarray:
    if exponent < 0:
        raise ValueError(f"Expected data.size_exponent >= 0, got {exponent}.")
    shares = np.arange(1, num_clients + 1, dtype=np.float64) ** -float(exponent)
    shares = shares[generator(seed, Purpose.PARTITION).permutation(num_clients)]
    return np.tile(shares / shares.sum(), (num_categories, 1))


def natural_proportions(group_sizes: Sequence[int], num_clients: int) -> np.ndarray:
    """Each group wholly on one client: largest group first, to the client with the fewest examples."""
    if len(group_sizes) < num_clients:
        raise ValueError(f"The natural partition has {len(group_sizes)} groups, fewer than fed.num_clients="
                         f"{num_clients}; lower fed.num_clients or choose another data.natural_key.")
    held, load = np.zeros((len(group_sizes), num_clients)), np.zeros(num_clients)
    for group in sorted(range(len(group_sizes)), key=lambda g: -group_sizes[g]):
        client = int(np.argmin(load))
        held[group, client], load[client] = 1.0, load[client] + group_sizes[group]
    return held


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


def sizes_text(sizes: list[int]) -> str:
    """Each client's count, or beyond 20 clients their range and total (a federation too large to list)."""
    if len(sizes) <= 20:
        return str(list(sizes))
    return f"{min(sizes)} to {max(sizes)} per client ({sum(sizes):,} in all)"
