"""Greedy generation with the KV cache, on left-padded prompts; or with the decoder across the split link."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

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


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prompt_embeds(graphdef, frozen, adapters, input_ids, images):
    return merge_model(graphdef, frozen, adapters).edge(input_ids, images)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_embeds(graphdef, frozen, adapters, tokens):
    return merge_model(graphdef, frozen, adapters).edge.embed_text(tokens[:, None])


def linked_generate(next_tokens: Callable, graphdef, frozen, adapters, input_ids, attention_mask, images, *,
                    max_new_tokens: int, pad_id: int, eos_id: int) -> np.ndarray:
    """`greedy_generate` with the decoder elsewhere (NanoEdge alone here: `graphdef` may be an EdgeModel's): the
    prompt is embedded here, and each new token costs one round trip, `next_tokens(embeds, attention_mask)` -> the
    greedy next ids [B]; the grown sequence is sent whole each time (no cache is kept across the link). The same
    tokens as `greedy_generate` where no two logits tie."""
    embeds = np.asarray(_prompt_embeds(graphdef, frozen, adapters, input_ids, images))
    mask = np.asarray(attention_mask, bool)
    token = np.asarray(next_tokens(embeds, mask))
    done, out = np.zeros(len(token), bool), []
    for step in range(max_new_tokens):
        out.append(token)
        done |= token == eos_id
        if step + 1 == max_new_tokens:
            break
        new = np.asarray(_token_embeds(graphdef, frozen, adapters, jnp.asarray(token)))
        embeds, mask = np.concatenate([embeds, new], axis=1), np.concatenate([mask, np.ones((len(token), 1), bool)], 1)
        token = np.where(done, pad_id, np.asarray(next_tokens(embeds, mask)))
    return np.stack(out, axis=1)
