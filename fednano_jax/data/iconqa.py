"""IconQA problems -> prompts, targets, partition skill and scorer metadata; the dataset's `Splits`.

- choose_txt: "Question: ...\\nOptions: (A) ... (B) ...\\nAnswer with the option's letter from the
  given choices directly." -> the letter.
- choose_img: the same with options "(A) image A (B) image B ..."; a single-image model sees
  one composed image: the question image on top and, below it, the choice images side by
  side, each under its label "(A)", "(B)", ... (`compose_choices`).
- fill_in_blank: "Question: ...\\nAnswer the question using a single word or phrase." -> the answer.

Clients are partitioned over skills; a problem with several skills goes by its first
(pid2skills.json order), while the per-skill accuracy counts it under each of its skills.
"""

from __future__ import annotations

import os

from PIL import Image, ImageDraw, ImageFont

from fednano_jax.data.iconqa_builder import IconQa, check_release
from fednano_jax.data.pipeline import Splits
from fednano_jax.data.problems import (OFFICIAL_SPLITS, Problem, build_dir, decoder, prepared, records,
                                       splits_from_config, text)
from fednano_jax.data.prompts import OPTION_LETTERS, multiple_choice_question, short_answer_question

GAP = 8  # pixels between the composed pieces
LABEL_HEIGHT = 24  # the strip above each choice image holding its "(A)" label


def compose_choices(question: Image.Image, choices: list[Image.Image]) -> Image.Image:
    """One white canvas: the question image centred on top, the labelled choice images in a row below."""
    tile_width = max(c.width for c in choices)
    tile_height = max(c.height for c in choices)
    width = max(question.width, GAP + len(choices) * (tile_width + GAP))
    canvas = Image.new("RGB", (width, question.height + 2 * GAP + LABEL_HEIGHT + tile_height), "white")
    canvas.paste(question.convert("RGB"), ((width - question.width) // 2, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=LABEL_HEIGHT - 6)
    for k, choice in enumerate(choices):
        left, top = GAP + k * (tile_width + GAP), question.height + GAP
        draw.text((left, top), f"({OPTION_LETTERS[k]})", fill="black", font=font)
        canvas.paste(choice.convert("RGB"), (left, top + LABEL_HEIGHT))
    return canvas


def _composed(png: bytes, choice_pngs: list[bytes]):
    question, choices = decoder(png), [decoder(c) for c in choice_pngs]
    return lambda: compose_choices(question(), [c() for c in choices])


def _question_and_target(record: dict, subtask: str) -> tuple[str, str, str]:
    """(prompt body, target, caption-like text; '' for none)."""
    question, answer = text(record["question"]), text(record["answer"])
    if subtask == "fill_in_blank":
        return short_answer_question(question), answer, answer
    index = int(answer)
    if subtask == "choose_txt":
        choices = [text(c) for c in record["choices"]]
        return multiple_choice_question(question, choices), OPTION_LETTERS[index], choices[index]
    labels = [f"image {OPTION_LETTERS[k]}" for k in range(len(record["choices"]))]
    return multiple_choice_question(question, labels), OPTION_LETTERS[index], ""


def problem_from_record(record: dict) -> Problem:
    subtask = text(record["subtask"])
    skills = [text(s) for s in record["skills"]]
    question, target, caption = _question_and_target(record, subtask)
    choice_pngs = list(record["choice_images"])
    image = _composed(record["image"], choice_pngs) if choice_pngs else decoder(record["image"])
    meta = {"answer": text(record["answer"]), "subtask": subtask, "skills": skills,
            "num_choices": len(record["choices"])}
    return Problem(pid=text(record["pid"]), question=question, answer=target, category=skills[0], caption=caption,
                   meta=meta, image=image)


def load_splits(config, with_images: bool = True) -> Splits:
    """IconQA from config.data.root (the authors' release), built once into config.data.dir."""
    root = os.path.expanduser(config.data.root)
    check_release(root)
    builder = prepared(IconQa, build_dir(config.data.dir, "iconqa", root, os.path.join(root, "problems.json")),
                       root, "official", "IconQA")
    by_split = {split: [problem_from_record(r) for r in records(builder, split)] for split in OFFICIAL_SPLITS}
    return splits_from_config(by_split, config, with_images)
