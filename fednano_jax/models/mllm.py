"""The multimodal model, split the way FedNano deploys it.

NanoEdge (client): vision tower, connector, token embeddings and the two
NanoAdapters (A_I on projected image tokens, A_T on text token embeddings); it
turns token ids and images into input embeddings. The server keeps the LLM
(decoder blocks, final norm, LM head) frozen and turns embeddings into logits.
With `MllmConfig.client_layers` = k the client also runs the decoder's first k
layers (frozen) and the server the rest (`client_side`; FedSEA-LLaMA's split).
Image tokens are spliced where the (already expanded) `<image>` placeholder ids sit,
as LLaVA does. The vision side is whatever module `MllmConfig.vision` builds (`build`): LLaVA's CLIP
tower (then a projector) or MiniGPT-4's EVA ViT and Q-Former (then `llama_proj`); the server is
`MllmConfig.decoder` on `MllmConfig.llm`. The backbone family (`backbone/family/`) fills both in.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from fednano_jax.models.connector import make_connector
from fednano_jax.models.llama import LlamaConfig, LlamaDecoder
from fednano_jax.models.nano_adapter import AdapterParam, NanoAdapter


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    rank: int = 64
    alpha: float = 16.0
    image: bool = True  # A_I on image tokens
    text: bool = True  # A_T on text tokens


class VisionSideConfig(Protocol):
    """What NanoEdge needs of a vision side's config (models/vision.VisionConfig, models/minigpt4's, ...)."""

    image_size: int
    parts: tuple[tuple[str, str], ...]  # (label, path under NanoEdge's `vision/`): what the client holds

    @property
    def num_image_tokens(self) -> int: ...  # image embeddings per image

    @property
    def feature_size(self) -> int: ...  # the width the connector reads

    def build(self, rngs: nnx.Rngs) -> nnx.Module: ...  # images [B, H, W, 3] -> features [B, tokens, feature_size]


@dataclasses.dataclass(frozen=True)
class MllmConfig:
    vision: VisionSideConfig | None  # None: a text-only LLM (no vision side, no A_I)
    llm: LlamaConfig  # the decoder's config
    adapter: AdapterConfig
    image_token_id: int
    connector: str = "mlp2x_gelu"
    embed_vocab_size: int | None = None  # rows of the client's embedding table, when it has ids the LM head has not
                                          # (an `<image>` token added to a text-only LLM's tokenizer)
    decoder: type = LlamaDecoder  # the server's module, built as decoder(llm, rngs): the backbone family names it
    client_layers: int = 0  # the decoder's first layers, run (frozen) by the client after NanoEdge: the wire carries
                            # their output (model.client_layers)


def splice_image_features(text_embeds: jax.Array, image_features: jax.Array, is_image: jax.Array) -> jax.Array:
    """Put image feature i at the i-th image-token position of each row.

    text_embeds [B, T, D]; image_features [B, N, D]; is_image [B, T] with N True per
    image row (none in a text-only row).
    """
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_features.shape[1] - 1)
    gathered = jnp.take_along_axis(image_features, slot[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class NanoEdge(nnx.Module):
    """Everything a client holds: the only place raw images and token ids are seen."""

    def __init__(self, config: MllmConfig, rngs: nnx.Rngs):
        d = config.llm.hidden_size
        dtype = jnp.dtype(config.llm.dtype)
        v = config.vision
        self.vision = v.build(rngs) if v else None
        self.connector = make_connector(config.connector, v.feature_size, d, rngs, dtype) if v else None
        self.embed_tokens = nnx.Embed(config.embed_vocab_size or config.llm.vocab_size, d, dtype=dtype, rngs=rngs,
                                      embedding_init=nnx.initializers.normal(0.02))
        a = config.adapter
        self.adapter_image = NanoAdapter(d, a.rank, a.alpha, rngs) if a.image and config.vision else None
        self.adapter_text = NanoAdapter(d, a.rank, a.alpha, rngs) if a.text else None
        self.image_token_id = config.image_token_id

    def embed_text(self, input_ids: jax.Array) -> jax.Array:
        embeds = self.embed_tokens(input_ids)
        return self.adapter_text(embeds) if self.adapter_text is not None else embeds

    def embed_images(self, images: jax.Array) -> jax.Array:
        if self.vision is None:
            raise ValueError("This model has no vision tower (a text-only LLM); pass no images.")
        features = self.connector(self.vision(images))
        return self.adapter_image(features) if self.adapter_image is not None else features

    def __call__(self, input_ids: jax.Array, images: jax.Array | None = None) -> jax.Array:
        embeds = self.embed_text(input_ids)
        if images is None:
            return embeds
        return splice_image_features(embeds, self.embed_images(images), input_ids == self.image_token_id)


class MultimodalModel(nnx.Module):
    def __init__(self, config: MllmConfig, rngs: nnx.Rngs):
        self.edge = NanoEdge(config, rngs)
        self.server = config.decoder(config.llm, rngs)
        self.config = config

    def __call__(self, input_ids, attention_mask, images=None):
        return self.server(self.edge(input_ids, images), attention_mask)


def client_side(model: nnx.Module, input_ids: jax.Array, images, attention_mask: jax.Array) -> jax.Array:
    """What a client sends the server (`MultimodalModel`, or `EdgeModel` alone): NanoEdge's embeddings, through the
    decoder's first `config.client_layers` layers. Those layers are the first slice of the decoder's stacked
    layers (no copy of their weights); the server goes on from layer `client_layers` (`LlamaDecoder`'s
    `first_layer`), so the two sides compose to the whole model."""
    embeds = model.edge(input_ids, images)
    layers = model.config.client_layers
    return model.server.layers_between(embeds, attention_mask, 0, layers) if layers else embeds


class EdgeModel(nnx.Module):
    """A client's half alone: NanoEdge, under the same paths as in MultimodalModel (`edge/...`), so its frozen state
    and adapters are the full model's `edge/` entries. It has no server: its wire goes to a split-step server."""

    def __init__(self, config: MllmConfig, rngs: nnx.Rngs):
        self.edge = NanoEdge(config, rngs)
        self.config = config


class ServerModel(nnx.Module):
    """The server's half alone: the decoder (layers, final norm, LM head), under the same paths as in
    MultimodalModel (`server/...`)."""

    def __init__(self, config: MllmConfig, rngs: nnx.Rngs):
        self.server = config.decoder(config.llm, rngs)
        self.config = config


def split_model(model: nnx.Module):
    """-> (graphdef, frozen, adapters): the backbone state and the NanoAdapter state."""
    graphdef, adapters, frozen = nnx.split(model, AdapterParam, ...)
    return graphdef, frozen, adapters


def merge_model(graphdef, frozen, adapters) -> MultimodalModel:
    return nnx.merge(graphdef, frozen, adapters)


def count_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))
