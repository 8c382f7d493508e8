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
