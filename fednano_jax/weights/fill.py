"""Stream checkpoint tensors into a model's frozen state through a name table."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from fednano_jax.errors import WeightsError
from fednano_jax.weights.names import CONV, LINEAR, by_source, to_flax


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        flat.update(flatten(value, path + "/") if isinstance(value, dict) else {path: value})
    return flat


def unflatten(flat: dict, template: dict, prefix: str = "") -> dict:
    return {key: unflatten(flat, value, f"{prefix}{key}/") if isinstance(value, dict) else flat[f"{prefix}{key}"]
            for key, value in template.items()}


def _torch_layout(shape: tuple, transform: str) -> tuple:
    if transform == LINEAR:
        return tuple(reversed(shape))
    if transform == CONV:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def fill_state(abstract_state: nnx.State, table: dict[str, tuple[str, str]],
               tensors: Iterable[tuple[str, np.ndarray]], dtype, source: str) -> nnx.State:
    """A state shaped like `abstract_state` with every parameter taken from `tensors`.

    Each tensor is transformed, checked against the shape the config implies, cast and
    put on the device as it arrives, so host memory holds one tensor at a time.
    """
    pure = nnx.to_pure_dict(abstract_state)
    expected = flatten(pure)
    unmapped = sorted(set(expected) - set(table))
    if unmapped:
        raise AssertionError(f"No checkpoint tensor is mapped to {unmapped[:3]}")  # a bug in a name table
    wanted, filled = by_source(table), {}
    for name, array in tqdm(tensors, desc=f"loading {source}", unit="tensor", leave=False):
        for ours, transform in wanted.get(name, []):
            want = tuple(expected[ours].shape)
            if tuple(array.shape) != _torch_layout(want, transform):
                raise WeightsError(f"Tensor {name!r} in {source} has shape {tuple(array.shape)}, but the model "
                                   f"config implies {_torch_layout(want, transform)}.")
            filled[ours] = jax.device_put(jnp.asarray(to_flax(array, transform), dtype))
    missing = [table[ours][0] for ours in expected if ours not in filled]
    if missing:
        raise WeightsError(f"Tensor {missing[0]!r} is missing from {source}"
                           f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}.")
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, unflatten(filled, pure))
    return state
