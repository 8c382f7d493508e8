"""What a backbone family supplies (`Family`), with the behaviour most families share: a CLIP vision tower read
from `model.vision`, the LLaMA decoder, the LLaVA-1.5 chat template, a checkpoint at `model.path` (its own
vision side, or the config's aligned to it) or the small backbone pretrained here.

A family overrides what differs (see tiny.py, llava.py, llama_text.py, minigpt4.py); the registry
(`family/__init__.py`) names each one.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fednano_jax.data.images import llava_image
from fednano_jax.data.prompts import DEFAULT_TEMPLATE
from fednano_jax.errors import ConfigError, DataError
from fednano_jax.models.llama import LlamaConfig, LlamaDecoder
from fednano_jax.models.mllm import AdapterConfig, MllmConfig
from fednano_jax.models.vision import VisionConfig


def adapter_config(config) -> AdapterConfig:
    """config.model.adapter as the NanoAdapters' config (every family's)."""
    a = config.model.adapter
    return AdapterConfig(a.rank, a.alpha, a.image, a.text)


class Family:
    """One backbone family. Subclasses set the attributes and override the methods where they differ."""

    name = ""
    prompt = DEFAULT_TEMPLATE  # the chat template (data/prompts.TEMPLATES) its checkpoints were tuned with
    decoder = LlamaDecoder  # the server's module, built from MllmConfig.llm
    hf_model_type: str | None = None  # config.json's model_type this family reads (load_pretrained), if any
    hf_description = ""  # that architecture, in words (for the error naming what is supported)

    # ------------------------------------------------------------------------------------------- the config
    def check(self, config) -> None:
        """This family's checks on config.model (one ConfigError sentence each), run by config.validate."""
        model = config.model
        if self.prompt != DEFAULT_TEMPLATE and not model.prompt:
            raise ConfigError(f"model.family={self.name!r} was tuned with the {self.prompt!r} chat template: set "
                              f"model.prompt={self.prompt!r} (or another template to prompt it otherwise).")

    def vision_config(self, config):
        """The vision side's config from config.model.vision: a CLIP-layout tower."""
        m = config.model
        v = m.vision
        if not v:
            raise ConfigError(f"model.family={self.name!r} needs model.vision (the vision tower's shapes)"
                              + (f" to align to the text-only LLM at model.path={m.path}" if m.path else "")
                              + ".")
        return VisionConfig(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
                            intermediate_size=v.intermediate_size, num_layers=v.num_layers, num_heads=v.num_heads,
                            feature_layer=v.feature_layer, dtype=m.dtype)

    def llm_config(self, config, vocab_size: int) -> LlamaConfig:
        """The decoder's config from config.model.llm."""
        m = config.model
        l = m.llm
        return LlamaConfig(vocab_size=vocab_size, hidden_size=l.hidden_size, intermediate_size=l.intermediate_size,
                           num_layers=l.num_layers, num_heads=l.num_heads, num_kv_heads=l.num_kv_heads,
                           rope_theta=l.rope_theta, rms_norm_eps=l.rms_norm_eps, dtype=m.dtype,
                           remat=m.remat, scan_unroll=m.scan_unroll)

    def model_config(self, config, vocab_size: int, image_token_id: int) -> MllmConfig:
        """The model the config's sections describe (model.vision, model.llm, model.connector, model.adapter)."""
        return MllmConfig(self.vision_config(config), self.llm_config(config, vocab_size), adapter_config(config),
                          image_token_id, config.model.connector, decoder=self.decoder)

    def with_vision_tower(self, config, llm: LlamaConfig, image_token: int, tokenizer_size: int) -> MllmConfig:
        """A text-only LLM's config plus the experiment config's vision side, connector and adapters."""
        return MllmConfig(self.vision_config(config), llm, adapter_config(config), image_token,
                          config.model.connector, embed_vocab_size=max(tokenizer_size, llm.vocab_size),
                          decoder=self.decoder)

    # ------------------------------------------------------------------------------------------- the shapes
    def shapes(self, config, vocab_size: int | None = None, vocab_fallback: int | None = None) -> MllmConfig:
        """Every shape the config describes, without reading a tensor: from the checkpoint's metadata when
        model.path is set without model.llm, else from the sections. A data-decided vocabulary is taken from
        `vocab_size`, a stored backbone's tokenizer, `vocab_fallback` (where its exact size does not matter),
        or the data."""
        if config.model.path and not config.model.llm:
            return self.checkpoint_shapes(config)
        vocab_size = vocab_size or config.model.vocab_size or _stored_vocabulary(config)
        if not vocab_size and vocab_fallback:
            vocab_size = vocab_fallback
        if not vocab_size:
            vocab_size = _data_vocabulary(config)
        return self.model_config(config, vocab_size, image_token_id=vocab_size - 1)

    def checkpoint_metadata(self, config) -> MllmConfig:
        """The model config the checkpoint at model.path describes, from its metadata (no tensor is read)."""
        from fednano_jax.backbone.pretrained import checkpoint_config

        return checkpoint_config(config.model.path, config.model.dtype, adapter_config(config))

    def checkpoint_shapes(self, config) -> MllmConfig:
        mcfg = self.checkpoint_metadata(config)
        llm = dataclasses.replace(mcfg.llm, remat=config.model.remat, scan_unroll=config.model.scan_unroll)
        if mcfg.vision is not None:
            return dataclasses.replace(mcfg, llm=llm)
        # A text-only LLM gets the config's vision tower and one new token id, `<image>`.
        return self.with_vision_tower(config, llm, llm.vocab_size, llm.vocab_size + 1)

    # ------------------------------------------------------------------------------------------ the weights
    def load(self, config, part: str = "whole"):
        """The checkpoint at model.path as a PretrainedModel (backbone/pretrained.py), of `part` (weights/names.PARTS:
        "edge" reads no decoder tensor, "server" no NanoEdge tensor)."""
        from fednano_jax.backbone.pretrained import load_pretrained

        return load_pretrained(config.model.path, dtype=config.model.dtype, adapter=adapter_config(config),
                               seed=config.pretrain.seed, part=part)

    def backbone(self, config, splits):
        """-> (graphdef, frozen, adapters, tokenizer, model config): the checkpoint at model.path (its vision side
        aligned here if it has none); without model.path, the backbone stored for these settings (shipped with
        the repository or cached) or pretrained here on the held-aside data and cached."""
        if config.model.path:
            from fednano_jax.backbone.from_checkpoint import checkpoint_backbone

            return checkpoint_backbone(config, splits, self)
        from fednano_jax.backbone import stored

        return stored.stored_or_pretrained(config, splits, lambda vocab, image: self.model_config(config, vocab, image))

    def edge(self, config):
        """-> (graphdef, frozen, adapters, tokenizer, model config) of an `EdgeModel` (models/mllm.py): what a
        split-step client holds, NanoEdge alone, read from the same files as `backbone` without opening a
        decoder tensor: the checkpoint's NanoEdge (its vision side aligned here and cached, if it has none), or
        without model.path the backbone stored for these settings."""
        if config.model.path:
            from fednano_jax.backbone.from_checkpoint import checkpoint_edge

            return checkpoint_edge(config, self)
        from fednano_jax.backbone import stored

        return stored.stored_part(config, lambda vocab, image: self.model_config(config, vocab, image))

    def server_half(self, config, splits):
        """The frozen decoder (an nnx module: layers, final norm, LM head) the split-step server holds: without
        model.path, read alone from the backbone stored for these settings, or from the checkpoint's decoder tensors
        alone (NanoEdge's are never read, beyond a tied LM head's embeddings); where no backbone is stored yet, it is
        pretrained here and cached, as a run would, and NanoEdge dropped after."""
        from fednano_jax.backbone import stored
        from fednano_jax.models.mllm import ServerModel, merge_model

        if config.model.path:
            loaded = self.load(config, part="server")
            return merge_model(loaded.graphdef, loaded.frozen, loaded.adapters).server
        if not stored.stored_backbones(config):  # pretrained here first, as a run would
            graphdef, frozen, adapters, _, _ = self.backbone(config, splits)
            return merge_model(graphdef, frozen, adapters).server

        graphdef, frozen, adapters, _, _ = stored.stored_part(
            config, lambda vocab, image: self.model_config(config, vocab, image), ServerModel)
        return merge_model(graphdef, frozen, adapters).server

    def hf_layout(self, hf, directory: str, dtype, adapter: AdapterConfig):
        """-> (MllmConfig, name table) of a Hugging Face directory whose config.json has `hf_model_type`."""
        raise NotImplementedError(f"The {self.name} family reads no Hugging Face directory by model_type.")

    def prepare_image(self, image, vision) -> np.ndarray:
        """A PIL image -> uint8 [size, size, 3] as the family's checkpoints were fed (LLaVA-1.5: padded to a
        square with the tower's mean colour, bicubic-resized)."""
        return llava_image(image, vision.image_size, vision.image_mean)


def _stored_vocabulary(config) -> int | None:
    """The vocabulary size of the backbone shipped or cached for these settings, if there is one."""
    import os

    from fednano_jax.backbone import cache
    from fednano_jax.backbone.stored import stored_backbones
    from fednano_jax.data.tokenizer import load_tokenizer

    found = [] if config.model.path else stored_backbones(config)
    return len(load_tokenizer(os.path.join(found[0][0], cache.TOKENIZER))) if found else None


def _data_vocabulary(config) -> int:
    """The size of the word-level tokenizer the config's training data builds (no image is read)."""
    from fednano_jax.data import datasets, pipeline

    try:
        return len(pipeline.tokenizer_for(datasets.load_splits(config, with_images=False)))
    except (ConfigError, DataError) as error:
        raise type(error)(f"{str(error).rstrip('.')}; this config's vocabulary comes from its data (or pass "
                          "--vocab_size=N).") from error
