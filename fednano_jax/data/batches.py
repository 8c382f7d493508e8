"""Batches on the device: a tokenized set and its image table shared by every client, gathered by row.

Clients never hold copies of the data: a client's schedule is row indices into the
shared set, and padding rows are masked out of attention and loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fednano_jax.data.prompts import TokenizedSet
from fednano_jax.models.loss import answer_slots


def device_dataset(tokens: TokenizedSet, images: np.ndarray) -> dict:
    """A tokenized set and its image table on the device, shared by all clients; rows index into it.

    With each row's answer slots (`models/loss.py`), so the loss reads logits at answer positions only."""
    positions, valid = answer_slots(tokens.loss_mask)
    return {
        "input_ids": jnp.asarray(tokens.input_ids),
        "attention_mask": jnp.asarray(tokens.attention_mask),
        "loss_mask": jnp.asarray(tokens.loss_mask),
        "image_index": jnp.asarray(tokens.image_index),
        "images": jnp.asarray(images),
        "answer_positions": jnp.asarray(positions),
        "answer_valid": jnp.asarray(valid),
    }


def gather_batch(data: dict, rows: jax.Array, valid: jax.Array) -> dict:
    """Rows [B] of the shared dataset; invalid (padding) rows are masked out of attention and loss."""
    valid = valid[:, None]
    batch = {
        "input_ids": data["input_ids"][rows],
        "attention_mask": data["attention_mask"][rows] & valid,
        "loss_mask": data["loss_mask"][rows] & valid,
        "images": data["images"][data["image_index"][rows]],
    }
    if "answer_positions" in data:
        batch["answer_positions"] = data["answer_positions"][rows]
        batch["answer_valid"] = data["answer_valid"][rows] & valid
    return batch
