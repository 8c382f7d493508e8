"""How fast a round of local client updates runs, three ways, with random weights and synthetic batches.

    python -m fednano_jax.benchmark --config=configs/easyvqa_tiny.py --clients=16 --out=docs/bench/cpu_tiny.json
    python -m fednano_jax.benchmark --config=configs/easyvqa_tiny.py --preset=llava15_7b --clients=1 --mode=vmap

Modes (each compiled once, then timed over --repeats rounds after a warm-up round):
  vmap        all clients in one jitted program: vmap over clients, lax.scan over steps, clients sharded
              over the config's mesh (every device by default), exactly as the simulation runs a round
  sequential  one jitted program per client (scan over its steps), clients looped in Python on one device
              (fed.mode=sequential)
  loop        one jitted optimizer step per call, a Python loop over clients and steps on one device: how
              PyTorch federated frameworks run a round, with our jitted step
  torch       that loop in eager PyTorch (commands/torch_loop.py): transformers' LLaVA of the same shapes,
              host batches per step, a fresh optimizer per client; needs torch (requirements-test.txt),
              and `all` leaves it out, saying why, where torch is missing or has no CUDA beside a GPU
On a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=<cores> makes each core a device, so the vmap
mode's clients run on all cores at once (see docs/benchmarks.md).
Reported per mode: compile seconds, round seconds, steps/s, tokens/s, client updates/s, memory (per
device), and FLOP/s with MFU (over the devices the mode uses) where the device's peak is known.
FLOPs per client step come from XLA's cost analysis of the compiled single step (the loop mode's
program); a round does clients x steps of them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import statistics
import time

import jax
import numpy as np
from jax.sharding import Mesh
from absl import flags

from fednano_jax.backbone import synthetic
from fednano_jax.backbone.build import with_remat
from fednano_jax.parallel import mesh as sharding
from fednano_jax.parallel import op_profile
from fednano_jax.parallel.xla_stats import device_summary, write_json, flops_of, memory_of, planned_total
from fednano_jax.commands import cli
from fednano_jax.config import read
from fednano_jax.federated.client import (ClientInputs, initial_carry, local_update, make_client_programs,
                                          make_packed_program, train_step)
from fednano_jax.errors import ConfigError
from fednano_jax.federated.methods.fedavg import FedAvg
from fednano_jax.federated.methods.fednano import FedNano
from fednano_jax.federated.packing import packed_schedule
from fednano_jax.federated.schedule import client_schedule
from fednano_jax.federated.rounds import make_optimizer

MODES = ("loop", "sequential", "vmap", "torch", "torch_compile", "torch_workers")  # JAX's smallest memory first: a
# device's peak counter only grows
TORCH_MODES = ("torch", "torch_compile", "torch_workers")
# Dense peak FLOP/s per device (spec sheets), by a substring of jax's device_kind and the compute dtype.
PEAK_FLOPS = {("H100", "bfloat16"): 989e12, ("H200", "bfloat16"): 989e12, ("A100", "bfloat16"): 312e12}


@dataclasses.dataclass
class Problem:
    graphdef: object
    frozen: object
    adapters: object
    data: dict
    rows: np.ndarray
    valid: np.ndarray
    optimizer: object
    work: synthetic.Workload
    dtype: str
    mesh: Mesh
    mesh_config: object
    mcfg: object
    fed: object
    method: object  # FedAvg: plain local steps


def build_problem(config, preset, clients, steps, batch, text_tokens, seed=0) -> Problem:
    config = synthetic.with_preset(config, preset)
    mcfg = synthetic.synthetic_model_config(config)
    work = synthetic.Workload(clients, steps, batch or config.fed.batch_size, synthetic.sequence_length(mcfg, text_tokens))
    graphdef, frozen, adapters = synthetic.random_model(mcfg, seed)
    data, rows, valid = synthetic.synthetic_data(mcfg, work, seed)
    mesh_config = config.mesh
    return Problem(graphdef, frozen, adapters, data, rows, valid, make_optimizer(config.fed), work, mcfg.llm.dtype,
                   sharding.make_mesh(mesh_config), mesh_config, mcfg, config.fed, FedAvg(config.fed))


def _timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def _compiled(jitted, *args):
    return _timed(lambda: jitted.lower(*args).compile())


def vmap_round(p: Problem, method=None, extra_pass_examples: int = 0):
    """-> (compiled program, compile seconds, run one round). Placed on the mesh as the simulation places it:
    backbone by the mesh rules, dataset and global adapters replicated, clients (padded) over `clients`."""
    vmapped, _ = make_client_programs(p.graphdef, p.optimizer, method or p.method, p.work.steps,
                                      extra_pass_examples=extra_pass_examples)
    program = jax.jit(vmapped, out_shardings=sharding.client_sharding(p.mesh))
    frozen = sharding.place(p.frozen, sharding.backbone_shardings(p.frozen, p.mesh, p.mesh_config))
    broadcast, data = sharding.place(({"adapters": p.adapters}, p.data), sharding.replicated(p.mesh))
    clients, _ = sharding.shard_cohort(ClientInputs(p.rows, p.valid), p.mesh)
    args = (frozen, data, broadcast, clients)
    compiled, seconds = _compiled(program, *args)
    return compiled, seconds, lambda: jax.block_until_ready(compiled(*args))


def sequential_round(p: Problem):
    single = jax.jit(functools.partial(local_update, p.graphdef, p.optimizer, p.method, p.work.steps))
    broadcast = {"adapters": p.adapters}
    client = lambda k: ClientInputs(p.rows[k], p.valid[k])
    compiled, seconds = _compiled(single, p.frozen, p.data, broadcast, client(0))
    clients = range(p.work.clients)
    return compiled, seconds, lambda: jax.block_until_ready(
        [compiled(p.frozen, p.data, broadcast, client(k)) for k in clients])


def loop_round(p: Problem):
    step = jax.jit(functools.partial(train_step, p.graphdef, p.optimizer, p.method))
    broadcast = {"adapters": p.adapters}
    start = initial_carry(p.optimizer, p.method, p.adapters)
    compiled, seconds = _compiled(step, p.frozen, p.data, broadcast, None, p.adapters, start, p.rows[0, 0],
                                  p.valid[0, 0])

    def run():
        finals = []
        for k in range(p.work.clients):
            carry = start
            for s in range(p.work.steps):
                carry, _ = compiled(p.frozen, p.data, broadcast, None, p.adapters, carry, p.rows[k, s],
                                    p.valid[k, s])
            finals.append(carry[0])
        return jax.block_until_ready(finals)

    return compiled, seconds, run


def torch_round(p: Problem, compiled: bool = False):
    """-> (None, setup seconds, run one round): eager PyTorch builds its model and compiles nothing; under
    `torch.compile` the setup is the build and the first round, where the loss's forward and backward compile."""
    from fednano_jax.commands import torch_loop  # imports torch, which only these modes need

    (model, seconds) = _timed(lambda: torch_loop.random_model(p.mcfg, torch_loop.default_device(), compiled=compiled))
    start = torch_loop.adapters_from_jax(p.adapters)
    data, rows, valid = torch_loop.host_dataset(p.data), np.asarray(p.rows), np.asarray(p.valid)

    def run():
        return torch_loop.run_round(model, start, data, rows, valid, p.fed)

    if compiled:
        seconds += _timed(run)[1]
    return None, seconds, run


