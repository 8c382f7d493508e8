"""The round loop: sample a cohort, local updates, (Fisher), aggregate, evaluate, log, checkpoint.

Every random choice is a pure function of (seed, round, client id), so a run resumed
from a round checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from fednano_jax import sharding
from fednano_jax.checkpoint import CheckpointMismatch, RoundCheckpoints
from fednano_jax.federated.client import make_client_updates
from fednano_jax.federated.fisher import make_client_fishers
from fednano_jax.federated.methods import Method
from fednano_jax.federated.server import ClientUploads, aggregate_uploads, reporting_clients

OPTIMIZERS = {"adamw": lambda lr: optax.adamw(lr, weight_decay=0.0), "sgd": optax.sgd, "adam": optax.adam}


def steps_per_round(client_rows: list[np.ndarray], batch_size: int, epochs: int) -> int:
    """Local steps of the largest client: every client's schedule is padded to it, every round,
    so the round program compiles once."""
    return max(-(-len(r) // batch_size) for r in client_rows) * epochs


def client_schedule(client_rows: list[np.ndarray], batch_size: int, epochs: int, seed: int, round_index: int,
                    steps: int | None = None, client_ids=None):
    """-> rows, valid [K, steps, batch]: each client's shuffled epochs, padded with invalid steps.

    Shuffling depends only on (seed, round, client id), never on which clients share the round.
    """
    steps = steps or steps_per_round(client_rows, batch_size, epochs)
    client_ids = range(len(client_rows)) if client_ids is None else client_ids
    rows = np.zeros((len(client_rows), steps, batch_size), np.int32)
    valid = np.zeros_like(rows, bool)
    for k, (client_id, client) in enumerate(zip(client_ids, client_rows)):
        rng = np.random.default_rng([seed, round_index, int(client_id)])
        batches = []
        for _ in range(epochs):
            order = rng.permutation(client)
            padded = np.full(-(-len(order) // batch_size) * batch_size, -1)
            padded[: len(order)] = order
            batches.append(padded.reshape(-1, batch_size))
        client_batches = np.concatenate(batches)
        rows[k, : len(client_batches)] = np.maximum(client_batches, 0)
        valid[k, : len(client_batches)] = client_batches >= 0
    return rows, valid


def sample_cohort(num_clients: int, cohort_size: int, seed: int, round_index: int) -> np.ndarray:
    """Sorted ids of the clients taking part in a round (all of them when cohort_size is 0)."""
    if cohort_size in (0, num_clients):
        return np.arange(num_clients)
    rng = np.random.default_rng([seed, round_index, 0xC0])
    return np.sort(rng.choice(num_clients, size=cohort_size, replace=False))


def make_optimizer(fed) -> optax.GradientTransformation:
    if fed.optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown fed.optimizer {fed.optimizer!r}; expected one of {sorted(OPTIMIZERS)}.")
    return OPTIMIZERS[fed.optimizer](fed.learning_rate)


@dataclasses.dataclass
class RunResult:
    state: dict  # {"global": adapters} and, for LocFT / FedDPA-F, {"personal": stacked client adapters}
    history: list[dict]


def _stack(tree, count: int):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (count,) + x.shape), tree)


def _to_pure(state: dict) -> dict:
    return {k: nnx.to_pure_dict(v) for k, v in state.items()}


def _resume(checkpoints: RoundCheckpoints | None, init_state: dict, rounds: int):
    """-> (first round to run, state, history) from the latest checkpoint, if any."""
    restored = checkpoints.restore_latest(_to_pure(init_state)) if checkpoints else None
    if restored is None:
        return 0, init_state, []
    done, pure, history = restored
    if done > rounds:
        raise CheckpointMismatch(f"The checkpoint in {checkpoints.directory} is at round {done}, beyond "
                                 f"fed.rounds={rounds}; raise fed.rounds or use another --workdir.")
    state = {}
    for key, template in init_state.items():
        state[key] = jax.tree.map(lambda x: x, template)
        nnx.replace_by_pure_dict(state[key], pure[key])
    print(f"Resuming from round {done} of {rounds} ({checkpoints.directory})")
    return done, state, history


def training_clients(method: Method, client_rows: list[np.ndarray]) -> list[np.ndarray]:
    """The row sets trained as clients: Centralized pools every client's data into one (the upper bound)."""
    return [np.concatenate(client_rows)] if method.pooled else client_rows


