"""Centralized pretraining of the small MLLM backbone, cached on disk.

FedNano tunes adapters on a *pretrained* model; a random frozen backbone would make
every comparison meaningless. This stage trains everything but the adapters (which
stay the identity) on held-aside images and text that the federated clients never
see, then caches the backbone and its tokenizer keyed by every setting that shapes
them, so later runs (and other methods, ranks, client counts) reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from fednano_jax.backbone.family import without_derived_family
from fednano_jax.data.prompts import TokenizedSet
from fednano_jax.data.batches import device_dataset, gather_batch
from fednano_jax.models.loss import mean_answer_nll, model_logits
from fednano_jax.models.mllm import merge_model
from fednano_jax.streams import Purpose, generator
from fednano_jax.weights.fill import flatten, unflatten


def cache_key(config) -> str:
    """Hash of everything that determines the pretrained backbone (not adapters, not fed)."""
    model = without_derived_family(config.model)  # naming a config's own family keeps its key
    model.pop("adapter")
    model.pop("remat", None)  # how the graph saves memory, not what it computes
    model.pop("scan_unroll", None)  # how the layer scan runs, not what it computes
    model.pop("client_layers", None)  # where the decoder is split, not what it is
    where = ("cache_dir", "shipped")  # where a backbone is looked for, not what it is
    unused = () if config.data.name == "easyvqa" else ("questions_per_image",)  # easy-VQA's text-only QA alone
    shaping = {"model": model, "pretrain": {k: v for k, v in config.pretrain.as_dict().items()
                                            if k not in where + unused},
               "data": _pretraining_data(config.data), "version": 3}
    if config.model.path:  # the vision side is aligned to this very checkpoint: a replaced file is a new key
        from fednano_jax.backbone.pretrained import checkpoint_identity

        shaping["checkpoint"] = checkpoint_identity(model["path"])
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def _pretraining_data(data) -> dict:
    """What in config.data shapes the pretraining set: easy-VQA keeps its original key (caches stay valid)."""
    if data.name == "easyvqa":
        return {"pretrain_images": data.pretrain_images}
    return {"name": data.name, "root": os.path.realpath(os.path.expanduser(data.root)), "format": data.format,
            "pretrain_examples": data.pretrain_examples}


def cache_dir(config) -> str:
    return os.path.join(os.path.expanduser(config.pretrain.cache_dir), cache_key(config))


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped")  # backbones in the repository


def shipped_dir(config) -> str | None:
    """The backbone shipped with the repository for these settings, if there is one and the config allows it."""
    directory = os.path.join(SHIPPED, cache_key(config))
    return directory if config.pretrain.shipped and os.path.isdir(directory) else None


def epoch_batches(num_rows: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """[steps, batch] row indices: shuffled epochs laid end to end."""
    rng = generator(seed, Purpose.PRETRAIN_BATCHES)
    epochs = -(-steps * batch_size // num_rows)
    order = np.concatenate([rng.permutation(num_rows) for _ in range(epochs)])
    return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def _split_trainable(frozen, trainable_prefixes: tuple[str, ...] | None):
    """-> (trainable, fixed) flat dicts of the backbone: everything, or only the parameters under the prefixes."""
    flat = flatten(nnx.to_pure_dict(frozen))
    if trainable_prefixes is None:
        return flat, {}
    chosen = {k: v for k, v in flat.items() if k.startswith(trainable_prefixes)}
    return chosen, {k: v for k, v in flat.items() if k not in chosen}


def pretrain_backbone(graphdef, frozen, adapters, tokens: TokenizedSet, images: np.ndarray, config,
                      trainable_prefixes: tuple[str, ...] | None = None):
    """Trains the backbone (adapters stay the identity): all of it, or only the parameters under
    `trainable_prefixes` (LLaVA's alignment stage: vision side only, the LLM frozen)."""
    cfg = config.pretrain
    template = nnx.to_pure_dict(frozen)
    trainable, fixed = _split_trainable(frozen, trainable_prefixes)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                  max(cfg.steps, cfg.warmup_steps + 1))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))
    data = device_dataset(tokens, images)
    batch_valid = jnp.ones((cfg.batch_size,), bool)

    def backbone(params):
        state = jax.tree.map(lambda x: x, frozen)
        nnx.replace_by_pure_dict(state, unflatten({**fixed, **params}, template))
        return state

    @jax.jit
    def step(params, opt_state, rows):
        batch = gather_batch(data, rows, batch_valid)

        def loss_fn(params):
            model = merge_model(graphdef, backbone(params), adapters)
            embeds = model.edge(batch["input_ids"], batch["images"])
            return mean_answer_nll(model_logits(model.server, embeds, batch), batch)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(trainable)
    schedule_rows = epoch_batches(len(tokens), cfg.batch_size, cfg.steps, cfg.seed)
    progress = tqdm(schedule_rows, desc="pretraining backbone", unit="step")
    for i, rows in enumerate(progress):
        trainable, opt_state, loss = step(trainable, opt_state, rows)
        if i % 25 == 0:
            progress.set_postfix(loss=f"{float(loss):.3f}")
    return backbone(trainable)