def torch_memory() -> dict:
    import torch

    measured = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"peak_memory_bytes": measured, "peak_memory_source": "torch.cuda.max_memory_allocated()" if measured
            else "not kept by PyTorch on a CPU", "torch_threads": torch.get_num_threads()}


def torch_workers_round(p: Problem):
    """-> (None, setup seconds, run one round): the cohort over one PyTorch worker process per core (pfl's way);
    the setup is starting them, each building its model, and the first round. `run.close` stops the workers."""
    import os

    from fednano_jax.commands import torch_loop

    rounds = torch_loop.WorkerRounds(p.mcfg, torch_loop.host_dataset(p.data), p.fed, os.cpu_count() or 1)
    start = torch_loop.adapters_from_jax(p.adapters)
    rows, valid = np.asarray(p.rows), np.asarray(p.valid)

    def run():
        return rounds(start, rows, valid)

    run.close, run.workers = rounds.close, rounds.workers
    try:
        return None, _timed(run)[1], run
    except BaseException:
        rounds.close()
        raise


ROUNDS = {"vmap": vmap_round, "sequential": sequential_round, "loop": loop_round, "torch": torch_round,
          "torch_compile": functools.partial(torch_round, compiled=True), "torch_workers": torch_workers_round}


def available_modes(requested: str, mcfg) -> tuple[tuple[str, ...], dict]:
    """-> (modes to run, {mode left out: why}). `all` runs the torch mode only where torch is installed and
    transformers' LLaVA can mirror the model."""
    if requested != "all":
        return (requested,), {}
    without_torch = tuple(m for m in MODES if m not in TORCH_MODES)
    if importlib.util.find_spec("torch") is None:
        return without_torch, dict.fromkeys(TORCH_MODES, "PyTorch is not installed (pip install -r "
                                                          "requirements-test.txt)")
    import torch

    if jax.default_backend() != "cpu" and not torch.cuda.is_available():
        return without_torch, dict.fromkeys(TORCH_MODES, f"JAX runs on {jax.default_backend()} but this torch "
                                                          "build has no CUDA; a CPU PyTorch loop would be no "
                                                          "comparison (install a CUDA torch)")
    from fednano_jax.commands.torch_loop import unsupported

    if why := unsupported(mcfg):
        return without_torch, dict.fromkeys(TORCH_MODES, why)
    return MODES, {}


