"""The LLaVA-1.5 family: a CLIP ViT tower, the mlp2x_gelu projector and a LLaMA-family decoder.

Weights: a llava-hf checkpoint directory at `model.path` (`load_pretrained` reads any directory whose
config.json has model_type 'llava' through this module's layout and name tables). Shapes: the preset's
sections (`presets.llava15_7b`: usable with no weights at hand) or the checkpoint's metadata. A text-only
checkpoint at `model.path` gets the config's tower aligned to it, as before families (the llama_text family
names that case).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp

from fednano_jax.backbone.family.base import Family
from fednano_jax.backbone.pretrained import llama_config
from fednano_jax.errors import WeightsError
from fednano_jax.models.mllm import AdapterConfig, MllmConfig
from fednano_jax.models.vision import VisionConfig
from fednano_jax.weights import safetensors_hf
from fednano_jax.weights.names import CONV, COPY, Prefixes, find_prefix, layer_norm, linear, llama_table


# ------------------------------------------------------------------ name tables: llava-hf -> our NanoEdge
def llava_prefixes(keys: set[str]) -> Prefixes:
    """Where a LLaVA checkpoint keeps its parts: llava-hf spells them differently across transformers
    versions (`language_model.model.*`, `model.language_model.*`, `vision_tower[.vision_model].*`)."""
    language_model = find_prefix(keys, "embed_tokens.weight", "token embeddings")
    heads = [k for k in keys if k.endswith("lm_head.weight")]
    return Prefixes(language_model, heads[0] if heads else "", find_prefix(keys, "embeddings.class_embedding",
                                                                         "CLIP class embedding"),
                    find_prefix(keys, "linear_1.weight", "multi_modal_projector"))


def clip_vision_table(p: Prefixes, num_layers: int) -> dict[str, tuple[str, str]]:
    """HF CLIPVisionModel (under `p.vision_model`) -> our VisionTower."""
    v = p.vision_model
    table = {"edge/vision/patch_embedding/kernel": (f"{v}embeddings.patch_embedding.weight", CONV),
             "edge/vision/class_embedding": (f"{v}embeddings.class_embedding", COPY),
             "edge/vision/position_embedding": (f"{v}embeddings.position_embedding.weight", COPY),
             **layer_norm("edge/vision/pre_layrnorm", f"{v}pre_layrnorm")}
    for i in range(num_layers):
        src, dst = f"{v}encoder.layers.{i}.", f"edge/vision/layers/{i}/"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            table.update(linear(f"{dst}self_attn/{proj}", f"{src}self_attn.{proj}"))
        table.update(layer_norm(f"{dst}layer_norm1", f"{src}layer_norm1"))
        table.update(layer_norm(f"{dst}layer_norm2", f"{src}layer_norm2"))
        table.update(linear(f"{dst}fc1", f"{src}mlp.fc1"))
        table.update(linear(f"{dst}fc2", f"{src}mlp.fc2"))
    return table


def projector_table(p: Prefixes) -> dict[str, tuple[str, str]]:
    """LLaVA's multi_modal_projector -> our mlp2x_gelu connector."""
    return {**linear("edge/connector/linear_1", f"{p.projector}linear_1"),
            **linear("edge/connector/linear_2", f"{p.projector}linear_2")}


# ------------------------------------------------------------------ shapes: a transformers LlavaConfig
def _image_statistics(directory: str) -> dict:
    path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        processor = json.load(f)
    return {key: tuple(processor[key]) for key in ("image_mean", "image_std") if key in processor}


def clip_config(hf, directory: str, dtype) -> VisionConfig:
    """CLIP vision tower config from a transformers LlavaConfig (and the checkpoint's preprocessor config)."""
    vc = hf.vision_config
    if vc.model_type != "clip_vision_model":
        raise WeightsError(f"Unsupported vision tower {vc.model_type!r}; expected a CLIP vision model.")
    layer = hf.vision_feature_layer
    if not isinstance(layer, int):
        raise WeightsError(f"vision_feature_layer={layer!r} is not supported; expected one layer index.")
    strategy = hf.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise WeightsError(f"vision_feature_select_strategy {strategy!r} is not supported; expected 'default' "
                           "or 'full'.")
    if hf.projector_hidden_act != "gelu" or not getattr(hf, "multimodal_projector_bias", True):
        raise WeightsError("Only LLaVA's mlp2x_gelu projector (GELU, with biases) is supported.")
    return VisionConfig(image_size=vc.image_size, patch_size=vc.patch_size, hidden_size=vc.hidden_size,
                        intermediate_size=vc.intermediate_size, num_layers=vc.num_hidden_layers,
                        num_heads=vc.num_attention_heads, feature_layer=layer, select_strategy=strategy,
                        layer_norm_eps=vc.layer_norm_eps, activation=vc.hidden_act, dtype=jnp.dtype(dtype).name,
                        **_image_statistics(directory))


class Llava(Family):
    name = "llava"
    hf_model_type = "llava"
    hf_description = "LLaVA-1.5"

    def hf_layout(self, hf, directory: str, dtype, adapter: AdapterConfig):
        text = hf.text_config
        prefixes = llava_prefixes(safetensors_hf.checkpoint_keys(directory))
        vision = clip_config(hf, directory, dtype)
        image_token = getattr(hf, "image_token_id", None)
        image_token = hf.image_token_index if image_token is None else image_token
        table = {**llama_table(prefixes, text.num_hidden_layers, text.tie_word_embeddings),
                 **clip_vision_table(prefixes, vision.num_layers), **projector_table(prefixes)}
        return MllmConfig(vision, llama_config(text, dtype), adapter, image_token, decoder=self.decoder), table


FAMILY = Llava()
