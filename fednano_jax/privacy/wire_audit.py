"""Attacks on what FedNano's split wire shows the server: the adapted input embedding of every token (with
`model.client_layers` = k, its hidden state after the decoder's first k layers).

A server that knows the backbone (a public checkpoint) knows its embedding table, so it can read an
embedding back as the nearest row of that table; or it can learn an inverter (a linear softmax map
from what is sent to token ids) from a few public examples through the untrained NanoEdge (and the
first k layers, which it has too). The recovery rate is the share of text tokens an attack names
exactly, reported separately for prompt tokens and answer tokens (teacher forcing feeds the answer to the
model as input, so it is on the wire whether or not the labels are).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def nearest_rows(embeds: np.ndarray, table: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """[N] the index of the table row nearest (L2) to each embedding [N, D]."""
    table = jnp.asarray(table, jnp.float32)
    norms = jnp.sum(table * table, axis=1)
    out = []
    for start in range(0, len(embeds), chunk):
        part = jnp.asarray(embeds[start: start + chunk], jnp.float32)
        out.append(np.asarray(jnp.argmin(norms[None, :] - 2.0 * part @ table.T, axis=1)))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def train_inverter(embeds: np.ndarray, tokens: np.ndarray, vocab: int, steps: int = 300, learning_rate: float = 1e-2,
                   seed: int = 0):
    """A linear softmax map embeddings -> token ids, fitted (Adam, full batch) to public (embedding, id) pairs."""
    x, y = jnp.asarray(embeds, jnp.float32), jnp.asarray(tokens, jnp.int32)
    params = {"w": 0.01 * jax.random.normal(jax.random.key(seed), (x.shape[1], vocab)), "b": jnp.zeros(vocab)}
    optimizer = optax.adam(learning_rate)

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

    @jax.jit
    def step(p, state):
        grads = jax.grad(loss_fn)(p)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(p, updates), state

    state = optimizer.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


def invert(params, embeds: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.argmax(jnp.asarray(embeds, jnp.float32) @ params["w"] + params["b"], axis=1))


def recovery_rate(guess: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(guess == truth)) if len(truth) else float("nan")


def token_positions(input_ids: np.ndarray, attention_mask: np.ndarray, loss_mask: np.ndarray, image_token_id: int):
    """-> (prompt [N, T] bool, answer [N, T] bool): the text positions on the wire, by role (the BOS and the
    image positions excluded)."""
    text = attention_mask.astype(bool) & (input_ids != image_token_id)
    text[:, 0] = False
    answer = text & loss_mask.astype(bool)
    return text & ~answer, answer
