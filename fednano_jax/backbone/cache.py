"""The cache of pretrained backbones: orbax parameters and the tokenizer, committed by renaming.

A backbone is cached once per (model, pretraining, data) setting; it is written to a
temporary directory and renamed into place, so an interrupted save never leaves a
half-written cache entry that a later run would trust.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from fednano_jax.data.tokenizer import save_tokenizer

PARAMS = "params"
TOKENIZER = "tokenizer"


def backbone_is_cached(directory: str) -> bool:
    return os.path.isdir(os.path.join(directory, PARAMS)) and os.path.isdir(os.path.join(directory, TOKENIZER))


def save_backbone(directory: str, frozen: nnx.State | dict, tokenizer) -> None:
    """`frozen`: the backbone state, or a dict of arrays (the trained part of a backbone)."""
    staging = directory.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    save_tokenizer(tokenizer, os.path.join(staging, TOKENIZER))
    with ocp.StandardCheckpointer() as checkpointer:
        tree = nnx.to_pure_dict(frozen) if isinstance(frozen, nnx.State) else frozen
        checkpointer.save(os.path.join(os.path.abspath(staging), PARAMS), tree)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)


def load_backbone(directory: str, abstract_frozen: nnx.State | dict) -> nnx.State | dict:
    """Restores into the structure (and shapes) of `abstract_frozen`, a state or a dict of arrays.

    A backbone saved before the decoder layers were stacked (one entry per layer) is stacked as it loads."""
    is_state = isinstance(abstract_frozen, nnx.State)
    tree = nnx.to_pure_dict(abstract_frozen) if is_state else abstract_frozen
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    path = os.path.join(os.path.abspath(directory), PARAMS)
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata(path).item_metadata.tree
        restored = _stacked(checkpointer.restore(path, _as_saved(target, saved)), target)
    if not is_state:
        return restored
    state = jax.tree.map(lambda x: x, abstract_frozen)
    nnx.replace_by_pure_dict(state, restored)
    return state


def load_part(directory: str, abstract_part: nnx.State) -> nnx.State:
    """Restores only the entries of `abstract_part`, a state holding some of the cached backbone's top-level parts
    (a client's `edge`): orbax reads those arrays alone, never the rest of the checkpoint."""
    tree = nnx.to_pure_dict(abstract_part)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    path = os.path.join(os.path.abspath(directory), PARAMS)
    with ocp.PyTreeCheckpointer() as checkpointer:
        as_saved = _as_saved(target, checkpointer.metadata(path).item_metadata.tree)
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=as_saved, restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(), as_saved),
            partial_restore=True))
    restored = _stacked(restored, target)
    state = jax.tree.map(lambda x: x, abstract_part)
    nnx.replace_by_pure_dict(state, restored)
    return state


def _per_layer(saved) -> bool:
    return isinstance(saved, Mapping) and bool(saved) and all(str(key).isdigit() for key in saved)


def _as_saved(target, saved):
    """`target` with each stacked-layers subtree that was saved per layer ({'0': ..., '1': ...}) unstacked."""
    if not isinstance(target, dict) or not isinstance(saved, Mapping):
        return target
    out = {}
    for key, value in target.items():
        if key == "layers" and not _per_layer(value) and _per_layer(saved.get(key)):
            layer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), value)
            out[key] = {str(i): layer for i in range(len(saved[key]))}
        else:
            out[key] = _as_saved(value, saved.get(key))
    return out


def _stacked(restored, target):
    """Restored arrays in `target`'s structure: per-layer entries stacked on a leading axis."""
    if not isinstance(target, dict):
        return restored
    out = {}
    for key, value in target.items():
        part = restored[key]
        if key == "layers" and not _per_layer(value) and _per_layer(part):
            layers = [part[str(i)] for i in range(len(part))]
            part = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        out[key] = _stacked(part, value)
    return out
