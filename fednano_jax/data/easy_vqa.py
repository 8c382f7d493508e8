"""easy-VQA questions: categories from the question templates, captions, examples.

easy-VQA questions come from a fixed set of templates, so each question is parsed against
them: the parse gives its category (used to partition clients) and the colour or shape word
it names (used to caption an image).
"""

import dataclasses
import re
from collections.abc import Iterable

import numpy as np

from fednano_jax.data.easy_vqa_builder import ImageRecord

COLORS = ("red", "green", "blue", "black", "gray", "yellow", "teal", "brown")
SHAPES = ("circle", "rectangle", "triangle")
QUESTION_CATEGORIES = (
    "color",
    "shape",
    "yes_no_color",
    "yes_no_shape",
    "yes_no_color_negated",
    "yes_no_shape_negated",
)

_COLOR = "(?P<color>" + "|".join(COLORS) + ")"
_SHAPE = "(?P<shape>" + "|".join(SHAPES) + ")"
_THING = f"(?:{_COLOR} shape|{_SHAPE})"

# (category, template); None marks a yes/no template, whose category depends on the words named.
_TEMPLATES = tuple(
    (category, re.compile(template + r"\?"))
    for category, template in (
        ("color", "what color is the shape"),
        ("color", f"what color is the {_SHAPE}"),
        ("color", "what is the color of the shape"),
        ("color", f"what is the color of the {_SHAPE}"),
        ("shape", "what shape is in the image"),
        ("shape", "what shape does the image contain"),
        ("shape", "what shape is present"),
        ("shape", f"what is the {_COLOR} shape"),
        (None, f"is a {_THING} present"),
        (None, f"is no {_THING} present"),
        (None, f"is there a {_THING}"),
        (None, f"is there not a {_THING}"),
        (None, f"is there a {_THING} in the image"),
        (None, f"is there not a {_THING} in the image"),
        (None, f"does the image contain a {_THING}"),
        (None, f"does the image not contain a {_THING}"),
    )
)


@dataclasses.dataclass(frozen=True)
class ParsedQuestion:
    category: str
    color: str | None  # the colour word the question names, if any
    shape: str | None  # the shape word the question names, if any


@dataclasses.dataclass(frozen=True)
class VqaExample:
    image_id: int
    image: np.ndarray = dataclasses.field(repr=False, compare=False)
    question: str
    answer: str
    category: str


def _yes_no_category(question: str, color: str | None) -> str:
    kind = "yes_no_color" if color else "yes_no_shape"
    negated = " not " in question or question.startswith("is no ")
    return kind + "_negated" if negated else kind


def parse_question(question: str) -> ParsedQuestion:
    text = question.strip().lower()
    for category, pattern in _TEMPLATES:
        match = pattern.fullmatch(text)
        if match:
            color, shape = match.groupdict().get("color"), match.groupdict().get("shape")
            return ParsedQuestion(category or _yes_no_category(text, color), color, shape)
    raise ValueError(f"Expected an easy-VQA template question, got {question!r}.")


def question_category(question: str) -> str:
    return parse_question(question).category


def revealed_color_and_shape(question: str, answer: str) -> tuple[str | None, str | None]:
    """The colour and shape of the image that one answered question reveals."""
    parsed = parse_question(question)
    answer = answer.strip().lower()
    if parsed.category == "color":
        return (answer if answer in COLORS else None), parsed.shape
    if parsed.category == "shape":
        return parsed.color, (answer if answer in SHAPES else None)
    # A yes/no question names a thing; the thing is present when the answer affirms it.
    affirms = parsed.category.endswith("_negated") == (answer == "no")
    return (parsed.color, parsed.shape) if affirms else (None, None)


def caption(record: ImageRecord) -> str | None:
    """'a {colour} {shape}' from the record's own answers; None if they do not reveal both."""
    colors, shapes = set(), set()
    for question, answer in zip(record.questions, record.answers, strict=True):
        color, shape = revealed_color_and_shape(question, answer)
        colors.update([color] if color else [])
        shapes.update([shape] if shape else [])
    if len(colors) > 1 or len(shapes) > 1:
        raise ValueError(f"Expected the answers of image {record.image_id} to agree on one colour and one "
                         f"shape, got {sorted(colors)} and {sorted(shapes)}.")
    if not colors or not shapes:
        return None
    return f"a {colors.pop()} {shapes.pop()}"


def examples_from_records(records: Iterable[ImageRecord]) -> list[VqaExample]:
    """One example per question; the examples of one image share its array."""
    return [
        VqaExample(record.image_id, record.image, question, answer, question_category(question))
        for record in records
        for question, answer in zip(record.questions, record.answers, strict=True)
    ]
