"""`python -m fednano_jax.privacy_audit --config=configs/easyvqa_tiny.py --workdir=DIR`

What FedNano's split wire shows the server, and what three defences change (`privacy/wire_audit.py`).
For each count of decoder layers the client runs (`--client_layers`, `model.client_layers` = k) and each
wire noise level (`--noise`, the std of `fed.wire_noise`) it trains FedNano as the config says with them,
evaluates it, and records what the server receives for `--rows` training rows of the first client: the
tensors sent up (the embeddings at k = 0, the hidden states after layer k otherwise; at A_T untrained and
at the trained adapters) and, with labels on the server (the paper's protocol), the labels. It attacks the
tensors by nearest neighbour in the backbone's own embedding table (k = 0 only: a hidden state is no
table row) and by a linear inverter fitted to `--public` public examples (held-aside rows through the
untrained NanoEdge and the first k layers, which the server has from the public checkpoint), and reports
the token recovery rate for prompt and answer tokens, with what the k layers cost the client per example
(`models/llama.client_prefix_cost`) at the config's shapes and at LLaVA-1.5-7B's. Labels on the client
(`fed.labels_on_client`) removes the labels from the wire and changes no gradient (tested), so its
accuracy is the same run's. The tables go to stdout, `privacy_audit.md`, `privacy_audit.json` and a PNG
in the workdir.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import ConfigDict

from fednano_jax.backbone import presets
from fednano_jax.backbone.build import experiment_backbone, with_client_layers
from fednano_jax.backbone.family import family_of
from fednano_jax.commands.accounting import human
from fednano_jax.config import read
from fednano_jax.data import datasets, pipeline
from fednano_jax.data.batches import device_dataset
from fednano_jax.data.partition import Partition
from fednano_jax.errors import ConfigError
from fednano_jax.eval.evaluate import Evaluator
from fednano_jax.experiment import prepare_workdir
from fednano_jax.federated.methods import get_method
from fednano_jax.federated.rounds import run_method
from fednano_jax.models.llama import LlamaConfig, client_prefix_cost
from fednano_jax.models.mllm import client_side, merge_model
from fednano_jax.privacy import wire_audit
from fednano_jax.weights.fill import flatten

FLAGS = flags.FLAGS
LLAVA_TEXT_TOKENS = 128  # text tokens of a LLaVA-1.5-7B training row beside its image's (accounting's --text_tokens)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _client_side(graphdef, frozen, adapters, input_ids, images, attention_mask):
    return client_side(merge_model(graphdef, frozen, adapters), input_ids, images, attention_mask)


def _wire_tensors(graphdef, frozen, adapters, rows: dict) -> np.ndarray:
    """What the server receives for `rows` (the graph's client side: NanoEdge and its decoder layers); one compiled
    program for every adapter set of the same rows' shape."""
    return np.asarray(_client_side(graphdef, frozen, adapters, jnp.asarray(rows["input_ids"]),
                                   jnp.asarray(rows["images"]), jnp.asarray(rows["attention_mask"])), np.float32)


def llava15_7b_shapes() -> tuple[LlamaConfig, int]:
    """LLaVA-1.5-7B's decoder (bf16) and a training row's positions: 576 image tokens and LLAVA_TEXT_TOKENS."""
    preset = presets.llava15_7b()
    llm = LlamaConfig(vocab_size=preset.vocab_size, dtype=preset.dtype, **preset.llm)
    return llm, (preset.vision.image_size // preset.vision.patch_size) ** 2 + LLAVA_TEXT_TOKENS


def cost_columns(llm: LlamaConfig, layers: int, length: int, prefix: str) -> dict:
    """What `layers` decoder layers add to a client per training example, as a result row's columns."""
    cost = client_prefix_cost(llm, layers, length)
    return {f"{prefix}_positions": length, f"{prefix}_frozen_bytes": cost.frozen_bytes,
            f"{prefix}_activation_bytes": cost.activation_bytes,
            f"{prefix}_flops": cost.forward_flops + cost.backward_flops}


def _rows(tokens, images, indices) -> dict:
    return {"input_ids": tokens.input_ids[indices], "attention_mask": tokens.attention_mask[indices],
            "loss_mask": tokens.loss_mask[indices], "images": images[tokens.image_index[indices]]}


def _attack(embeds, rows, table, inverter, image_token_id, noise, seed):
    """Recovery rates of both attacks, by role, on wire tensors with the wire's noise; `table` None: no nearest
    neighbour (hidden states after the client's layers are no embedding table's rows)."""
    prompt, answer = wire_audit.token_positions(rows["input_ids"], rows["attention_mask"], rows["loss_mask"],
                                                image_token_id)
    rng = np.random.default_rng(seed)
    noisy = embeds + noise * rng.standard_normal(embeds.shape).astype(np.float32)
    out = {"wire_rms": float(np.sqrt(np.mean(np.square(embeds[prompt | answer]))))}  # the noise's scale beside it
    for role, where in (("prompt", prompt), ("answer", answer)):
        truth, seen = rows["input_ids"][where], noisy[where]
        out[f"nn_{role}"] = None if table is None else wire_audit.recovery_rate(wire_audit.nearest_rows(seen, table),
                                                                                   truth)
        out[f"inverter_{role}"] = wire_audit.recovery_rate(wire_audit.invert(inverter, seen), truth)
    return out


def audited_config(config: ConfigDict) -> ConfigDict:
    """The config's FedNano, evaluated after its last round, without round checkpoints."""
    config = ConfigDict(config.to_dict())
    config.fed.methods = ("fednano",)
    config.checkpoint.every_rounds = 0
    config.eval.every_rounds = 0
    return config


def check_client_layers(config, client_layers: list[int]) -> None:
    layers = family_of(config).shapes(config, vocab_fallback=2).llm.num_layers
    if any(not 0 <= k <= layers for k in client_layers):
        raise ConfigError(f"--client_layers must list layer counts from 0 to the decoder's {layers} layers, got "
                          f"{','.join(map(str, client_layers))}.")


def audit(config: ConfigDict, workdir: str, noises: list[float], client_layers: list[int], audited_rows: int,
          public_rows: int) -> list[dict]:
    config = read(audited_config(config))
    check_client_layers(config, client_layers)
    prepare_workdir(workdir)
    splits = datasets.load_splits(config)
    graphdef, frozen, adapters, tokenizer, mcfg = experiment_backbone(config, splits)
    data = pipeline.federated_data(splits, tokenizer, mcfg.vision.num_image_tokens, config.fed.num_clients,
                                   Partition.of(config.data), config.seed)
    device_data = device_dataset(data.train, data.images)
    evaluator = Evaluator(graphdef, frozen, data, tokenizer, config)
    table = np.asarray(flatten(nnx.to_pure_dict(frozen))["edge/embed_tokens/embedding"], np.float32)
    audited = _rows(data.train, data.images, data.client_train[0][:audited_rows])
    public = pipeline.tokenize_pretraining(splits, tokenizer, mcfg.vision.num_image_tokens)
    public_rows_ = _rows(public, splits.images, np.arange(min(public_rows, len(public))))
    text = public_rows_["attention_mask"].astype(bool) & (public_rows_["input_ids"] != mcfg.image_token_id)
    length = data.train.input_ids.shape[1]  # a training row's positions
    llava, llava_length = llava15_7b_shapes()
    results = []
    for layers in client_layers:
        split, _ = with_client_layers(graphdef, mcfg, layers)
        costs = {**cost_columns(mcfg.llm, layers, length, "tiny"),
                 **cost_columns(llava, layers, llava_length, "llava15_7b")}
        inverter = wire_audit.train_inverter(_wire_tensors(split, frozen, adapters, public_rows_)[text],
                                             public_rows_["input_ids"][text], table.shape[0])
        untrained = _wire_tensors(split, frozen, adapters, audited)
        for noise in noises:
            setting = config.replace(model={"client_layers": layers}, fed={"wire_noise": float(noise)})
            result = run_method(get_method("fednano", setting.fed, config.seed), split, frozen, adapters, device_data,
                                data.client_train, setting, evaluator, lambda record: None)
            accuracy = 100 * result.history[-1]["average"]
            trained = _wire_tensors(split, frozen, result.server["adapters"], audited)
            for stage, sent in (("untrained", untrained), ("trained", trained)):
                attacks = _attack(sent, audited, table if layers == 0 else None, inverter, mcfg.image_token_id,
                                  noise, config.seed)
                for labels in ("server", "client"):
                    results.append({"client_layers": layers, "wire_noise": noise, "a_t": stage, "labels": labels,
                                    "accuracy": accuracy, "labels_answer": 1.0 if labels == "server" else 0.0,
                                    **attacks, **costs})
    return results


def percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}%"


def client_memory(r: dict, prefix: str) -> str:
    return human(r[f"{prefix}_frozen_bytes"] + r[f"{prefix}_activation_bytes"])


def table_of(results: list[dict]) -> str:
    lines = ["| client layers k | wire noise | RMS of the text positions sent | A_T | labels on | FedNano accuracy (%) "
             "| answers from labels | nearest neighbour: prompt / answer | inverter: prompt / answer | client's extra "
             "memory, one example: tiny / 7B | client's extra FLOPs per example: tiny / 7B |",
             "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['client_layers']} | {r['wire_noise']:g} | {r['wire_rms']:.3f} | {r['a_t']} | "
                     f"{r['labels']} | {r['accuracy']:.2f} | {100 * r['labels_answer']:.0f}% | "
                     f"{percent(r['nn_prompt'])} / {percent(r['nn_answer'])} | "
                     f"{percent(r['inverter_prompt'])} / {percent(r['inverter_answer'])} | "
                     f"{client_memory(r, 'tiny')} / {client_memory(r, 'llava15_7b')} | "
                     f"{human(r['tiny_flops'], 'FLOP')} / {human(r['llava15_7b_flops'], 'FLOP')} |")
    return "\n".join(lines)


def cost_table(results: list[dict]) -> str:
    """What the k layers add to each client, per training example, at the config's shapes and LLaVA-1.5-7B's."""
    lines = ["| client layers k | shapes | sequence positions | frozen weights held | activations kept per example | "
             "FLOPs per example (forward + backward) |", "|---:|---|---:|---:|---:|---:|"]
    seen = {}
    for r in results:
        seen.setdefault(r["client_layers"], r)
    for layers, r in seen.items():
        for prefix, shapes in (("tiny", "this config"), ("llava15_7b", "LLaVA-1.5-7B (bf16)")):
            lines.append(f"| {layers} | {shapes} | {r[f'{prefix}_positions']} | {human(r[f'{prefix}_frozen_bytes'])} | "
                         f"{human(r[f'{prefix}_activation_bytes'])} | {human(r[f'{prefix}_flops'], 'FLOP')} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in results if r["a_t"] == "trained" and r["labels"] == "client"]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for index, layers in enumerate(sorted({r["client_layers"] for r in trained})):
        rows = [r for r in trained if r["client_layers"] == layers]
        noises = [r["wire_noise"] for r in rows]
        axis.plot(noises, [100 * r["inverter_answer"] for r in rows], marker="o", color=f"C{index}",
                  label=f"k={layers}: inverter, answer recovered (%)")
        axis.plot(noises, [r["accuracy"] for r in rows], marker="s", linestyle="--", color=f"C{index}",
                  label=f"k={layers}: FedNano accuracy (%)")
    axis.set_xlabel("fed.wire_noise (std of the noise on the tensor sent up)")
    axis.set_ylim(0, 105)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    args = FLAGS
    noises = [float(n) for n in args.noise]
    if any(n < 0 for n in noises):
        raise ConfigError(f"--noise must list non-negative stds, got {args.noise}.")
    if not all(k.strip().isdigit() for k in args.client_layers):
        raise ConfigError(f"--client_layers must list counts of decoder layers like 0,1,2, got "
                          f"{','.join(args.client_layers)}.")
    client_layers = [int(k) for k in args.client_layers]
    if args.dry_run:
        from fednano_jax.preflight import dry_run

        print(dry_run(audited_config(args.config)))
        return
    workdir = args.workdir or os.path.join("runs", args.config.name + "_privacy_audit")
    results = audit(args.config, workdir, noises, client_layers, args.rows, args.public)
    text = table_of(results) + "\n\nWhat the client's k decoder layers cost it:\n\n" + cost_table(results)
    with open(os.path.join(workdir, "privacy_audit.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(workdir, "privacy_audit.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(workdir, "privacy_audit.png"))
    print(text)
    print(f"\nWritten to {workdir}/privacy_audit.md, privacy_audit.json and privacy_audit.png")


def define_flags() -> None:
    from fednano_jax.commands import cli

    cli.define_config_flag()
    flags.DEFINE_string("workdir", None, "Where the audit's table and plot go (default: runs/<name>_privacy_audit).")
    flags.DEFINE_list("noise", ["0", "0.1", "0.3", "1"], "fed.wire_noise levels to train FedNano with and audit.")
    flags.DEFINE_list("client_layers", ["0"], "model.client_layers values (decoder layers each client runs) to train "
                      "FedNano with and audit.")
    flags.DEFINE_integer("rows", 64, "Training rows of the first client whose wire is audited.")
    flags.DEFINE_integer("public", 200, "Public (held-aside) examples the inverter is fitted to.")
    flags.DEFINE_bool("dry_run", False, "Make the checks the audit's FedNano runs make, print what they would run, "
                      "and stop.")
