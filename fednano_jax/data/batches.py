"""Batches on the device: a tokenized set and its image table shared by every client, gathered by row.

Clients never hold copies of the data: a client's schedule is row indices into the
shared set, and padding rows are masked out of attention and loss. The image table may
stay in host memory instead (`data.stream_images`, `HostImages`): each step then fetches
only its batch's images from the host, so device memory does not grow with the dataset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fednano_jax.data.prompts import TokenizedSet
from fednano_jax.models.loss import answer_slots


class HostImages:
    """An image table kept in host memory, read by a host callback inside the compiled step.

    A pytree with no array leaves (the table is static to `jit`), so it rides in the dataset dict
    like the device table it replaces. `table` may be a `jax.ShapeDtypeStruct` for planning."""

    def __init__(self, table):
        self.table = table
        self.shape, self.dtype = tuple(table.shape), table.dtype

    def take(self, index: jax.Array) -> jax.Array:
        """The images at `index` (any shape), copied from the host into the running program."""
        result = jax.ShapeDtypeStruct(tuple(index.shape) + self.shape[1:], self.dtype)
        return jax.pure_callback(self._fetch, result, index, vmap_method="expand_dims")

    def _fetch(self, index) -> np.ndarray:
        return np.asarray(self.table)[np.asarray(index)]


jax.tree_util.register_pytree_node(HostImages, lambda images: ((), images), lambda images, _: images)


def take_images(images, index: jax.Array) -> jax.Array:
    return images.take(index) if isinstance(images, HostImages) else images[index]


def device_dataset(tokens: TokenizedSet, images: np.ndarray, stream_images: bool = False) -> dict:
    """A tokenized set and its image table on the device, shared by all clients; rows index into it.

    With each row's answer slots (`models/loss.py`), so the loss reads logits at answer positions only.
    With `stream_images` the image table stays on the host (`HostImages`)."""
    positions, valid = answer_slots(tokens.loss_mask)
    return {
        "input_ids": jnp.asarray(tokens.input_ids),
        "attention_mask": jnp.asarray(tokens.attention_mask),
        "loss_mask": jnp.asarray(tokens.loss_mask),
        "image_index": jnp.asarray(tokens.image_index),
        "images": HostImages(np.asarray(images)) if stream_images else jnp.asarray(images),
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
        "images": take_images(data["images"], data["image_index"][rows]),
    }
    if "answer_positions" in data:
        batch["answer_positions"] = data["answer_positions"][rows]
        batch["answer_valid"] = data["answer_valid"][rows] & valid
    return batch
