"""The cache of pretrained backbones: orbax parameters and the tokenizer, committed by renaming.

A backbone is cached once per (model, pretraining, data) setting; it is written to a
temporary directory and renamed into place, so an interrupted save never leaves a
half-written cache entry that a later run would trust.
"""

from __future__ import annotations

import os
import shutil

import jax
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
    """Restores into the structure (and shapes) of `abstract_frozen`, a state or a dict of arrays."""
    is_state = isinstance(abstract_frozen, nnx.State)
    tree = nnx.to_pure_dict(abstract_frozen) if is_state else abstract_frozen
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.join(os.path.abspath(directory), PARAMS), target)
    if not is_state:
        return restored
    state = jax.tree.map(lambda x: x, abstract_frozen)
    nnx.replace_by_pure_dict(state, restored)
    return state
