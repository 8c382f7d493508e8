"""A pretrained checkpoint as an experiment's backbone (`config.model.path`), as its family loads it.

A checkpoint with its own vision side (LLaVA, MiniGPT-4's files) is used as it is. A text-only LLM (SmolLM2,
LLaMA, Vicuna, ...) gets the config's vision side (its family's: a CLIP tower, or MiniGPT-4's EVA ViT and
Q-Former), connector and an `<image>` token, and LLaVA's alignment stage trains that vision side on the
held-aside pretraining examples with the LLM frozen. Only the aligned vision side is cached (keyed like the
small backbone); the LLM is read from its checkpoint every run.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from fednano_jax.backbone import cache, pretrain
from fednano_jax.backbone.family import family_of
from fednano_jax.data import pipeline
from fednano_jax.data.tokenizer import add_image_token, load_tokenizer
from fednano_jax.errors import WeightsError
from fednano_jax.models.mllm import EdgeModel, MllmConfig, MultimodalModel, split_model
from fednano_jax.backbone.pretrained import PretrainedModel
from fednano_jax.weights.fill import flatten, unflatten

VISION_SIDE = ("edge/vision/", "edge/connector/")


def _vision_side(state) -> dict:
    return {k: v for k, v in flatten(nnx.to_pure_dict(state)).items() if k.startswith(VISION_SIDE)}


def attach_vision_tower(loaded: PretrainedModel, mcfg: MllmConfig, seed: int, model=MultimodalModel):
    """-> (graphdef, frozen, adapters) of `model` (the whole model, or NanoEdge alone as `loaded` holds it): the
    checkpoint's LLM and embeddings (grown by zero rows for new token ids, which image features replace), a
    freshly initialised vision side and NanoAdapters."""
    graphdef, abstract_frozen, _ = split_model(nnx.eval_shape(lambda: model(mcfg, nnx.Rngs(seed))))
    # Under jit only the initialisers of what is returned survive: the LLM is not allocated a second time.
    fresh_vision = jax.jit(lambda: _vision_side(split_model(model(mcfg, nnx.Rngs(seed)))[1]))()
    adapters = jax.jit(lambda: split_model(model(mcfg, nnx.Rngs(seed)))[2])()
    params = flatten(nnx.to_pure_dict(loaded.frozen))
    embedding = params["edge/embed_tokens/embedding"]
    extra_rows = mcfg.embed_vocab_size - embedding.shape[0]
    params["edge/embed_tokens/embedding"] = jnp.pad(embedding, ((0, extra_rows), (0, 0)))
    template = nnx.to_pure_dict(abstract_frozen)
    frozen = jax.tree.map(lambda x: x, abstract_frozen)
    nnx.replace_by_pure_dict(frozen, unflatten({**params, **fresh_vision}, template))
    return graphdef, frozen, adapters


def checkpoint_backbone(config, splits, family=None):
    """-> (graphdef, frozen, adapters, tokenizer, model config) from config.model.path, loaded by `family` (the
    config's, by default)."""
    family = family or family_of(config)
    loaded = family.load(config)
    print(f"Loaded {loaded.source}")
    if loaded.config.vision is not None:
        return loaded.graphdef, loaded.frozen, loaded.adapters, loaded.tokenizer, loaded.config
    backbone_dir = pretrain.cache_dir(config)
    cached = cache.backbone_is_cached(backbone_dir)
    tokenizer = load_tokenizer(os.path.join(backbone_dir, cache.TOKENIZER)) if cached else loaded.tokenizer
    graphdef, frozen, adapters, mcfg = _with_tower(config, family, loaded, tokenizer)
    del loaded
    if cached:
        try:
            return graphdef, _cached_vision_side(frozen, backbone_dir), adapters, tokenizer, mcfg
        except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt, never trusted
            print(f"Warning: the cached vision tower in {backbone_dir} is unreadable ({type(error).__name__}); "
                  "aligning it again.")
    tokens = pipeline.tokenize_pretraining(splits, tokenizer, mcfg.vision.num_image_tokens)
    print(f"Aligning the vision tower and connector to the frozen LLM on {len(tokens)} held-aside examples "
          f"(cached in {backbone_dir})")
    frozen = pretrain.pretrain_backbone(graphdef, frozen, adapters, tokens, splits.images, config,
                                        trainable_prefixes=VISION_SIDE)
    cache.save_backbone(backbone_dir, _vision_side(frozen), tokenizer)
    return graphdef, frozen, adapters, tokenizer, mcfg


def checkpoint_edge(config, family):
    """-> (graphdef, frozen, adapters, tokenizer, model config) of an EdgeModel, NanoEdge alone, from the files
    `checkpoint_backbone` reads, without reading a decoder tensor: the checkpoint's own vision side, or a text-only
    LLM's embeddings with the vision side a full run aligned and cached (a client never aligns one)."""
    loaded = family.load(config, part="edge")
    print(f"Loaded NanoEdge from {loaded.source}")
    if loaded.config.vision is not None:
        return loaded.graphdef, loaded.frozen, loaded.adapters, loaded.tokenizer, loaded.config
    backbone_dir = pretrain.cache_dir(config)
    if not cache.backbone_is_cached(backbone_dir):
        raise WeightsError(f"No vision tower aligned to {loaded.source} is cached in {backbone_dir}; run python -m "
                           "fednano_jax.main with this config once (it aligns and caches one) before starting a "
                           "client alone.")
    tokenizer = load_tokenizer(os.path.join(backbone_dir, cache.TOKENIZER))
    graphdef, frozen, adapters, mcfg = _with_tower(config, family, loaded, tokenizer, EdgeModel)
    return graphdef, _cached_vision_side(frozen, backbone_dir), adapters, tokenizer, mcfg


def _with_tower(config, family, loaded: PretrainedModel, tokenizer, model=MultimodalModel):
    """-> (graphdef, frozen, adapters, model config): a text-only `loaded` with the config's vision side (fresh)
    and `<image>` added to `tokenizer`."""
    mcfg = family.with_vision_tower(config, loaded.config.llm, add_image_token(tokenizer), len(tokenizer))
    return (*attach_vision_tower(loaded, mcfg, config.pretrain.seed, model), mcfg)


def _cached_vision_side(frozen, backbone_dir: str):
    """`frozen` with its vision side replaced by the aligned one cached in `backbone_dir`."""
    frozen = _with_vision_side(frozen, cache.load_backbone(backbone_dir, _vision_side(frozen)))
    print(f"Using the aligned vision tower cached in {backbone_dir}")
    return frozen


def _with_vision_side(frozen, vision: dict):
    template = nnx.to_pure_dict(frozen)
    state = jax.tree.map(lambda x: x, frozen)
    nnx.replace_by_pure_dict(state, unflatten({**flatten(template), **vision}, template))
    return state
