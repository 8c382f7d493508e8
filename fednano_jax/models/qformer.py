"""BLIP-2's Q-Former as MiniGPT-4 uses it: 32 learned queries read the image through BERT-base layers.

MiniGPT-4 removes the word and position embeddings and the text FFNs. What is left, as in
LAVIS's `Qformer.py` and HF's `Blip2QFormerModel` with query tokens only: the embeddings'
LayerNorm applied to the queries; per layer, post-LN self-attention, cross-attention to
the image tokens on every `cross_attention_frequency`-th layer (keys and values from the
vision width), and the query FFN (`intermediate_query`, `output_query`); exact GELU,
LayerNorm eps 1e-12. Output [B, num_query_tokens, hidden].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fednano_jax.models.vision import ACTIVATIONS, attend


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    encoder_hidden_size: int = 1408  # the vision width the cross-attention reads
    cross_attention_frequency: int = 2
    num_query_tokens: int = 32
    layer_norm_eps: float = 1e-12


def _dense(rngs, d_in, d_out):
    return nnx.Linear(d_in, d_out, rngs=rngs, kernel_init=nnx.initializers.normal(0.02))


class QFormerAttention(nnx.Module):
    """Multi-head attention, then `dense` and a residual LayerNorm (BERT's post-LN `output`)."""

    def __init__(self, config: QFormerConfig, key_size: int, rngs: nnx.Rngs):
        d = config.hidden_size
        self.query, self.key, self.value = _dense(rngs, d, d), _dense(rngs, key_size, d), _dense(rngs, key_size, d)
        self.dense = _dense(rngs, d, d)
        self.layer_norm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)
        self.num_heads = config.num_heads

    def __call__(self, x, context):
        d = x.shape[-1]
        heads = lambda t: t.reshape(t.shape[0], t.shape[1], self.num_heads, d // self.num_heads)  # noqa: E731
        attended = attend(heads(self.query(x)), heads(self.key(context)), heads(self.value(context)))
        return self.layer_norm(self.dense(attended) + x)


class QFormerLayer(nnx.Module):
    def __init__(self, config: QFormerConfig, cross: bool, rngs: nnx.Rngs):
        d = config.hidden_size
        self.attention = QFormerAttention(config, d, rngs)
        self.crossattention = QFormerAttention(config, config.encoder_hidden_size, rngs) if cross else None
        self.intermediate_query = _dense(rngs, d, config.intermediate_size)
        self.output_query = _dense(rngs, config.intermediate_size, d)
        self.output_query_norm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)

    def __call__(self, queries, image_embeds):
        queries = self.attention(queries, queries)
        if self.crossattention is not None:
            queries = self.crossattention(queries, image_embeds)
        hidden = ACTIVATIONS["gelu"](self.intermediate_query(queries))
        return self.output_query_norm(self.output_query(hidden) + queries)


class QFormer(nnx.Module):
    """Image embeddings [B, S, encoder_hidden] -> query outputs [B, num_query_tokens, hidden], in float32."""

    def __init__(self, config: QFormerConfig, rngs: nnx.Rngs):
        d = config.hidden_size
        self.query_tokens = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, config.num_query_tokens, d)))
        self.layernorm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)
        self.layers = nnx.List([QFormerLayer(config, i % config.cross_attention_frequency == 0, rngs)
                                for i in range(config.num_layers)])

    def __call__(self, image_embeds: jax.Array) -> jax.Array:
        image_embeds = image_embeds.astype(jnp.float32)
        queries = jnp.broadcast_to(self.query_tokens[...], (image_embeds.shape[0],) + self.query_tokens.shape[1:])
        queries = self.layernorm(queries)
        for layer in self.layers:
            queries = layer(queries, image_embeds)
        return queries
