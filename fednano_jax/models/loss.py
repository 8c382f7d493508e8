"""The answer-token losses over a model's logits (pretraining, local training, the Fisher pass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Batch = dict  # input_ids [B, T], attention_mask [B, T], loss_mask [B, T], images [B, H, W, 3]


def answer_token_log_probs(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """log p(token t+1 | tokens <= t) at answer positions -> (log_probs [B, T-1], mask [B, T-1])."""
    targets = batch["input_ids"][:, 1:]
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return picked * mask, mask


def answer_tokens(batch: Batch) -> jax.Array:
    """The number of answer tokens the loss counts (predicted positions)."""
    return batch["loss_mask"][:, 1:].astype(jnp.float32).sum()


def mean_answer_nll(logits: jax.Array, batch: Batch) -> jax.Array:
    """Mean negative log-likelihood over the batch's answer tokens (0 for an all-padding batch)."""
    log_probs, mask = answer_token_log_probs(logits, batch)
    return -log_probs.sum() / jnp.maximum(mask.sum(), 1.0)


def summed_answer_nll(logits: jax.Array, batch: Batch) -> jax.Array:
    """Negative log-likelihood of the whole answer, summed over its tokens and the batch."""
    log_probs, _ = answer_token_log_probs(logits, batch)
    return -log_probs.sum()
