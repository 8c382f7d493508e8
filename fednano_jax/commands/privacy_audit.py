"""`python -m fednano_jax.privacy_audit --config=configs/easyvqa_tiny.py --workdir=DIR`

What FedNano's split wire shows the server, and what two defences change (`privacy/wire_audit.py`).
For each wire noise level (`--noise`, the std of `fed.wire_noise`) it trains FedNano as the config says
with that noise, evaluates it, and records what the server receives for `--rows` training rows of the
first client: the embeddings sent up (at A_T untrained and at the trained adapters) and, with labels on
the server (the paper's protocol), the labels. It attacks the embeddings by nearest neighbour in the
backbone's own embedding table and by a linear inverter fitted to `--public` public examples (held-aside
rows embedded by the untrained NanoEdge), and reports the token recovery rate for prompt and answer
tokens. Labels on the client (`fed.labels_on_client`) removes the labels from the wire and changes no
gradient (tested), so its accuracy is the same run's. The table goes to stdout, `privacy_audit.md`,
`privacy_audit.json` and a PNG in the workdir.
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

from fednano_jax.backbone.build import experiment_backbone
from fednano_jax.config import read
from fednano_jax.data import datasets, pipeline
from fednano_jax.data.batches import device_dataset
from fednano_jax.data.partition import Partition
from fednano_jax.errors import ConfigError
from fednano_jax.eval.evaluate import Evaluator
from fednano_jax.experiment import prepare_workdir
from fednano_jax.federated.methods import get_method
from fednano_jax.federated.rounds import run_method
from fednano_jax.models.mllm import merge_model
from fednano_jax.privacy import wire_audit
from fednano_jax.weights.fill import flatten

FLAGS = flags.FLAGS


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _edge(graphdef, frozen, adapters, input_ids, images):
    return merge_model(graphdef, frozen, adapters).edge(input_ids, images)


def _wire_embeddings(graphdef, frozen, adapters, rows: dict) -> np.ndarray:
    """What the server receives for `rows`: one compiled program for every adapter set of the same rows' shape."""
    return np.asarray(_edge(graphdef, frozen, adapters, jnp.asarray(rows["input_ids"]), jnp.asarray(rows["images"])),
                      np.float32)


def _rows(tokens, images, indices) -> dict:
    return {"input_ids": tokens.input_ids[indices], "attention_mask": tokens.attention_mask[indices],
            "loss_mask": tokens.loss_mask[indices], "images": images[tokens.image_index[indices]]}


def _attack(embeds, rows, table, inverter, image_token_id, noise, seed):
    """Recovery rates of both attacks, by role, on embeddings with the wire's noise."""
    prompt, answer = wire_audit.token_positions(rows["input_ids"], rows["attention_mask"], rows["loss_mask"],
                                                image_token_id)
    rng = np.random.default_rng(seed)
    noisy = embeds + noise * rng.standard_normal(embeds.shape).astype(np.float32)
    out = {}
    for role, where in (("prompt", prompt), ("answer", answer)):
        truth, seen = rows["input_ids"][where], noisy[where]
        out[f"nn_{role}"] = wire_audit.recovery_rate(wire_audit.nearest_rows(seen, table), truth)
        out[f"inverter_{role}"] = wire_audit.recovery_rate(wire_audit.invert(inverter, seen), truth)
    return out


def audited_config(config: ConfigDict) -> ConfigDict:
    """The config's FedNano, evaluated after its last round, without round checkpoints."""
    config = ConfigDict(config.to_dict())
    config.fed.methods = ("fednano",)
    config.checkpoint.every_rounds = 0
    config.eval.every_rounds = 0
    return config


def audit(config: ConfigDict, workdir: str, noises: list[float], audited_rows: int, public_rows: int) -> list[dict]:
    config = read(audited_config(config))
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
    public_embeds = _wire_embeddings(graphdef, frozen, adapters, public_rows_)
    text = public_rows_["attention_mask"].astype(bool) & (public_rows_["input_ids"] != mcfg.image_token_id)
    inverter = wire_audit.train_inverter(public_embeds[text], public_rows_["input_ids"][text], table.shape[0])
    untrained = _wire_embeddings(graphdef, frozen, adapters, audited)
    results = []
    for noise in noises:
        noised = config.replace(fed={"wire_noise": float(noise)})
        result = run_method(get_method("fednano", noised.fed, config.seed), graphdef, frozen, adapters, device_data,
                            data.client_train, noised, evaluator, lambda record: None)
        accuracy = 100 * result.history[-1]["average"]
        trained = _wire_embeddings(graphdef, frozen, result.server["adapters"], audited)
        for stage, embeds in (("untrained", untrained), ("trained", trained)):
            for labels in ("server", "client"):
                row = {"wire_noise": noise, "a_t": stage, "labels": labels, "accuracy": accuracy,
                       "labels_answer": 1.0 if labels == "server" else 0.0,
                       **_attack(embeds, audited, table, inverter, mcfg.image_token_id, noise, config.seed)}
                results.append(row)
    return results


def table_of(results: list[dict]) -> str:
    lines = ["| wire noise | A_T | labels on | FedNano accuracy (%) | answers from labels | nearest neighbour: "
             "prompt / answer | inverter: prompt / answer |", "|---:|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['wire_noise']:g} | {r['a_t']} | {r['labels']} | {r['accuracy']:.2f} | "
                     f"{100 * r['labels_answer']:.0f}% | {100 * r['nn_prompt']:.1f}% / {100 * r['nn_answer']:.1f}% | "
                     f"{100 * r['inverter_prompt']:.1f}% / {100 * r['inverter_answer']:.1f}% |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in results if r["a_t"] == "trained" and r["labels"] == "client"]
    noises = [r["wire_noise"] for r in trained]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for key, label in (("nn_prompt", "nearest neighbour, prompt"), ("nn_answer", "nearest neighbour, answer"),
                       ("inverter_answer", "inverter, answer")):
        axis.plot(noises, [100 * r[key] for r in trained], marker="o", label=f"{label} recovered (%)")
    axis.plot(noises, [r["accuracy"] for r in trained], marker="s", color="black", label="FedNano accuracy (%)")
    axis.set_xlabel("fed.wire_noise (std of the noise on the embeddings sent up)")
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
    if args.dry_run:
        from fednano_jax.preflight import dry_run

        print(dry_run(audited_config(args.config)))
        return
    workdir = args.workdir or os.path.join("runs", args.config.name + "_privacy_audit")
    results = audit(args.config, workdir, noises, args.rows, args.public)
    text = table_of(results)
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
    flags.DEFINE_integer("rows", 64, "Training rows of the first client whose wire is audited.")
    flags.DEFINE_integer("public", 200, "Public (held-aside) examples the inverter is fitted to.")
    flags.DEFINE_bool("dry_run", False, "Make the checks the audit's FedNano runs make, print what they would run, "
                      "and stop.")
