"""LLaMA-family decoder (the server-side LLM): RMSNorm, rotary embeddings, GQA, SwiGLU.

The decoder consumes input embeddings (token embeddings live on the client, in
NanoEdge) and returns logits. One attention path serves training and KV-cache
decoding: without a cache the keys are the sequence itself; with a cache the new
keys are written at `cache.index` and queries attend to every valid earlier slot.

The decoder layers are one stacked module, every parameter leading with a
[num_layers] axis, run by `lax.scan` (MaxText's `scan_layers`): a 32-layer
decoder is traced and compiled as one layer, not 32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    dtype: str = "float32"
    remat: str = "none"  # rematerialisation per decoder layer in training passes: a key of REMAT_POLICIES
    scan_unroll: int = 1  # decoder layers per iteration of the training passes' layer scan (lax.scan's unroll)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys/values [layers, batch, max_len, kv_heads, head_dim]."""

    keys: jax.Array
    values: jax.Array
    valid: jax.Array  # [batch, max_len] bool: slot holds a real (non-padding) token
    index: jax.Array  # scalar int32: next slot to write

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, max_len: int, dtype) -> "KVCache":
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.resolved_head_dim)
        return cls(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )


# What a decoder layer keeps for the backward pass; everything else is recomputed.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: every activation is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # only each layer's input: least memory, ~1 extra forward
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
}


def scan_body(graphdef, policy: str, positions, mask):
    """(x, layer state) -> (x, None): one decoder layer as a `lax.scan` body over the stacked layers,
    rematerialised by the named policy (a remat policy keeps only what it names for the backward pass)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat policy {policy!r}; expected one of {sorted(REMAT_POLICIES)}.")

    def body(x, layer_state):
        return nnx.merge(graphdef, layer_state)(x, positions, mask)[0], None

    if REMAT_POLICIES[policy] is None:
        return body
    return jax.checkpoint(body, policy=REMAT_POLICIES[policy], prevent_cse=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,)))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...]).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """HF 'rotate-half' RoPE. x: [batch, seq, heads, head_dim]; positions: [batch, seq]."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def dense(rngs: nnx.Rngs, d_in: int, d_out: int, bias: bool = False, dtype=jnp.float32) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, rngs=rngs,
                      kernel_init=nnx.initializers.normal(0.02))


def grouped_attention(q, k, v, mask):
    """q: [B, T, H, D]; k, v: [B, S, KV, D]; mask: [B, T, S] bool."""
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / jnp.sqrt(dim)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, length, heads * dim)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.resolved_head_dim
        dtype = jnp.dtype(config.dtype)
        self.q_proj = dense(rngs, d, config.num_heads * hd, dtype=dtype)
        self.k_proj = dense(rngs, d, config.num_kv_heads * hd, dtype=dtype)
        self.v_proj = dense(rngs, d, config.num_kv_heads * hd, dtype=dtype)
        self.o_proj = dense(rngs, config.num_heads * hd, d, dtype=dtype)
        self.config = config

    def __call__(self, x, positions, mask, layer_cache=None):
        """Returns (output, updated (keys, values) of every layer) with a cache, (output, None) without.

        `layer_cache` is (keys, values, layer, index): the stacked cache [layers, B, S, KV, D] and where
        this layer's new keys and values go."""
        cfg = self.config
        batch, length, _ = x.shape
        hd = cfg.resolved_head_dim
        q = self.q_proj(x).reshape(batch, length, cfg.num_heads, hd)
        k = self.k_proj(x).reshape(batch, length, cfg.num_kv_heads, hd)
        v = self.v_proj(x).reshape(batch, length, cfg.num_kv_heads, hd)
        q, k = rotary(q, positions, cfg.rope_theta), rotary(k, positions, cfg.rope_theta)
        if layer_cache is None:
            return self.o_proj(grouped_attention(q, k, v, mask)), None
        # Write only the new tokens into this layer's slice of the stacked cache: an update XLA does in place.
        keys, values, layer, index = layer_cache
        keys = jax.lax.dynamic_update_slice(keys, k[None].astype(keys.dtype), (layer, 0, index, 0, 0))
        values = jax.lax.dynamic_update_slice(values, v[None].astype(values.dtype), (layer, 0, index, 0, 0))
        return self.o_proj(grouped_attention(q, keys[layer], values[layer], mask)), (keys, values)


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        dtype = jnp.dtype(config.dtype)
        self.gate_proj = dense(rngs, d, f, dtype=dtype)
        self.up_proj = dense(rngs, d, f, dtype=dtype)
        self.down_proj = dense(rngs, f, d, dtype=dtype)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, positions, mask, layer_cache=None):
        attended, kv = self.self_attn(self.input_layernorm(x), positions, mask, layer_cache)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that skip padding (left or right), as HF computes them."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def stacked_layers(config: LlamaConfig, rngs: nnx.Rngs) -> "DecoderLayer":
    """One DecoderLayer whose parameters are every layer's, stacked on a leading [num_layers] axis.

    Each layer is initialised as an unstacked list would be (the same random draws, in order)."""
    layers = [nnx.split(DecoderLayer(config, rngs)) for _ in range(config.num_layers)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[state for _, state in layers])
    return nnx.merge(layers[0][0], stacked)


