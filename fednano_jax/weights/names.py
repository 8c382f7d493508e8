"""Name tables: each parameter of our model <- (checkpoint tensor name, layout transform).

What every table is made of: the layout transforms, where a part sits in a checkpoint's key space, the
LLaMA decoder's table (every family's server so far) and the entries of a linear layer and a LayerNorm.
A family's own tables (LLaVA's CLIP tower and projector, MiniGPT-4's EVA ViT and Q-Former) live in its
module under backbone/family/. Checkpoint names are Hugging Face's (or LAVIS's); GGUF names
are translated to them first (`gguf_llama.hf_name`), so one LLaMA table serves every format.
Our names are the '/'-joined paths of the model's state (`nnx.to_pure_dict`). The decoder's
layers are stacked (`models/llama.py`): layer i of a stacked parameter is named `path@i`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fednano_jax.errors import WeightsError

LINEAR = "linear"  # torch [out, in] -> flax kernel [in, out]
CONV = "conv"  # torch [out, in, kh, kw] -> flax [kh, kw, in, out]
COPY = "copy"
QKV_Q, QKV_V = "qkv_bias_q", "qkv_bias_v"  # HF BLIP-2's qkv bias is cat(q, zeros, v): its first or last third


@dataclasses.dataclass(frozen=True)
class Prefixes:
    """Where each part of a model sits in a checkpoint's key space."""

    language_model: str  # holds embed_tokens, layers, norm
    lm_head: str  # the full key of the LM head weight
    vision_model: str = ""
    projector: str = ""


LLAMA = Prefixes("model.", "lm_head.weight")


def find_prefix(keys, suffix: str, what: str, source: str = "the checkpoint") -> str:
    """The shortest key prefix before `suffix` (where a part of a model sits in a checkpoint's key space)."""
    found = sorted(k[: -len(suffix)] for k in keys if k.endswith(suffix))
    if not found:
        raise WeightsError(f"No tensor named '*{suffix}' ({what}) in {source}.")
    return min(found, key=len)


STACKED = "@"  # `path@i`: slice i of a parameter whose layers are stacked on its leading axis


def stacked_slot(name: str) -> tuple[str, int | None]:
    """`path@i` -> (path, i); a plain name -> (name, None)."""
    path, sep, index = name.rpartition(STACKED)
    return (path, int(index)) if sep else (name, None)


def to_flax(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == LINEAR:
        return array.T
    if transform == CONV:
        return array.transpose(2, 3, 1, 0)
    if transform in (QKV_Q, QKV_V):
        third = array.shape[0] // 3
        return array[:third] if transform == QKV_Q else array[2 * third:]
    return array


def llama_table(p: Prefixes, num_layers: int, tied: bool) -> dict[str, tuple[str, str]]:
    lm = p.language_model
    table = {"edge/embed_tokens/embedding": (f"{lm}embed_tokens.weight", COPY),
             "server/norm/weight": (f"{lm}norm.weight", COPY),
             "server/lm_head/kernel": (f"{lm}embed_tokens.weight" if tied else p.lm_head, LINEAR)}
    for i in range(num_layers):
        src, at = f"{lm}layers.{i}.", f"{STACKED}{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            table[f"server/layers/{norm}/weight{at}"] = (f"{src}{norm}.weight", COPY)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            table[f"server/layers/self_attn/{proj}/kernel{at}"] = (f"{src}self_attn.{proj}.weight", LINEAR)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            table[f"server/layers/mlp/{proj}/kernel{at}"] = (f"{src}mlp.{proj}.weight", LINEAR)
    return table


def layer_norm(dst: str, src: str) -> dict[str, tuple[str, str]]:
    return {f"{dst}/scale": (f"{src}.weight", COPY), f"{dst}/bias": (f"{src}.bias", COPY)}


def linear(dst: str, src: str) -> dict[str, tuple[str, str]]:
    return {f"{dst}/kernel": (f"{src}.weight", LINEAR), f"{dst}/bias": (f"{src}.bias", COPY)}


EDGE = "edge/"  # our names under NanoEdge (the client); the rest is the server's decoder
# The parts a loader can fill: the whole model, NanoEdge alone (a split-step client's), the decoder alone (its
# server's), as the prefix of our names each holds.
PARTS = {"whole": "", "edge": EDGE, "server": "server/"}


def part_entries(table: dict[str, tuple[str, str]], part: str) -> dict[str, tuple[str, str]]:
    """The entries of a name table that fill `part` (PARTS): NanoEdge's (vision side, connector, token embeddings)
    for a client, the decoder's (layers, final norm, LM head) for its server, all for the whole model."""
    return {ours: entry for ours, entry in table.items() if ours.startswith(PARTS[part])}


def sources(table: dict[str, tuple[str, str]]) -> set[str]:
    """The checkpoint names a table reads: what a loader streams (`keep`), and nothing else."""
    return {source for source, _ in table.values()}


def by_source(table: dict[str, tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """checkpoint name -> [(our name, transform)]: a tied embedding feeds two of our parameters."""
    inverse: dict[str, list[tuple[str, str]]] = {}
    for ours, (source, transform) in table.items():
        inverse.setdefault(source, []).append((ours, transform))
    return inverse
