"""The training objective, and the wire between a client's NanoEdge and the server LLM.

`adapter_value_and_grad` computes a client's adapter gradient the way FedNano runs
it: the client embeds its batch (NanoEdge), the server runs the frozen LLM on the
embeddings and returns the loss and d loss / d embeddings, and the client
backpropagates those into its adapters. Only embeddings go up and only their
gradients come down; the result equals differentiating the composed model.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fednano_jax.models.mllm import merge_model

Batch = dict  # input_ids [B, T], attention_mask [B, T], loss_mask [B, T], images [B, H, W, 3]


def answer_token_log_probs(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """log p(token t+1 | tokens <= t) at answer positions -> (log_probs [B, T-1], mask [B, T-1])."""
    targets = batch["input_ids"][:, 1:]
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return picked * mask, mask


def mean_answer_nll(logits: jax.Array, batch: Batch) -> jax.Array:
    """Mean negative log-likelihood over the batch's answer tokens (0 for an all-padding batch)."""
    log_probs, mask = answer_token_log_probs(logits, batch)
    return -log_probs.sum() / jnp.maximum(mask.sum(), 1.0)


def summed_answer_nll(logits: jax.Array, batch: Batch) -> jax.Array:
    """Negative log-likelihood of the whole answer, summed over its tokens and the batch."""
    log_probs, _ = answer_token_log_probs(logits, batch)
    return -log_probs.sum()


LossFn = Callable[[jax.Array, Batch], jax.Array]


def adapter_value_and_grad(graphdef, frozen, adapters, batch: Batch, loss_fn: LossFn = mean_answer_nll):
    def client_embed(adapter_state):
        return merge_model(graphdef, frozen, adapter_state).edge(batch["input_ids"], batch["images"])

    def server_loss(embeds):
        server = merge_model(graphdef, frozen, adapters).server
        return loss_fn(server(embeds, batch["attention_mask"]), batch)

    embeds, client_backward = jax.vjp(client_embed, adapters)
    loss, embed_grads = jax.value_and_grad(server_loss)(embeds)
    (adapter_grads,) = client_backward(embed_grads)
    return loss, adapter_grads
