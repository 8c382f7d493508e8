"""The round loop: sample a cohort, local updates, uploads, server update, evaluate, log, checkpoint.

It names no method and imports none: what a method does enters through its hooks (`methods/base.py`).
Every random choice is a pure function of (seed, round, client id) (`schedule`, `server`),
so a run resumed from a round checkpoint continues exactly as the uninterrupted run
would have. Server state lives on the device (replicated on a mesh); client state, one
row per client, lives on the host and only the cohort's rows enter a round.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from fednano_jax.errors import CheckpointMismatch, ClientProcessError, ConfigError
from fednano_jax.federated import callbacks
from fednano_jax.federated.checkpoints import RoundCheckpoints
from fednano_jax.federated.client import ClientInputs, in_chunks, make_client_programs, make_packed_program
from fednano_jax.federated.packing import packed_schedule
from fednano_jax.federated.schedule import client_schedule, round_cohort, steps_per_epoch
from fednano_jax.federated.secure import secure_sums
from fednano_jax.federated.server import (Aggregation, ClientUploads, client_contributions, finalize_round,
                                          reporting_clients, server_round)
from fednano_jax.models.adapter_ranks import client_ranks, rank_bytes, stacked_masks
from fednano_jax.federated.server_optimizer import init_state as init_server_optimizer, server_optimizer
from fednano_jax.parallel import mesh as meshes
from fednano_jax.parallel.xla_stats import compile_clock
from fednano_jax.privacy import dp as client_dp
from fednano_jax.privacy.secagg import majority_threshold
from fednano_jax.settings import MASKED, POISSON
from fednano_jax.streams import Purpose

OPTIMIZERS = {
    "adamw": lambda fed: optax.adamw(fed.learning_rate, weight_decay=fed.weight_decay),
    "adam": lambda fed: optax.adam(fed.learning_rate),
    "sgd": lambda fed: optax.sgd(fed.learning_rate),
}


def make_optimizer(fed) -> optax.GradientTransformation:
    """The client optimizer, re-initialised every round (`fed.optimizer`, `fed.learning_rate`, `fed.weight_decay`)."""
    return OPTIMIZERS[fed.optimizer](fed)


@dataclasses.dataclass
class RunResult:
    server: dict  # the method's final server state ({"adapters": global adapters, ...})
    clients: Any  # its client states [N, ...] on the host, or None
    history: list[dict]


@dataclasses.dataclass(frozen=True)
class RoundPrograms:
    """The jitted programs one method's rounds run, compiled once per run."""

    local: Callable  # (frozen, data, broadcast, ClientInputs [K]) -> ClientOutputs [K]
    # (server state, ClientUploads [K], reporting [K], noise key, clients' noise keys) -> (server state, used [K])
    server: Callable
    plain_local: Callable  # local training without the method's hooks, for its after_rounds phase
    packed: Callable  # (frozen, data, broadcast, PackedLanes [L]) -> ClientOutputs [L, P] (fed.pack_clients)
    # The server program in two halves, for sums added up elsewhere (secure aggregation):
    contribute: Callable  # (server state, uploads, reporting, clients' noise keys) -> (contributions [K], used [K])
    finalize: Callable  # (server state, sums, clients summed, noise key) -> server state


def compile_programs(method, graphdef, fed, epoch_steps: int, mesh: Mesh | None = None,
                     aggregation: Aggregation = Aggregation(), public_weight=None) -> RoundPrograms:
    """With a mesh (vmap mode), clients run sharded over its `clients` axis (see parallel/mesh.py).
    `aggregation`: rank masks and DP; `public_weight`: under DP with rank masks, q Σ_all w_k m_k."""
    optimizer = make_optimizer(fed)
    devices = mesh.shape[meshes.CLIENTS] if mesh is not None else 1

    def client_program(hooks):
        vmapped, sequential = make_client_programs(graphdef, optimizer, hooks, epoch_steps,
                                                   fed.client_chunk, devices, hooks.extra_pass_examples)
        if fed.mode == "sequential":
            return sequential
        return meshes.sharded_client_program(vmapped, mesh) if mesh is not None else jax.jit(vmapped)

    packed = in_chunks(make_packed_program(graphdef, optimizer, method), fed.client_chunk, devices)
    packed = meshes.sharded_client_program(packed, mesh) if mesh is not None else jax.jit(packed)
    stepper = server_optimizer(fed, method)
    server = jax.jit(functools.partial(server_round, method, optimizer=stepper, aggregation=aggregation,
                                       public_weight=public_weight))
    contribute = jax.jit(lambda state, uploads, reporting, client_keys: client_contributions(
        method, state, uploads, reporting, aggregation, client_keys))
    finalize = jax.jit(lambda state, sums, used_count, key: finalize_round(
        method, state, sums, used_count, aggregation, key, stepper, public_weight))
    return RoundPrograms(client_program(method), server, client_program(method.plain()), packed, contribute,
                         finalize)


