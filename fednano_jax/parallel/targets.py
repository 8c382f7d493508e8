"""Devices to plan for: this host's CPUs, or GPUs and TPUs this machine does not have.

XLA compiles ahead of time for a device it only knows by description. A GPU target is a
CUDA compile-only topology described by a GpuTargetConfigProto (`targets/<name>.txtpb`,
written from the device's public specification); a TPU target is one of libtpu's
compile-only topologies ("v5p:2x2x1"). Both need the plugins in requirements-aot.txt but
no GPU, TPU or CUDA library. `compiled.memory_analysis()` of a program lowered for their
devices is then that compiler's own memory plan.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import jax

from fednano_jax.errors import ConfigError

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets")
GPU_TARGETS = ("a100-80gb", "h100-80gb", "h200-141gb")
TARGETS_HELP = f"cpu, {', '.join(GPU_TARGETS)} or tpu:<topology> (tpu:v5p:2x2x1, tpu:v5e:2x2, tpu:v4:2x2x1, tpu:v6e:2x2)"
AOT_INSTALL = "pip install -r requirements-aot.txt"
# Without these the deviceless GPU compile fails on Triton tile sizes for small f32 dots, and autotuning
# needs a real GPU.
GPU_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false", "--xla_gpu_autotune_level=0")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    devices: tuple  # the devices programs are compiled for
    device_memory_bytes: int
    kind: str  # what the devices call themselves

    @property
    def device_memory_gib(self) -> float:
        return self.device_memory_bytes / 2**30


def resolve(name: str, devices: int | None = None) -> Target:
    """The target `--target=name` names, with `devices` of its devices (None: one GPU, the whole TPU topology,
    every CPU device)."""
    if name == "cpu":
        return _cpu(devices)
    if name in GPU_TARGETS:
        return _gpu(name, devices or 1)
    if name.startswith("tpu:"):
        return _tpu(name[len("tpu:"):], devices)
    raise ConfigError(f"--target={name!r} is not a target; expected {TARGETS_HELP}.")


def _take(found: list, wanted: int | None, name: str) -> tuple:
    if wanted is not None and not 1 <= wanted <= len(found):
        raise ConfigError(f"--devices={wanted} does not fit target {name!r}, which has {len(found)} devices.")
    return tuple(found[:wanted] if wanted else found)


def _cpu(devices: int | None) -> Target:
    found = jax.devices("cpu")
    if devices and devices > len(found):
        raise ConfigError(f"--devices={devices} on the cpu target needs that many CPU devices; this process has "
                          f"{len(found)} (set XLA_FLAGS=--xla_force_host_platform_device_count={devices}).")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Target("cpu", _take(found, devices, "cpu"), memory, found[0].device_kind)


def gpu_description(name: str) -> str:
    with open(os.path.join(HERE, f"{name}.txtpb")) as f:
        return f.read()


def _gpu(name: str, devices: int) -> Target:
    from jax.experimental import topologies

    if devices < 1:
        raise ConfigError(f"--devices must be at least 1, got {devices}.")
    _add_gpu_flags()
    description = gpu_description(name)
    try:
        topology = topologies.get_topology_desc(name, "cuda", topology=f"1 x 1 x {devices}",
                                                target_config=description)
    except Exception as error:  # the plugin raises RuntimeError or its own errors when it is absent
        raise ConfigError(f"--target={name} needs JAX's CUDA compile-only plugin, which did not load ({error}); "
                          f"install it with `{AOT_INSTALL}`.") from error
    memory = int(re.search(r"device_memory_size:\s*(\d+)", description).group(1))
    return Target(name, tuple(topology.devices), memory, topology.devices[0].device_kind)


def _add_gpu_flags() -> None:
    """XLA reads its GPU flags when the first GPU compile starts: set them here, before any."""
    flags = os.environ.get("XLA_FLAGS", "")
    missing = [flag for flag in GPU_XLA_FLAGS if flag.split("=")[0] not in flags]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()


@functools.cache
def _tpu_memory() -> dict:
    with open(os.path.join(HERE, "tpu_memory.json")) as f:
        return json.load(f)["hbm_gib_per_chip"]


def _tpu(topology_name: str, devices: int | None) -> Target:
    from jax.experimental import topologies

    generation = topology_name.split(":")[0]
    if generation not in _tpu_memory():
        raise ConfigError(f"--target=tpu:{topology_name} names no TPU generation recorded here; expected one of "
                          f"{sorted(_tpu_memory())}, as in tpu:v5p:2x2x1.")
    try:
        # Compile-only: nothing claims a chip, so another process using libtpu (a second plan) is no conflict.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        topology = topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
    except Exception as error:
        raise ConfigError(f"--target=tpu:{topology_name} could not be made ({error}); it needs libtpu "
                          f"(`{AOT_INSTALL}`) and a topology such as v5p:2x2x1.") from error
    found = list(topology.devices)
    return Target(f"tpu:{topology_name}", _take(found, devices, f"tpu:{topology_name}"),
                  _tpu_memory()[generation] * 2**30, found[0].device_kind)
