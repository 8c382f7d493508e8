"""Name tables: each parameter of our model <- (checkpoint tensor name, layout transform).

Checkpoint names are Hugging Face's (LLaMA, CLIP vision, LLaVA projector); GGUF names
are translated to them first (`gguf_llama.hf_name`), so one table serves every format.
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


def llava_prefixes(keys: set[str]) -> Prefixes:
    """Where a LLaVA checkpoint keeps its parts: llava-hf spells them differently across transformers
    versions (`language_model.model.*`, `model.language_model.*`, `vision_tower[.vision_model].*`)."""
    language_model = find_prefix(keys, "embed_tokens.weight", "token embeddings")
    heads = [k for k in keys if k.endswith("lm_head.weight")]
    return Prefixes(language_model, heads[0] if heads else "", find_prefix(keys, "embeddings.class_embedding",
                                                                         "CLIP class embedding"),
                    find_prefix(keys, "linear_1.weight", "multi_modal_projector"))


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


def _layer_norm(dst: str, src: str) -> dict[str, tuple[str, str]]:
    return {f"{dst}/scale": (f"{src}.weight", COPY), f"{dst}/bias": (f"{src}.bias", COPY)}


def _linear(dst: str, src: str) -> dict[str, tuple[str, str]]:
    return {f"{dst}/kernel": (f"{src}.weight", LINEAR), f"{dst}/bias": (f"{src}.bias", COPY)}


def clip_vision_table(p: Prefixes, num_layers: int) -> dict[str, tuple[str, str]]:
    v = p.vision_model
    table = {"edge/vision/patch_embedding/kernel": (f"{v}embeddings.patch_embedding.weight", CONV),
             "edge/vision/class_embedding": (f"{v}embeddings.class_embedding", COPY),
             "edge/vision/position_embedding": (f"{v}embeddings.position_embedding.weight", COPY),
             **_layer_norm("edge/vision/pre_layrnorm", f"{v}pre_layrnorm")}
    for i in range(num_layers):
        src, dst = f"{v}encoder.layers.{i}.", f"edge/vision/layers/{i}/"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            table.update(_linear(f"{dst}self_attn/{proj}", f"{src}self_attn.{proj}"))
        table.update(_layer_norm(f"{dst}layer_norm1", f"{src}layer_norm1"))
        table.update(_layer_norm(f"{dst}layer_norm2", f"{src}layer_norm2"))
        table.update(_linear(f"{dst}fc1", f"{src}mlp.fc1"))
        table.update(_linear(f"{dst}fc2", f"{src}mlp.fc2"))
    return table


def eva_vit_hf_table(src: str, dst: str, num_layers: int) -> dict[str, tuple[str, str]]:
    """HF `Blip2VisionModel` (under `src`, e.g. `vision_model.`) -> our EvaVisionTower (under `dst`)."""
    table = {f"{dst}patch_embed/kernel": (f"{src}embeddings.patch_embedding.weight", CONV),
             f"{dst}patch_embed/bias": (f"{src}embeddings.patch_embedding.bias", COPY),
             f"{dst}cls_token": (f"{src}embeddings.class_embedding", COPY),
             f"{dst}pos_embed": (f"{src}embeddings.position_embedding", COPY),
             **_layer_norm(f"{dst}ln_vision", f"{src}post_layernorm")}
    for i in range(num_layers):
        at, layer = f"{dst}blocks/{i}/", f"{src}encoder.layers.{i}."
        table.update({f"{at}attn/qkv/kernel": (f"{layer}self_attn.qkv.weight", LINEAR),
                      f"{at}attn/q_bias": (f"{layer}self_attn.qkv.bias", QKV_Q),
                      f"{at}attn/v_bias": (f"{layer}self_attn.qkv.bias", QKV_V),
                      **_linear(f"{at}attn/proj", f"{layer}self_attn.projection"),
                      **_layer_norm(f"{at}norm1", f"{layer}layer_norm1"),
                      **_layer_norm(f"{at}norm2", f"{layer}layer_norm2"),
                      **_linear(f"{at}fc1", f"{layer}mlp.fc1"), **_linear(f"{at}fc2", f"{layer}mlp.fc2")})
    return table


def eva_vit_lavis_table(dst: str, num_layers: int, src: str = "", ln_vision: str = "ln_vision.") -> dict[str, tuple[str, str]]:
    """LAVIS's `eva_vit_g.pth` (keys under `src`, none by default) and BLIP-2's `ln_vision` -> EvaVisionTower."""
    table = {f"{dst}patch_embed/kernel": (f"{src}patch_embed.proj.weight", CONV),
             f"{dst}patch_embed/bias": (f"{src}patch_embed.proj.bias", COPY),
             f"{dst}cls_token": (f"{src}cls_token", COPY), f"{dst}pos_embed": (f"{src}pos_embed", COPY),
             **_layer_norm(f"{dst}ln_vision", ln_vision.rstrip("."))}
    for i in range(num_layers):
        at, block = f"{dst}blocks/{i}/", f"{src}blocks.{i}."
        table.update({f"{at}attn/qkv/kernel": (f"{block}attn.qkv.weight", LINEAR),
                      f"{at}attn/q_bias": (f"{block}attn.q_bias", COPY),
                      f"{at}attn/v_bias": (f"{block}attn.v_bias", COPY),
                      **_linear(f"{at}attn/proj", f"{block}attn.proj"),
                      **_layer_norm(f"{at}norm1", f"{block}norm1"), **_layer_norm(f"{at}norm2", f"{block}norm2"),
                      **_linear(f"{at}fc1", f"{block}mlp.fc1"), **_linear(f"{at}fc2", f"{block}mlp.fc2")})
    return table


def _qformer_attention(dst: str, src: str, inner: str) -> dict[str, tuple[str, str]]:
    return {**_linear(f"{dst}/query", f"{src}.{inner}.query"), **_linear(f"{dst}/key", f"{src}.{inner}.key"),
            **_linear(f"{dst}/value", f"{src}.{inner}.value"), **_linear(f"{dst}/dense", f"{src}.output.dense"),
            **_layer_norm(f"{dst}/layer_norm", f"{src}.output.LayerNorm")}


def qformer_table(src: str, dst: str, num_layers: int, cross_attention_frequency: int, lavis: bool = False,
                  query_tokens: str = "query_tokens") -> dict[str, tuple[str, str]]:
    """A BLIP-2 Q-Former (under `src`) and its `query_tokens` -> our QFormer. HF's `Blip2QFormerModel`
    (`qformer.` in a BLIP-2 directory) names the attention `attention.attention` and the queries' norm
    `layernorm`; LAVIS (`Qformer.bert.`) names them `attention.self` and `embeddings.LayerNorm`."""
    inner, norm = ("self", "embeddings.LayerNorm") if lavis else ("attention", "layernorm")
    table = {f"{dst}query_tokens": (query_tokens, COPY), **_layer_norm(f"{dst}layernorm", f"{src}{norm}")}
    for i in range(num_layers):
        at, layer = f"{dst}layers/{i}/", f"{src}encoder.layer.{i}."
        table.update(_qformer_attention(f"{at}attention", f"{layer}attention", inner))
        if i % cross_attention_frequency == 0:
            table.update(_qformer_attention(f"{at}crossattention", f"{layer}crossattention", inner))
        table.update({**_linear(f"{at}intermediate_query", f"{layer}intermediate_query.dense"),
                      **_linear(f"{at}output_query", f"{layer}output_query.dense"),
                      **_layer_norm(f"{at}output_query_norm", f"{layer}output_query.LayerNorm")})
    return table


def projector_table(p: Prefixes) -> dict[str, tuple[str, str]]:
    return {**_linear("edge/connector/linear_1", f"{p.projector}linear_1"),
            **_linear("edge/connector/linear_2", f"{p.projector}linear_2")}


def by_source(table: dict[str, tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """checkpoint name -> [(our name, transform)]: a tied embedding feeds two of our parameters."""
    inverse: dict[str, list[tuple[str, str]]] = {}
    for ours, (source, transform) in table.items():
        inverse.setdefault(source, []).append((ours, transform))
    return inverse
