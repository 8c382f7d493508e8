"""Multiple-choice / short-answer problems (ScienceQA, IconQA) -> the common `Splits`.

A dataset module turns its official records into `Problem`s per official split; this
module does the rest the same way for both: it holds a seeded part of the train split
aside for backbone pretraining, samples the federated pools, decodes only the images
the run uses into one uint8 table (resized to the model's size; row 0 is a blank
image that text-only rows point at, since nothing is spliced for them; LLaVA-1.5 pads to a square
before resizing, MiniGPT-4 only resizes) and builds the
pretraining examples:

- every held-aside problem as text only (its prompt without `<image>` -> its answer),
- and, for a problem with an image, a caption-like example: "describe the image." on
  the image -> the text of the correct answer (`caption_repeats` times).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fednano_jax.errors import DataError
from fednano_jax.data.images import prepare_image
from fednano_jax.data.pipeline import CAPTION_QUESTION, Examples, Splits, merge_examples
from fednano_jax.data.prompts import DEFAULT_TEMPLATE, TEMPLATES, render_prompt, template_of
from fednano_jax.streams import Purpose, generator

OFFICIAL_SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Problem:
    pid: str
    question: str  # the prompt body; render_prompt adds the chat template (and <image>)
    answer: str  # the training target: an option letter or a short answer
    category: str  # the partition key (ScienceQA topic, IconQA first skill)
    caption: str  # the correct answer's text, the caption-like pretraining target ('' for none)
    meta: dict  # what the official scorer reads
    image: Callable[[], Image.Image] | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much of each official split a run uses (0 = all)."""

    pretrain_examples: int  # train problems held aside for backbone pretraining only
    train_examples: int
    test_examples: int  # also caps the validation pool


class ImageTable:
    """uint8 rows at the model's size; row 0 is blank. Without images every row is 0 (statistics only)."""

    def __init__(self, size: int, with_images: bool, pad_to_square: bool = True):
        self.size, self.with_images, self.pad = size, with_images, pad_to_square
        self.rows = [prepare_image(Image.new("RGB", (size, size)), size)]
        self.row_of: dict[str, int] = {}

    def row(self, problem: Problem) -> int:
        if problem.image is None or not self.with_images:
            return 0
        if problem.pid not in self.row_of:
            self.row_of[problem.pid] = len(self.rows)
            self.rows.append(prepare_image(problem.image(), self.size, self.pad))
        return self.row_of[problem.pid]

    def array(self) -> np.ndarray:
        return np.stack(self.rows)


def _examples(problems: list[Problem], table: ImageTable, template: str) -> Examples:
    return Examples([render_prompt(p.question, p.image is not None, template) for p in problems],
                    [p.answer for p in problems], [p.category for p in problems],
                    np.asarray([table.row(p) for p in problems], np.int32),
                    [{"pid": p.pid, **p.meta} for p in problems])


def _pretraining_examples(problem: Problem, table: ImageTable, caption_repeats: int, template: str) -> Examples:
    text_only = Examples([render_prompt(problem.question, False, template)], [problem.answer], ["pretrain"],
                         np.zeros(1, np.int32))
    if problem.image is None or caption_repeats < 1 or not problem.caption:
        return text_only
    captions = Examples([render_prompt(CAPTION_QUESTION, True, template)] * caption_repeats,
                        [problem.caption] * caption_repeats, ["pretrain"] * caption_repeats,
                        np.full(caption_repeats, table.row(problem), np.int32))
    return merge_examples([text_only, captions])


def _sample(problems: list[Problem], count: int, rng: np.random.Generator) -> list[Problem]:
    if count <= 0 or count >= len(problems):
        return problems
    return [problems[i] for i in np.sort(rng.choice(len(problems), size=count, replace=False))]


