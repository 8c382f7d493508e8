"""Every dataset's splits in one schema, easy-VQA's loader, and the per-client federated sets.

`Splits` is what every dataset loader returns (easy-VQA here; ScienceQA and IconQA in
their modules, chosen by `data.datasets`): an image table, held-aside pretraining
examples, the federated train/test (and optional validation) pools, the tokenizer's
source texts and the partition categories. Per-example `meta` carries what a
dataset's official scorer reads.

easy-VQA: the training images are split once (seeded) into a held-aside set used only for
centralized backbone pretraining and a federated pool; the federated test set is
easy-VQA's official test split. The same Dirichlet proportions over question
categories split the train and test pools, so each client is evaluated on its own
distribution.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
from PIL import Image

from fednano_jax.data import easy_vqa
from fednano_jax.data.easy_vqa_builder import ImageRecord, load_image_records
from fednano_jax.data.partition import (DIRICHLET_ATTEMPTS, Partition, dirichlet_proportions,
                                        iid_proportions, natural_proportions, partition_by_proportions,
                                        pathological_proportions, size_skew_proportions)
from fednano_jax.data.prompts import (DEFAULT_TEMPLATE, TokenizedSet, render_prompt, tokenize_for_training,
                                      tokenize_prompts)
from fednano_jax.data.tokenizer import build_tokenizer
from fednano_jax.streams import Purpose, generator
from fednano_jax.settings import PARTITIONS

CAPTION_QUESTION = "describe the image."


@dataclasses.dataclass(frozen=True)
class Examples:
    prompts: list[str]
    answers: list[str]
    categories: list[str]
    image_index: np.ndarray  # row in the image table
    meta: list[dict] = dataclasses.field(default_factory=list)  # per example, for the official scorer; or empty

    def __len__(self) -> int:
        return len(self.prompts)


@dataclasses.dataclass(frozen=True)
class Splits:
    images: np.ndarray  # [num_images, H, W, 3] uint8
    pretrain: Examples
    federated_train: Examples
    federated_test: Examples
    vocabulary: list[str]  # every training text (pretraining and the whole federated pool): tokenizer source
    category_order: tuple[str, ...] = easy_vqa.QUESTION_CATEGORIES  # partition categories, one Dirichlet row each
    federated_val: Examples | None = None  # official val split, partitioned like test; not evaluated, no images
    lowercase: bool = True  # the word-level tokenizer lowercases (easy-VQA); letter answers need case kept
    template: str = DEFAULT_TEMPLATE  # the chat template the prompts are rendered in (data/prompts.TEMPLATES)


EasyVqaSplits = Splits  # the schema's first name


@dataclasses.dataclass(frozen=True)
class FederatedData:
    images: np.ndarray
    train: TokenizedSet
    test: TokenizedSet  # left-padded prompts
    test_answers: list[str]
    test_categories: list[str]
    client_train: list[np.ndarray]  # row indices into `train`
    client_test: list[np.ndarray]  # row indices into `test`
    test_meta: list[dict] = dataclasses.field(default_factory=list)  # per test row, for the official scorer


def _questions(records: list[ImageRecord], first_row: int, template: str) -> Examples:
    prompts, answers, categories, rows = [], [], [], []
    for offset, record in enumerate(records):
        for question, answer in zip(record.questions, record.answers):
            prompts.append(render_prompt(question, True, template))
            answers.append(answer)
            categories.append(easy_vqa.question_category(question))
            rows.append(first_row + offset)
    return Examples(prompts, answers, categories, np.asarray(rows, np.int32))


def _pretraining_examples(record: ImageRecord, row: int, caption_repeats: int, questions_per_image: int,
                          rng: np.random.Generator, template: str) -> Examples:
    """Captioning of a held-aside image, and question answering from a *text* description of it.

    The federated task (answering from the image) is never shown: the backbone learns
    to see (captions) and to answer (text QA), and tuning must connect the two.
    Captions are repeated because one image yields one caption but many questions.
    """
    text = easy_vqa.caption(record)
    if text is None:
        return Examples([], [], [], np.zeros(0, np.int32))
    prompts = [render_prompt(CAPTION_QUESTION, True, template)] * caption_repeats
    answers = [text] * caption_repeats
    count = min(questions_per_image, len(record.questions))
    for q in sorted(rng.choice(len(record.questions), size=count, replace=False)):
        prompts.append(render_prompt(f"the image shows {text}. {record.questions[q]}", False, template))
        answers.append(record.answers[q])
    return Examples(prompts, answers, ["pretrain"] * len(prompts), np.full(len(prompts), row, np.int32))


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of uint8 [N, H, W, 3] images to the vision tower's input size, as CLIP's processor
    (easy-VQA's images are square: LLaVA's padding is a no-op, and MiniGPT-4 resizes the same way)."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def _take(examples: Examples, rows) -> Examples:
    """The examples at `rows`, in that order."""
    rows = np.asarray(rows, np.int64)
    return Examples([examples.prompts[i] for i in rows], [examples.answers[i] for i in rows],
                    [examples.categories[i] for i in rows], examples.image_index[rows],
                    [examples.meta[i] for i in rows] if examples.meta else [])


def _subsample(examples: Examples, count: int, rng: np.random.Generator) -> Examples:
    if count <= 0 or count >= len(examples.prompts):
        return examples
    return _take(examples, np.sort(rng.choice(len(examples.prompts), size=count, replace=False)))


def load_splits(data_dir: str, pretrain_images: int, train_examples: int, test_examples: int, seed: int,
                caption_repeats: int = 4, questions_per_image: int = 3, image_size: int = 64,
                pretrain_seed: int = 0, template: str = DEFAULT_TEMPLATE) -> Splits:
    """`pretrain_seed` fixes the held-aside images and so the backbone; `seed` draws the federated questions."""
    train_records = load_image_records(data_dir, "train")
    test_records = load_image_records(data_dir, "test")
    if not 0 < pretrain_images < len(train_records):
        raise ValueError(f"data.pretrain_images must be between 1 and {len(train_records) - 1}, got {pretrain_images}.")
    order = generator(pretrain_seed, Purpose.HOLD_ASIDE).permutation(len(train_records))
    rng = generator(pretrain_seed, Purpose.PRETRAIN_QUESTIONS)
    held_aside = sorted(order[:pretrain_images])
    federated = sorted(order[pretrain_images:])
    images = resize_images(np.stack([r.image for r in train_records] + [r.image for r in test_records]), image_size)
    pretrain = merge_examples([_pretraining_examples(train_records[i], int(i), caption_repeats,
                                                     questions_per_image, rng, template) for i in held_aside])
    fed_train = merge_examples([_questions([train_records[i]], int(i), template) for i in federated])
    fed_test = _questions(test_records, len(train_records), template)
    fed_rng = generator(seed, Purpose.QUESTIONS)
    return Splits(images, pretrain, _subsample(fed_train, train_examples, fed_rng),
                  _subsample(fed_test, test_examples, fed_rng), vocabulary=_vocabulary(pretrain, fed_train),
                  template=template)


def merge_examples(parts: list[Examples]) -> Examples:
    return Examples(
        [p for e in parts for p in e.prompts],
        [a for e in parts for a in e.answers],
        [c for e in parts for c in e.categories],
        np.concatenate([np.zeros(0, np.int32)] + [e.image_index for e in parts]).astype(np.int32),
        [m for e in parts for m in e.meta],
    )


def _vocabulary(pretrain: Examples, federated_pool: Examples) -> list[str]:
    return pretrain.prompts + pretrain.answers + federated_pool.prompts + federated_pool.answers


def tokenizer_for(splits: Splits):
    """Word-level tokenizer over every training text; independent of the federated seed, like the backbone."""
    return build_tokenizer(splits.vocabulary, lowercase=splits.lowercase)


def tokenize_pretraining(splits: Splits, tokenizer, num_image_tokens: int) -> TokenizedSet:
    p = splits.pretrain
    return tokenize_for_training(tokenizer, p.prompts, p.answers, p.image_index, num_image_tokens, splits.template)


def _pools(splits: Splits) -> dict[str, Examples]:
    pools = {"train": splits.federated_train, "test": splits.federated_test}
    if splits.federated_val is not None:
        pools["val"] = splits.federated_val
    return pools


def _natural_keys(pool: Examples, key: str) -> list[str]:
    if not pool.meta or key not in pool.meta[0]:
        fields = sorted(pool.meta[0]) if pool.meta else []
        raise ValueError(f"data.partition='natural' groups examples by data.natural_key={key!r}, which this "
                         f"dataset's examples do not carry (they carry {fields or 'no metadata'}; ScienceQA has "
                         "subject and grade, IconQA subtask).")
    return [str(example[key]) for example in pool.meta]


def client_partition(splits: Splits, num_clients: int, partition: Partition, seed: int) -> dict[str, list[np.ndarray]]:
    """Per split ("train", "test" and "val" if present), each client's row indices. One matrix of shares
    (`data/partition.py`) serves every split, so every client is evaluated on its own distribution."""
    pools = _pools(splits)
    if partition.kind not in PARTITIONS:
        raise ValueError(f"data.partition must be one of {list(PARTITIONS)}, got {partition.kind!r}.")
    keys = {name: pool.categories for name, pool in pools.items()}
    order = splits.category_order
    if partition.kind == "natural":
        keys = {name: _natural_keys(pool, partition.natural_key) for name, pool in pools.items()}
        order = tuple(sorted({key for pool_keys in keys.values() for key in pool_keys}))

    def cut(proportions):
        return {name: partition_by_proportions(keys[name], proportions, order, seed, split_index)
                for split_index, name in enumerate(pools)}

    if partition.kind != "dirichlet":
        return cut(_proportions(partition, order, keys["train"], num_clients, seed))
    for attempt in range(DIRICHLET_ATTEMPTS):
        clients = cut(dirichlet_proportions(len(order), num_clients, partition.alpha, seed, attempt))
        if min(len(rows) for rows in clients["train"]) >= partition.min_client_size:
            return clients
    raise ValueError(f"No Dirichlet(alpha={partition.alpha}) draw in {DIRICHLET_ATTEMPTS} gave every one of "
                     f"{num_clients} clients {partition.min_client_size} training examples; raise "
                     "data.dirichlet_alpha or data.train_examples, or lower data.min_client_size or fed.num_clients.")


def _proportions(partition: Partition, order, train_keys, num_clients: int, seed: int) -> np.ndarray:
    if partition.kind == "iid":
        return iid_proportions(len(order), num_clients)
    if partition.kind == "pathological":
        return pathological_proportions(len(order), num_clients, partition.categories_per_client, seed)
    if partition.kind == "size_skew":
        return size_skew_proportions(len(order), num_clients, partition.size_exponent, seed)
    sizes = collections.Counter(train_keys)
    return natural_proportions([sizes[group] for group in order], num_clients)


def federated_data(splits: Splits, tokenizer, num_image_tokens: int, num_clients: int,
                   partition: Partition, seed: int) -> FederatedData:
    train, test = splits.federated_train, splits.federated_test
    if num_clients > len(train.prompts):
        raise ValueError(f"fed.num_clients ({num_clients}) exceeds the {len(train.prompts)} federated "
                         "training examples; lower it or raise data.train_examples.")
    clients = client_partition(splits, num_clients, partition, seed)
    empty = [k for k, rows in enumerate(clients["train"]) if len(rows) == 0]
    if empty:
        raise ValueError(f"Clients {empty} received no training examples; raise data.train_examples, lower "
                         "fed.num_clients, or choose another data.partition.")
    return FederatedData(
        images=splits.images,
        train=tokenize_for_training(tokenizer, train.prompts, train.answers, train.image_index, num_image_tokens,
                                    splits.template),
        test=tokenize_prompts(tokenizer, test.prompts, test.image_index, num_image_tokens),
        test_answers=test.answers,
        test_categories=test.categories,
        client_train=clients["train"],
        client_test=clients["test"],
        test_meta=test.meta,
    )