def _stack(tree, count: int):
    return None if tree is None else jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (count,) + x.shape), tree)


def _rows(tree, index):
    return None if tree is None else jax.tree.map(lambda x: x[index], tree)


def _finite_rows(tree, count: int) -> np.ndarray:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return np.ones(count, bool)
    return np.stack([np.isfinite(x).reshape(count, -1).all(axis=1) for x in leaves]).all(axis=0)


def _set_rows(tree, index, keep: np.ndarray, new):
    """`tree` with rows `index[keep]` replaced by the matching rows of `new` (a copy; None stays None)."""
    if tree is None:
        return None

    def one(old, update):
        out = np.array(old)
        out[index[keep]] = np.asarray(update)[keep]
        return out

    return jax.tree.map(one, tree, new)


def _resume(checkpoints: RoundCheckpoints | None, init_state: dict, rounds: int):
    """-> (first round to run, state, history) from the latest checkpoint, if any."""
    restored = checkpoints.restore_latest(_checkpointed(init_state)) if checkpoints else None
    if restored is None:
        return 0, init_state, []
    done, state, history = restored
    if done > rounds:
        raise CheckpointMismatch(f"The checkpoint in {checkpoints.directory} is at round {done}, beyond "
                                 f"fed.rounds={rounds}; raise fed.rounds or use another --workdir.")
    print(f"Resuming from round {done} of {rounds} ({checkpoints.directory})")
    return done, {"server": state["server"], "clients": state["clients"] if "clients" in state else None}, history


@dataclasses.dataclass
class RunContext:
    """Everything a method's rounds share: the method, its programs, the placed backbone and data, the clients."""

    method: Any  # methods/base.py's Method
    programs: RoundPrograms
    frozen: Any
    data: dict
    train_rows: list[np.ndarray]
    num_examples: np.ndarray
    epoch_steps: int
    config: Any
    mesh: Mesh | None
    ranks: np.ndarray | None = None  # [N] each client's adapter rank (model.adapter.client_ranks), or None
    aggregation: Aggregation = Aggregation()
    upload_bytes: list | None = None  # [N] bytes each client uploads per round
    # Each client in its own process, its wire to a split-step server (serving/client_processes.ClientProcesses);
    # None: the clients are this program's.
    remote: Any = None

    def cohort_ranks(self, cohort: np.ndarray):
        return None if self.ranks is None else self.ranks[cohort]

    def place_replicated(self, tree):
        return meshes.place(tree, meshes.replicated(self.mesh)) if self.mesh is not None else tree

    def schedule(self, client_ids, epochs: int, round_index: int, purpose: Purpose = Purpose.SHUFFLE):
        rows = [self.train_rows[k] for k in client_ids]
        return client_schedule(rows, self.config.fed.batch_size, epochs, self.config.seed, round_index,
                               client_ids, self.epoch_steps, purpose)

    def local_trainer(self, start, epochs: int):
        """Every client's plain local training from `start` -> their adapters [N, ...] on the host."""
        ids = np.arange(len(self.train_rows))
        rows, valid = self.schedule(ids, epochs, 0, Purpose.LOCAL_PHASE)
        if self.remote is not None:
            outputs, failures, _ = self.remote.local_updates(self.method.name, True, self.epoch_steps,
                                                             {"adapters": start}, ids, ClientInputs(rows, valid, None))
            _raise_failures(failures, ids.tolist())
            return outputs.upload["adapters"]
        outputs = self.programs.plain_local(self.frozen, self.data, {"adapters": self.place_replicated(start)},
                                            ClientInputs(rows, valid, None))
        return jax.tree.map(meshes.to_host, outputs.upload["adapters"])


