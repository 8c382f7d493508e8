"""Where FedNano's parameters live and what crosses the network (the paper's Table 1), from shapes only.

    python -m fednano_jax.accounting --config=configs/scienceqa_llava15_7b.py [--text_tokens=128]

The model is built with `nnx.eval_shape` (backbone/synthetic.abstract_model), so no weights are needed and nothing is
allocated. The model section gives the shapes: `model.llm` and `model.vocab_size` (a
preset's, even when `model.path` names a checkpoint not yet downloaded), or else the
metadata of the checkpoint at `model.path` (its config.json or GGUF header; no
tensor is read).

Besides the adapter traffic the paper counts, a client trains its adapters by
backpropagating through the server's frozen LLM: every local step sends the adapted
input embeddings up and receives their gradients back (split learning), and FedNano's
Fisher pass does the same once per local example. Those bytes are reported too.

With `model.client_layers` = k each client also holds the decoder's first k layers and runs them forward and
backward (to reach its adapters) at every step: the client's share of the frozen weights and of the decoder
layers' FLOPs is reported for the config's k (the wire then carries hidden states of the embeddings' width, so
the bytes above do not change).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax.numpy as jnp
from absl import flags
from flax import nnx

from fednano_jax.commands import cli
from fednano_jax.config import read
from fednano_jax.backbone.shapes import model_shapes
from fednano_jax.backbone.synthetic import abstract_model
from fednano_jax.data.split_sizes import federated_train_rows
from fednano_jax.errors import ConfigError
from fednano_jax.federated.methods import METHODS
from fednano_jax.models.llama import client_prefix_cost, layer_cost
from fednano_jax.models.mllm import MllmConfig
from fednano_jax.settings import require_client_layers
from fednano_jax.weights.fill import flatten

VISION = ("Vision tower", "edge/vision/", "client")  # a text-only model's (empty) row
COMPONENTS = (  # (row label, parameter-path prefix, side) after the vision side's parts
    ("Connector", "edge/connector/", "client"),
    ("Token embeddings", "edge/embed_tokens/", "client"),
    ("NanoAdapter A_I (image tokens)", "edge/adapter_image/", "client"),
    ("NanoAdapter A_T (text tokens)", "edge/adapter_text/", "client"),
    ("LLM (decoder, final norm, LM head)", "server/", "server"),
)


def components(mcfg: MllmConfig) -> tuple:
    """The rows of a model: its vision side's parts as its config names them (a CLIP tower is one; MiniGPT-4's
    EVA ViT and Q-Former are two), then COMPONENTS."""
    if mcfg.vision is None:
        return (VISION, *COMPONENTS)
    return (*((label, f"edge/vision/{path}", "client") for label, path in mcfg.vision.parts), *COMPONENTS)


def side_of(label: str) -> str:
    """Where a component lives: everything but the LLM is on the client (NanoEdge)."""
    return next((side for row, _, side in COMPONENTS if row == label), "client")


@dataclasses.dataclass(frozen=True)
class Traffic:
    batch_size: int
    sequence_length: int  # image tokens plus text tokens
    hidden_size: int  # width of the embeddings that cross the split
    activation_bytes: int  # bytes per element of those embeddings
    local_steps: int  # per client per round
    examples_per_client: int

    @property
    def example_bytes(self) -> int:
        """One example's input embeddings (or their gradient)."""
        return self.sequence_length * self.hidden_size * self.activation_bytes


def shapes_from_config(config, vocab_size: int | None = None) -> MllmConfig:
    """The MllmConfig the experiment config describes, without reading any tensor (backbone/shapes.py)."""
    return model_shapes(config, vocab_size)


def parameter_counts(mcfg: MllmConfig) -> dict[str, int]:
    """Parameters per component (COMPONENTS labels), from abstract shapes."""
    no_remat = dataclasses.replace(mcfg, llm=dataclasses.replace(mcfg.llm, remat="none"))  # same parameters
    _, frozen, adapters = abstract_model(no_remat)
    params = {**flatten(nnx.to_pure_dict(frozen)), **flatten(nnx.to_pure_dict(adapters))}
    rows = components(mcfg)
    counts = {label: sum(math.prod(v.shape) for k, v in params.items() if k.startswith(prefix))
              for label, prefix, _ in rows}
    unassigned = [k for k in params if not any(k.startswith(prefix) for _, prefix, _ in rows)]
    assert not unassigned, f"parameters in no component: {unassigned}"
    return counts


