"""Every compiled program of a config's run, planned per device by XLA's own compiler for a target device.

    python -m fednano_jax.memory_plan --config=configs/scienceqa_llava15_7b.py --target=h100-80gb --out=F.json
    python -m fednano_jax.memory_plan --config=configs/iconqa_llava15_7b.py --target=tpu:v5p:2x2x1
    python -m fednano_jax.memory_plan --config=configs/easyvqa_tiny.py                  # this host's CPU

For each method in `fed.methods` it lowers exactly the programs the run compiles, with the arguments the run
gives them (`federated/abstract_programs.py` over `rounds.compile_programs`; `eval/`): the vmapped (or packed) local update with the method's extra pass,
the server's aggregation, a local phase over every client after the rounds where the method has one,
evaluation (greedy decoding: prefill and KV-cache steps at `eval.batch_size`) and the programs a method
adds to it (`Method.evaluation_programs`); it names no method. They are lowered on abstract arguments (no weights,
no data) placed as the run places them on the config's mesh over the target's devices:
the frozen backbone (replicated or FSDP), the device dataset at the official split sizes,
the cohort sharded over `clients`. `compiled.memory_analysis()` gives each program's
arguments, outputs and temporaries per device. Programs that lower to the same module
are compiled once. It exits non-zero, naming the program, when one exceeds 90% of the
device's memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import flags

from fednano_jax.backbone import synthetic
from fednano_jax.commands import cli
from fednano_jax.config import read
from fednano_jax.data.batches import HostImages
from fednano_jax.data.prompts import bucket
from fednano_jax.data.split_sizes import federated_train_rows, official_split_sizes
from fednano_jax.eval.generate import greedy_generate
from fednano_jax.federated.abstract_programs import AbstractRun, placed, round_programs, shape_of
from fednano_jax.federated.methods import get_method
from fednano_jax.federated.rounds import packs_clients
from fednano_jax.models.mllm import MllmConfig, count_params
from fednano_jax.parallel import mesh as sharding
from fednano_jax.parallel import targets
from fednano_jax.parallel.xla_stats import memory_of, planned_total, write_json

GIB = 2**30
FIT_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the run holds and runs, in rows and tokens."""

    train_rows: int  # the federated training rows in the device dataset
    images: int  # rows of its image table (train and test images, and the blank row 0)
    seq_len: int  # tokens per training row
    prompt_len: int  # tokens per evaluation prompt
    answer_slots: int  # answer tokens per row the loss reads
    source: str  # where the row counts come from


def run_sizes(config, mcfg: MllmConfig, text_tokens: int, answer_tokens: int) -> Sizes:
    image_tokens = mcfg.vision.num_image_tokens if mcfg.vision else 0
    seq_len = bucket(1 + image_tokens + text_tokens)
    prompt_len = bucket(1 + image_tokens + text_tokens - answer_tokens)
    train, source = federated_train_rows(config) or (config.data.train_examples, "data.train_examples")
    sizes = official_split_sizes(config.data.name)
    if sizes is not None:
        test = config.data.test_examples or sizes["test"]
        images = sizes.get("images", {})
        image_fraction = {split: images.get(split, sizes[split]) / sizes[split] for split in ("train", "test")}
        image_rows = 1 + math.ceil(train * image_fraction["train"]) + math.ceil(test * image_fraction["test"])
    else:
        test = config.data.test_examples
        image_rows = 1 + train + test  # one image per row: an upper bound
    return Sizes(train, image_rows, seq_len, prompt_len, answer_tokens,
                 f"{train:,} train rows ({source}), {test:,} test rows")


class PlannedHostImages(HostImages):
    """`HostImages` for a plan: a host callback cannot be lowered for a GPU that is not there, so a
    computed batch of the fetched images' shape stands in for it (the barrier keeps it a real buffer).
    What matters for memory is kept: the table is not an argument, each step holds its own images."""

    def take(self, index: jax.Array) -> jax.Array:
        pixels = index.astype(self.dtype).reshape(tuple(index.shape) + (1,) * (len(self.shape) - 1))
        return jax.lax.optimization_barrier(jnp.broadcast_to(pixels, tuple(index.shape) + self.shape[1:]))


jax.tree_util.register_pytree_node(PlannedHostImages, lambda images: ((), images), lambda images, _: images)


def device_dataset_shapes(mcfg: MllmConfig, sizes: Sizes, everywhere, stream_images: bool = False) -> dict:
    """What `data.batches.device_dataset` puts on every device, as abstract arrays (with `stream_images`,
    the image table stays on the host: the plan counts only each step's fetched images)."""
    n, t, s = sizes.train_rows, sizes.seq_len, sizes.answer_slots
    size = mcfg.vision.image_size if mcfg.vision else 1
    images = jax.ShapeDtypeStruct((sizes.images, size, size, 3), jnp.uint8)
    return {"input_ids": shape_of((n, t), jnp.int32, everywhere), "attention_mask": shape_of((n, t), bool, everywhere),
            "loss_mask": shape_of((n, t), bool, everywhere), "image_index": shape_of((n,), jnp.int32, everywhere),
            "images": PlannedHostImages(images) if stream_images else shape_of(images.shape, images.dtype, everywhere),
            "answer_positions": shape_of((n, s), jnp.int32, everywhere), "answer_valid": shape_of((n, s), bool, everywhere)}


