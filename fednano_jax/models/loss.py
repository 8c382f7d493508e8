"""The answer-token losses (pretraining, local training, the Fisher pass), computed where the answers are.

About two answer tokens per row count, out of hundreds of positions. A batch built from a
device dataset (`data/batches.py`) carries its answer slots: for each row, the positions t
whose next token t+1 is an answer token (`answer_positions` [B, S]) and which of the S slots
are real (`answer_valid` [B, S]), S being the largest answer of the set, a static shape. The
server applies the LM head at those positions only (`LlamaDecoder.logits_at`), so the float32
log-softmax is [B, S, V] rather than [B, T, V]. A batch without slots is scored at every
position from full-sequence logits: the reference the slotted path is tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Batch = dict  # input_ids [B, T], attention_mask [B, T], loss_mask [B, T], images [B, H, W, 3], optional slots


def answer_slots(loss_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Host-side: (positions [N, S] int32, valid [N, S] bool) of each row's predicted answer tokens,
    S = the most any row has (at least 1). Position t predicts token t + 1."""
    targets = np.asarray(loss_mask)[:, 1:]
    counts = targets.sum(axis=1)
    slots = max(int(counts.max(initial=0)), 1)
    order = np.argsort(~targets, axis=1, kind="stable")[:, :slots].astype(np.int32)
    valid = np.arange(slots)[None, :] < counts[:, None]
    return np.where(valid, order, 0).astype(np.int32), valid


def has_slots(batch: Batch) -> bool:
    return "answer_positions" in batch


def _targets_and_mask(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(target ids, float mask), both [B, S] at the batch's slots, or [B, T-1] without slots."""
    if not has_slots(batch):
        return batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].astype(jnp.float32)
    positions = batch["answer_positions"]
    targets = jnp.take_along_axis(batch["input_ids"], positions + 1, axis=1)
    # loss_mask is zeroed on padding rows (gather_batch), so it also drops their slots.
    live = jnp.take_along_axis(batch["loss_mask"], positions + 1, axis=1) & batch["answer_valid"]
    return targets, live.astype(jnp.float32)


def answer_token_log_probs(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """log p(answer token | tokens before it) -> (log_probs, mask), [B, S] with slots, [B, T-1] without.

    `logits` are [B, S, V] at the batch's slots, or the full sequence's [B, T, V] for a batch without.
    """
    targets, mask = _targets_and_mask(batch)
    scored = logits if has_slots(batch) else logits[:, :-1]
    log_probs = jax.nn.log_softmax(scored.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
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


def model_logits(server, embeds: jax.Array, batch: Batch, first_layer: int = 0) -> jax.Array:
    """The server LLM's logits where the loss reads them: at the slots if the batch has them. `embeds` are the
    input of layer `first_layer` (the embeddings, or what a client's first layers sent)."""
    if has_slots(batch):
        return server.logits_at(embeds, batch["attention_mask"], batch["answer_positions"], first_layer)
    return server(embeds, batch["attention_mask"], first_layer)
