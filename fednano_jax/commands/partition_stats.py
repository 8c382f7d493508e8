"""A config's client partition, without a model: examples per client per split, and per category.

python -m fednano_jax.data.partition_stats --config=configs/scienceqa_llava15_7b.py --config.data.root=DIR

Prints, for the config's K clients and its partition (`data.partition`), the examples each client gets
from the official train / val / test splits, and a table of training examples per
partition category (ScienceQA topic, IconQA first skill) and client; `--png=FILE` also draws them.
"""

from __future__ import annotations

import collections

import numpy as np

from fednano_jax.data import datasets
from fednano_jax.data.partition import Partition
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


def category_histogram_png(splits: Splits, clients: dict[str, list[np.ndarray]], title: str, path: str) -> None:
    """Each client's training examples as a bar stacked by partition category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [collections.Counter(splits.federated_train.categories[i] for i in rows) for rows in clients["train"]]
    labels = [f"C{k + 1}" for k in range(len(counts))]
    figure, axes = plt.subplots(figsize=(max(4.0, 0.6 * len(counts) + 2.5), 4.0))
    bottom = np.zeros(len(counts))
    colours = plt.get_cmap("tab20")
    for index, category in enumerate(splits.category_order):
        heights = np.array([c[category] for c in counts], float)
        axes.bar(labels, heights, bottom=bottom, color=colours(index % 20),
                 label=category if len(splits.category_order) <= 20 else None)
        bottom += heights
    axes.set_xlabel("client")
    axes.set_ylabel("training examples")
    axes.set_title(title, fontsize=9)
    if len(splits.category_order) <= 20:
        axes.legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def partition_report(config, png: str | None = None) -> str:
    splits = datasets.load_splits(config, with_images=False)
    partition = Partition.of(config.data)
    clients = client_partition(splits, config.fed.num_clients, partition, config.seed)
    name = datasets.dataset_name(config)
    title = f"{name}: {config.fed.num_clients} clients, {partition.describe()}"
    if png:
        category_histogram_png(splits, clients, title, png)
    return (f"{title}, {len(splits.category_order)} categories\n\nExamples per client and split:\n"
            f"{split_sizes(clients)}\n\nTraining examples per category and client:\n{category_counts(splits, clients)}"
            + (f"\n\nHistogram written to {png}" if png else ""))


def main() -> None:
    from absl import flags

    from fednano_jax.config import check_data, read

    config = read(flags.FLAGS.config, run=False)
    check_data(config)
    try:
        print(partition_report(config, flags.FLAGS.png))
    except (DataError, ConfigError):
        raise
    except ValueError as error:  # a size or skew the data cannot satisfy
        raise DataError(str(error)) from error


def define_flags() -> None:
    from absl import flags

    from fednano_jax.commands import cli

    cli.define_config_flag()
    flags.DEFINE_string("png", None, "Also draw each client's training examples by category, as a PNG here.")