def adapter_bytes(adapters) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(adapters))


@dataclasses.dataclass(frozen=True)
class RoundPrograms:
    """The jitted programs one method's rounds run, compiled once per run."""

    update_clients: Callable  # (start, frozen, data, rows, valid) -> (adapters [K], losses [K], squares [K] | None)
    extra_fisher: Callable | None  # FedNano's extra pass
    aggregate: Callable | None  # (uploads, reporting, previous global) -> (global, used)


def compile_programs(method: Method, graphdef, fed, mesh: Mesh | None = None) -> RoundPrograms:
    """With a mesh (vmap mode), clients run sharded over its `clients` axis (see sharding.py)."""
    personal = method.personal == "local"
    vmapped, sequential = make_client_updates(graphdef, make_optimizer(fed), method.local_options(fed), personal)
    extra_fisher = make_client_fishers(graphdef) if method.fisher == "extra_pass" else None
    if mesh is not None and fed.mode == "vmap":
        vmapped = sharding.sharded_client_program(vmapped, mesh, (3, 4, 0) if personal else (3, 4))
        if extra_fisher is not None:
            extra_fisher = sharding.sharded_client_program(extra_fisher, mesh, (3, 4, 0))
    aggregate = None
    if method.aggregate is not None:
        aggregate = jax.jit(functools.partial(aggregate_uploads, lambda a, f, n: method.aggregate(a, f, n, fed)))
    return RoundPrograms(vmapped if fed.mode == "vmap" else sequential, extra_fisher, aggregate)


def _local_round(programs: RoundPrograms, state: dict, frozen, device_data, cohort, rows, valid):
    """LocFT: each client continues its own adapters; nothing is sent."""
    own = jax.tree.map(lambda x: x[cohort], state["personal"])
    trained, losses, _ = programs.update_clients(own, frozen, device_data, rows, valid)
    personal = jax.tree.map(lambda x, t: x.at[cohort].set(t), state["personal"], trained)
    return {**state, "personal": personal}, losses, np.ones(len(cohort), bool)


def _federated_round(programs: RoundPrograms, state: dict, frozen, device_data, rows, valid, fisher_schedule,
                     counts, reporting):
    """Local updates from the global adapters, (Fisher), uploads, aggregation of the reporting clients."""
    trained, losses, fishers = programs.update_clients(state["global"], frozen, device_data, rows, valid)
    if programs.extra_fisher is not None:
        fishers = programs.extra_fisher(trained, frozen, device_data, *fisher_schedule())
    uploads = ClientUploads(trained, fishers, jnp.asarray(counts))
    new_global, used = programs.aggregate(uploads, jnp.asarray(reporting), state["global"])
    return {**state, "global": new_global}, losses, sharding.to_host(used)