def adapter_count(counts: dict[str, int]) -> int:
    return sum(n for label, n in counts.items() if label.startswith("NanoAdapter"))


def communication(adapters: int, traffic: Traffic) -> dict[str, dict]:
    """Bytes per client per round, per method: adapters (fp32) up and down; split-learning activations."""
    adapter_bytes = 4 * adapters
    training = traffic.local_steps * traffic.batch_size * traffic.example_bytes
    rows = {}
    for method in METHODS.values():
        if method.pooled:
            continue  # centralized training: the data moves, not the model
        extra_passes = method.extra_passes * traffic.examples_per_client * traffic.example_bytes
        rows[method.label] = {
            "upload_bytes": len(method.uploads) * adapter_bytes,
            "download_bytes": len(method.downloads) * adapter_bytes,
            "embeddings_up_bytes": training + extra_passes,
            "gradients_down_bytes": training + extra_passes,
        }
    return rows


def mean_examples_per_client(config, override: int | None) -> tuple[int, str]:
    """-> (mean local training examples per client, where that number comes from)."""
    clients = config.fed.num_clients
    if override is not None:
        return override, "--examples_per_client"
    found = federated_train_rows(config)
    if found is None:
        raise ConfigError(f"data.train_examples is 0 (all) and no official split size of "
                          f"{config.data.name!r} is recorded, so the examples per client are "
                          "unknown here; pass --examples_per_client=N.")
    rows, source = found
    return rows // clients, f"{source} over {clients} clients"


def traffic_for(config, mcfg: MllmConfig, text_tokens: int, examples: int) -> Traffic:
    image_tokens = mcfg.vision.num_image_tokens if mcfg.vision else 0
    steps = math.ceil(examples / config.fed.batch_size) * config.fed.local_epochs
    return Traffic(config.fed.batch_size, image_tokens + text_tokens, mcfg.llm.hidden_size,
                   jnp.dtype(mcfg.llm.dtype).itemsize, steps, examples)


def client_share(mcfg: MllmConfig, counts: dict[str, int], layers: int, sequence_length: int) -> dict:
    """Frozen bytes (in the decoder's dtype) and decoder-layer FLOPs per training example (forward and backward
    to the wire) on each side when the client runs the decoder's first `layers` layers; the vision side's and the
    LM head's FLOPs are the same at every split and left out."""
    require_client_layers(layers, mcfg.llm.num_layers)
    itemsize = jnp.dtype(mcfg.llm.dtype).itemsize
    frozen = {label: n for label, n in counts.items() if not label.startswith("NanoAdapter")}
    prefix = client_prefix_cost(mcfg.llm, layers, sequence_length)
    one = layer_cost(mcfg.llm, sequence_length)
    client_bytes = itemsize * sum(n for label, n in frozen.items() if side_of(label) == "client") + prefix.frozen_bytes
    server_bytes = itemsize * sum(n for label, n in frozen.items() if side_of(label) == "server") - prefix.frozen_bytes
    server_layers = mcfg.llm.num_layers - layers
    return {"client_layers": layers, "decoder_layers": mcfg.llm.num_layers, "sequence_length": sequence_length,
            "client_frozen_bytes": client_bytes, "server_frozen_bytes": server_bytes,
            "client_activation_bytes": prefix.activation_bytes,
            "client_decoder_flops": prefix.forward_flops + prefix.backward_flops,
            "server_decoder_flops": server_layers * (one.forward_flops + one.backward_flops)}


