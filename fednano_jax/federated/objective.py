"""The training objective, and the wire between a client's NanoEdge and the server LLM.

`adapter_value_and_grad` computes a client's adapter gradient the way FedNano runs
it: the client embeds its batch (NanoEdge), the server runs the frozen LLM on the
embeddings and returns the loss and d loss / d embeddings, and the client
backpropagates those into its adapters. Only embeddings go up and only their
gradients come down; the result equals differentiating the composed model. With
`model.client_layers` = k the client also runs the decoder's first k layers
(`mllm.client_side`): the hidden states after layer k go up instead, the server runs
the rest, and the client backpropagates through its k layers too.
`per_example_adapter_grads` gets every example's own adapter gradient from the same
one batched pass: rows never interact, so a row's embedding gradient of the batch's
summed loss is its own loss's, and only the client's step is differentiated per row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from fednano_jax.models.loss import Batch, mean_answer_nll, model_logits, summed_answer_nll
from fednano_jax.models.mllm import client_side, merge_model
from fednano_jax.streams import Purpose, generator

LossFn = Callable[[jax.Array, Batch], jax.Array]
WIRE_KEYS = ("attention_mask", "answer_positions")  # what the server needs besides the embeddings
# What a remote server needs with the embeddings when it computes the loss (labels on the server), and the loss
# each of the client's loss functions asks it for.
REMOTE_KEYS = ("attention_mask", "input_ids", "loss_mask", "answer_positions", "answer_valid")
REMOTE_KINDS = {mean_answer_nll: "mean", summed_answer_nll: "sum"}


def wire_batch(batch: Batch) -> Batch:
    """What a server that keeps no labels receives with the embeddings: the attention mask and where the
    answers' logits are wanted (no token ids, no loss mask)."""
    return {key: batch[key] for key in WIRE_KEYS if key in batch}


@dataclasses.dataclass(frozen=True)
class Wire:
    """How the client <-> server wire is protected: labels kept on the client; Gaussian noise of std `noise`
    on what is sent up (the embeddings, or the hidden states after the client's layers; as FL-LLaMA does), drawn
    from `key`. `remote`: a host function that has a server elsewhere compute (loss, d loss / d embeddings),
    `(embeds, *REMOTE_KEYS tensors, kind=...)`, or with labels on the client the logits and then the backward
    pass (`StepClient.wire`, `serving/step_client.py`); None: the server LLM in this program."""

    labels_on_client: bool = False
    noise: float = 0.0
    key: jax.Array | None = None
    remote: Callable | None = None

    @classmethod
    def of(cls, fed, rows: jax.Array, seed: int = 0, remote: Callable | None = None) -> "Wire":
        """The config's wire (`fed`: settings.Fed); the noise key comes from the run's seed (`streams.py`) and
        the batch's row ids (distinct for every batch of a round's shuffled schedule, the same when a run is
        repeated)."""
        noise = float(fed.wire_noise)
        key = None
        if noise > 0:
            salt = jnp.sum((rows.astype(jnp.uint32) + 1) * jnp.arange(1, rows.size + 1, dtype=jnp.uint32))
            root = jax.random.key(int(generator(seed, Purpose.WIRE_NOISE).integers(2**31)))
            key = jax.random.fold_in(root, salt)
        return cls(fed.labels_on_client, noise, key, remote)

    def sent(self, embeds):
        if self.noise <= 0:
            return embeds
        return embeds + (self.noise * jax.random.normal(self.key, embeds.shape, jnp.float32)).astype(embeds.dtype)


def embed_grads_of(server, embeds, batch: Batch, loss_fn: LossFn, labels_on_client: bool, first_layer: int = 0):
    """-> (loss, d loss / d embeddings) across the wire; `embeds`: the input of decoder layer `first_layer`.
    Labels on the server (the paper's protocol): the server computes the loss. Labels on the client
    (`fed.labels_on_client`): the server returns the logits where the answers are, the client computes the loss
    and sends d loss / d logits back, and the server backpropagates them; the same numbers, without a label
    crossing."""
    if not labels_on_client:
        return jax.value_and_grad(lambda e: loss_fn(model_logits(server, e, batch, first_layer), batch))(embeds)
    wire = wire_batch(batch)
    logits, server_backward = jax.vjp(lambda e: model_logits(server, e, wire, first_layer), embeds)
    loss, logit_grads = jax.value_and_grad(lambda l: loss_fn(l, batch))(logits)  # on the client
    (embed_grads,) = server_backward(logit_grads)
    return loss, embed_grads