def run_round(run: RunContext, state: dict, cohort: np.ndarray, round_index: int,
              sampled: np.ndarray | None = None) -> tuple[dict, dict]:
    """One round of the method over `cohort` -> (new state, the round's record): broadcast, local updates,
    uploads of the clients that report, aggregation; after the last round, the method's phase after the rounds.
    `sampled` [K]: the slots that hold a sampled client (Poisson cohorts fill the program's slots with clients
    that take no part); None: all."""
    method, fed, config = run.method, run.config.fed, run.config
    started = time.perf_counter()
    dp_state = state["server"].get(client_dp.STATE)
    clip_norm = {} if dp_state is None else {"round_clip_norm": float(meshes.to_host(dp_state["clip_norm"]))}
    broadcast = run.place_replicated(method.broadcast(state["server"]))
    summed = None
    try:
        if adds_remotely(run):
            outputs, steps, failures, summed = remote_secure_round(run, state["server"], cohort,
                                                                   _rows(state["clients"], cohort), round_index)
        else:
            outputs, steps, failures = local_updates(run, cohort, broadcast, _rows(state["clients"], cohort),
                                                     round_index)
    except ClientProcessError as error:
        raise ClientProcessError(f"Round {round_index + 1} failed: {error}; the rounds before it stand (with "
                                 "checkpoint.every_rounds set, rerunning the same command resumes after the last "
                                 "checkpoint).") from None
    # A method that sends nothing (LocFT, Centralized) has nothing to lose to a dropped connection.
    reporting = (reporting_clients(cohort, fed.dropout, config.seed, round_index) if method.uploads
                 else np.ones(len(cohort), bool))
    failed = np.array([reason is not None for reason in failures.get("reasons", [None] * len(cohort))], bool)
    sampled = np.ones(len(cohort), bool) if sampled is None else sampled
    reporting &= ~failed & sampled
    if summed is not None:
        server, used, cost = summed
    else:
        server, used, cost = aggregate(run, state["server"], outputs.upload, cohort, reporting, round_index)
    new_client_states = jax.tree.map(meshes.to_host, outputs.state)
    used = used & _finite_rows(new_client_states, len(cohort))
    state = {"server": server, "clients": _set_rows(state["clients"], cohort, used, new_client_states)}
    last = round_index + 1 == fed.rounds
    if last:
        state["clients"] = method.after_rounds(state["server"], state["clients"], run.local_trainer)
    jax.block_until_ready(state["server"])
    record = {"method": method.name, "round": round_index + 1, "clients": cohort[sampled].tolist(),
              "dropped": cohort[sampled & ~reporting].tolist(), "non_finite": cohort[reporting & ~used].tolist(),
              "used": cohort[used].tolist(), "train_loss": meshes.to_host(outputs.loss)[sampled].tolist(),
              **steps, **cost,
              "uploaded_bytes": int(sum(run.upload_bytes[k] for k in cohort[reporting])),
              "round_seconds": time.perf_counter() - started, **clip_norm, **_process_record(cohort, failed, failures)}
    return state, record


def _process_record(cohort: np.ndarray, failed: np.ndarray, failures: dict) -> dict:
    """With client processes: who failed and why, each client's bytes on the split link and upload, and on Flower
    each client's start-up (its ClientApp process until NanoEdge and the data are loaded) and training seconds."""
    if not failures:
        return {}
    traffic = failures["traffic"]
    timed = {f"client_{key}_seconds": [t.get(f"{key}_ms", 0) / 1000 for t in traffic]  # Flower's clients time both
             for key in ("start", "train") if any(f"{key}_ms" in t for t in traffic)}
    return {"failed": cohort[failed].tolist(), "failures": [r for r in failures["reasons"] if r is not None],
            **{f"{key}_bytes": [t.get(key, 0) for t in traffic]
               for key in ("split_sent", "split_received", "upload", "peak_rss")}, **timed}


def aggregate(run: RunContext, server_state, uploaded, cohort: np.ndarray, reporting: np.ndarray, round_index: int):
    """The cohort's uploads -> (new server state, used [K], the protocol's costs): one server program, or, under
    secure aggregation, its two halves around the secure sum (only masked vectors leave the clients)."""
    ranks = run.cohort_ranks(cohort)
    uploads = ClientUploads(uploaded, jnp.asarray(run.num_examples[cohort]),
                            None if ranks is None else jnp.asarray(ranks))
    dp, seed = run.aggregation.dp, run.config.seed
    key = client_dp.noise_key(dp, seed, round_index) if dp is not None else None
    client_keys = client_dp.client_noise_keys(seed, round_index, cohort) if dp is not None and dp.distributed else None
    if not run.config.fed.secure_aggregation:
        server, used = run.programs.server(server_state, uploads, jnp.asarray(reporting), key, client_keys)
        return server, meshes.to_host(used), {}
    stacked, used = run.programs.contribute(server_state, uploads, jnp.asarray(reporting), client_keys)
    threshold = run.config.fed.secagg_threshold or majority_threshold(len(cohort))
    sums, used, cost = secure_sums(jax.tree.map(meshes.to_host, stacked), meshes.to_host(used), cohort,
                                   threshold, seed, round_index)
    if sums is None:
        return server_state, used, cost
    return run.programs.finalize(server_state, sums, jnp.asarray(used.sum()), key), used, cost


