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


def experiment_backbone(config, splits):
    """-> (graphdef, frozen, adapters, tokenizer, model config): from the cache, or pretrained and cached."""
    if config.model.get("path"):
        return checkpoint_backbone(config, splits)
    backbone_dir = pretrain.cache_dir(config)
    if cache.backbone_is_cached(backbone_dir):
        tokenizer = load_tokenizer(os.path.join(backbone_dir, cache.TOKENIZER))
        mcfg = model_config(config, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE))
        graphdef, frozen, adapters = split_model(MultimodalModel(mcfg, nnx.Rngs(config.pretrain.seed)))
        try:
            frozen = cache.load_backbone(backbone_dir, frozen)
            print(f"Using the pretrained backbone cached in {backbone_dir}")
            return graphdef, frozen, adapters, tokenizer, mcfg
        except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt, never trusted
            print(f"Warning: the cached backbone in {backbone_dir} is unreadable ({type(error).__name__}); "
                  "pretraining it again.")
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