def share_table(share: dict) -> str:
    k, layers = share["client_layers"], share["decoder_layers"]
    total_bytes = share["client_frozen_bytes"] + share["server_frozen_bytes"]
    total_flops = share["client_decoder_flops"] + share["server_decoder_flops"]
    rows = (("Client", f"NanoEdge + decoder layers 1..{k}" if k else "NanoEdge", "client"),
            ("Server", f"decoder layers {k + 1}..{layers}, final norm, LM head" if k < layers
             else "final norm, LM head", "server"))
    lines = ["| Side | Holds | Frozen weights | Decoder-layer FLOPs per training example (forward + backward) |",
             "|---|---|---:|---:|"]
    for side, holds, key in rows:
        held, flops = share[f"{key}_frozen_bytes"], share[f"{key}_decoder_flops"]
        lines.append(f"| {side} | {holds} | {human(held)} ({100 * held / total_bytes:.1f}%) | "
                     f"{human(flops, 'FLOP')} ({100 * flops / total_flops:.1f}%) |")
    return "\n".join(lines)


def human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:,.0f} {unit}" if prefix == "" else f"{n:,.2f} {prefix}{unit}"
        n /= 1000


def parameter_table(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    lines = ["| Component | Side | Parameters | % of model |", "|---|---|---:|---:|"]
    for label, n in counts.items():
        lines.append(f"| {label} | {side_of(label)} | {n:,} | {100 * n / total:.3f} |")
    for side in ("client", "server"):
        n = sum(c for label, c in counts.items() if side_of(label) == side)
        lines.append(f"| **All on the {side}** | | {n:,} | {100 * n / total:.2f} |")
    adapters = adapter_count(counts)
    lines.append(f"| **Trained and uploaded (NanoAdapters)** | client | {adapters:,} | {100 * adapters / total:.3f} |")
    lines.append(f"| **Whole model** | | {total:,} | 100 |")
    return "\n".join(lines)


def traffic_table(rows: dict[str, dict], traffic: Traffic) -> str:
    lines = ["| Method | Upload | Download | Embeddings up | Gradients down |", "|---|---:|---:|---:|---:|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {human(r['upload_bytes'])} | {human(r['download_bytes'])} | "
                     f"{human(r['embeddings_up_bytes'])} | {human(r['gradients_down_bytes'])} |")
    return "\n".join(lines)


def report(config, vocab_size=None, text_tokens: int = 128, examples_per_client: int | None = None) -> dict:
    mcfg = shapes_from_config(config, vocab_size)
    counts = parameter_counts(mcfg)
    examples, source = mean_examples_per_client(config, examples_per_client)
    traffic = traffic_for(config, mcfg, text_tokens, examples)
    return {"parameters": counts, "adapters": adapter_count(counts), "total": sum(counts.values()),
            "traffic": dataclasses.asdict(traffic), "examples_per_client_source": source, "per_client_per_round": communication(adapter_count(counts), traffic),
            "client_share": client_share(mcfg, counts, config.model.client_layers, traffic.sequence_length)}


def observed(config, workdir: str, vocab_size=None) -> dict:
    """A run with --split_server (its results.json) against the prediction for its settings (`config`), each client's
    examples and its data's sequence positions -> per method, the mean per client per round of the bytes observed
    on the split link (both ways) and in the upload, and the predicted bytes; and what each client process held."""
    import ml_collections

    path = os.path.join(workdir, "results.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--observed={workdir!r} holds no results.json; pass the --workdir of a finished run.")
    with open(path) as file:
        run = json.load(file)
    held = run.get("client_processes")
    if not held:
        raise ConfigError(f"--observed={workdir!r} is not a run with --split_server (its results.json names no "
                          "client processes).")
    given = json.loads(json.dumps(config.as_dict()))  # as results.json holds it (lists for tuples)
    ran = json.loads(json.dumps(read(ml_collections.ConfigDict(run["config"]), run=False).as_dict()))
    if given != ran:
        differs = sorted(key for key, value in given.items() if ran.get(key) != value)
        raise ConfigError(f"--config differs from the settings of the run in {workdir!r} (in {', '.join(differs)}); "
                          "pass the config and overrides that run was started with.")
    mcfg = shapes_from_config(config, vocab_size)
    adapters = adapter_count(parameter_counts(mcfg))
    labels = {method.label: method.name for method in METHODS.values()}
    methods = {}
    for label, history in run["history"].items():
        sums = {key: 0 for key in ("split_observed", "split_predicted", "upload_observed", "upload_predicted")}
        count = 0
        for record in history:
            for i, k in enumerate(record["clients"]):
                traffic = traffic_for(config, mcfg, held[k]["positions"] - held[k]["image_tokens"],
                                      run["client_train_examples"][k])
                predicted = communication(adapters, traffic)[label]
                sums["split_observed"] += record["split_sent_bytes"][i] + record["split_received_bytes"][i]
                sums["split_predicted"] += predicted["embeddings_up_bytes"] + predicted["gradients_down_bytes"]
                sums["upload_observed"] += record["upload_bytes"][i]
                sums["upload_predicted"] += predicted["upload_bytes"]
                count += 1
        mean = {key: value / count for key, value in sums.items()}
        methods[label] = {**mean, "method": labels.get(label, label), "client_rounds": count,
                          "split_ratio": mean["split_observed"] / mean["split_predicted"],
                          "upload_ratio": mean["upload_observed"] / mean["upload_predicted"],
                          "client_peak_rss_bytes": max(max(r["peak_rss_bytes"]) for r in history)}
    return {"workdir": workdir, "per_client_per_round": methods, "client_processes": held}


def observed_table(figures: dict) -> str:
    lines = ["| Method | Split link, observed | predicted | ratio | Upload, observed | predicted | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in figures["per_client_per_round"].items():
        lines.append(f"| {label} | {human(r['split_observed'])} | {human(r['split_predicted'])} | "
                     f"{r['split_ratio']:.3f} | {human(r['upload_observed'])} | {human(r['upload_predicted'])} | "
                     f"{r['upload_ratio']:.3f} |")
    return "\n".join(lines)


def write_json(figures: dict, out: str | None) -> None:
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(figures, f, indent=2)
        print(f"\nWritten to {out}")


def main() -> None:
    args = flags.FLAGS
    if args.observed:
        figures = observed(read(args.config, run=False), args.observed, args.vocab_size)
        print(f"Bytes per client per round of the run in {args.observed} (observed: the messages' bytes; predicted: "
              "this command's figures for the run's settings, each client's examples and its data's positions)\n")
        print(observed_table(figures))
        write_json(figures, args.out)
        return
    config = read(args.config, run=False)
    figures = report(config, args.vocab_size, args.text_tokens, args.examples_per_client)
    traffic = Traffic(**figures["traffic"])
    print(f"{config.name}: parameters by component (from abstract shapes; no weights read)\n")
    print(parameter_table(figures["parameters"]))
    print(f"\nCommunication per client per round: adapters in fp32; the split-learning traffic for "
          f"{traffic.local_steps} local steps of batch {traffic.batch_size} x {traffic.sequence_length} tokens "
          f"x {traffic.hidden_size} x {traffic.activation_bytes} bytes ({traffic.examples_per_client:,} local "
          f"examples per client: {figures['examples_per_client_source']}), plus FedNano's Fisher pass over them once.\n")
    print(traffic_table(figures["per_client_per_round"], traffic))
    share = figures["client_share"]
    print(f"\nThe client's share with model.client_layers={share['client_layers']} (of {share['decoder_layers']} "
          f"decoder layers), weights in {config.model.dtype}, FLOPs at {share['sequence_length']} positions: each "
          f"decoder layer run forward and backward to its input (frozen: no weight gradient); the client also keeps "
          f"{human(share['client_activation_bytes'])} of its layers' activations per example.\n")
    print(share_table(share))
    write_json(figures, args.out)


def define_flags() -> None:
    """Command-line flags, defined only when run as a command (importing this module defines none)."""
    cli.define_config_flag()
    flags.DEFINE_integer("vocab_size", None, "Embedding rows, for a config whose model section has no vocab_size "
                         "and no checkpoint path (a tokenizer built from the data).")
    flags.DEFINE_integer("text_tokens", 128, "Text tokens per training sequence (image tokens are added).")
    flags.DEFINE_integer("examples_per_client", None, "Local training examples per client (default: "
                         "data.train_examples / fed.num_clients, or the dataset's official train split over the "
                         "clients when data.train_examples is 0).")
    flags.DEFINE_string("out", None, "Also write the figures to this JSON file.")
    flags.DEFINE_string("observed", None, "The --workdir of a finished run with --split_server: its clients' bytes on "
                        "the split link and in the upload against this command's prediction for the run's own "
                        "settings (--config, with the overrides that run was given).")
