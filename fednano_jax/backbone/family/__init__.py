"""The backbone families: `model.family` picks one entry of FAMILIES; a config without it gets the family its
keys describe (`derived_family`).

An entry (`base.Family`, one module per family in this package) supplies everything that differs between
backbones: the shapes (from a preset's sections or from the checkpoint's files), the model config and vision
config it builds, loading the weights and the name tables that map a checkpoint's tensors onto ours, the chat
template its checkpoints were tuned with, the vision side NanoEdge holds, and the decoder class on the server.
Adding a backbone is one module here and one line in FAMILIES (docs/design.md walks through it).

This module imports no entry until one is asked for, so `config.py`, `pretrain.py` and the loaders can use the
registry without importing every backbone.
"""

from __future__ import annotations

import importlib

from fednano_jax.errors import ConfigError

# model.family -> the module of this package that defines its entry as `FAMILY`.
FAMILIES = {
    "tiny": "tiny",  # the small backbone pretrained here on held-aside data (shipped or cached)
    "llava": "llava",  # LLaVA-1.5: CLIP tower, mlp2x_gelu projector, LLaMA; a llava-hf directory or preset shapes
    "llama_text": "llama_text",  # a text-only LLaMA-family checkpoint (HF directory, GGUF) with a tower aligned here
    "minigpt4": "minigpt4",  # MiniGPT-4: EVA ViT-g, Q-Former, llama_proj, Vicuna; MiniGPT-4's files
}


def derived_family(model) -> str:
    """The family a model section without `family` describes, from the keys configs had before families:
    a Q-Former or MiniGPT-4's files -> minigpt4; a checkpoint whose shapes come from its metadata and which
    gets the config's vision tower -> llama_text; any other checkpoint or a preset's vocabulary -> llava;
    else the small backbone pretrained here -> tiny. The one place the old key ladder is read."""
    if model.qformer or model.minigpt4:
        return "minigpt4"
    if model.path:
        return "llama_text" if model.vision and not model.llm else "llava"
    return "llava" if model.vocab_size else "tiny"


def family_name(config) -> str:
    """config.model.family, or the family its keys describe; an unknown name is one ConfigError sentence."""
    name = config.model.family or derived_family(config.model)
    if name not in FAMILIES:
        raise ConfigError(f"model.family must be one of {sorted(FAMILIES)}, got {name!r}.")
    return name


def entry(name: str):
    """The registry entry (a base.Family) of a family's name."""
    if name not in FAMILIES:
        raise ConfigError(f"model.family must be one of {sorted(FAMILIES)}, got {name!r}.")
    return importlib.import_module(f"{__name__}.{FAMILIES[name]}").FAMILY


def family_of(config):
    """The registry entry of `config.model.family` (or of the family its keys describe)."""
    return entry(family_name(config))


def without_derived_family(model) -> dict:
    """The model section (settings.Model) as a dict, without `family` where it names the family its keys describe
    anyway: what keys the caches and resume fingerprints, so that naming a config's family changes neither."""
    values = model.as_dict()
    if model.family and model.family == derived_family(model):
        del values["family"]
    return values
