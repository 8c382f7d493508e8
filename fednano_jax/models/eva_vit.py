"""EVA-CLIP ViT-g/14, MiniGPT-4's (and BLIP-2's) vision encoder, with its `ln_vision`.

Layout as LAVIS's `eva_vit.py`: patch conv with bias, class token, learned absolute
positions, pre-LN blocks (eps 1e-6) whose qkv projection has a q bias and a v bias but no k
bias, exact GELU, no final norm; every output token (class token included) then goes
through `ln_vision`, a LayerNorm (eps 1e-5) computed in float32. BLIP-2 keeps 39 of
EVA-CLIP-g's 40 blocks. HF's `Blip2VisionModel` computes the same (its `post_layernorm` is
`ln_vision`, one eps for both).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fednano_jax.models.vision import ACTIVATIONS, attend, linear, normalize_pixels


@dataclasses.dataclass(frozen=True)
class EvaVitConfig:
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_layers: int = 39
    num_heads: int = 16
    layer_norm_eps: float = 1e-6  # the blocks'
    ln_vision_eps: float = 1e-5
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    dtype: str = "float32"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class EvaAttention(nnx.Module):
    def __init__(self, config: EvaVitConfig, rngs: nnx.Rngs):
        d = config.hidden_size
        self.qkv = nnx.Linear(d, 3 * d, use_bias=False, dtype=jnp.dtype(config.dtype), rngs=rngs,
                              kernel_init=nnx.initializers.normal(0.02))
        self.q_bias = nnx.Param(jnp.zeros((d,)))
        self.v_bias = nnx.Param(jnp.zeros((d,)))
        self.proj = linear(rngs, d, d, jnp.dtype(config.dtype))
        self.num_heads = config.num_heads

    def __call__(self, x):
        batch, length, d = x.shape
        bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.q_bias[...]), self.v_bias[...]])
        qkv = (self.qkv(x) + bias.astype(x.dtype)).reshape(batch, length, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return self.proj(attend(q, k, v))


class EvaBlock(nnx.Module):
    def __init__(self, config: EvaVitConfig, rngs: nnx.Rngs):
        d, dtype = config.hidden_size, jnp.dtype(config.dtype)
        self.norm1 = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)
        self.attn = EvaAttention(config, rngs)
        self.norm2 = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)
        self.fc1 = linear(rngs, d, config.intermediate_size, dtype)
        self.fc2 = linear(rngs, config.intermediate_size, d, dtype)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(ACTIVATIONS["gelu"](self.fc1(self.norm2(x))))


class EvaVisionTower(nnx.Module):
    """Images [B, H, W, 3] -> `ln_vision` of all patch tokens and the class token [B, 1 + patches, hidden]."""

    def __init__(self, config: EvaVitConfig, rngs: nnx.Rngs):
        d, p = config.hidden_size, config.patch_size
        self.patch_embed = nnx.Conv(3, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
                                    dtype=jnp.dtype(config.dtype), rngs=rngs, kernel_init=nnx.initializers.normal(0.02))
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, d)))
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, config.num_patches + 1, d)))
        self.blocks = nnx.List([EvaBlock(config, rngs) for _ in range(config.num_layers)])
        self.ln_vision = nnx.LayerNorm(d, epsilon=config.ln_vision_eps, rngs=rngs)
        self.config = config

    def __call__(self, images: jax.Array) -> jax.Array:
        """uint8 images are CLIP-normalised here; float images are taken as already normalised."""
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, 3)
        if images.shape[1:] != expected:
            raise ValueError(f"EVA ViT expects images of shape [batch, {expected}], got {images.shape}.")
        pixels = normalize_pixels(images, cfg) if images.dtype == jnp.uint8 else images.astype(jnp.dtype(cfg.dtype))
        patches = self.patch_embed(pixels)
        patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size)
        cls = jnp.broadcast_to(self.cls_token[...], (patches.shape[0], 1, cfg.hidden_size)).astype(patches.dtype)
        x = jnp.concatenate([cls, patches], axis=1) + self.pos_embed[...].astype(patches.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln_vision(x.astype(jnp.float32))
