"""A config's client partition, without a model: examples per client per split, and per category.

python -m fednano_jax.data.partition_stats --config=configs/scienceqa_llava15_7b.py --config.data.root=DIR

Prints, for the config's K clients and Dirichlet(alpha), the examples each client gets
from the official train / val / test splits, and a table of training examples per
partition category (ScienceQA topic, IconQA first skill) and client.
"""

from __future__ import annotations

import collections

import numpy as np

from fednano_jax.data import datasets
from fednano_jax.data.pipeline import Splits, client_partition
from fednano_jax.errors import ConfigError, DataError


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def split_sizes(clients: dict[str, list[np.ndarray]]) -> str:
    """Rows: clients, then the total; columns: the splits."""
    names = [name for name in ("train", "val", "test") if name in clients]
    num_clients = len(clients[names[0]])
    rows = [[f"C{k + 1}"] + [len(clients[s][k]) for s in names] for k in range(num_clients)]
    totals = ["all"] + [sum(len(rows_k) for rows_k in clients[s]) for s in names]
    return _table(["Client"] + names, rows + [totals])


def category_counts(splits: Splits, clients: dict[str, list[np.ndarray]], split: str = "train") -> str:
    """Rows: partition categories; columns: clients, then the total."""
    pool = {"train": splits.federated_train, "test": splits.federated_test, "val": splits.federated_val}[split]
    counts = [collections.Counter(pool.categories[i] for i in rows) for rows in clients[split]]
    rows = [[category] + [c[category] for c in counts] + [sum(c[category] for c in counts)]
            for category in splits.category_order]
    return _table(["Category"] + [f"C{k + 1}" for k in range(len(counts))] + ["all"], rows)


def partition_report(config) -> str:
    splits = datasets.load_splits(config, with_images=False)
    clients = client_partition(splits, config.fed.num_clients, config.data.dirichlet_alpha, config.seed)
    name = datasets.dataset_name(config)
    return (f"{name}: {config.fed.num_clients} clients, Dirichlet alpha {config.data.dirichlet_alpha}, "
            f"{len(splits.category_order)} categories\n\nExamples per client and split:\n{split_sizes(clients)}"
            f"\n\nTraining examples per category and client:\n{category_counts(splits, clients)}")


def main() -> None:
    from absl import flags

    from fednano_jax.config import validate_data

    validate_data(flags.FLAGS.config.data)
    try:
        print(partition_report(flags.FLAGS.config))
    except (DataError, ConfigError):
        raise
    except ValueError as error:  # a size or skew the data cannot satisfy
        raise DataError(str(error)) from error


def define_flags() -> None:
    from fednano_jax.commands import cli

    cli.define_config_flag()