def remote_embed_grads(remote: Callable, embeds, batch: Batch, loss_fn: LossFn):
    """-> (loss, d loss / d embeddings) from a server elsewhere: the embeddings and the rows the loss needs leave
    the program through a host callback, in order, inside the scanned step; the same numbers as
    `embed_grads_of` with labels on the server."""
    if loss_fn not in REMOTE_KINDS:
        raise ValueError(f"A remote server computes {sorted(REMOTE_KINDS.values())} answer NLLs, not {loss_fn}.")
    shapes = (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct(embeds.shape, jnp.float32))
    loss, grads = io_callback(functools.partial(remote, kind=REMOTE_KINDS[loss_fn]), shapes,
                              embeds.astype(jnp.float32), *(batch[key] for key in REMOTE_KEYS), ordered=True)
    return loss, grads.astype(embeds.dtype)


def remote_labels_on_client(remote: Callable, embeds, batch: Batch, loss_fn: LossFn, vocab: int):
    """-> (loss, d loss / d embeddings) from a server elsewhere that never sees a label: the logits at the answer
    slots come back (one host callback), the loss and its gradient at them are taken here, and the server turns
    those into the embeddings' gradients (a second callback); the same numbers as `embed_grads_of` with labels on
    the client."""
    rows, slots = batch["answer_positions"].shape
    sent = (embeds.astype(jnp.float32), batch["attention_mask"], batch["answer_positions"], batch["answer_valid"])
    logits = io_callback(functools.partial(remote, kind="logits", vocab=vocab),
                         jax.ShapeDtypeStruct((rows, slots, vocab), jnp.float32), *sent, ordered=True)
    loss, logit_grads = jax.value_and_grad(lambda l: loss_fn(l, batch))(logits)
    grads = io_callback(functools.partial(remote, kind="backward"), jax.ShapeDtypeStruct(embeds.shape, jnp.float32),
                        *sent, logit_grads, ordered=True)
    return loss, grads.astype(embeds.dtype)


def wire_embed_grads(graphdef, frozen, adapters, embeds, batch: Batch, loss_fn: LossFn, wire: "Wire"):
    """(loss, d loss / d embeddings) across the wire: the server LLM here, or a remote one."""
    if wire.remote is not None and wire.labels_on_client:
        vocab = merge_model(graphdef, frozen, adapters).config.llm.vocab_size  # the server's LM head's
        return remote_labels_on_client(wire.remote, wire.sent(embeds), batch, loss_fn, vocab)
    if wire.remote is not None:
        return remote_embed_grads(wire.remote, wire.sent(embeds), batch, loss_fn)
    model = merge_model(graphdef, frozen, adapters)
    return embed_grads_of(model.server, wire.sent(embeds), batch, loss_fn, wire.labels_on_client,
                          model.config.client_layers)


def adapter_value_and_grad(graphdef, frozen, adapters, batch: Batch, loss_fn: LossFn = mean_answer_nll,
                           wire: Wire = Wire()):
    def client_embed(adapter_state):
        return client_side(merge_model(graphdef, frozen, adapter_state), batch["input_ids"], batch["images"],
                           batch["attention_mask"])

    embeds, client_backward = jax.vjp(client_embed, adapters)
    # Additive noise: d(embeds + noise)/d embeds is the identity, so the server's gradient at the noised
    # embeddings flows back unchanged.
    loss, embed_grads = wire_embed_grads(graphdef, frozen, adapters, embeds, batch, loss_fn, wire)
    (adapter_grads,) = client_backward(embed_grads)
    return loss, adapter_grads


def per_example_adapter_grads(graphdef, frozen, adapters, batch: Batch, loss_fn: LossFn, wire: Wire = Wire()):
    """Adapter gradients [B, ...] of each row's own loss, for a `loss_fn` that sums over rows
    (`summed_answer_nll`): one batched backward pass through the server LLM, not one per row.

    Each row embeds with its own copy of the adapters (a vmap), so the vjp of the client's step
    with respect to the copies is per row."""
    count = batch["input_ids"].shape[0]
    copies = jax.tree.map(lambda x: jnp.broadcast_to(x, (count,) + x.shape), adapters)

    def embed_row(adapter_state, input_ids, images, attention_mask):
        row_images = None if images is None else images[None]
        model = merge_model(graphdef, frozen, adapter_state)
        return client_side(model, input_ids[None], row_images, attention_mask[None])[0]

    def client_embed(adapter_copies):
        return jax.vmap(embed_row)(adapter_copies, batch["input_ids"], batch["images"], batch["attention_mask"])

    embeds, client_backward = jax.vjp(client_embed, copies)
    _, embed_grads = wire_embed_grads(graphdef, frozen, adapters, embeds, batch, loss_fn, wire)
    (grads,) = client_backward(embed_grads)
    return grads