def adds_remotely(run: RunContext) -> bool:
    """Secure aggregation by the clients themselves (Flower's SecAgg+ among the SuperNodes)."""
    return getattr(run.remote, "adds_securely", False) and run.config.fed.secure_aggregation


def remote_secure_round(run: RunContext, server_state, cohort: np.ndarray, states, round_index: int):
    """A round whose clients train, compute their own contributions and add them up under secure aggregation
    (`flower/supernodes.py`) -> (ClientOutputs [K], steps, failures, (new server state, used [K], costs)): the
    server program's second half (`finalize`) sees only the sum."""
    fed, dp = run.config.fed, run.aggregation.dp
    rows, valid = run.schedule(cohort, fed.local_epochs, round_index)
    threshold = fed.secagg_threshold or majority_threshold(len(cohort))
    outputs, reasons, traffic, sums, used, cost = run.remote.secure_updates(
        run.method.name, run.epoch_steps, jax.tree.map(meshes.to_host, server_state), cohort,
        ClientInputs(rows, valid, states, run.cohort_ranks(cohort)), round_index, threshold)
    server = server_state
    if sums is not None:
        key = client_dp.noise_key(dp, run.config.seed, round_index) if dp is not None else None
        server = run.programs.finalize(server_state, sums, jnp.asarray(used.sum()), key)
    steps = {"client_steps": int(valid.any(axis=2).sum()), "padded_client_steps": len(cohort) * rows.shape[1]}
    return outputs, steps, {"reasons": reasons, "traffic": traffic}, (server, used, cost)


def packs_clients(fed) -> bool:
    return fed.pack_clients and fed.mode != "sequential"


def local_updates(run: RunContext, cohort: np.ndarray, broadcast, states, round_index: int):
    """The cohort's local training -> (ClientOutputs [K] in cohort order, {client_steps, padded_client_steps}:
    steps the clients really take, and the steps the round's programs run, padding included, and with client
    processes {reasons: why each client failed, or None, and each one's traffic})."""
    fed = run.config.fed
    if run.remote is not None:
        rows, valid = run.schedule(cohort, fed.local_epochs, round_index)
        outputs, reasons, traffic = run.remote.local_updates(
            run.method.name, False, run.epoch_steps, broadcast, cohort,
            ClientInputs(rows, valid, states, run.cohort_ranks(cohort)))
        steps = int(valid.any(axis=2).sum())
        return outputs, {"client_steps": steps, "padded_client_steps": len(cohort) * rows.shape[1]}, \
            {"reasons": reasons, "traffic": traffic}
    if not packs_clients(fed):
        rows, valid = run.schedule(cohort, fed.local_epochs, round_index)
        outputs = run.programs.local(run.frozen, run.data, broadcast,
                                     ClientInputs(rows, valid, states, run.cohort_ranks(cohort)))
        lanes = meshes.padded_cohort(len(cohort), run.mesh) if run.mesh is not None else len(cohort)
        return outputs, {"client_steps": int(valid.any(axis=2).sum()), "padded_client_steps": lanes * rows.shape[1]}, {}
    devices = run.mesh.shape[meshes.CLIENTS] if run.mesh is not None else 1
    packed = packed_schedule([run.train_rows[k] for k in cohort], fed.batch_size, fed.local_epochs, run.config.seed,
                             round_index, cohort, run.method.extra_pass_examples, devices, fed.pack_padding,
                             states, run.cohort_ranks(cohort))
    outputs = run.programs.packed(run.frozen, run.data, broadcast, packed.lanes)
    order = packed.order()
    outputs = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[order], outputs)
    return outputs, {"client_steps": packed.client_steps, "padded_client_steps": packed.padded_client_steps}, {}


def _raise_failures(reasons: list, ids: list[int]) -> None:
    """The local phase after the rounds needs every client: any failure stops it with their sentences."""
    failed = [f"client {k}: {reason}" for k, reason in zip(ids, reasons) if reason is not None]
    if failed:
        raise ClientProcessError(f"the local phase needs every client, and {len(failed)} failed ({'; '.join(failed)})")


