"""The small backbone pretrained here: the one stored for a config's settings (shipped with the repository or
cached), or pretrained on the held-aside data and cached. Families without a checkpoint use it (tiny, and
MiniGPT-4's layout without MiniGPT-4's files)."""

from __future__ import annotations

import os
from typing import Callable

import jax
from flax import nnx

from fednano_jax.backbone import cache, pretrain
from fednano_jax.data import pipeline
from fednano_jax.data.tokenizer import IMAGE, load_tokenizer
from fednano_jax.errors import WeightsError
from fednano_jax.models.mllm import EdgeModel, MllmConfig, MultimodalModel, split_model

# (vocabulary size, image token id) -> the model config of a family's sections
ModelConfigOf = Callable[[int, int], MllmConfig]


def stored_backbones(config) -> list[tuple[str, str]]:
    """-> [(directory, "shipped with the repository in" | "cached in")]: the stored backbones for these settings,
    in the order a run tries them."""
    places = ((pretrain.shipped_dir(config), "shipped with the repository in"), (pretrain.cache_dir(config), "cached in"))
    return [(d, where) for d, where in places if d and cache.backbone_is_cached(d)]


def load_stored(config, directory: str, model_config: ModelConfigOf):
    """-> (graphdef, frozen, adapters, tokenizer, model config) of a stored backbone, or None if unreadable."""
    tokenizer = load_tokenizer(os.path.join(directory, cache.TOKENIZER))
    mcfg = model_config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE))
    graphdef, frozen, adapters = split_model(MultimodalModel(mcfg, nnx.Rngs(config.pretrain.seed)))
    try:
        return graphdef, cache.load_backbone(directory, frozen), adapters, tokenizer, mcfg
    except Exception as error:  # noqa: BLE001 - any unreadable backbone is rebuilt, never trusted
        print(f"Warning: the backbone in {directory} is unreadable ({type(error).__name__}); pretraining it again.")
        return None


def stored_or_pretrained(config, splits, model_config: ModelConfigOf):
    """-> (graphdef, frozen, adapters, tokenizer, model config): the backbone shipped with the repository for
    these settings (pretrain.shipped), cached, or pretrained here and cached."""
    for directory, where in stored_backbones(config):
        loaded = load_stored(config, directory, model_config)
        if loaded is not None:
            print(f"Using the pretrained backbone {where} {directory}")
            return loaded
    backbone_dir = pretrain.cache_dir(config)
    tokenizer = pipeline.tokenizer_for(splits)
    mcfg = model_config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE))
    graphdef, frozen, adapters = split_model(MultimodalModel(mcfg, nnx.Rngs(config.pretrain.seed)))
    tokens = pipeline.tokenize_pretraining(splits, tokenizer, mcfg.vision.num_image_tokens)
    print(f"Pretraining the backbone on {len(tokens)} held-aside examples (cached in {backbone_dir})")
    frozen = pretrain.pretrain_backbone(graphdef, frozen, adapters, tokens, splits.images, config)
    cache.save_backbone(backbone_dir, frozen, tokenizer)
    return graphdef, frozen, adapters, tokenizer, mcfg


def stored_part(config, model_config: ModelConfigOf, model=EdgeModel):
    """-> (graphdef, frozen, adapters, tokenizer, model config) of `model`, a part of the whole (`EdgeModel`: a
    client's NanoEdge alone; `ServerModel`: the server's decoder alone), read from the backbone stored for these
    settings; the other part's arrays are never read."""
    found = stored_backbones(config)
    if not found:
        raise WeightsError("No pretrained backbone is stored for these settings; run python -m fednano_jax.main "
                           "with this config once (it pretrains and caches one) before starting a part alone.")
    directory = found[0][0]
    tokenizer = load_tokenizer(os.path.join(directory, cache.TOKENIZER))
    mcfg = model_config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE))
    graphdef, frozen, adapters = split_model(nnx.eval_shape(lambda: model(mcfg, nnx.Rngs(config.pretrain.seed))))
    # Under jit only the adapter initialisers survive dead-code elimination: the part is not initialised twice.
    adapters = jax.jit(lambda: split_model(model(mcfg, nnx.Rngs(config.pretrain.seed)))[2])()
    return graphdef, cache.load_part(directory, frozen), adapters, tokenizer, mcfg
