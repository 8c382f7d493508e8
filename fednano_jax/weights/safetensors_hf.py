"""Hugging Face checkpoint directories: config.json plus one or many safetensors shards."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
from safetensors import safe_open

from fednano_jax.errors import WeightsError

INDEX = "model.safetensors.index.json"


def shard_files(directory: str) -> list[str]:
    """The shards in the order the index lists them (a single model.safetensors otherwise)."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not names:
        raise WeightsError(f"{directory} holds no *.safetensors weights; expected a directory written by "
                           "save_pretrained (config.json plus model*.safetensors).")
    missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        raise WeightsError(f"Shard {missing[0]!r} listed in {INDEX} is missing from {directory}.")
    return [os.path.join(directory, n) for n in names]


def checkpoint_keys(directory: str) -> set[str]:
    keys: set[str] = set()
    for shard in shard_files(directory):
        with safe_open(shard, framework="numpy") as f:
            keys.update(f.keys())
    return keys


def iter_tensors(directory: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) one tensor at a time, shard by shard: never a whole checkpoint in host memory."""
    for shard in shard_files(directory):
        with safe_open(shard, framework="numpy") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
