"""Per-round metrics where researchers look: `metrics.jsonl` and TensorBoard event files beside it.

Every record (the untuned model's evaluation, then one per method and round) is appended
to `<workdir>/metrics.jsonl`, tagged with the run's start time, so rerunning into a workdir
keeps earlier runs' lines. Its numbers also go to TensorBoard through tensorboardX, one run
per method (`<workdir>/tensorboard/<method>`), stepped by round: a resumed run continues
its curves, and a study's cells (each its own workdir) are each their own runs under the
study's directory (`tensorboard --logdir=runs/...`).
"""

from __future__ import annotations

import json
import os

import numpy as np

SCALARS = ("average", "round_seconds", "compile_seconds", "eval_seconds", "uploaded_bytes", "client_steps",
           "padded_client_steps")  # record fields written as they are


def scalars(record: dict) -> dict[str, float]:
    """A record's TensorBoard scalars: its numbers, the clients' mean training loss, each client's accuracy."""
    out = {name: float(record[name]) for name in SCALARS if name in record}
    if "average" in out:
        out["average_accuracy"] = out.pop("average")
    if record.get("train_loss"):
        out["train_loss"] = float(np.mean(record["train_loss"]))
    for client, accuracy in enumerate(record.get("accuracy") or []):
        out[f"client_accuracy/C{client + 1}"] = float(accuracy)
    return out


class MetricsLog:
    """`log(record)` appends it to metrics.jsonl and writes its scalars; `close()` flushes the event files."""

    def __init__(self, workdir: str, run_id: str, write: bool = True):
        self.path, self.run_id, self.write = os.path.join(workdir, "metrics.jsonl"), run_id, write
        self.tensorboard_dir = os.path.join(workdir, "tensorboard")
        self.writers = {}

    def __call__(self, record: dict) -> None:
        if not self.write:  # another process of a multi-host run writes
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"run": self.run_id, **record}) + "\n")
        writer = self._writer(record["method"])
        for tag, value in scalars(record).items():
            writer.add_scalar(tag, value, global_step=int(record["round"]))
        writer.flush()

    def _writer(self, method: str):
        if method not in self.writers:
            from tensorboardX import SummaryWriter

            self.writers[method] = SummaryWriter(os.path.join(self.tensorboard_dir, method))
        return self.writers[method]

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