def run_method(method, graphdef, frozen, init_adapters, device_data: dict, client_rows: list[np.ndarray],
               config, evaluator, log: Callable, checkpoints: RoundCheckpoints | None = None,
               mesh: Mesh | None = None, remote=None) -> RunResult:
    """The method's rounds: `state, record = run_round(run, state, cohort)`, then the callbacks. `remote`: the
    clients' processes (`RunContext.remote`), or None."""
    init_adapters = nnx.to_pure_dict(init_adapters) if isinstance(init_adapters, nnx.State) else init_adapters
    run = run_context(method, graphdef, frozen, init_adapters, device_data, client_rows, config, mesh)
    run.remote = remote
    fed = config.fed
    if remote is not None and fed.cohort_sampling == POISSON:
        raise ConfigError("fed.cohort_sampling='poisson' fills the round's client slots with clients that take no "
                          "part, which client processes do not model; use 'fixed' or 'cyclic'.")
    init_state = {"server": jax.tree.map(np.asarray, initial_server_state(method, fed, init_adapters,
                                                                          run.aggregation.dp)),
                  "clients": _stack(method.client_state_init(init_adapters), len(run.train_rows))}
    first, state, history = _resume(checkpoints, init_state, fed.rounds)
    state["server"] = run.place_replicated(state["server"])
    after_round = [callbacks.dp_accounting(run.aggregation.dp), callbacks.fault_report,
                   callbacks.evaluation(evaluator, config.eval.every_rounds), callbacks.metrics(history, log),
                   callbacks.checkpointing(checkpoints, config.checkpoint.every_rounds, history, _checkpointed)]
    clock = compile_clock()
    for round_index in tqdm(range(first, fed.rounds), desc=f"{method.label} rounds", unit="round",
                            initial=first, total=fed.rounds):
        clock.take()
        cohort, sampled = (np.zeros(1, np.int64), np.ones(1, bool)) if method.pooled else round_cohort(
            fed, len(run.train_rows), config.seed, round_index)
        state, record = run_round(run, state, cohort, round_index, sampled)
        record["compile_seconds"] = clock.take()
        record["round_seconds"] -= record["compile_seconds"]
        for callback in after_round:
            callback(run, state, record, round_index + 1 == fed.rounds)
    return RunResult(jax.tree.map(meshes.to_host, state["server"]), state["clients"], history)


def run_context(method, graphdef, frozen, init_adapters, device_data: dict, client_rows: list[np.ndarray], config,
                mesh: Mesh | None) -> RunContext:
    """What the method's rounds share: its clients' rows and weights, DP settings, compiled programs, the placed
    backbone and data. `init_adapters`: a pure dict."""
    fed = config.fed
    train_rows = [np.concatenate(client_rows)] if method.pooled else client_rows
    epoch_steps = steps_per_epoch(train_rows, fed.batch_size)
    ranks = None if method.pooled else client_ranks(config.model.adapter, len(train_rows))
    weights = np.array([method.client_weight(len(r)) for r in train_rows], np.float64)
    dp = client_dp.settings(fed, weights)
    aggregation = Aggregation(fed.rank_aggregation, dp)
    programs = compile_programs(method, graphdef, fed, epoch_steps, mesh, aggregation,
                                public_weight(dp, init_adapters, weights, ranks, aggregation.rank_aggregation))
    if mesh is not None:
        frozen = meshes.place_backbone(frozen, mesh, config.mesh)  # a no-op once placed
        device_data = meshes.place(device_data, meshes.replicated(mesh))
    own_ranks = ranks.tolist() if ranks is not None else [None] * len(train_rows)
    upload_bytes = [len(method.uploads) * rank_bytes(init_adapters, rank) for rank in own_ranks]  # per client
    return RunContext(method, programs, frozen, device_data, train_rows, np.array([len(r) for r in train_rows]),
                      epoch_steps, config, mesh, ranks, aggregation, upload_bytes)


def initial_server_state(method, fed, adapters, dp: client_dp.DpSettings | None) -> dict:
    """The method's server state before round one, with the server optimizer's and DP's state."""
    return client_dp.init_state(dp, init_server_optimizer(server_optimizer(fed, method), method.server_init(adapters)))


def public_weight(dp, adapters, weights: np.ndarray, ranks: np.ndarray | None, rank_aggregation: str):
    """Under DP with rank masks, the expected sum of the public per-entry weights, q Σ_all w_k m_k (the sum the
    server divides by); None otherwise (DP's scalar q Σ_all w_k)."""
    if dp is None or ranks is None or rank_aggregation != MASKED:
        return None
    masks = stacked_masks(adapters, jnp.asarray(ranks))
    return jax.tree.map(lambda m: dp.sampling_probability * jnp.tensordot(jnp.asarray(weights, jnp.float32),
                                                                           m.astype(jnp.float32), axes=1), masks)


def _checkpointed(state: dict) -> dict:
    """The state as orbax stores it: host arrays; no entry for a method without client state."""
    saved = {"server": jax.tree.map(meshes.to_host, state["server"])}
    if state["clients"] is not None:
        saved["clients"] = state["clients"]
    return saved
