"""The experiment's backbone, as its family (`model.family`, backbone/family/) builds it: a checkpoint's
(`model.path`) or the small one pretrained here; with the config's rematerialisation applied whatever built it."""

from __future__ import annotations

import dataclasses

from flax import nnx

from fednano_jax.backbone.family import family_of
from fednano_jax.models.mllm import MultimodalModel, split_model


def experiment_backbone(config, splits):
    """-> (graphdef, frozen, adapters, tokenizer, model config) of the config's backbone family."""
    return family_of(config).backbone(config, splits)


def with_remat(graphdef, mcfg, policy: str):
    """The model graph with decoder layers rematerialised by `policy` (parameters unchanged), whatever
    built the backbone (pretraining, a cache, a checkpoint)."""
    if mcfg.llm.remat == policy:
        return graphdef, mcfg
    mcfg = dataclasses.replace(mcfg, llm=dataclasses.replace(mcfg.llm, remat=policy))
    graphdef, _, _ = split_model(nnx.eval_shape(lambda: MultimodalModel(mcfg, nnx.Rngs(0))))
    return graphdef, mcfg
