"""Stream checkpoint tensors into a model's frozen state through a name table."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from fednano_jax.errors import WeightsError
from fednano_jax.weights.names import CONV, LINEAR, QKV_Q, QKV_V, by_source, stacked_slot, to_flax


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
    if transform in (QKV_Q, QKV_V):
        return (3 * shape[0],)
    return tuple(shape)


def fill_state(abstract_state: nnx.State, table: dict[str, tuple[str, str]],
               tensors: Iterable[tuple[str, np.ndarray]], dtype, source: str) -> nnx.State:
    """A state shaped like `abstract_state` with every parameter taken from `tensors`.

    Each tensor is transformed, checked against the shape the config implies, cast and
    put on the device as it arrives, so host memory holds one tensor at a time. The
    layers of a stacked parameter (`path@i` in the table) are stacked on the device once all
    have arrived.
    """
    pure = nnx.to_pure_dict(abstract_state)
    expected = flatten(pure)
    unmapped = sorted(set(expected) - {stacked_slot(ours)[0] for ours in table})
    if unmapped:
        raise AssertionError(f"No checkpoint tensor is mapped to {unmapped[:3]}")  # a bug in a name table
    wanted, filled = by_source(table), {}
    for name, array in tqdm(tensors, desc=f"loading {source}", unit="tensor", leave=False):
        for ours, transform in wanted.get(name, []):
            path, layer = stacked_slot(ours)
            want = tuple(expected[path].shape[1:] if layer is not None else expected[path].shape)
            if tuple(array.shape) != _torch_layout(want, transform):
                raise WeightsError(f"Tensor {name!r} in {source} has shape {tuple(array.shape)}, but the model "
                                   f"config implies {_torch_layout(want, transform)}.")
            filled[ours] = jax.device_put(jnp.asarray(to_flax(array, transform), dtype))
    missing = [source_name for ours, (source_name, _) in table.items() if ours not in filled]
    if missing:
        raise WeightsError(f"Tensor {missing[0]!r} is missing from {source}"
                           f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}.")
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, unflatten(_stack_layers(filled, expected), pure))
    return state


def _stack_layers(filled: dict, expected: dict) -> dict:
    """Our names -> arrays, each stacked parameter's layers (`path@i`) joined on its leading axis."""
    layers: dict[str, dict[int, jax.Array]] = {}
    out = {}
    for ours, array in filled.items():
        path, layer = stacked_slot(ours)
        if layer is None:
            out[path] = array
        else:
            layers.setdefault(path, {})[layer] = array
    for path, slices in layers.items():
        out[path] = jnp.stack([slices.pop(i) for i in range(expected[path].shape[0])])
    return out
