"""What one round of vmapped client updates needs per device, planned by XLA on abstract shapes (no weights).

    python -m fednano_jax.memory_plan --config=configs/memory_llava15_7b.py --out=docs/bench/memory_llava15_7b.json
    python -m fednano_jax.memory_plan --config=configs/easyvqa_tiny.py --preset=llava15_7b --remat=full

The round program (vmap over clients, scan over steps) is lowered with `jax.ShapeDtypeStruct`
arguments placed as the config's mesh places them (frozen backbone in the model dtype,
replicated or FSDP; adapters and optimizer state float32; the cohort sharded over
`clients`), compiled, and `compiled.memory_analysis()` gives the per-device bytes:
arguments, outputs, temporaries (activations kept for the backward pass, gradients,
optimizer state) and generated code. One plan per remat policy in --remat.
"""

from __future__ import annotations

import time

import jax
from absl import flags

from fednano_jax.backbone import synthetic
from fednano_jax.parallel import mesh as sharding
from fednano_jax.commands import cli
from fednano_jax.federated.client import ClientInputs, make_client_programs
from fednano_jax.federated.methods.fedavg import FedAvg
from fednano_jax.federated.rounds import make_optimizer
from fednano_jax.models.mllm import count_params
from fednano_jax.parallel.xla_stats import device_summary, write_json, memory_of, planned_total


GIB = 2**30


def _placed(tree, shardings):
    """Abstract arrays carrying the shardings the real ones would get."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def plan(config, clients: int, batch: int, steps: int, text_tokens: int) -> dict:
    """Per-device memory of one round for the config's model, remat policy and mesh."""
    mcfg = synthetic.synthetic_model_config(config)
    mesh_config = sharding.mesh_config_of(config)
    mesh = sharding.make_mesh(mesh_config)
    work = synthetic.Workload(sharding.padded_cohort(clients, mesh), steps, batch,
                              synthetic.sequence_length(mcfg, text_tokens))
    graphdef, frozen, adapters = synthetic.abstract_model(mcfg)
    data, rows, valid = synthetic.abstract_data(mcfg, work)
    everywhere = sharding.replicated(mesh)
    args = (_placed(frozen, sharding.backbone_shardings(frozen, mesh, mesh_config)), _placed(data, everywhere),
            _placed({"adapters": adapters}, everywhere), _placed(ClientInputs(rows, valid), sharding.client_sharding(mesh)))
    vmapped, _ = make_client_programs(graphdef, make_optimizer(config.fed), FedAvg(config.fed), steps)
    program = jax.jit(vmapped, out_shardings=sharding.client_sharding(mesh))
    start = time.perf_counter()
    compiled = program.lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = memory_of(compiled)
    return {"remat": mcfg.llm.remat, "compile_seconds": seconds, "per_device_bytes": memory,
            "per_device_total_gib": planned_total(memory) / GIB, "mesh": dict(mesh.shape), "clients_planned": work.clients,
            "seq_len": work.seq_len, "frozen_params": count_params(frozen), "adapter_params": count_params(adapters),
            "frozen_dtype": mcfg.llm.dtype}


def main() -> None:
    args = flags.FLAGS
    config = synthetic.with_preset(args.config, args.preset)
    plans = []
    for policy in args.remat:
        config.model.remat = policy
        result = plan(config, args.clients, args.batch, args.steps, args.text_tokens)
        plans.append(result)
        print(f"remat={policy}: {result['per_device_total_gib']:.2f} GiB per device "
              f"({ {k: round(v / GIB, 3) for k, v in result['per_device_bytes'].items()} } GiB), "
              f"compiled in {result['compile_seconds']:.0f} s")
    report = {"config": config.get("name"), "preset": args.preset, "clients": args.clients, "batch": args.batch,
              "device": device_summary(),
              "plans": plans}
    write_json(args.out, report)


def define_flags() -> None:
    """Command-line flags, defined only when run as a command (importing this module defines none)."""
    cli.define_config_flag(lock=False)
    flags.DEFINE_string("preset", None, f"Replace the config's model by a preset: {sorted(synthetic.PRESETS)}.")
    flags.DEFINE_integer("clients", 5, "Clients vmapped in one round program.")
    flags.DEFINE_integer("batch", 8, "Sequences per local step.")
    flags.DEFINE_integer("steps", 1, "Local steps in the planned round (memory does not grow with them).")
    flags.DEFINE_integer("text_tokens", 63, "Text tokens per sequence after <s> and the image tokens.")
    flags.DEFINE_list("remat", ["none", "full"], "Remat policies to plan (models/llama.py REMAT_POLICIES).")
    flags.DEFINE_string("out", None, "Write the plans here as JSON.")

