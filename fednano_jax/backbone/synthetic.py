"""Random-weight models and synthetic token batches of a config's shapes, for benchmarks and memory plans.

No dataset, tokenizer or checkpoint is needed: the model section (or a preset from
`model_presets`) fixes every shape, and the frozen backbone is cast to the model
dtype (bf16 for the 7B preset) while adapters stay float32 master weights.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fednano_jax.backbone import presets as model_presets
from fednano_jax.backbone.shapes import model_shapes
from fednano_jax.errors import ConfigError
from fednano_jax.models.loss import answer_slots
from fednano_jax.models.mllm import MllmConfig, MultimodalModel, split_model
from fednano_jax.settings import Experiment, Model

PRESETS = {"llava15_7b": model_presets.llava15_7b, "minigpt4_7b": model_presets.minigpt4_7b,
           "minigpt4_13b": model_presets.minigpt4_13b, "smollm2_135m": model_presets.smollm2_135m}
DEFAULT_VOCAB = 256  # token ids for a config whose vocabulary its data decides, when no stored backbone says


def with_preset(config: Experiment, preset: str | None) -> Experiment:
    """The config with its model section replaced by a named preset's (its adapters included), keeping its remat
    and layer-scan unrolling (none: unchanged)."""
    if not preset:
        return config
    if preset not in PRESETS:
        raise ConfigError(f"Unknown --preset {preset!r}; expected one of {sorted(PRESETS)}.")
    model = Model.read(PRESETS[preset](), "model")
    return dataclasses.replace(config, model=dataclasses.replace(model, remat=config.model.remat,
                                                                      scan_unroll=config.model.scan_unroll))


def synthetic_model_config(config: Experiment) -> MllmConfig:
    """The config's shapes (backbone/shapes.py); a vocabulary only its data would decide gets DEFAULT_VOCAB ids."""
    return model_shapes(config, vocab_fallback=DEFAULT_VOCAB)


def _as_abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@functools.lru_cache(maxsize=4)
def _abstract_split(mcfg: MllmConfig):
    # Tracing a 7B model's constructor takes about 13 s on a CPU (nnx's Variable set_value asks each tracer for
    # its sharding, which walks the whole trace): commands that count, plan and dry-run share one trace.
    return split_model(nnx.eval_shape(lambda: MultimodalModel(mcfg, nnx.Rngs(0))))


def abstract_model(mcfg: MllmConfig):
    """-> (graphdef, frozen, adapters) as shapes only: frozen in the model dtype, adapters float32."""
    graphdef, frozen, adapters = _abstract_split(mcfg)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, _frozen_dtype(x.dtype, mcfg)), frozen)
    return graphdef, frozen, _as_abstract(adapters)


def _frozen_dtype(dtype, mcfg: MllmConfig):
    return jnp.dtype(mcfg.llm.dtype) if jnp.issubdtype(dtype, jnp.floating) else dtype


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_leaf(key, shape: tuple[int, ...], dtype):
    """Normal(0, 0.02) for a matrix, ones for a vector (norm scales, biases), made directly in its dtype."""
    if len(shape) >= 2:
        return jax.random.normal(key, shape, dtype) * jnp.asarray(0.02, dtype)
    return jnp.ones(shape, dtype)


def _random_like(abstract, key):
    """One small program per distinct (shape, dtype), not one program over every leaf: a 30-layer model's
    single program took 45 s of CPU compilation, these take seconds."""
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [_random_leaf(k, x.shape, jnp.dtype(x.dtype)) for k, x in zip(keys, leaves)])


def random_model(mcfg: MllmConfig, seed: int = 0):
    """-> (graphdef, frozen, adapters) with random weights, generated on the device in their final dtypes
    (a 7B bf16 backbone never exists in float32). Adapters get random `up` too, so gradients reach both
    adapter matrices."""
    graphdef, frozen, adapters = abstract_model(mcfg)
    frozen_key, adapter_key = jax.random.split(jax.random.key(seed))
    return graphdef, _random_like(frozen, frozen_key), _random_like(adapters, adapter_key)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one round computes: `clients` x `steps` local steps of `batch` sequences of `seq_len` tokens."""

    clients: int
    steps: int
    batch: int
    seq_len: int

    @property
    def tokens_per_round(self) -> int:
        return self.clients * self.steps * self.batch * self.seq_len


def sequence_length(mcfg: MllmConfig, text_tokens: int) -> int:
    """<s>, the image tokens, then `text_tokens` of text (prompt and answer)."""
    return 1 + (mcfg.vision.num_image_tokens if mcfg.vision else 0) + text_tokens


def synthetic_data(mcfg: MllmConfig, work: Workload, seed: int = 0, answer_tokens: int = 4):
    """-> (dataset dict, rows [K, steps, batch], valid [K, steps, batch]): every row distinct and valid."""
    rng = np.random.default_rng(seed)
    count = work.clients * work.steps * work.batch
    vocab = mcfg.llm.vocab_size
    ids = rng.integers(3, vocab - 1, size=(count, work.seq_len)).astype(np.int32)
    ids[ids == mcfg.image_token_id] = 3 if mcfg.image_token_id != 3 else 4  # image tokens only where images go
    ids[:, 0] = 1
    image_tokens = mcfg.vision.num_image_tokens if mcfg.vision else 0
    ids[:, 1: 1 + image_tokens] = mcfg.image_token_id
    loss = np.zeros_like(ids, bool)
    loss[:, -answer_tokens:] = True
    size = mcfg.vision.image_size if mcfg.vision else 1
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids, bool), "loss_mask": loss,
            "image_index": np.arange(count, dtype=np.int32),
            "images": rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)}
    data["answer_positions"], data["answer_valid"] = answer_slots(loss)
    rows = np.arange(count, dtype=np.int32).reshape(work.clients, work.steps, work.batch)
    return {k: jnp.asarray(v) for k, v in data.items()}, rows, np.ones_like(rows, bool)


def abstract_data(mcfg: MllmConfig, work: Workload, answer_tokens: int = 4):
    """synthetic_data's shapes without the arrays."""
    count = work.clients * work.steps * work.batch
    size = mcfg.vision.image_size if mcfg.vision else 1
    sds = jax.ShapeDtypeStruct
    data = {"input_ids": sds((count, work.seq_len), jnp.int32), "attention_mask": sds((count, work.seq_len), bool),
            "loss_mask": sds((count, work.seq_len), bool), "image_index": sds((count,), jnp.int32),
            "images": sds((count, size, size, 3), jnp.uint8),
            "answer_positions": sds((count, answer_tokens), jnp.int32), "answer_valid": sds((count, answer_tokens), bool)}
    schedule = (work.clients, work.steps, work.batch)
    return data, sds(schedule, jnp.int32), sds(schedule, bool)
