"""The experiment's backbone: the small one pretrained on held-aside data (and cached), or a checkpoint's
(`model.path`), with the config's rematerialisation applied whatever built it."""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from fednano_jax.backbone import cache, pretrain
from fednano_jax.backbone.from_checkpoint import checkpoint_backbone
from fednano_jax.config import model_config
from fednano_jax.data import pipeline
from fednano_jax.data.tokenizer import IMAGE, load_tokenizer
from fednano_jax.models.mllm import MultimodalModel, split_model


def _load(config, directory: str):
    """-> (graphdef, frozen, adapters, tokenizer, model config) of a stored backbone, or None if unreadable."""
    tokenizer = load_tokenizer(os.path.join(directory, cache.TOKENIZER))
    mcfg = model_config(config, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE))
    graphdef, frozen, adapters = split_model(MultimodalModel(mcfg, nnx.Rngs(config.pretrain.seed)))
    try:
        return graphdef, cache.load_backbone(directory, frozen), adapters, tokenizer, mcfg
    except Exception as error:  # noqa: BLE001 - any unreadable backbone is rebuilt, never trusted
        print(f"Warning: the backbone in {directory} is unreadable ({type(error).__name__}); pretraining it again.")
        return None


def stored_backbones(config) -> list[tuple[str, str]]:
    """-> [(directory, "shipped with the repository in" | "cached in")]: the stored backbones for these settings,
    in the order a run tries them."""
    places = ((pretrain.shipped_dir(config), "shipped with the repository in"), (pretrain.cache_dir(config), "cached in"))
    return [(d, where) for d, where in places if d and cache.backbone_is_cached(d)]


def experiment_backbone(config, splits):
    """-> (graphdef, frozen, adapters, tokenizer, model config): a checkpoint's (model.path); or the small one,
    shipped with the repository for these settings (pretrain.shipped), cached, or pretrained and cached."""
    if config.model.get("path"):
        return checkpoint_backbone(config, splits)
    for directory, where in stored_backbones(config):
        loaded = _load(config, directory)
        if loaded is not None:
            print(f"Using the pretrained backbone {where} {directory}")
            return loaded
    backbone_dir = pretrain.cache_dir(config)
    tokenizer = pipeline.tokenizer_for(splits)
    mcfg = model_config(config, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE))
    graphdef, frozen, adapters = split_model(MultimodalModel(mcfg, nnx.Rngs(config.pretrain.seed)))
    tokens = pipeline.tokenize_pretraining(splits, tokenizer, mcfg.vision.num_image_tokens)
    print(f"Pretraining the backbone on {len(tokens)} held-aside examples (cached in {backbone_dir})")
    frozen = pretrain.pretrain_backbone(graphdef, frozen, adapters, tokens, splits.images, config)
    cache.save_backbone(backbone_dir, frozen, tokenizer)
    return graphdef, frozen, adapters, tokenizer, mcfg


def with_remat(graphdef, mcfg, policy: str):
    """The model graph with decoder layers rematerialised by `policy` (parameters unchanged), whatever
    built the backbone (pretraining, a cache, a checkpoint)."""
    if mcfg.llm.remat == policy:
        return graphdef, mcfg
    mcfg = dataclasses.replace(mcfg, llm=dataclasses.replace(mcfg.llm, remat=policy))
    graphdef, _, _ = split_model(nnx.eval_shape(lambda: MultimodalModel(mcfg, nnx.Rngs(0))))
    return graphdef, mcfg