def device_peak_bytes() -> int | None:
    """The device allocator's peak so far (GPU/TPU); None where the backend keeps no such count (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def peak_memory(compiled) -> dict:
    """The allocator's peak where the device keeps one, else XLA's plan: arguments + outputs + temporaries + code."""
    planned = memory_of(compiled)
    measured = device_peak_bytes()
    return {"peak_memory_bytes": measured if measured is not None else planned_total(planned),
            "peak_memory_source": "device memory_stats()" if measured is not None else "compiled memory_analysis()",
            "compiled_memory_bytes": planned}


def datasheet_flops(device, dtype: str) -> float | None:
    """The vendor's dense peak for the device and dtype, where one is known (PEAK_FLOPS)."""
    return next((peak for (kind, kind_dtype), peak in PEAK_FLOPS.items()
                 if kind in device.device_kind and kind_dtype == dtype), None)


def matmul_flops(dtype: str, devices: list, repeats: int = 10, size: int | None = None) -> float | None:
    """The dense-matmul FLOP/s the devices reach together, measured here: each multiplies two [size, size] matrices
    of `dtype` at once (one program sharded over them; size 1024 on a CPU, 8192 on an accelerator); the best of
    `repeats`. None where the device cannot multiply in that dtype."""
    size = size or (1024 if devices[0].platform == "cpu" else 8192)
    mesh = Mesh(np.array(devices), ("devices",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
    matrices = jax.device_put(jax.random.normal(jax.random.key(0), (len(devices), size, size)).astype(dtype), sharding)
    multiply = jax.jit(lambda x: jax.numpy.einsum("bij,bjk->bik", x, x), out_shardings=sharding)
    try:
        multiply(matrices).block_until_ready()
    except Exception:  # noqa: BLE001 - a dtype the backend has no kernel for: no peak to measure
        return None
    best = min(_timed(lambda: multiply(matrices).block_until_ready())[1] for _ in range(repeats))
    return 2 * size**3 * len(devices) / best


def measured_peaks(mesh_devices: int) -> dict:
    """f32 and bf16 matmul peaks of one device and of the vmap mode's devices together (on a CPU split into
    devices, they share the same cores: the peak of all of them, not one device's times their count)."""
    devices = jax.devices()
    return {dtype: {1: matmul_flops(dtype, devices[:1]), mesh_devices: matmul_flops(dtype, devices[:mesh_devices])}
            for dtype in ("float32", "bfloat16")}


def figures(p: Problem, setup: dict, seconds: float, memory: dict, step_flops: float | None,
            peak: float | None, devices: int) -> dict:
    """A mode's throughput figures from its median round time; `devices`: how many it runs on; `peak`: the FLOP/s
    those devices reach together (MFU is the fraction of it the mode achieves)."""
    w = p.work
    result = {**setup, "round_seconds": seconds, "steps_per_second": w.steps / seconds,
              "client_steps_per_second": w.clients * w.steps / seconds, "tokens_per_second": w.tokens_per_round / seconds,
              "client_updates_per_second": w.clients / seconds, "devices": devices, **memory}
    if step_flops:
        achieved = step_flops * w.clients * w.steps / seconds
        result["flops_per_second"] = achieved
        result["mfu"] = achieved / peak if peak else None
    return result


def timed_rounds(prepared: dict, repeats: int) -> dict:
    """Median round seconds per mode. The modes take turns, round by round, so load that drifts over the
    run (other processes, thermal limits) weighs on every mode alike."""
    times = {mode: [] for mode in prepared}
    for _ in range(repeats):
        for mode, (_, _, run) in prepared.items():
            times[mode].append(_timed(run)[1])
    return {mode: statistics.median(t) for mode, t in times.items()}


def model_flops_per_step(p: Problem) -> float | None:
    """FLOPs of one client step: XLA's cost analysis of the step with the decoder layers unrolled and nothing
    rematerialised. XLA counts a while loop's body once, so the scanned layer stack would count as one layer (the
    tables before 2026-12-05 counted one of the tiny decoder's two), and a recomputation is not the model's work."""
    graphdef, _ = with_remat(p.graphdef, p.mcfg, "none", scan_unroll=p.mcfg.llm.num_layers)
    step = jax.jit(functools.partial(train_step, graphdef, p.optimizer, p.method))
    start = initial_carry(p.optimizer, p.method, p.adapters)
    return flops_of(step.lower(p.frozen, p.data, {"adapters": p.adapters}, None, p.adapters, start, p.rows[0, 0],
                               p.valid[0, 0]))


def benchmark(p: Problem, modes, repeats: int, profile_dir: str | None = None) -> dict:
    """Every mode's round, timed in turns; with `profile_dir`, then 5 vmapped rounds traced there (op_profile)."""
    device = jax.devices()[0]
    loop = loop_round(p)
    step_flops = model_flops_per_step(p)
    profiled = None
    prepared, memory = {}, {}
    try:
        for mode in (m for m in MODES if m in modes):  # in MODES order: the peak counter only grows
            prepared[mode] = loop if mode == "loop" else ROUNDS[mode](p)
            compiled, _, run = prepared[mode]
            run()  # warm-up: first-call dispatch costs stay out of the timings
            memory[mode] = torch_memory() if mode in TORCH_MODES else peak_memory(compiled)
            if mode == "torch_workers":  # their memory and threads are the workers'
                memory[mode].update(peak_memory_source="in the worker processes, not kept", torch_threads=1,
                                    workers=run.workers)
        seconds = timed_rounds(prepared, repeats)
        if profile_dir:
            profiled = op_profile.profile(prepared["vmap"][2], directory=profile_dir)
    finally:  # worker processes (torch_workers) are stopped whatever happens
        for _, _, run in prepared.values():
            getattr(run, "close", lambda: None)()
    setup = {mode: {"model_build_seconds" if mode in ("torch", "torch_workers") else "compile_seconds":
                    prepared[mode][1]}
             for mode in prepared}
    peaks = measured_peaks(p.mesh.size)
    results = {}
    for mode in prepared:
        devices = p.mesh.size if mode == "vmap" else 1
        results[mode] = figures(p, setup[mode], seconds[mode], memory[mode], step_flops, peaks[p.dtype][devices],
                                devices)
    speedup = {f"vmap_over_{other}": results[other]["round_seconds"] / results["vmap"]["round_seconds"]
               for other in ("loop", "sequential", *TORCH_MODES) if other in results and "vmap" in results}
    return {"device": device_summary(), "mesh": dict(p.mesh.shape),
            "dtype": p.dtype, "workload": {**dataclasses.asdict(p.work), "tokens_per_round": p.work.tokens_per_round},
            "flops_per_client_step": step_flops,
            "flops_source": "XLA cost_analysis() of the lowered single-client step with the decoder layers unrolled and "
                            "no rematerialisation (forward, backward to the "
                            "adapters through the frozen backbone, optimizer update)",
            "peak_flops_per_second": peaks[p.dtype][1],
            "peak_flops_source": "measured here: the best of 10 dense matmuls (einsum of [n, n] matrices, n = 1024 on "
                                 "a CPU, 8192 on an accelerator) per device, at once on the devices counted",
            "measured_peak_flops": {dtype: {str(d): v for d, v in by.items()} for dtype, by in peaks.items()},
            "datasheet_peak_flops_per_device": datasheet_flops(device, p.dtype),
            "modes": results, "speedup": speedup, **({"profile": profiled} if profiled else {})}


def full_logits_data(data: dict) -> dict:
    """The dataset without its answer slots: the loss then takes the LM head at every position."""
    return {k: v for k, v in data.items() if k not in ("answer_positions", "answer_valid")}


def compare(p: Problem, variants: dict, baseline: str, repeats: int) -> dict:
    """Median vmap-round seconds of each variant (built by a thunk), timed in turns, and their ratios to `baseline`."""
    prepared = {name: build() for name, build in variants.items()}
    for _, _, run in prepared.values():
        run()
    seconds = timed_rounds(prepared, repeats)
    return {"round_seconds": seconds, "compile_seconds": {name: prepared[name][1] for name in prepared},
            "over_" + baseline: {name: seconds[name] / seconds[baseline] for name in seconds if name != baseline}}


def compare_logits(p: Problem, repeats: int) -> tuple[dict, dict]:
    """A round whose loss reads logits at the answer positions only, against one taking them everywhere."""
    full = dataclasses.replace(p, data=full_logits_data(p.data))
    result = compare(p, {"answer_logits": lambda: vmap_round(p), "full_logits": lambda: vmap_round(full)},
                     "answer_logits", repeats)
    return result, {"answer_over_full_logits": result["over_answer_logits"]["full_logits"]}


def compare_fisher(p: Problem, repeats: int, cap: int) -> tuple[dict, dict]:
    """FedNano's round (local steps, then its Fisher pass over the first epoch, or its first `cap` examples)
    against FedAvg's at equal data."""
    fednano = FedNano(p.fed)
    result = compare(p, {"fedavg": lambda: vmap_round(p),
                         "fednano": lambda: vmap_round(p, fednano),
                         f"fednano_fisher_examples_{cap}": lambda: vmap_round(p, fednano, cap)}, "fedavg", repeats)
    ratios = result["over_fedavg"]
    return result, {"fednano_over_fedavg": ratios["fednano"],
                    f"fednano_fisher_examples_{cap}_over_fedavg": ratios[f"fednano_fisher_examples_{cap}"]}


def partition_sizes(config) -> list[int]:
    """Training examples per client of the config's own partition (its data, without images)."""
    from fednano_jax.data import datasets
    from fednano_jax.data.partition import Partition
    from fednano_jax.data.pipeline import client_partition

    splits = datasets.load_splits(config, with_images=False)
    clients = client_partition(splits, config.fed.num_clients, Partition.of(config.data), config.seed)
    return [len(rows) for rows in clients["train"]]


def compare_packing(p: Problem, config, repeats: int) -> tuple[dict, dict]:
    """The config's round (its partition's client sizes, one epoch, FedAvg) with every client padded to the
    largest, against packed lanes (`federated/packing.py`)."""
    sizes = partition_sizes(config)
    batch, total = p.work.batch, sum(sizes)
    work = synthetic.Workload(1, -(-total // batch), batch, p.work.seq_len)
    data, _, _ = synthetic.synthetic_data(p.mcfg, work)
    bounds = np.cumsum([0] + sizes)
    client_rows = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    rows, valid = client_schedule(client_rows, batch, 1, config.seed, 0)
    packed = packed_schedule(client_rows, batch, 1, config.seed, 0, range(len(sizes)),
                             max_padding=config.fed.pack_padding)
    broadcast = {"adapters": p.adapters}
    vmapped, _ = make_client_programs(p.graphdef, p.optimizer, p.method, rows.shape[1])
    padded_args = (p.frozen, data, broadcast, ClientInputs(rows, valid))
    packed_args = (p.frozen, data, broadcast, jax.tree.map(jax.numpy.asarray, packed.lanes))
    programs = {"padded": (jax.jit(vmapped), padded_args),
                "packed": (jax.jit(make_packed_program(p.graphdef, p.optimizer, p.method)), packed_args)}

    def prepared(name):
        program, args = programs[name]
        compiled, seconds = _compiled(program, *args)
        return compiled, seconds, lambda: jax.block_until_ready(compiled(*args))

    result = compare(p, {name: functools.partial(prepared, name) for name in programs}, "packed", repeats)
    real = packed.client_steps
    result["client_sizes"] = sizes
    result["client_steps"] = real
    result["padded_client_steps"] = {"padded": rows.shape[0] * rows.shape[1], "packed": packed.padded_client_steps}
    result["padding_share"] = {name: steps / real - 1 for name, steps in result["padded_client_steps"].items()}
    result["lanes"] = packed.members.tolist()
    return result, {"packed_over_padded": result["over_packed"]["padded"]}


def split_steps(server, batch: dict, embeds: np.ndarray, clients: int, steps: int, batched: bool) -> dict:
    """`clients` threads, each a client of an in-process split-step server on 127.0.0.1 sending `steps` steps
    of `embeds` one after another -> client-steps per second and per-step latency (ms, p50 and p95). Batched: the
    server merges concurrent steps (up to 5 ms of waiting); not: each step is its own call of the LLM."""
    import threading

    from fednano_jax.serving.step_client import StepClient
    from fednano_jax.serving.step_server import Limits, StepServer, grpc_server

    rows = len(embeds)
    limits = Limits(max_rows=rows * clients if batched else rows, max_wait_ms=5.0 if batched else 0.0)
    steps_server = StepServer(server, clients, limits=limits)
    steps_server.warm({"embeds": embeds, **batch})
    grpc, port = grpc_server(steps_server, "127.0.0.1:0")
    latencies: list[float] = []
    errors: list[Exception] = []

    def client(k: int, count: int, record: bool) -> None:
        stub = StepClient(f"127.0.0.1:{port}", k)
        try:
            for _ in range(count):
                start = time.perf_counter()
                stub.step(embeds, batch)
                if record:
                    latencies.append(time.perf_counter() - start)
        except Exception as error:  # noqa: BLE001 (reported after the threads are joined)
            errors.append(error)
        finally:
            stub.close()

    def run(count: int, record: bool) -> float:
        threads = [threading.Thread(target=client, args=(k, count, record)) for k in range(clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        return time.perf_counter() - start

    try:
        run(2, False)  # every batch shape is compiled (warm); this warms the channels
        seconds = run(steps, True)
    finally:
        grpc.stop(grace=None)
        steps_server.close()
    if errors:
        raise errors[0]
    ms = np.array(latencies) * 1000
    return {"client_steps_per_second": clients * steps / seconds, "latency_ms_p50": float(np.percentile(ms, 50)),
            "latency_ms_p95": float(np.percentile(ms, 95)),
            "calls_per_step": steps_server.stats["calls"] / max(steps_server.stats["requests"], 1)}


def llm_call_ms(server, example: dict, copies: tuple[int, ...], repeats: int) -> dict:
    """Median ms of one call of the server's program on `example`'s rows repeated 1x and 8x: how its cost grows
    with the rows a batch merges (no gRPC, no serialization)."""
    from flax import nnx

    from fednano_jax.serving.step_server import merge_requests, served_step

    rows, (graph, state) = len(example["embeds"]), nnx.split(server)
    out = {}
    for count in copies:
        args = merge_requests([example] * count, ["mean"] * count, rows * max(copies))[:3]
        jax.block_until_ready(served_step(graph, state, *args))
        times = []
        for _ in range(max(repeats, 3)):
            start = time.perf_counter()
            jax.block_until_ready(served_step(graph, state, *args))
            times.append(time.perf_counter() - start)
        out[str(rows * count)] = 1000 * statistics.median(times)
    return out


def compare_split_batching(p: Problem, repeats: int) -> tuple[dict, dict]:
    """The split-step server (`serving/step_server.py`) with 1, 2, 4 and 8 concurrent clients, each sending its
    batch's embeddings (`repeats` x 4 steps each): dynamic batching on against off."""
    from fednano_jax.models.mllm import merge_model

    model = merge_model(p.graphdef, p.frozen, p.adapters)
    rows = p.rows[0, 0]
    batch = {name: np.asarray(p.data[name])[rows] for name in ("attention_mask", "input_ids", "loss_mask",
                                                                "answer_positions", "answer_valid")}
    images = jax.numpy.asarray(p.data["images"])[jax.numpy.asarray(p.data["image_index"])[rows]]
    embeds = np.asarray(model.edge(jax.numpy.asarray(batch["input_ids"]), images), np.float32)
    result, ratios = {"llm_call_ms_by_rows": llm_call_ms(model.server, {"embeds": embeds, **batch}, (1, 8), repeats)}, {}
    for clients in (1, 2, 4, 8):
        runs = {mode: split_steps(model.server, batch, embeds, clients, 4 * repeats, mode == "batched")
                for mode in ("unbatched", "batched")}
        result[f"{clients}_clients"] = runs
        ratios[f"split_batching_{clients}_clients"] = (runs["batched"]["client_steps_per_second"]
                                                       / runs["unbatched"]["client_steps_per_second"])
    return result, ratios


COMPARISONS = ("logits", "fisher", "packing", "split_batching")


def comparisons(p: Problem, config, which: list[str], repeats: int, fisher_cap: int) -> tuple[dict, dict]:
    results, speedup = {}, {}
    for name in which:
        if name == "logits":
            result, ratios = compare_logits(p, repeats)
        elif name == "fisher":
            result, ratios = compare_fisher(p, repeats, fisher_cap)
        elif name == "split_batching":
            result, ratios = compare_split_batching(p, repeats)
        else:
            result, ratios = compare_packing(p, config, repeats)
        results[name] = result
        speedup.update(ratios)
    return results, speedup


def summary(report: dict) -> str:
    lines = [f"{report['device']['kind']} x{report['device']['count']}, {report['dtype']}, {report['workload']}, "
             f"vmap mesh {report['mesh']}",
             f"  dense matmul peak measured here: {report['peak_flops_per_second'] / 1e9:.0f} GFLOP/s on one device "
             f"(MFU is each mode's FLOP/s over the peak of the devices it runs on)"]
    for mode, r in report["modes"].items():
        mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") else ""
        setup = f"compile {r['compile_seconds']:6.1f} s" if "compile_seconds" in r else \
            f"build   {r['model_build_seconds']:6.1f} s"
        lines.append(f"  {mode:10s} {r['devices']} dev  {setup}  round {r['round_seconds']:8.4f} s  "
                     f"{r['client_steps_per_second']:8.1f} client-steps/s  {r['tokens_per_second']:10.0f} tokens/s  "
                     f"{r['client_updates_per_second']:7.2f} client-updates/s{mfu}")
    lines += [f"  {name}: {value:.2f}x" for name, value in report["speedup"].items()]
    lines += [f"  {mode} mode left out: {why}" for mode, why in report.get("left_out", {}).items()]
    if "profile" in report:
        lines.append(op_profile.profile_table(report["profile"]))
    return "\n".join(lines)


def comparison_report(config, args, problem: Problem) -> dict:
    unknown = sorted(set(args.compare) - set(COMPARISONS))
    if unknown:
        raise ConfigError(f"--compare={','.join(unknown)} is not a comparison; expected some of {list(COMPARISONS)}.")
    results, speedup = comparisons(problem, config, args.compare, args.repeats, args.fisher_examples)
    return {"config": config.name, "preset": args.preset, "device": device_summary(),
            "mesh": dict(problem.mesh.shape), "dtype": problem.dtype,
            "workload": {**dataclasses.asdict(problem.work), "answer_tokens": int(problem.data["answer_valid"].shape[1])},
            "comparisons": results, "speedup": speedup}


def comparison_summary(report: dict) -> str:
    lines = [f"{report['device']['kind']} x{report['device']['count']}, {report['dtype']}, {report['workload']}"]
    for name, result in report["comparisons"].items():
        if name == "split_batching":
            lines.append("  split steps, one LLM call: " + ", ".join(
                f"{rows} rows {ms:.1f} ms" for rows, ms in result["llm_call_ms_by_rows"].items()))
            for clients, runs in result.items():
                if clients == "llm_call_ms_by_rows":
                    continue
                lines.append(f"  split steps, {clients.replace('_', ' ')}: " + ", ".join(
                    f"{mode} {r['client_steps_per_second']:.1f} client-steps/s (p50 {r['latency_ms_p50']:.1f} ms, "
                    f"p95 {r['latency_ms_p95']:.1f} ms)" for mode, r in runs.items()))
            continue
        rounds = ", ".join(f"{variant} {seconds:.4f} s" for variant, seconds in result["round_seconds"].items())
        lines.append(f"  {name}: vmap rounds {rounds}")
        if "padding_share" in result:
            shares = ", ".join(f"{variant} {share:.1%}" for variant, share in result["padding_share"].items())
            lines.append(f"    padded client-steps over the {result['client_steps']} real ones: {shares}")
    lines += [f"  {name}: {value:.2f}x" for name, value in report["speedup"].items()]
    return "\n".join(lines)


def main() -> None:
    args = flags.FLAGS
    config = read(args.config, run=False)
    if args.profile and (args.compare or args.mode not in ("all", "vmap")):
        raise ConfigError("--profile traces the vmap mode's rounds: pass --mode=all or --mode=vmap, without --compare.")
    problem = build_problem(config, args.preset, args.clients, args.steps, args.batch, args.text_tokens)
    if args.compare:
        report = comparison_report(config, args, problem)
        print(comparison_summary(report))
        write_json(args.out, report)
        return
    modes, left_out = available_modes(args.mode, problem.mcfg)
    report = {"config": config.name, "preset": args.preset, **benchmark(problem, modes, args.repeats, args.profile),
              "left_out": left_out}
    print(summary(report))
    write_json(args.out, report)


def define_flags() -> None:
    """Command-line flags, defined only when run as a command (importing this module defines none)."""
    cli.define_config_flag(lock=False)
    flags.DEFINE_string("preset", None, f"Replace the config's model by a preset: {sorted(synthetic.PRESETS)}.")
    flags.DEFINE_integer("clients", 16, "Clients trained per round.")
    flags.DEFINE_integer("steps", 4, "Local steps per client per round.")
    flags.DEFINE_integer("batch", 0, "Sequences per step (0: config.fed.batch_size).")
    flags.DEFINE_integer("text_tokens", 32, "Text tokens per sequence, after <s> and the image tokens.")
    flags.DEFINE_enum("mode", "all", ["all", *MODES], "Which ways to run a round.")
    flags.DEFINE_integer("repeats", 3, "Timed rounds per mode (the median is reported).")
    flags.DEFINE_string("out", None, "Write the results here as JSON.")
    flags.DEFINE_list("compare", [], "Instead of the modes, time vmap rounds against each other: `logits` (answer-"
                                     "only against full-sequence logits), `fisher` (FedNano, capped and not, against "
                                     "FedAvg), `packing` (the config's partition, padded against packed), `split_batching` "
                                     "(the split-step server with 1-8 clients, batching on against off; "
                                     "docs/deployment.md).")
    flags.DEFINE_string("profile", None, "Also trace 5 vmapped rounds into this directory (jax.profiler; TensorBoard "
                                         "reads it) and report their busy time by kind of XLA op "
                                         "(parallel/op_profile.py).")
    flags.DEFINE_integer("fisher_examples", 128, "The cap on the Fisher pass's examples per client in --compare=fisher.")
