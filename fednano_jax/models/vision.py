"""CLIP-layout ViT vision tower: returns the selected layer's patch features.

Layout as HF CLIPVisionModel: patch conv without bias, class token, learned
positions, `pre_layrnorm`, pre-LN encoder layers. Like LLaVA, the feature is
`hidden_states[feature_layer]` (index 0 is the embedding output) with the class
token dropped (select_strategy "default") or kept ("full"), and layers after the
selected one are never computed.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    feature_layer: int = -2
    select_strategy: str = "default"  # LLaVA's vision_feature_select_strategy: "default" drops the class token
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    dtype: str = "float32"

    # What this vision side holds, for the parameter accounting: (label, path under the NanoEdge's `vision/`).
    parts: ClassVar[tuple[tuple[str, str], ...]] = (("Vision tower", ""),)

    def build(self, rngs: nnx.Rngs) -> nnx.Module:
        """The module this config describes (NanoEdge builds its vision side from its config)."""
        return VisionTower(self, rngs)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """Image features per image, i.e. `<image>` ids a prompt expands to."""
        return self.num_patches + (self.select_strategy == "full")

    @property
    def feature_size(self) -> int:
        """The width the connector reads."""
        return self.hidden_size

    @property
    def layers_used(self) -> int:
        """Encoder layers needed to produce hidden_states[feature_layer]."""
        return self.feature_layer % (self.num_layers + 1)


ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def normalize_pixels(images: jax.Array, config: VisionConfig) -> jax.Array:
    """uint8 [B, H, W, 3] -> CLIP-normalised float [B, H, W, 3]."""
    mean = jnp.asarray(config.image_mean, jnp.float32)
    std = jnp.asarray(config.image_std, jnp.float32)
    return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(jnp.dtype(config.dtype))


def attend(q, k, v):
    """Unmasked softmax attention: q [B, T, H, D], k, v [B, S, H, D] -> [B, T, H * D], scores in float32."""
    scores = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhts,bshd->bthd", probs, v)
    return out.reshape(out.shape[0], out.shape[1], -1)


def linear(rngs, d_in, d_out, dtype):
    return nnx.Linear(d_in, d_out, dtype=dtype, rngs=rngs, kernel_init=nnx.initializers.normal(0.02))


class VisionAttention(nnx.Module):
    def __init__(self, config: VisionConfig, rngs: nnx.Rngs):
        d, dtype = config.hidden_size, jnp.dtype(config.dtype)
        self.q_proj = linear(rngs, d, d, dtype)
        self.k_proj = linear(rngs, d, d, dtype)
        self.v_proj = linear(rngs, d, d, dtype)
        self.out_proj = linear(rngs, d, d, dtype)
        self.num_heads = config.num_heads

    def __call__(self, x):
        batch, length, d = x.shape
        split = lambda t: t.reshape(batch, length, self.num_heads, d // self.num_heads)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        return self.out_proj(attend(q, k, v))


class VisionLayer(nnx.Module):
    def __init__(self, config: VisionConfig, rngs: nnx.Rngs):
        d, dtype = config.hidden_size, jnp.dtype(config.dtype)
        self.layer_norm1 = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)
        self.self_attn = VisionAttention(config, rngs)
        self.layer_norm2 = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)
        self.fc1 = linear(rngs, d, config.intermediate_size, dtype)
        self.fc2 = linear(rngs, config.intermediate_size, d, dtype)
        self.activation = config.activation

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.fc2(ACTIVATIONS[self.activation](self.fc1(self.layer_norm2(x))))


class VisionTower(nnx.Module):
    def __init__(self, config: VisionConfig, rngs: nnx.Rngs):
        d, p = config.hidden_size, config.patch_size
        self.patch_embedding = nnx.Conv(3, d, kernel_size=(p, p), strides=(p, p), use_bias=False,
                                        padding="VALID", dtype=jnp.dtype(config.dtype), rngs=rngs,
                                        kernel_init=nnx.initializers.normal(0.02))
        self.class_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d,)))
        self.position_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (config.num_patches + 1, d)))
        self.pre_layrnorm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)
        self.layers = nnx.List([VisionLayer(config, rngs) for _ in range(config.num_layers)])
        self.config = config

    def __call__(self, images: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] -> features [B, num_image_tokens, hidden].

        uint8 images are CLIP-normalised here; float images are taken as already normalised.
        """
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, 3)
        if images.shape[1:] != expected:
            raise ValueError(f"Vision tower expects images of shape [batch, {expected}], got {images.shape}.")
        pixels = normalize_pixels(images, cfg) if images.dtype == jnp.uint8 else images.astype(jnp.dtype(cfg.dtype))
        patches = self.patch_embedding(pixels)
        patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size)
        cls = jnp.broadcast_to(self.class_embedding[...], (patches.shape[0], 1, cfg.hidden_size))
        x = jnp.concatenate([cls.astype(patches.dtype), patches], axis=1) + self.position_embedding[...]
        x = self.pre_layrnorm(x)
        for layer in self.layers[: cfg.layers_used]:
            x = layer(x)
        return x if cfg.select_strategy == "full" else x[:, 1:]
