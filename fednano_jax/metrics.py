"""Per-round metrics where researchers look: `metrics.jsonl` and TensorBoard event files beside it.

Every record (the untuned model's evaluation, then one per method and round) is appended
to `<workdir>/metrics.jsonl`, tagged with the run's start time, so rerunning into a workdir
keeps earlier runs' lines. Its numbers also go to TensorBoard through tensorboardX, one run
per method (`<workdir>/tensorboard/<method>`), stepped by round: a resumed run continues
its curves, and a study's cells (each its own workdir) are each their own runs under the
study's directory (`tensorboard --logdir=runs/...`). A run's seconds by phase (`Phases`) go to its
results.json and its last lines.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from fednano_jax.parallel.xla_stats import compile_clock

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
        if accuracy == accuracy:  # a client without test examples has no accuracy (NaN): no scalar
            out[f"client_accuracy/C{client + 1}"] = float(accuracy)
    return out


def process_age_seconds() -> float | None:
    """Seconds since this process started (Linux's /proc; None elsewhere): its interpreter start-up and imports."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Phases:
    """Wall seconds by phase (`mark(name)` closes the phase that ran since the last mark), and the seconds JAX spent
    compiling within them (`compile_clock().total`, so its share can be told apart)."""

    _first = True  # the first run of a process counts its start-up (imports included); a study's later runs do not

    def __init__(self):
        self.seconds: dict[str, float] = {}
        startup = process_age_seconds() if Phases._first else None
        Phases._first = False
        if startup is not None:
            self.seconds["start-up"] = startup
        self.last = time.perf_counter()
        self.compile_start = compile_clock().total

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now

    def move(self, seconds: float, source: str, phase: str) -> None:
        """Book `seconds` of `source` (a phase that ran others inside it) to `phase` instead."""
        self.seconds[source] -= seconds
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def report(self) -> dict:
        return {**{name: round(value, 2) for name, value in self.seconds.items()},
                "compilation_within": round(compile_clock().total - self.compile_start, 2),
                "total": round(sum(self.seconds.values()), 2)}

    def line(self) -> str:
        figures = self.report()
        parts = ", ".join(f"{name} {value:.1f}" for name, value in figures.items()
                          if name not in ("compilation_within", "total"))
        return (f"Seconds by phase: {parts} ({figures['compilation_within']:.1f} of them compiling); "
                f"{figures['total']:.0f} s in all")


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