class LlamaDecoder(nnx.Module):
    """Decoder blocks + final norm + LM head: everything the server keeps frozen."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        self.layers = stacked_layers(config, rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = dense(rngs, config.hidden_size, config.vocab_size, dtype=jnp.dtype(config.dtype))
        self.config = config

    def layers_between(self, x, attention_mask, start: int, stop: int):
        """Layers [start, stop) over x [B, T, D], full sequence (training): causal + padding mask. One `lax.scan`
        over that slice of the stacked parameters, so a decoder split between a client's first layers and the
        server's rest runs the same layers on the same weights as the whole."""
        if start == stop:
            return x
        valid = attention_mask.astype(bool)
        length = x.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None] & valid[:, None, :]
        graphdef, state = nnx.split(self.layers)
        if (start, stop) != (0, self.config.num_layers):
            state = jax.tree.map(lambda stacked: stacked[start:stop], state)
        body = scan_body(graphdef, self.config.remat, positions_from_mask(attention_mask), mask)
        x, _ = jax.lax.scan(body, x, state, unroll=self.config.scan_unroll)
        return x

    def hidden_states(self, embeds, attention_mask, first_layer: int = 0):
        """Final normed states of a full-sequence pass from layer `first_layer`'s input: the embeddings (0), or
        the hidden states after a client's first `first_layer` layers."""
        return self.norm(self.layers_between(embeds, attention_mask, first_layer, self.config.num_layers))

    def __call__(self, embeds, attention_mask, first_layer: int = 0):
        return self.lm_head(self.hidden_states(embeds, attention_mask, first_layer))

    def logits_at(self, embeds, attention_mask, positions, first_layer: int = 0):
        """Logits [B, S, V] at `positions` [B, S] only: the LM head is applied to those hidden states alone."""
        hidden = self.hidden_states(embeds, attention_mask, first_layer)
        return self.lm_head(jnp.take_along_axis(hidden, positions[..., None], axis=1))

    def decode(self, embeds, positions, valid, cache: KVCache):
        """Writes `embeds` [B, T, D] at cache.index and returns (logits [B, V] of the last token, new cache).

        `positions` are the rotary positions of the new tokens; `valid` [B, T] marks
        which of them are real tokens (left padding in a prompt is not).
        """
        length = embeds.shape[1]
        max_len = cache.valid.shape[1]
        valid_slots = jax.lax.dynamic_update_slice(cache.valid, valid.astype(bool), (0, cache.index))
        query_slots = cache.index + jnp.arange(length)
        causal = jnp.arange(max_len)[None, :] <= query_slots[:, None]
        mask = causal[None] & valid_slots[:, None, :]
        graphdef, state = nnx.split(self.layers)

        def body(carry, inputs):  # the whole cache rides in the carry, so each layer's write is in place
            x, keys, values = carry
            layer_state, layer = inputs
            x, (keys, values) = nnx.merge(graphdef, layer_state)(x, positions, mask, (keys, values, layer,
                                                                                       cache.index))
            return (x, keys, values), None

        layer_ids = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        (x, keys, values), _ = jax.lax.scan(body, (embeds, cache.keys, cache.values), (state, layer_ids))
        logits = self.lm_head(self.norm(x[:, -1]))  # greedy decoding reads only the last position
        return logits, KVCache(keys, values, valid_slots, cache.index + length)


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One decoder layer on one example of `length` positions, in a training step that backpropagates through it
    to its input with its weights frozen (no weight gradient): what a client running the first layers pays."""

    parameters: int
    activations: int  # elements kept for the backward pass, without rematerialisation
    forward_flops: int
    backward_flops: int


def layer_cost(config: LlamaConfig, length: int) -> LayerCost:
    """Matmul FLOPs (2 per multiply-add; norms, RoPE, softmax and SwiGLU's elementwise work left out) and the
    activations autodiff keeps. Frozen weights need no matmul input for the backward pass, which multiplies the
    output gradient by each weight alone (as many FLOPs as the forward matmul); attention's two products need
    the gradients of both their operands (twice their forward FLOPs). Kept: both norms' inputs, q, k, v, the
    attention probabilities [heads, T, T] and the MLP's gate and up outputs."""
    d, f, head_dim = config.hidden_size, config.intermediate_size, config.resolved_head_dim
    q_width, kv_width = config.num_heads * head_dim, config.num_kv_heads * head_dim
    projections = 2 * d * q_width + 2 * d * kv_width + 3 * d * f  # q, o; k, v; gate, up, down
    attention = 2 * 2 * length * length * q_width  # scores q k^T and probabilities @ v, every (query, key) pair
    kept = length * (2 * d + q_width + 2 * kv_width + 2 * f) + config.num_heads * length * length
    return LayerCost(parameters=projections + 2 * d, activations=kept,
                     forward_flops=2 * length * projections + attention,
                     backward_flops=2 * length * projections + 2 * attention)


@dataclasses.dataclass(frozen=True)
class PrefixCost:
    """What running the decoder's first layers adds to a client, per training example."""

    frozen_bytes: int  # the layers' weights, held on the client
    activation_bytes: int  # what their backward pass keeps, per example
    forward_flops: int
    backward_flops: int


def client_prefix_cost(config: LlamaConfig, layers: int, length: int) -> PrefixCost:
    """The first `layers` decoder layers at `length` positions, in the decoder's dtype."""
    one, itemsize = layer_cost(config, length), jnp.dtype(config.dtype).itemsize
    return PrefixCost(layers * one.parameters * itemsize, layers * one.activations * itemsize,
                      layers * one.forward_flops, layers * one.backward_flops)
