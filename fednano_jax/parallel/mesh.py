"""Device meshes: clients spread over a `clients` axis, the frozen backbone replicated or FSDP-sharded.

The mesh has two axes, `clients` and `model` (`config.mesh.clients` x `config.mesh.model`
devices, -1 = the rest). Every per-client tree (adapters, optimizer state, Fisher, the
row schedule and its mask) has a leading clients axis, sharded over `clients`, so each
device holds and computes only its own clients. The frozen backbone is placed by
rules, as MaxText's logical-axis rules do: `mesh.backbone="replicated"` copies it to
every device; `"fsdp"` shards each large matrix (at least `mesh.fsdp_min_size`
elements) along its first dimension that the `model` axis divides, and XLA gathers
it layer by layer. The shared dataset and the global adapters are replicated.

On a CPU, XLA makes one device of all cores, and a device runs a small op on one thread: a round of small steps
then leaves the other cores idle. `mesh.cpu_devices` makes that many devices of the cores (-1: one per core), so the
clients axis spreads the clients over them; a command sets it before JAX starts (`use_cpu_devices`).

A cohort the `clients` axis does not divide is padded with dummy clients that have
no valid step (they change nothing, like padded steps) and whose outputs are dropped
before aggregation; the padding is announced once.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fednano_jax.errors import MeshError
from fednano_jax.settings import BACKBONE_LAYOUTS

CLIENTS, MODEL = "clients", "model"


def mesh_shape(clients: int, model: int, device_count: int) -> tuple[int, int]:
    """(clients, model) sizes with -1 resolved to the devices left over."""
    if clients == -1 and model == -1:
        raise MeshError("mesh.clients and mesh.model cannot both be -1; set one of them.")
    if clients == -1:
        clients = device_count // model if model > 0 and device_count % model == 0 else 0
    if model == -1:
        model = device_count // clients if clients > 0 and device_count % clients == 0 else 0
    if clients < 1 or model < 1 or clients * model != device_count:
        raise MeshError(f"mesh.clients x mesh.model must use all {device_count} devices, got {clients} x {model}.")
    return clients, model


FORCED_DEVICES = "--xla_force_host_platform_device_count"


def cpu_devices_wanted(cpu_devices: int) -> int | None:
    """The CPU devices `mesh.cpu_devices` asks for (None: XLA's own)."""
    if cpu_devices == -1:
        return len(os.sched_getaffinity(0))
    return cpu_devices or None


def use_cpu_devices(cpu_devices: int) -> None:
    """Make `mesh.cpu_devices` CPU devices; before JAX's first computation in this process (a command's start)."""
    wanted = cpu_devices_wanted(cpu_devices)
    if wanted is None:
        return
    if FORCED_DEVICES in os.environ.get("XLA_FLAGS", ""):
        raise MeshError(f"mesh.cpu_devices={cpu_devices} and XLA_FLAGS' {FORCED_DEVICES} both say how many CPU "
                        "devices to make; pass one of them.")
    try:
        jax.config.update("jax_num_cpu_devices", wanted)
    except RuntimeError:  # JAX has started: check_cpu_devices says whether it started with these
        pass


def check_cpu_devices(cpu_devices: int, devices: list) -> None:
    """`mesh.cpu_devices` took effect, or one sentence on why it cannot."""
    wanted = cpu_devices_wanted(cpu_devices)
    if wanted is None:
        return
    if devices[0].platform != "cpu":
        raise MeshError(f"mesh.cpu_devices applies when JAX runs on the CPU; this run's devices are "
                        f"{devices[0].platform}: leave it at 0.")
    if len(devices) != wanted:
        raise MeshError(f"mesh.cpu_devices={cpu_devices} asks for {wanted} CPU devices, but JAX started with "
                        f"{len(devices)}: the commands set it before JAX starts; in Python, call "
                        f"jax.config.update('jax_num_cpu_devices', {wanted}) before JAX's first computation.")


def make_mesh(mesh_config, devices=None) -> Mesh:
    """The (clients, model) mesh a config's `mesh` section describes, over all (or the given) devices."""
    if devices is None:  # a section written before the setting (a ConfigDict of the other keys) keeps XLA's own
        check_cpu_devices(getattr(mesh_config, "cpu_devices", 0), jax.devices())
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config.clients, mesh_config.model, len(devices))
    if mesh_config.backbone not in BACKBONE_LAYOUTS:
        raise MeshError(f"mesh.backbone must be one of {BACKBONE_LAYOUTS}, got {mesh_config.backbone!r}.")
    return Mesh(np.asarray(devices).reshape(shape), (CLIENTS, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def client_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (clients) axis over the `clients` mesh axis, everything else whole."""
    return NamedSharding(mesh, P(CLIENTS))


def backbone_spec(shape: tuple[int, ...], layout: str, model_size: int, min_size: int, stacked: bool = False) -> P:
    """The rule for one frozen leaf: replicated, or (fsdp) its first dimension `model` divides.

    A stacked layer's leading (layer) axis is never sharded: the scan over layers slices it."""
    first = 1 if stacked else 0
    if layout != "fsdp" or model_size == 1 or len(shape) < first + 2 or int(np.prod(shape)) < min_size:
        return P()
    for axis, size in enumerate(shape[first:], start=first):
        if size % model_size == 0:
            return P(*([None] * axis + [MODEL]))
    return P()


def _key(entry) -> object:
    return getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))


