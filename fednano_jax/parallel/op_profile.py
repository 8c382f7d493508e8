"""Where a compiled program's time goes: jax.profiler's trace of a few runs, each XLA op's own time (its events'
time less the events nested in them), summed by kind of op.

The trace's op events sit on the threads that run them: on a CPU, XLA's Eigen pool (`tf_XLAEigen`) and the PjRt
threads that run a program (`tf_XLAPjRtCpuClient`); on a GPU or TPU, the device plane's "XLA Ops" line. A thread's
wait for a program to finish is left out: its time is waiting, not work. A kind is read from the op's name, whose
first word XLA takes from the fusion's root or first instruction (`copy_bitcast_fusion`, `add_divide_fusion`); on a
CPU, `ynn_fusion` is a dot (or a small reduction) XLA hands to YNNPACK.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time
from typing import Callable

import jax

MATMUL, LAYOUT, MOVEMENT, BROADCAST, REDUCE, CONTROL, EXECUTOR, ELEMENTWISE = (
    "matmul", "layout copy", "slice and update", "broadcast", "reduce", "control flow", "executor", "elementwise")
_FIRST_WORD = {"ynn": MATMUL, "dot": MATMUL, "convolution": MATMUL, "cutlass": MATMUL, "copy": LAYOUT,
               "transpose": LAYOUT, "dynamic-update-slice": MOVEMENT, "dynamic-slice": MOVEMENT, "slice": MOVEMENT,
               "gather": MOVEMENT, "scatter": MOVEMENT, "concatenate": MOVEMENT, "pad": MOVEMENT,
               "broadcast": BROADCAST, "reduce": REDUCE, "while": CONTROL, "call": CONTROL, "conditional": CONTROL}


def kind_of(op: str) -> str:
    """The kind of an XLA op from its name in the trace: the first word that is not `bitcast` (free), `wrapped` (a
    lone op in a fusion of its own) or `fusion`."""
    if op.startswith("ThunkExecutor"):
        return EXECUTOR
    name = re.sub(r"\.\d+$", "", op).lstrip("%_")
    if "gemm" in name or "cublas" in name:
        return MATMUL
    words = [w for w in name.split("_") if w not in ("bitcast", "wrapped", "fusion")]
    return _FIRST_WORD.get(words[0] if words else name, ELEMENTWISE)


def _work_lines(data) -> list:
    """The lines ops run on: XLA's threads on a CPU (its Eigen pool, and the PjRt threads that run a program's
    small ops themselves), a device's "XLA Ops" line on a GPU or TPU."""
    return [line for plane in data.planes for line in plane.lines
            if line.name.startswith("tf_XLA") or (plane.name.startswith("/device:") and line.name == "XLA Ops")]


def is_op(name: str) -> bool:
    """An HLO op (`ynn_fusion.2`, `wrapped_tanh`, `while.160`), or the executor's own step; not the profiler's
    markers (`ThreadpoolListener::StartRegion`, `end: ynn_fusion`) nor a thread's wait for a program to finish."""
    return name == "ThunkExecutor::Execute" or re.fullmatch(r"[a-z][\w\-]*(\.\d+)*", name) is not None


def self_times(lines) -> collections.Counter:
    """Op name -> its own nanoseconds (nested events subtracted), over every line."""
    own = collections.Counter()
    for line in lines:
        events = sorted(((e.start_ns, e.end_ns, e.name) for e in line.events if is_op(e.name)),
                        key=lambda e: (e[0], -e[1]))
        stack: list[list] = []  # [end, name, nested ns, start]

        def close():
            end, name, nested, start = stack.pop()
            own[name] += (end - start) - nested
            if stack:
                stack[-1][2] += end - start

        for start, end, name in events:
            while stack and stack[-1][0] <= start:
                close()
            stack.append([end, name, 0, start])
        while stack:
            close()
    return own


def profile(run: Callable[[], object], runs: int = 5, directory: str | None = None, top: int = 12) -> dict:
    """Trace `runs` calls of `run` (already compiled and warm) -> seconds per run by kind and the `top` ops, summed
    over the threads or devices that ran them; the trace stays in `directory` (None: a temporary one)."""
    with tempfile.TemporaryDirectory() as scratch:
        where = directory or scratch
        with jax.profiler.trace(where):
            start = time.perf_counter()
            for _ in range(runs):
                jax.block_until_ready(run())
            traced = (time.perf_counter() - start) / runs
        traces = sorted(glob.glob(os.path.join(where, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
        own = self_times(_work_lines(jax.profiler.ProfileData.from_file(traces[-1])))
    by_kind = collections.Counter()
    for name, ns in own.items():
        by_kind[kind_of(name)] += ns
    total = sum(by_kind.values()) or 1
    return {"runs": runs, "traced_seconds_per_run": traced, "busy_seconds_per_run": total / 1e9 / runs,
            "by_kind": {kind: {"seconds_per_run": ns / 1e9 / runs, "share": ns / total}
                        for kind, ns in by_kind.most_common()},
            "top_ops": [{"op": name, "kind": kind_of(name), "seconds_per_run": ns / 1e9 / runs}
                        for name, ns in own.most_common(top)]}


def profile_table(report: dict) -> str:
    rows = [f"| {kind} | {1e3 * v['seconds_per_run']:.1f} | {100 * v['share']:.1f}% |"
            for kind, v in report["by_kind"].items()]
    return "\n".join([f"  profile of {report['runs']} vmapped rounds ({1e3 * report['traced_seconds_per_run']:.0f} ms "
                      f"each while traced): busy {1e3 * report['busy_seconds_per_run']:.0f} ms per round, summed over "
                      "the threads or devices that ran it", "| kind | ms per round | share |",
                      "|---|---:|---:|", *rows])
