"""The datasets a config can name (`config.data.name`) and the one place that picks a loader.

Every loader takes (config, with_images) and returns the common `pipeline.Splits`;
`with_images=False` skips decoding images (partition statistics need none). The
matching official scorer lives in `eval.official_accuracy.SCORERS` under the same name.
"""

from __future__ import annotations

import os

from fednano_jax.data import iconqa, pipeline, scienceqa
from fednano_jax.data.prompts import template_of
from fednano_jax.errors import LABELS, ConfigError


def _easyvqa(config, with_images: bool = True) -> pipeline.Splits:
    del with_images  # easy-VQA's images are small and part of its build
    data = config.data
    return pipeline.load_splits(os.path.expanduser(data.dir), data.pretrain_images, data.train_examples,
                                data.test_examples, config.seed, config.pretrain.caption_repeats,
                                config.pretrain.questions_per_image, config.model.vision.image_size,
                                config.pretrain.seed, template_of(config))


LOADERS = {"easyvqa": _easyvqa, "scienceqa": scienceqa.load_splits, "iconqa": iconqa.load_splits}


def dataset_name(config) -> str:
    """config.data.name."""
    return config.data.name


def load_splits(config, with_images: bool = True) -> pipeline.Splits:
    """The config's dataset; a size the data cannot satisfy (data.pretrain_examples, ...) is a ConfigError."""
    try:
        return LOADERS[dataset_name(config)](config, with_images)
    except ValueError as error:
        if isinstance(error, tuple(LABELS)):
            raise
        raise ConfigError(str(error)) from error
