"""MiniGPT-4's vision side: EVA ViT (with `ln_vision`), then the Q-Former's learned queries read it.

The NanoEdge of a MiniGPT-4 client is this module, `llama_proj` (the "linear" connector, 768 ->
LLM width) and the token embeddings; A_I sits on `llama_proj`'s outputs, one per query token.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
from flax import nnx

from fednano_jax.models.eva_vit import EvaVisionTower, EvaVitConfig
from fednano_jax.models.qformer import QFormer, QFormerConfig


@dataclasses.dataclass(frozen=True)
class MiniGpt4VisionConfig:
    eva: EvaVitConfig
    qformer: QFormerConfig

    # What this vision side holds, for the parameter accounting: (label, path under the NanoEdge's `vision/`).
    parts: ClassVar[tuple[tuple[str, str], ...]] = (("EVA ViT (with ln_vision)", "visual_encoder/"),
                                                    ("Q-Former (with its query tokens)", "qformer/"))

    def build(self, rngs: nnx.Rngs) -> nnx.Module:
        """The module this config describes (NanoEdge builds its vision side from its config)."""
        return MiniGpt4Vision(self, rngs)

    def __post_init__(self):
        if self.qformer.encoder_hidden_size != self.eva.hidden_size:
            raise ValueError(f"The Q-Former's cross-attention reads {self.qformer.encoder_hidden_size}-wide image "
                             f"tokens but the EVA ViT is {self.eva.hidden_size} wide.")

    @property
    def image_size(self) -> int:
        return self.eva.image_size

    @property
    def image_mean(self):
        return self.eva.image_mean

    @property
    def image_std(self):
        return self.eva.image_std

    @property
    def num_image_tokens(self) -> int:
        """One image embedding per query token (32 in MiniGPT-4)."""
        return self.qformer.num_query_tokens

    @property
    def feature_size(self) -> int:
        """The width the connector (`llama_proj`) reads."""
        return self.qformer.hidden_size


class MiniGpt4Vision(nnx.Module):
    """Images [B, H, W, 3] -> query outputs [B, num_query_tokens, qformer width], in float32."""

    def __init__(self, config: MiniGpt4VisionConfig, rngs: nnx.Rngs):
        self.visual_encoder = EvaVisionTower(config.eva, rngs)
        self.qformer = QFormer(config.qformer, rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.qformer(self.visual_encoder(images))
