"""Greedy generation with the KV cache, on left-padded prompts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fednano_jax.models.llama import KVCache, positions_from_mask
from fednano_jax.models.mllm import merge_model


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "pad_id", "eos_id"))
def greedy_generate(graphdef, frozen, adapters, input_ids, attention_mask, images, *,
                    max_new_tokens: int, pad_id: int, eos_id: int) -> jax.Array:
    """-> new token ids [B, max_new_tokens]; after a row's </s> it emits pad_id."""
    model = merge_model(graphdef, frozen, adapters)
    batch, prompt_len = input_ids.shape
    cfg = model.config.llm
    cache = KVCache.empty(cfg, batch, prompt_len + max_new_tokens, jnp.dtype(cfg.dtype))
    positions = positions_from_mask(attention_mask)
    logits, cache = model.server.decode(model.edge(input_ids, images), positions, attention_mask, cache)
    first = jnp.argmax(logits, axis=-1)

    def step(carry, _):
        token, position, cache, done = carry
        embeds = model.edge(token[:, None])
        logits, cache = model.server.decode(embeds, position[:, None], jnp.ones((batch, 1), bool), cache)
        done = done | (token == eos_id)
        nxt = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1))
        return (nxt, position + 1, cache, done), token

    init = (first, positions[:, -1] + 1, cache, jnp.zeros((batch,), bool))
    _, tokens = jax.lax.scan(step, init, None, length=max_new_tokens)
    return tokens.T


def full_recompute_generate(model, input_ids, attention_mask, images, max_new_tokens: int) -> jax.Array:
    """Reference greedy decoding without a cache: re-runs the whole sequence for every token.

    Generated tokens are embedded as text, as in the cached path (even an `<image>` id).
    """
    embeds, mask = model.edge(input_ids, images), attention_mask
    out = []
    for _ in range(max_new_tokens):
        token = jnp.argmax(model.server(embeds, mask)[:, -1], axis=-1)
        out.append(token)
        embeds = jnp.concatenate([embeds, model.edge.embed_text(token[:, None])], axis=1)
        mask = jnp.concatenate([mask, jnp.ones_like(token[:, None], bool)], axis=1)
    return jnp.stack(out, axis=1)
