"""Orbax-backed storage behind a small interface: the pretrained backbone and round checkpoints.

The pretrained backbone is cached once per (model, pretraining, data) setting; it is
written to a temporary directory and renamed into place, so an interrupted save
never leaves a half-written cache entry that a later run would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

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


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a run with other settings."""


def _first_difference(saved: dict, current: dict, prefix: str = "") -> str | None:
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}={a!r}, but the config says {b!r}"
    return None


class RoundCheckpoints:
    """One method's round checkpoints (server state + metrics history) in `directory`.

    Orbax writes each step to a temporary directory and commits it by renaming, so a
    run killed mid-save leaves the previous step intact. The frozen backbone is never
    saved here. `fingerprint` holds the settings a resumed run must share.
    """

    def __init__(self, directory: str, keep: int, fingerprint: dict):
        self.directory = os.path.abspath(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it will read back from JSON
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, round_index: int, state, history: list[dict]) -> None:
        self.manager.save(round_index, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"round": round_index, "history": history, "fingerprint": self.fingerprint}),
        ))

    def restore_latest(self, abstract_state):
        """-> (round, state, history) of the newest readable checkpoint, or None if there is none.

        A checkpoint that cannot be read is skipped with a warning, falling back to the one
        before it; one written with other settings raises CheckpointMismatch.
        """
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            meta = self._read(step, meta=ocp.args.JsonRestore())
            if meta is None:
                continue
            difference = _first_difference(meta["meta"]["fingerprint"], self.fingerprint)
            if difference:
                raise CheckpointMismatch(f"The checkpoint in {self.directory} was written with {difference}; "
                                         "rerun with the same settings or use another --workdir.")
            state = self._read(step, state=ocp.args.StandardRestore(target))
            if state is not None:
                return step, state["state"], meta["meta"]["history"]
        return None

    def _read(self, step: int, **items):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # noqa: BLE001 - whatever is unreadable, an older step may not be
            warnings.warn(f"Checkpoint {self.directory}/{step} is unreadable ({type(error).__name__}: {error}); "
                          "falling back to the previous one.")
            return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
