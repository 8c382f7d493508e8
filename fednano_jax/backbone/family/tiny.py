"""The tiny family: the small CLIP + LLaMA backbone of configs/easyvqa_tiny.py (and scienceqa_tiny, iconqa_tiny),
pretrained here on the held-aside data and cached (backbone/stored.py, backbone/pretrain.py); the default
configs' backbones are shipped with the repository (backbone/shipped/). Its shapes are the config's sections;
its vocabulary is the word-level tokenizer its data builds (the stored backbone's, when there is one).
"""

from __future__ import annotations

from fednano_jax.backbone.family.base import Family
from fednano_jax.errors import ConfigError


class Tiny(Family):
    name = "tiny"

    def check(self, config) -> None:
        super().check(config)
        if config.model.path:
            raise ConfigError(f"model.family='tiny' is pretrained here and reads no checkpoint, but model.path="
                              f"{config.model.path!r}; drop model.path or set model.family to the checkpoint's.")

    def backbone(self, config, splits):
        from fednano_jax.backbone import stored

        return stored.stored_or_pretrained(config, splits, lambda vocab, image: self.model_config(config, vocab, image))


FAMILY = Tiny()