def run_federated(method: Method, graphdef, frozen, init_adapters, device_data: dict,
                  client_rows: list[np.ndarray], config, evaluator, log: Callable,
                  checkpoints: RoundCheckpoints | None = None, mesh: Mesh | None = None) -> RunResult:
    fed = config.fed
    train_rows = training_clients(method, client_rows)
    programs = compile_programs(method, graphdef, fed, mesh)
    if mesh is not None:
        frozen = sharding.place(frozen, sharding.backbone_shardings(frozen, mesh, sharding.mesh_config_of(config)))
        device_data, init_adapters = sharding.place((device_data, init_adapters), sharding.replicated(mesh))
    num_examples = np.array([len(r) for r in train_rows])
    train_steps = steps_per_round(train_rows, fed.batch_size, fed.local_epochs)
    fisher_steps = steps_per_round(train_rows, fed.batch_size, 1)
    upload_bytes = method.uploads * adapter_bytes(init_adapters)

    init_state = {"global": init_adapters}
    if method.personal != "none":
        init_state["personal"] = _stack(init_adapters, len(client_rows))
    first, state, history = _resume(checkpoints, init_state, fed.rounds)
    for round_index in tqdm(range(first, fed.rounds), desc=f"{method.label} rounds", unit="round",
                            initial=first, total=fed.rounds):
        start = time.perf_counter()
        cohort = sample_cohort(len(train_rows), 0 if method.pooled else fed.clients_per_round, config.seed,
                               round_index)
        rows_of = [train_rows[k] for k in cohort]
        schedule = functools.partial(client_schedule, rows_of, fed.batch_size, seed=config.seed,
                                     round_index=round_index, client_ids=cohort)
        rows, valid = schedule(fed.local_epochs, steps=train_steps)
        if method.personal == "local":
            state, losses, used = _local_round(programs, state, frozen, device_data, cohort, rows, valid)
            reporting = used
        else:
            reporting = (np.ones(len(cohort), bool) if method.pooled
                         else reporting_clients(len(cohort), fed.dropout, config.seed, round_index))
            state, losses, used = _federated_round(programs, state, frozen, device_data, rows, valid,
                                                   lambda: schedule(1, steps=fisher_steps), num_examples[cohort],
                                                   reporting)
        last = round_index + 1 == fed.rounds
        if last and method.personal == "dpa":
            state["personal"] = _local_finetune(programs.update_clients, state["global"], frozen, device_data,
                                                client_rows, fed, config.seed, round_index + 1)
        record = {"method": method.name, "round": round_index + 1, "clients": cohort.tolist(),
                  "dropped": cohort[~reporting].tolist(), "non_finite": cohort[reporting & ~used].tolist(),
                  "train_loss": sharding.to_host(losses).tolist(), "uploaded_bytes": int(upload_bytes * reporting.sum()),
                  "round_seconds": time.perf_counter() - start}
        _warn_about_faults(record, used)
        if last or (config.eval.every_rounds and (round_index + 1) % config.eval.every_rounds == 0):
            record.update(_evaluate(method, evaluator, state, client_rows, last))
        history.append(record)
        log(record)
        if checkpoints and (last or (round_index + 1) % config.checkpoint.every_rounds == 0):
            checkpoints.save(round_index + 1, _to_pure(state), history)
    return RunResult(state, history)


def _warn_about_faults(record: dict, used: np.ndarray) -> None:
    if record["non_finite"]:
        tqdm.write(f"Round {record['round']}: left out clients {record['non_finite']}, whose update was not finite.")
    if not used.any():
        tqdm.write(f"Round {record['round']}: no client reported; the global adapters are unchanged.")


def _local_finetune(update_clients, global_adapters, frozen, device_data, client_rows, fed, seed, round_index):
    """FedDPA-F's local phase: every client fine-tunes its own adapter from the final global one."""
    rows, valid = client_schedule(client_rows, fed.batch_size, fed.dpa_local_epochs, seed, round_index)
    local, _, _ = update_clients(global_adapters, frozen, device_data, rows, valid)
    return local


def _evaluate(method: Method, evaluator, state: dict, client_rows, last: bool) -> dict:
    # The evaluator decodes on one device with the unplaced backbone; adapters trained on a mesh come to the host
    # first (they are small), so its programs never mix one-device and mesh arrays.
    state = jax.tree.map(sharding.to_host, state)
    if method.personal == "local":
        return evaluator.personal(state["personal"])
    if method.personal == "dpa" and last:
        return evaluator.dpa(state["global"], state["personal"], client_rows)
    return evaluator.shared(state["global"])
