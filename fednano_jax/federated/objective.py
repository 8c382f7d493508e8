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