@dataclasses.dataclass(frozen=True)
class Program:
    name: str
    lower: Callable[[], Any]  # -> jax.stages.Lowered


@dataclasses.dataclass
class Setting:
    """Everything the programs of one config share on one target."""

    config: Any
    mcfg: MllmConfig
    mesh: jax.sharding.Mesh
    sizes: Sizes
    graphdef: Any
    frozen: Any  # placed abstract backbone
    adapters: Any  # abstract adapters (unplaced)
    data: dict

    @property
    def everywhere(self):
        return sharding.replicated(self.mesh)


def make_setting(config, target: targets.Target, text_tokens: int, answer_tokens: int) -> Setting:
    mcfg = synthetic.synthetic_model_config(config)
    mesh_config = config.mesh
    mesh = sharding.make_mesh(mesh_config, devices=target.devices)
    graphdef, frozen, adapters = synthetic.abstract_model(mcfg)
    frozen = placed(frozen, sharding.backbone_shardings(frozen, mesh, mesh_config))
    sizes = run_sizes(config, mcfg, text_tokens, answer_tokens)
    data = device_dataset_shapes(mcfg, sizes, sharding.replicated(mesh), config.data.stream_images)
    return Setting(config, mcfg, mesh, sizes, graphdef, frozen, adapters, data)


def _prompts(setting: Setting):
    everywhere, ev = setting.everywhere, setting.config.eval
    size = setting.mcfg.vision.image_size if setting.mcfg.vision else 1
    shape = (ev.batch_size, setting.sizes.prompt_len)
    return (shape_of(shape, jnp.int32, everywhere), shape_of(shape, bool, everywhere),
            shape_of((ev.batch_size, size, size, 3), jnp.uint8, everywhere))


def _decode_options(config) -> dict:
    return dict(max_new_tokens=config.eval.max_new_tokens, pad_id=0, eos_id=2)


def generate_program(setting: Setting) -> Program:
    """Greedy decoding of one evaluation batch: the prefill, then one KV-cache step per new token."""
    adapters = placed(setting.adapters, setting.everywhere)
    return Program("eval:generate", lambda: greedy_generate.lower(
        setting.graphdef, setting.frozen, adapters, *_prompts(setting), **_decode_options(setting.config)))


def method_evaluation_programs(setting: Setting, method) -> list[Program]:
    """The programs a method adds to evaluation (`Method.evaluation_programs`: FedDPA-F's mixed decoding)."""
    adapters = placed(setting.adapters, setting.everywhere)
    last = shape_of((setting.config.eval.batch_size,), jnp.int32, setting.everywhere)
    weights = shape_of((setting.config.eval.batch_size,), jnp.float32, setting.everywhere)
    lowerings = method.evaluation_programs(setting.graphdef, setting.frozen, adapters, _prompts(setting), last,
                                           weights, _decode_options(setting.config))
    return [Program(f"eval:{name}", lower) for name, lower in lowerings.items()]


def run_programs(setting: Setting) -> list[Program]:
    """Every program a run of the config compiles, named `kind:method`: each method's round programs with the run's
    abstract arguments (`federated/abstract_programs.py`), its evaluation programs, and decoding."""
    fed = setting.config.fed
    run = AbstractRun(setting.graphdef, setting.frozen, setting.data, setting.adapters, setting.mesh, fed,
                      setting.sizes.train_rows)
    programs = []
    for name in fed.methods:
        method = get_method(name, fed)
        for kind, lower in round_programs(method, run).items():
            programs.append(Program(f"local:{name}_local_phase" if kind == "local_phase" else f"{kind}:{name}", lower))
        programs.extend(method_evaluation_programs(setting, method))
    return programs + [generate_program(setting)]


def plan_programs(programs: list[Program], announce: Callable[[str], None] = print) -> dict:
    """name -> its per-device plan; modules that lower identically are compiled once."""
    plans, compiled_by_module = {}, {}
    for program in programs:
        start = time.perf_counter()
        lowered = program.lower()
        key = hashlib.sha256(lowered.as_text().encode()).hexdigest()
        if key in compiled_by_module:
            plans[program.name] = {**compiled_by_module[key], "same_module_as": compiled_by_module[key]["name"]}
            announce(f"  {program.name}: the module of {compiled_by_module[key]['name']}")
            continue
        memory = memory_of(lowered.compile())
        plan = {"arguments": memory.get("argument_size_in_bytes", 0) / GIB,
                "temporaries": memory.get("temp_size_in_bytes", 0) / GIB,
                "outputs": memory.get("output_size_in_bytes", 0) / GIB,
                "per_device_total_gib": planned_total(memory) / GIB,
                "compile_seconds": round(time.perf_counter() - start, 1)}
        compiled_by_module[key] = {**plan, "name": program.name}
        plans[program.name] = plan
        announce(f"  {program.name}: {plan['per_device_total_gib']:.2f} GiB ({plan['compile_seconds']:.0f} s)")
    return {name: {k: v for k, v in plan.items() if k != "name"} for name, plan in plans.items()}


