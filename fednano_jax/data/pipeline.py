"""easy-VQA -> pretraining set, per-client federated train/test sets, tokenizer.

The training images are split once (seeded) into a held-aside set used only for
centralized backbone pretraining and a federated pool; the federated test set is
easy-VQA's official test split. The same Dirichlet proportions over question
categories split the train and test pools, so each client is evaluated on its own
distribution.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from fednano_jax.data import easy_vqa
from fednano_jax.data.easy_vqa_builder import ImageRecord, load_image_records
from fednano_jax.data.partition import dirichlet_proportions, partition_by_proportions
from fednano_jax.data.prompts import TokenizedSet, render_prompt, tokenize_for_training, tokenize_prompts
from fednano_jax.data.tokenizer import build_tokenizer

CAPTION_QUESTION = "describe the image."


@dataclasses.dataclass(frozen=True)
class Examples:
    prompts: list[str]
    answers: list[str]
    categories: list[str]
    image_index: np.ndarray  # row in the image table


@dataclasses.dataclass(frozen=True)
class EasyVqaSplits:
    images: np.ndarray  # [num_images, H, W, 3] uint8: train images then test images
    pretrain: Examples
    federated_train: Examples
    federated_test: Examples
    vocabulary: list[str]  # every training text (pretraining and the whole federated pool): tokenizer source


@dataclasses.dataclass(frozen=True)
class FederatedData:
    images: np.ndarray
    train: TokenizedSet
    test: TokenizedSet  # left-padded prompts
    test_answers: list[str]
    test_categories: list[str]
    client_train: list[np.ndarray]  # row indices into `train`
    client_test: list[np.ndarray]  # row indices into `test`


def _questions(records: list[ImageRecord], first_row: int) -> Examples:
    prompts, answers, categories, rows = [], [], [], []
    for offset, record in enumerate(records):
        for question, answer in zip(record.questions, record.answers):
            prompts.append(render_prompt(question, has_image=True))
            answers.append(answer)
            categories.append(easy_vqa.question_category(question))
            rows.append(first_row + offset)
    return Examples(prompts, answers, categories, np.asarray(rows, np.int32))


def _pretraining_examples(record: ImageRecord, row: int, caption_repeats: int, questions_per_image: int,
                          rng: np.random.Generator) -> Examples:
    """Captioning of a held-aside image, and question answering from a *text* description of it.

    The federated task (answering from the image) is never shown: the backbone learns
    to see (captions) and to answer (text QA), and tuning must connect the two.
    Captions are repeated because one image yields one caption but many questions.
    """
    text = easy_vqa.caption(record)
    if text is None:
        return Examples([], [], [], np.zeros(0, np.int32))
    prompts = [render_prompt(CAPTION_QUESTION, has_image=True)] * caption_repeats
    answers = [text] * caption_repeats
    count = min(questions_per_image, len(record.questions))
    for q in sorted(rng.choice(len(record.questions), size=count, replace=False)):
        prompts.append(render_prompt(f"the image shows {text}. {record.questions[q]}", has_image=False))
        answers.append(record.answers[q])
    return Examples(prompts, answers, ["pretrain"] * len(prompts), np.full(len(prompts), row, np.int32))


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of uint8 [N, H, W, 3] images to the vision tower's input size, as CLIP's processor."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def _subsample(examples: Examples, count: int, rng: np.random.Generator) -> Examples:
    if count <= 0 or count >= len(examples.prompts):
        return examples
    keep = np.sort(rng.choice(len(examples.prompts), size=count, replace=False))
    return Examples([examples.prompts[i] for i in keep], [examples.answers[i] for i in keep],
                    [examples.categories[i] for i in keep], examples.image_index[keep])


def load_splits(data_dir: str, pretrain_images: int, train_examples: int, test_examples: int, seed: int,
                caption_repeats: int = 4, questions_per_image: int = 3, image_size: int = 64,
                pretrain_seed: int = 0) -> EasyVqaSplits:
    """`pretrain_seed` fixes the held-aside images and so the backbone; `seed` draws the federated questions."""
    train_records = load_image_records(data_dir, "train")
    test_records = load_image_records(data_dir, "test")
    if not 0 < pretrain_images < len(train_records):
        raise ValueError(f"data.pretrain_images must be between 1 and {len(train_records) - 1}, got {pretrain_images}.")
    rng = np.random.default_rng(pretrain_seed)
    order = rng.permutation(len(train_records))
    held_aside = sorted(order[:pretrain_images])
    federated = sorted(order[pretrain_images:])
    images = resize_images(np.stack([r.image for r in train_records] + [r.image for r in test_records]), image_size)
    pretrain = _merge([_pretraining_examples(train_records[i], int(i), caption_repeats, questions_per_image, rng)
                       for i in held_aside])
    fed_train = _merge([_questions([train_records[i]], int(i)) for i in federated])
    fed_test = _questions(test_records, len(train_records))
    fed_rng = np.random.default_rng(seed)
    return EasyVqaSplits(images, pretrain, _subsample(fed_train, train_examples, fed_rng),
                         _subsample(fed_test, test_examples, fed_rng), vocabulary=_vocabulary(pretrain, fed_train))


def _merge(parts: list[Examples]) -> Examples:
    return Examples(
        [p for e in parts for p in e.prompts],
        [a for e in parts for a in e.answers],
        [c for e in parts for c in e.categories],
        np.concatenate([e.image_index for e in parts]).astype(np.int32),
    )


def _vocabulary(pretrain: Examples, federated_pool: Examples) -> list[str]:
    return pretrain.prompts + pretrain.answers + federated_pool.prompts + federated_pool.answers


def tokenizer_for(splits: EasyVqaSplits):
    """Word-level tokenizer over every training text; independent of the federated seed, like the backbone."""
    return build_tokenizer(splits.vocabulary)


def tokenize_pretraining(splits: EasyVqaSplits, tokenizer, num_image_tokens: int) -> TokenizedSet:
    p = splits.pretrain
    return tokenize_for_training(tokenizer, p.prompts, p.answers, p.image_index, num_image_tokens)


def federated_data(splits: EasyVqaSplits, tokenizer, num_image_tokens: int, num_clients: int,
                   alpha: float, seed: int) -> FederatedData:
    train, test = splits.federated_train, splits.federated_test
    if num_clients > len(train.prompts):
        raise ValueError(f"fed.num_clients ({num_clients}) exceeds the {len(train.prompts)} federated "
                         "training examples; lower it or raise data.train_examples.")
    order = easy_vqa.QUESTION_CATEGORIES
    proportions = dirichlet_proportions(len(order), num_clients, alpha, seed)
    client_train = partition_by_proportions(train.categories, proportions, order, seed)
    client_test = partition_by_proportions(test.categories, proportions, order, seed + 1)
    empty = [k for k, rows in enumerate(client_train) if len(rows) == 0]
    if empty:
        raise ValueError(f"Clients {empty} received no training examples; raise data.train_examples or "
                         "data.dirichlet_alpha, or lower fed.num_clients.")
    return FederatedData(
        images=splits.images,
        train=tokenize_for_training(tokenizer, train.prompts, train.answers, train.image_index, num_image_tokens),
        test=tokenize_prompts(tokenizer, test.prompts, test.image_index, num_image_tokens),
        test_answers=test.answers,
        test_categories=test.categories,
        client_train=client_train,
        client_test=client_test,
    )
