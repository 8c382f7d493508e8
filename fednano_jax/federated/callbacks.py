"""What happens after each round, as callbacks (pfl's `after_central_iteration`): the round driver
(`rounds.run_method`) trains and aggregates; these add to the round's record, report, evaluate, log and
checkpoint. Each is `callback(run, state, record, last)`; they run in the order given, on the host.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
from tqdm import tqdm

from fednano_jax.federated.checkpoints import RoundCheckpoints
from fednano_jax.parallel import mesh as meshes
from fednano_jax.privacy import dp as client_dp


def dp_accounting(dp: client_dp.DpSettings | None) -> Callable:
    """Under client-level DP: the guarantee so far (ε at δ), the clip norm the next round uses, and the noise this
    round put on the mean update (std per adapter entry, and its norm over all of them, to set against C)."""

    def after_round(run, state, record, last):
        if dp is None:
            return
        server = state["server"]
        clip_norm = float(meshes.to_host(server[client_dp.STATE]["clip_norm"]))
        adapters = jax.tree.map(meshes.to_host, server["adapters"])
        bounds = run.method.dp_bounds(record["round_clip_norm"], adapters)
        std = client_dp.mean_update_noise(dp, bounds, run.method.unweighted, record["round"] - 1)
        entries = sum(x.size for x in jax.tree.leaves(adapters))
        record.update(epsilon=dp.epsilon(record["round"]), delta=dp.delta, noise_multiplier=dp.noise_multiplier,
                      clip_norm=clip_norm,
                      update_noise_std=std, update_noise_norm=std * entries ** 0.5)

    return after_round


def fault_report(run, state, record, last) -> None:
    """Say which clients' updates were left out, and when no client reported at all."""
    for client, reason in zip(record.get("failed", []), record.get("failures", [])):
        tqdm.write(f"Round {record['round']}: client {client}'s update failed and is left out: {reason}")
    if record["non_finite"]:
        tqdm.write(f"Round {record['round']}: left out clients {record['non_finite']}, whose update was not finite.")
    if not record["used"]:
        tqdm.write(f"Round {record['round']}: no client reported; the global adapters are unchanged.")


def evaluation(evaluator, every_rounds: int) -> Callable:
    """The method's evaluation every `every_rounds` rounds (0: only after the last) and after the last."""

    def after_round(run, state, record, last):
        if last or (every_rounds and record["round"] % every_rounds == 0):
            started = time.perf_counter()
            host_server = jax.tree.map(meshes.to_host, state["server"])
            record.update(run.method.evaluate(evaluator, host_server, state["clients"], last))
            record["eval_seconds"] = time.perf_counter() - started

    return after_round


def metrics(history: list, log: Callable) -> Callable:
    """The record into the run's history and its log (metrics.jsonl, TensorBoard: `metrics.MetricsLog`)."""

    def after_round(run, state, record, last):
        history.append(record)
        log(record)

    return after_round


def checkpointing(checkpoints: RoundCheckpoints | None, every_rounds: int, history: list,
                  checkpointed: Callable) -> Callable:
    """A round checkpoint (state and history) every `every_rounds` rounds and after the last."""

    def after_round(run, state, record, last):
        if checkpoints and (last or record["round"] % every_rounds == 0):
            checkpoints.save(record["round"], checkpointed(state), history)

    return after_round