def plan(config, target: targets.Target, text_tokens: int, answer_tokens: int) -> dict:
    setting = make_setting(config, target, text_tokens, answer_tokens)
    print(f"Planning {config.name} on {target.name} ({len(target.devices)} x {target.kind}, "
          f"{target.device_memory_gib:.1f} GiB each), mesh {dict(setting.mesh.shape)}, remat "
          f"{setting.mcfg.llm.remat}; data: {setting.sizes.source}")
    programs = plan_programs(run_programs(setting))
    return {"config": config.name, "target": target.name, "device_kind": target.kind,
            "devices": len(target.devices), "device_memory_gib": target.device_memory_gib,
            "mesh": dict(setting.mesh.shape), "remat": setting.mcfg.llm.remat, "units": "GiB per device",
            "frozen_params": count_params(setting.frozen), "adapter_params": count_params(setting.adapters),
            "frozen_dtype": setting.mcfg.llm.dtype, "sizes": dataclasses.asdict(setting.sizes),
            "client_chunk": config.fed.client_chunk, "packed": packs_clients(config.fed),
            "programs": programs}


def table(report: dict) -> str:
    limit = FIT_FRACTION * report["device_memory_gib"]
    lines = [f"{'GiB per device':<28} {'arguments':>10} {'temporaries':>12} {'outputs':>8} {'total':>8}  fits {limit:.1f} GiB",
             "-" * 84]
    for name, p in report["programs"].items():
        fits = "yes" if p["per_device_total_gib"] <= limit else "NO"
        lines.append(f"{name:<28} {p['arguments']:>10.2f} {p['temporaries']:>12.2f} {p['outputs']:>8.2f} "
                     f"{p['per_device_total_gib']:>8.2f}  {fits}")
    return "\n".join(lines)


def too_large(report: dict) -> str | None:
    """One sentence naming the largest program over 90% of device memory; None when all fit."""
    limit = FIT_FRACTION * report["device_memory_gib"]
    over = {name: p["per_device_total_gib"] for name, p in report["programs"].items()
            if p["per_device_total_gib"] > limit}
    if not over:
        return None
    name = max(over, key=over.get)
    return (f"Program {name} needs {over[name]:.2f} GiB per device on {report['target']}, over 90% of its "
            f"{report['device_memory_gib']:.1f} GiB ({len(over)} program(s) over in all); lower "
            f"fed.batch_size or set fed.client_chunk, model.remat or the mesh.")


def main() -> None:
    args = flags.FLAGS
    config = args.config
    if args.remat:
        config.model.remat = args.remat
    if args.clients:
        config.fed.clients_per_round = args.clients
        config.fed.num_clients = max(config.fed.num_clients, args.clients)
    if args.batch:
        config.fed.batch_size = args.batch
    if args.methods:
        config.fed.methods = tuple(args.methods)
    config = synthetic.with_preset(read(config, run=False), args.preset)
    target = targets.resolve(args.target, args.devices)
    report = plan(config, target, args.text_tokens, args.answer_tokens)
    print(table(report))
    write_json(args.out, report)
    problem = too_large(report)
    if problem:
        print(problem, file=sys.stderr)
        raise SystemExit(1)


def define_flags() -> None:
    """Command-line flags, defined only when run as a command (importing this module defines none)."""
    cli.define_config_flag(lock=False)
    flags.DEFINE_string("target", "cpu", f"The device to plan for: {targets.TARGETS_HELP}.")
    flags.DEFINE_integer("devices", None, "Devices of the target to plan over (default: 1 GPU, the whole TPU "
                                          "topology, every CPU device); the config's mesh spreads over them.")
    flags.DEFINE_string("preset", None, f"Replace the config's model by a preset: {sorted(synthetic.PRESETS)}.")
    flags.DEFINE_string("remat", None, "Override model.remat (models/llama.py REMAT_POLICIES).")
    flags.DEFINE_integer("clients", None, "Override the cohort (fed.clients_per_round).")
    flags.DEFINE_integer("batch", None, "Override fed.batch_size.")
    flags.DEFINE_list("methods", None, "Plan these methods only (default: the config's fed.methods).")
    flags.DEFINE_integer("text_tokens", 256, "Text tokens per training row after <s> and the image tokens (the "
                                             "longest row of the real set decides; this is the planned one).")
    flags.DEFINE_integer("answer_tokens", 8, "Answer tokens per row the loss reads (the set's longest answer).")
    flags.DEFINE_string("out", None, "Write the plan here as JSON.")
