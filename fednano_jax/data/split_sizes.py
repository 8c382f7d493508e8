"""The official split sizes of the paper's datasets, as their authors published them (split_sizes.json, with
sources), for figures that need only the number of examples: the paper's Table 1 traffic, memory plans."""

from __future__ import annotations

import functools
import json
import os


@functools.cache
def _recorded() -> dict:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "split_sizes.json")) as f:
        return json.load(f)


def official_split_sizes(name: str) -> dict | None:
    """{"train", "val", "test", "source", ...} for a dataset name (`config.data.name`); None where none is recorded."""
    return _recorded().get(name)


def federated_train_rows(config) -> tuple[int, str] | None:
    """-> (the federated training rows a run of the config takes, where that number comes from): data.train_examples,
    or the official train split less the rows held aside for pretraining; None where neither says."""
    if config.data.train_examples:
        return config.data.train_examples, f"data.train_examples={config.data.train_examples:,}"
    name = config.data.name
    sizes = official_split_sizes(name)
    if sizes is None:
        return None
    held_aside = config.data.pretrain_examples
    less = f" less {held_aside:,} held aside for pretraining" if held_aside else ""
    return sizes["train"] - held_aside, f"{name}'s official train split ({sizes['train']:,} examples{less})"
