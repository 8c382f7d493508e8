"""The training objective, and the wire between a client's NanoEdge and the server LLM.

`adapter_value_and_grad` computes a client's adapter gradient the way FedNano runs
it: the client embeds its batch (NanoEdge), the server runs the frozen LLM on the
embeddings and returns the loss and d loss / d embeddings, and the client
backpropagates those into its adapters. Only embeddings go up and only their
gradients come down; the result equals differentiating the composed model.
`per_example_adapter_grads` gets every example's own adapter gradient from the same
one batched pass: rows never interact, so a row's embedding gradient of the batch's
summed loss is its own loss's, and only the client's step is differentiated per row.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fednano_jax.models.loss import Batch, mean_answer_nll, model_logits
from fednano_jax.models.mllm import merge_model

LossFn = Callable[[jax.Array, Batch], jax.Array]


def adapter_value_and_grad(graphdef, frozen, adapters, batch: Batch, loss_fn: LossFn = mean_answer_nll):
    def client_embed(adapter_state):
        return merge_model(graphdef, frozen, adapter_state).edge(batch["input_ids"], batch["images"])

    def server_loss(embeds):
        server = merge_model(graphdef, frozen, adapters).server
        return loss_fn(model_logits(server, embeds, batch), batch)

    embeds, client_backward = jax.vjp(client_embed, adapters)
    loss, embed_grads = jax.value_and_grad(server_loss)(embeds)
    (adapter_grads,) = client_backward(embed_grads)
    return loss, adapter_grads


def per_example_adapter_grads(graphdef, frozen, adapters, batch: Batch, loss_fn: LossFn):
    """Adapter gradients [B, ...] of each row's own loss, for a `loss_fn` that sums over rows
    (`summed_answer_nll`): one batched backward pass through the server LLM, not one per row.

    Each row embeds with its own copy of the adapters (a vmap), so the vjp of the client's step
    with respect to the copies is per row."""
    count = batch["input_ids"].shape[0]
    copies = jax.tree.map(lambda x: jnp.broadcast_to(x, (count,) + x.shape), adapters)

    def embed_row(adapter_state, input_ids, images):
        row_images = None if images is None else images[None]
        return merge_model(graphdef, frozen, adapter_state).edge(input_ids[None], row_images)[0]

    def client_embed(adapter_copies):
        return jax.vmap(embed_row)(adapter_copies, batch["input_ids"], batch["images"])

    def server_loss(embeds):
        return loss_fn(model_logits(merge_model(graphdef, frozen, adapters).server, embeds, batch), batch)

    embeds, client_backward = jax.vjp(client_embed, copies)
    (grads,) = client_backward(jax.grad(server_loss)(embeds))
    return grads
