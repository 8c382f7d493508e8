"""ScienceQA problems -> prompts, targets, partition topic and scorer metadata; the dataset's `Splits`.

Prompt (LLaVA-1.5, CQM-A): "Context: {hint or N/A}\\nQuestion: ...\\nOptions: (A) ... (B) ...\\n
Answer with the option's letter from the given choices directly."; target: the letter.
About half the problems have no image: they are text-only prompts (no `<image>`), as LLaVA
treats them. Clients are partitioned over the problem's topic.
"""

from __future__ import annotations

import os

from fednano_jax.data.pipeline import Splits
from fednano_jax.data.problems import (OFFICIAL_SPLITS, Problem, build_dir, decoder, prepared, records,
                                       splits_from_config, text)
from fednano_jax.data.prompts import OPTION_LETTERS, multiple_choice_question
from fednano_jax.data.scienceqa_builder import ScienceQa, check_release


def problem_from_record(record: dict) -> Problem:
    choices = [text(c) for c in record["choices"]]
    answer = int(record["answer"])
    hint = text(record["hint"]).strip()
    png = record["image"]
    meta = {"answer_index": answer, "num_choices": len(choices), "subject": text(record["subject"]),
            "grade": text(record["grade"]), "has_text": bool(hint), "has_image": bool(png)}
    return Problem(pid=text(record["pid"]), question=multiple_choice_question(text(record["question"]), choices,
                                                                                context=hint or "N/A"),
                   answer=OPTION_LETTERS[answer], category=text(record["topic"]), caption=choices[answer],
                   meta=meta, image=decoder(png))


def load_splits(config, with_images: bool = True) -> Splits:
    """ScienceQA from config.data.root (config.data.format: "official" or "parquet"), built once into data.dir."""
    root = os.path.expanduser(config.data.root)
    data_format = config.data.data_format
    check_release(root, data_format)
    key_file = os.path.join(root, "problems.json") if data_format == "official" else root
    builder = prepared(ScienceQa, build_dir(config.data.dir, f"scienceqa_{data_format}", root, key_file), root,
                       data_format, "ScienceQA")
    by_split = {split: [problem_from_record(r) for r in records(builder, split)] for split in OFFICIAL_SPLITS}
    return splits_from_config(by_split, config, with_images)