def is_layer_stack(path) -> bool:
    """A leaf of stacked layers (`models/llama.py`): under a `layers` entry not followed by a layer number."""
    keys = [str(_key(entry)) for entry in path]  # a restored checkpoint spells layer numbers as strings
    return any(key == "layers" and not after.isdigit() for key, after in zip(keys, keys[1:]))


def backbone_shardings(frozen, mesh: Mesh, mesh_config):
    """A NamedSharding per frozen leaf (a tree like `frozen`)."""
    model_size = mesh.shape[MODEL]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, backbone_spec(x.shape, mesh_config.backbone, model_size,
                                                          mesh_config.fsdp_min_size, is_layer_stack(path))), frozen)


def place_backbone(frozen, mesh: Mesh, mesh_config):
    """The frozen backbone on the mesh as every program of a run uses it (training and evaluation alike)."""
    return place(frozen, backbone_shardings(frozen, mesh, mesh_config))


def place(tree, shardings):
    """Put a tree's arrays on the mesh (`shardings`: one sharding, or a tree of them).

    Works across hosts too: each process contributes the slices its devices hold of
    the (identical on every host) value.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)  # already global: reshard
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    if isinstance(shardings, NamedSharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def shard_clients(tree, mesh: Mesh):
    """A stacked per-client tree (leading axis = clients) spread over the `clients` axis."""
    return place(tree, client_sharding(mesh))


def padded_cohort(cohort_size: int, mesh: Mesh) -> int:
    """The smallest multiple of the clients-axis size that holds the cohort."""
    size = mesh.shape[CLIENTS]
    return -(-cohort_size // size) * size


_ANNOUNCED_PADDING = set()  # (cohort, clients-axis size) pairs already reported, to say it once per run


def _pad_clients(tree, count: int):
    """Append `count` all-zero dummy clients: zero rows, no valid step, zero (identity) adapters."""
    if not count:
        return tree
    return jax.tree.map(lambda x: jnp.pad(x, [(0, count)] + [(0, 0)] * (x.ndim - 1)), tree)


def shard_cohort(clients, mesh: Mesh):
    """Pad a per-client tree (leading clients axis) with dummy clients to a multiple of the clients axis
    and shard it over that axis. -> (sharded tree, cohort size before padding)."""
    count = jax.tree.leaves(clients)[0].shape[0]
    extra = padded_cohort(count, mesh) - count
    if extra and (count, mesh.shape[CLIENTS]) not in _ANNOUNCED_PADDING:
        _ANNOUNCED_PADDING.add((count, mesh.shape[CLIENTS]))
        print(f"Cohort of {count} clients padded with {extra} masked dummy clients to fill the "
              f"{mesh.shape[CLIENTS]}-device clients axis; a cohort it divides wastes nothing.")
    return shard_clients(_pad_clients(clients, extra), mesh), count


def sharded_client_program(program, mesh: Mesh):
    """Wrap a vmapped program `program(*shared, clients)` to run its clients sharded over the mesh.

    `clients`, the last argument, is the per-client pytree (leading clients axis): it is padded and
    sharded (`shard_cohort`); the shared arguments are passed as they are. Every output has a leading
    clients axis, trimmed back to the cohort.
    """
    jitted = jax.jit(program, out_shardings=client_sharding(mesh))

    def run(*args):
        *shared, clients = args
        clients, count = shard_cohort(clients, mesh)
        outputs = jitted(*shared, clients)
        padded = jax.tree.leaves(clients)[0].shape[0]
        return jax.tree.map(lambda x: x[:count], outputs) if padded != count else outputs

    run.lower = jitted.lower  # for arguments already padded and sharded (a memory plan's abstract ones)
    return run


def to_host(x) -> np.ndarray:
    """A (possibly clients-sharded, possibly multi-host) array as one numpy array on every process."""
    if jax.process_count() == 1 or not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def mesh_description(mesh: Mesh) -> str:
    return (f"Mesh: {mesh.shape[CLIENTS]} (clients) x {mesh.shape[MODEL]} (model) over {mesh.devices.size} "
            f"{mesh.devices.flat[0].platform} devices, {jax.process_count()} process(es)")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Multi-host start-up. With no arguments `jax.distributed.initialize()` reads the cluster (SLURM,
    Open MPI, ...) itself; elsewhere pass all three. CPU processes exchange data through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    print(f"Process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local devices, "
          f"{jax.device_count()} in all")


def is_main_process() -> bool:
    """Only process 0 writes logs, tables and results (orbax coordinates checkpoints itself)."""
    return jax.process_index() == 0
