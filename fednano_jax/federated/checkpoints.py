"""Round checkpoints of one method: server state, client state and metrics history, stored with orbax."""

from __future__ import annotations

import json
import os
import warnings

import jax
import orbax.checkpoint as ocp

from fednano_jax.errors import CheckpointMismatch


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
            meta = self._checked_meta(step)
            if meta is None:
                continue
            state = self._read(step, state=ocp.args.StandardRestore(target))
            if state is not None:
                return step, state["state"], meta["meta"]["history"]
        return None

    def check_settings(self) -> None:
        """Raise CheckpointMismatch now if the newest readable checkpoint was written with other settings (a run
        checks before it spends time on data, backbone and evaluation)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            if self._checked_meta(step) is not None:
                return

    def _checked_meta(self, step: int):
        meta = self._read(step, meta=ocp.args.JsonRestore())
        if meta is not None:
            difference = _first_difference(meta["meta"]["fingerprint"], self.fingerprint)
            if difference:
                raise CheckpointMismatch(f"The checkpoint in {self.directory} was written with {difference}; "
                                         "rerun with the same settings or use another --workdir.")
        return meta

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
