import json
import os

import easy_vqa as easy_vqa_package
import numpy as np
import pytest
from PIL import Image

from fednano_jax.data.easy_vqa import (COLORS, QUESTION_CATEGORIES, SHAPES, caption, examples_from_records,
                                       question_category)
from fednano_jax.data.easy_vqa_builder import ImageRecord, load_image_records

PACKAGE_DATA = os.path.join(os.path.dirname(easy_vqa_package.__file__), "data")


def package_questions(split: str) -> list[list]:
    """[[question, answer, image_id], ...] straight from the package's JSON."""
    with open(os.path.join(PACKAGE_DATA, split, "questions.json")) as file:
        return json.load(file)


def make_record(answers_by_question: dict[str, str], image_id: int = 0) -> ImageRecord:
    return ImageRecord(image_id=image_id, image=np.zeros((64, 64, 3), np.uint8),
                       questions=tuple(answers_by_question), answers=tuple(answers_by_question.values()))


def test_vocabulary_matches_the_package_answers():
    assert set(COLORS) | set(SHAPES) | {"yes", "no"} == set(easy_vqa_package.get_answers())


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_package_question_has_a_category_that_fits_its_answer(split):
    seen = set()
    for question, answer, _ in package_questions(split):
        category = question_category(question)
        assert answer in {"color": COLORS, "shape": SHAPES}.get(category, ("yes", "no")), (question, answer)
        seen.add(category)
    assert seen == set(QUESTION_CATEGORIES)


@pytest.mark.parametrize("question, category", [
    ("what is the blue shape?", "shape"),
    ("what color is the circle?", "color"),
    ("what is the color of the shape?", "color"),
    ("what shape does the image contain?", "shape"),
    ("is a teal shape present?", "yes_no_color"),
    ("does the image contain a triangle?", "yes_no_shape"),
    ("is there not a red shape in the image?", "yes_no_color_negated"),
    ("does the image not contain a rectangle?", "yes_no_shape_negated"),
    ("is no circle present?", "yes_no_shape_negated"),
    ("is no gray shape present?", "yes_no_color_negated"),
    ("  What Color is the Shape?", "color"),
])
def test_question_category_of_templates(question, category):
    assert question_category(question) == category


@pytest.mark.parametrize("question", ["how many shapes are there?", "what is the purple shape?", "is there a", ""])
def test_unrecognised_question_raises(question):
    with pytest.raises(ValueError, match="Expected an easy-VQA template question"):
        question_category(question)


@pytest.mark.parametrize("answers_by_question, expected", [
    ({"what color is the shape?": "red", "what shape is present?": "circle"}, "a red circle"),
    ({"what is the blue shape?": "triangle"}, "a blue triangle"),
    ({"what is the color of the rectangle?": "teal"}, "a teal rectangle"),
    ({"is there a yellow shape?": "yes", "is a triangle present?": "yes"}, "a yellow triangle"),
    # A negated question answered "no" affirms the thing it names.
    ({"is there not a green shape?": "no", "is no circle present?": "no"}, "a green circle"),
    # A negated question answered "yes", or a positive one answered "no", reveals nothing.
    ({"is there not a green shape?": "yes", "is there a circle?": "yes"}, None),
    ({"is there a red shape?": "no", "what shape is present?": "circle"}, None),
    ({"what shape is in the image?": "rectangle"}, None),
    ({}, None),
])
def test_caption_from_hand_made_records(answers_by_question, expected):
    assert caption(make_record(answers_by_question)) == expected


def test_caption_with_contradicting_answers_raises():
    contradiction = {"what color is the shape?": "red", "is a blue shape present?": "yes",
                     "what shape is present?": "circle"}
    with pytest.raises(ValueError, match="agree on one colour"):
        caption(make_record(contradiction))


def test_examples_one_per_question_sharing_the_image():
    first = make_record({"what color is the shape?": "red", "is no circle present?": "no"})
    second = make_record({"what shape is present?": "circle"}, image_id=1)
    examples = examples_from_records([first, second])
    assert [(e.image_id, e.question, e.answer, e.category) for e in examples] == [
        (0, "what color is the shape?", "red", "color"),
        (0, "is no circle present?", "no", "yes_no_shape_negated"),
        (1, "what shape is present?", "circle", "shape"),
    ]
    assert examples[0].image is first.image and examples[1].image is first.image
    assert examples[2].image is second.image


# The real dataset, built once per test session by the easy_vqa_dir fixture (conftest.py).


@pytest.mark.parametrize("split, num_images, num_questions", [("train", 4000, 38575), ("test", 1000, 9673)])
def test_builder_has_one_record_per_image(easy_vqa_dir, split, num_images, num_questions):
    records = load_image_records(easy_vqa_dir, split)
    assert len(records) == num_images
    assert [r.image_id for r in records] == sorted({r.image_id for r in records})
    assert sum(len(r.questions) for r in records) == num_questions
    assert all(len(r.questions) == len(r.answers) for r in records)


@pytest.mark.parametrize("split, image_id", [("train", 1234), ("test", 567)])
def test_builder_record_matches_the_package_files(easy_vqa_dir, split, image_id):
    record = {r.image_id: r for r in load_image_records(easy_vqa_dir, split)}[image_id]
    expected_image = np.asarray(Image.open(os.path.join(PACKAGE_DATA, split, "images", f"{image_id}.png"))
                                .convert("RGB"))
    assert record.image.dtype == np.uint8 and record.image.shape == (64, 64, 3)
    np.testing.assert_array_equal(record.image, expected_image)
    expected_pairs = [(q, a) for q, a, i in package_questions(split) if i == image_id]
    assert list(zip(record.questions, record.answers)) == expected_pairs
    assert all(isinstance(q, str) for q in record.questions)


def test_real_records_are_mostly_captioned(easy_vqa_dir):
    captions = [caption(r) for r in load_image_records(easy_vqa_dir, "test")]
    named = [c for c in captions if c is not None]
    assert len(named) > 0.8 * len(captions)
    assert {c.split()[1] for c in named} == set(COLORS)
    assert {c.split()[2] for c in named} == set(SHAPES)


def test_loading_a_built_dataset_does_not_rebuild(easy_vqa_dir, capsys):
    load_image_records(easy_vqa_dir, "test")
    assert "Building easy-VQA" not in capsys.readouterr().out


def test_unknown_split_raises(easy_vqa_dir):
    with pytest.raises(ValueError, match="Expected split"):
        load_image_records(easy_vqa_dir, "validation")
