"""Each dataset's accuracy as its authors compute it, with the breakdowns they report.

- ScienceQA, as LLaVA's `eval_science_qa.py`: the prediction is taken as a letter if it
  is a single letter A-E, else if it starts with "X. ", else if it contains exactly one
  "The answer is X." (LLaVA's regex); anything else is wrong, as is a letter beyond the
  problem's choices. Breakdowns as the ScienceQA paper: subject (NAT, SOC, LAN), context
  (TXT: a hint; IMG: an image; NO: neither; TXT and IMG overlap), grades G1-6 and G7-12.
- IconQA, as its authors: correct when str(prediction) == str(answer). For multiple
  choice the prediction is the choice index named by the letter (read by the same rule,
  within the problem's choices; the answer is an index); for fill_in_blank it is the
  stripped text. Breakdowns per sub-task and per skill (a multi-skill problem counts
  under each of its skills).
- easy-VQA: normalised exact match, no breakdown.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from fednano_jax.data.prompts import OPTION_LETTERS
from fednano_jax.eval.accuracy import exact_match

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # LLaVA's pattern, its unescaped dot included
SUBJECTS = {"NAT": "natural science", "SOC": "social science", "LAN": "language science"}


def option_letter(prediction: str, options=SCIENCEQA_OPTIONS) -> str | None:
    """The letter a prediction names by LLaVA's ScienceQA rule, or None ("FAILED")."""
    text = prediction.strip()
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def scienceqa_correct(prediction: str, meta: dict) -> bool:
    letter = option_letter(prediction)
    options = SCIENCEQA_OPTIONS[: meta["num_choices"]]
    return letter in options and options.index(letter) == meta["answer_index"]


def _grade(meta: dict) -> int:
    digits = re.sub(r"\D", "", str(meta["grade"]))
    return int(digits) if digits else 0


def scienceqa_groups(meta: list[dict]) -> dict[str, np.ndarray]:
    """Boolean masks over the rows, named as the ScienceQA paper's columns."""
    groups = {name: np.array([m["subject"] == subject for m in meta], bool) for name, subject in SUBJECTS.items()}
    groups["TXT"] = np.array([m["has_text"] for m in meta], bool)
    groups["IMG"] = np.array([m["has_image"] for m in meta], bool)
    groups["NO"] = ~groups["TXT"] & ~groups["IMG"]
    grades = np.array([_grade(m) for m in meta])
    groups["G1-6"] = (grades >= 1) & (grades <= 6)
    groups["G7-12"] = (grades >= 7) & (grades <= 12)
    return groups


def iconqa_prediction(prediction: str, meta: dict) -> str:
    """What IconQA compares with str(answer): a choice index for multiple choice, else the stripped text."""
    if meta["subtask"] == "fill_in_blank":
        return prediction.strip()
    letter = option_letter(prediction, tuple(OPTION_LETTERS[: meta["num_choices"]]))
    return str(OPTION_LETTERS.index(letter)) if letter else "FAILED"


def iconqa_correct(prediction: str, meta: dict) -> bool:
    return str(iconqa_prediction(prediction, meta)) == str(meta["answer"])


def iconqa_groups(meta: list[dict]) -> dict[str, np.ndarray]:
    subtasks = sorted({m["subtask"] for m in meta})
    skills = sorted({s for m in meta for s in m["skills"]})
    groups = {subtask: np.array([m["subtask"] == subtask for m in meta], bool) for subtask in subtasks}
    groups.update({f"skill:{skill}": np.array([skill in m["skills"] for m in meta], bool) for skill in skills})
    return groups


@dataclasses.dataclass(frozen=True)
class Scorer:
    correct: Callable[[list[str], list[str], list[dict]], np.ndarray]  # (predictions, answers, meta) -> bool rows
    groups: Callable[[list[dict]], dict[str, np.ndarray]]  # meta -> named boolean masks for the breakdown


def _per_row(rule: Callable[[str, dict], bool]):
    return lambda predictions, answers, meta: np.array([rule(p, m) for p, m in zip(predictions, meta)], bool)


SCORERS = {
    "easyvqa": Scorer(lambda predictions, answers, meta: exact_match(predictions, answers), lambda meta: {}),
    "scienceqa": Scorer(_per_row(scienceqa_correct), scienceqa_groups),
    "iconqa": Scorer(_per_row(iconqa_correct), iconqa_groups),
}


def breakdown(correct: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, float]:
    """Accuracy overall and in each non-empty group ({} when there are no groups)."""
    if not groups:
        return {}
    out = {"overall": float(correct.mean()) if len(correct) else float("nan")}
    out.update({name: float(correct[mask].mean()) for name, mask in groups.items() if mask.any()})
    return out
