"""A method's round programs with the abstract arguments a run calls them with: what `memory_plan` lowers.

`rounds.compile_programs` builds the programs; `round_programs` pairs each with arguments of the run's shapes
and shardings (`jax.ShapeDtypeStruct`s: no array is allocated), so a plan compiles exactly what a run would,
for a device that need not be here. It names no method: the hooks say what a client keeps and uploads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from fednano_jax.federated.client import ClientInputs, PackedLanes
from fednano_jax.federated.rounds import RoundPrograms, compile_programs, initial_server_state, packs_clients
from fednano_jax.federated.server import ClientUploads
from fednano_jax.parallel import mesh as meshes


def shape_of(shape, dtype, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def placed(tree, sharding):
    """Abstract arrays carrying the sharding the run gives them (one sharding, or a tree of them)."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: shape_of(x.shape, x.dtype, sharding), tree)
    return jax.tree.map(lambda x, s: shape_of(x.shape, x.dtype, s), tree, sharding)


def stacked(tree, count: int, sharding=None):
    return jax.tree.map(lambda x: shape_of((count,) + x.shape, x.dtype, sharding), tree)


@dataclasses.dataclass(frozen=True)
class AbstractRun:
    """A run as shapes: the placed backbone and data, the adapters, the mesh and the federation's sizes."""

    graphdef: Any
    frozen: Any  # the backbone, placed (abstract)
    data: dict  # the device dataset, placed (abstract)
    adapters: Any  # abstract adapters (unplaced)
    mesh: Mesh
    fed: Any  # settings.Fed
    train_rows: int  # federated training rows over all clients

    @property
    def everywhere(self):
        return meshes.replicated(self.mesh)

    def epoch_steps(self, method) -> int:
        """Local steps per epoch: the mean client's (the run pads to its largest; memory does not depend on it)."""
        rows = self.train_rows if method.pooled else self.train_rows // self.fed.num_clients
        return max(math.ceil(rows / self.fed.batch_size), 1)


def round_programs(method, run: AbstractRun) -> dict[str, Callable[[], jax.stages.Lowered]]:
    """The programs a run of `method` compiles, each lowered with the run's abstract arguments (call to lower):
    "local" (the cohort's local updates: one lane per client, or packed lanes), "server" (the aggregation, when
    the method uploads anything), "local_phase" (its plain local training after the rounds, if it has one)."""
    programs = compile_programs(method, run.graphdef, run.fed, run.epoch_steps(method), run.mesh)
    cohort = 1 if method.pooled else run.fed.cohort_size
    lowered = {"local": _local(run, method, programs, cohort, packed=packs_clients(run.fed))}
    if method.uploads:
        lowered["server"] = _server(run, method, programs, cohort)
    if method.local_phase:
        lowered["local_phase"] = _local(run, method, programs, run.fed.num_clients, local_phase=True)
    return lowered


def _local(run: AbstractRun, method, programs: RoundPrograms, clients: int, local_phase: bool = False,
           packed: bool = False) -> Callable[[], jax.stages.Lowered]:
    """The vmapped local update of `clients` clients: one lane per client, or packed lanes (planned at one client
    per lane, the most lanes packing runs: a lane's length, a scan, does not change its memory); `local_phase`:
    the method's plain local training after the rounds (never packed)."""
    hooks = method.plain() if local_phase else method
    steps = run.epoch_steps(method)
    padded = meshes.padded_cohort(clients, run.mesh)
    by_client = meshes.client_sharding(run.mesh)
    schedule = (padded, steps * run.fed.local_epochs, run.fed.batch_size)
    state = hooks.client_state_init(run.adapters)
    if packed:
        program = programs.packed
        inputs = _packed_lanes(schedule, steps, hooks.extra_pass_examples, by_client,
                               None if state is None else stacked(stacked(state, 1), padded, by_client))
    else:
        program = programs.plain_local if local_phase else programs.local
        inputs = ClientInputs(shape_of(schedule, jnp.int32, by_client), shape_of(schedule, bool, by_client),
                              None if state is None else stacked(state, padded, by_client))
    broadcast = placed(jax.eval_shape(lambda a: hooks.broadcast(hooks.server_init(a)), run.adapters), run.everywhere)
    return lambda: program.lower(run.frozen, run.data, broadcast, inputs)


def _packed_lanes(schedule, steps: int, cap: int, by_client, state) -> PackedLanes:
    """`cap`: the extra pass's examples (0: the first epoch)."""
    lanes, length, batch = schedule
    extra = min(steps, -(-cap // batch)) if cap else steps
    return PackedLanes(shape_of(schedule, jnp.int32, by_client), shape_of(schedule, bool, by_client),
                       shape_of((lanes, length), jnp.int32, by_client), shape_of((lanes, length), bool, by_client),
                       shape_of((lanes, 1), bool, by_client), shape_of((lanes, extra, batch), jnp.int32, by_client),
                       shape_of((lanes, extra, batch), bool, by_client), shape_of((lanes, extra), jnp.int32, by_client),
                       state)


def _server(run: AbstractRun, method, programs: RoundPrograms, clients: int) -> Callable[[], jax.stages.Lowered]:
    """The server's aggregation of the cohort's uploads (`federated/server.py`)."""
    everywhere = run.everywhere
    state = placed(jax.eval_shape(lambda a: initial_server_state(method, run.fed, a, None), run.adapters), everywhere)
    uploads = ClientUploads(stacked({name: run.adapters for name in method.uploads}, clients, everywhere),
                            shape_of((clients,), jnp.int32, everywhere))
    return lambda: programs.server.lower(state, uploads, shape_of((clients,), bool, everywhere))