def _hold_aside(train: list[Problem], count: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """`count` seeded train problems for pretraining, at most half the split (a small copy keeps a pool)."""
    if count < 0:
        raise ValueError(f"data.pretrain_examples must be non-negative, got {count}.")
    if count > len(train) // 2:
        print(f"Holding aside {len(train) // 2} train problems for pretraining (half of the {len(train)}), "
              f"not data.pretrain_examples={count}.")
        count = len(train) // 2
    order = generator(seed, Purpose.HOLD_ASIDE).permutation(len(train))
    return [train[i] for i in sorted(order[:count])], [train[i] for i in sorted(order[count:])]


def problem_splits(by_split: dict[str, list[Problem]], sizes: Sizes, *, seed: int, pretrain_seed: int,
                   image_size: int, caption_repeats: int, with_images: bool = True,
                   template: str = DEFAULT_TEMPLATE) -> Splits:
    """`by_split` maps "train"/"val"/"test" to problems in a fixed (pid) order. `pretrain_seed` fixes the
    held-aside problems and so the backbone; `seed` samples the federated pools."""
    held_aside, pool = _hold_aside(by_split["train"], sizes.pretrain_examples, pretrain_seed)
    rng = generator(seed, Purpose.QUESTIONS)
    chosen = {"train": _sample(pool, sizes.train_examples, rng),
              "val": _sample(by_split["val"], sizes.test_examples, rng),
              "test": _sample(by_split["test"], sizes.test_examples, rng)}
    table = ImageTable(image_size, with_images, TEMPLATES[template].pad_to_square)
    pretrain = merge_examples([_pretraining_examples(p, table, caption_repeats, template) for p in held_aside])
    federated = {name: _examples(chosen[name], table, template) for name in ("train", "test")}
    # Validation is partitioned (statistics) but not evaluated: its images are not decoded (rows point at 0).
    federated["val"] = _examples(chosen["val"], ImageTable(image_size, with_images=False), template)
    pool_texts = [render_prompt(p.question, p.image is not None, template) for p in pool] + [p.answer for p in pool]
    categories = sorted({c for examples in federated.values() for c in examples.categories})
    return Splits(table.array(), pretrain, federated["train"], federated["test"],
                  vocabulary=pretrain.prompts + pretrain.answers + pool_texts, category_order=tuple(categories),
                  federated_val=federated["val"], lowercase=False, template=template)


# ------------------------------------------------ official files and the tfds build
def read_json(path: str, layout: str):
    """A JSON file of an official release, or a DataError naming the expected layout."""
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing; {layout}")
    try:
        with open(path) as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error}); {layout}") from error


def read_bytes(path: str, layout: str) -> bytes:
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing; {layout}")
    with open(path, "rb") as file:
        return file.read()


def require_mapping(value, what: str, layout: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{what} is not a JSON object ({type(value).__name__}); {layout}")
    return value


def require_fields(record, fields, what: str, layout: str) -> dict:
    missing = [f for f in fields if not isinstance(record, dict) or f not in record]
    if missing:
        raise DataError(f"{what} lacks {', '.join(missing)}; {layout}")
    return record


def decoder(png: bytes) -> Callable[[], Image.Image] | None:
    """A lazy image decoder for stored image bytes; None for a problem without an image."""
    if not png:
        return None

    def decode() -> Image.Image:
        with Image.open(io.BytesIO(png)) as image:
            return image.convert("RGB")

    return decode


def build_dir(data_dir: str, name: str, root: str, key_file: str) -> str:
    """Where the tfds build of the release in `root` lives: keyed by its path and its key file's mtime,
    so pointing data.root elsewhere (or replacing the release) builds again."""
    real = os.path.realpath(root)
    stamp = os.path.getmtime(key_file) if os.path.exists(key_file) else 0
    digest = hashlib.sha256(f"{real}|{stamp}".encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser(data_dir), name, digest)


def prepared(builder_class, data_dir: str, root: str, config_name: str, label: str):
    """The builder over the release in `root` (tfds manual dir), built first if it is not yet built."""
    builder = builder_class(data_dir=data_dir, config=config_name, file_format="array_record")
    if not builder.is_prepared():
        print(f"Building {label} from {root} into {data_dir} (first use only).")
        builder.download_and_prepare(file_format="array_record",
                                     download_config=tfds.download.DownloadConfig(manual_dir=root))
    return builder


def records(builder, split: str) -> list[dict]:
    """A built split's records in pid order, numeric pids by number (the stored order is shuffled)."""
    source = builder.as_data_source()[split]
    return sorted((source[i] for i in range(len(source))), key=lambda r: (len(r["pid"]), r["pid"]))


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def splits_from_config(by_split: dict[str, list[Problem]], config, with_images: bool) -> Splits:
    data = config.data
    sizes = Sizes(data.pretrain_examples, data.train_examples, data.test_examples)
    return problem_splits(by_split, sizes, seed=config.seed, pretrain_seed=config.pretrain.seed,
                          image_size=config.model.vision.image_size,
                          caption_repeats=config.pretrain.caption_repeats, with_images=with_images,
                          template=template_of(config))
