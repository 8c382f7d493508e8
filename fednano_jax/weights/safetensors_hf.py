"""Hugging Face checkpoint directories (config.json plus one or many safetensors shards), and single
safetensors files (a converted `.pth`)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Collection, Iterator

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


def _files(path: str) -> list[str]:
    return [path] if os.path.isfile(path) else shard_files(path)


def checkpoint_keys(path: str) -> set[str]:
    return set(tensor_shapes(path))


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """name -> shape of a directory's (or one file's) tensors, read from the headers only (no tensor is opened)."""
    shapes = {}
    for shard in _files(path):
        shapes.update({name: tuple(entry["shape"]) for name, entry in _header(shard).items() if name != "__metadata__"})
    return shapes


def _header(file: str) -> dict:
    """A safetensors file's JSON header (its first 8 bytes give the header's length, little-endian)."""
    with open(file, "rb") as f:
        try:
            (length,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(length))
        except (struct.error, ValueError) as error:
            raise WeightsError(f"{file} is not a safetensors file (its header is unreadable: {error}).") from error


def iter_tensors(path: str, keep: Collection[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) one tensor at a time, shard by shard: never a whole checkpoint in host memory. With
    `keep`, only the tensors it names are read."""
    for shard in _files(path):
        with safe_open(shard, framework="numpy") as f:
            for name in f.keys():
                if keep is None or name in keep:
                    yield name, f.get_tensor(name)
