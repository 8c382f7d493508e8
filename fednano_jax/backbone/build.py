"""The experiment's backbone, as its family (`model.family`, backbone/family/) builds it: a checkpoint's
(`model.path`) or the small one pretrained here; with the config's rematerialisation, layer-scan unrolling and client
layers applied whatever built it."""

from __future__ import annotations

import dataclasses

from flax import nnx

from fednano_jax.backbone.family import family_of
from fednano_jax.models.mllm import MultimodalModel, split_model
from fednano_jax.settings import require_client_layers


def experiment_backbone(config, splits):
    """-> (graphdef, frozen, adapters, tokenizer, model config) of the config's backbone family."""
    return family_of(config).backbone(config, splits)


def with_remat(graphdef, mcfg, policy: str, scan_unroll: int = 1):
    """The model graph with decoder layers rematerialised by `policy` and `scan_unroll` of them per iteration of the
    layer scan (parameters unchanged), whatever built the backbone (pretraining, a cache, a checkpoint)."""
    if (mcfg.llm.remat, mcfg.llm.scan_unroll) == (policy, scan_unroll):
        return graphdef, mcfg
    mcfg = dataclasses.replace(mcfg, llm=dataclasses.replace(mcfg.llm, remat=policy, scan_unroll=scan_unroll))
    return model_graph(mcfg), mcfg


def with_client_layers(graphdef, mcfg, layers: int):
    """The model graph with the decoder's first `layers` layers on the client's side of the wire (parameters
    unchanged; models/mllm.client_side), whatever built the backbone; `layers` checked against the decoder's."""
    require_client_layers(layers, mcfg.llm.num_layers)
    if mcfg.client_layers == layers:
        return graphdef, mcfg
    mcfg = dataclasses.replace(mcfg, client_layers=layers)
    return model_graph(mcfg), mcfg


def model_graph(mcfg):
    """The graph of the model `mcfg` describes, built without allocating a parameter."""
    graphdef, _, _ = split_model(nnx.eval_shape(lambda: MultimodalModel(mcfg, nnx.Rngs(0))))
    return graphdef
