"""Official accuracy: LLaVA's ScienceQA answer extraction, IconQA's str(prediction) == str(answer), breakdowns."""

import numpy as np
import pytest

from fednano_jax.eval.official_accuracy import (SCORERS, breakdown, iconqa_correct, iconqa_groups, iconqa_prediction,
                                                option_letter, scienceqa_correct, scienceqa_groups)


@pytest.mark.parametrize("prediction, letter", [
    ("A", "A"),
    (" C\n", "C"),  # generated text is stripped, as LLaVA's outputs are
    ("B. because it is a mammal", "B"),
    ("The answer is D.", "D"),
    ("I think so. The answer is E, clearly", "E"),  # LLaVA's pattern ends in an unescaped dot: any character
    ("The answer is A. The answer is B.", None),  # more than one: failed
    ("F", None),  # not among A-E
    ("a", None),  # case matters
    ("B.", None),  # "X. " needs the space
    ("(A)", None),
    ("The answer is (A).", None),
    ("", None),
    ("Answer: A", None),
])
def test_scienceqa_letter_follows_llava_rules(prediction, letter):
    assert option_letter(prediction) == letter


@pytest.mark.parametrize("prediction, num_choices, answer_index, correct", [
    ("B", 3, 1, True),
    ("B", 3, 0, False),
    ("D", 3, 3, False),  # a letter beyond the problem's choices counts wrong even if it matched the index
    ("E. last option", 5, 4, True),
    ("The answer is C.", 4, 2, True),
    ("c", 4, 2, False),
])
def test_scienceqa_correct_needs_the_right_letter_among_the_choices(prediction, num_choices, answer_index, correct):
    assert scienceqa_correct(prediction, {"num_choices": num_choices, "answer_index": answer_index}) is correct


def _sqa_meta(subject, grade, has_text, has_image):
    return {"subject": subject, "grade": grade, "has_text": has_text, "has_image": has_image, "num_choices": 2,
            "answer_index": 0}


def test_scienceqa_breakdown_groups_are_the_papers_columns():
    meta = [_sqa_meta("natural science", "grade1", True, True), _sqa_meta("social science", "grade6", False, True),
            _sqa_meta("language science", "grade7", True, False), _sqa_meta("natural science", "grade12", False, False)]
    groups = scienceqa_groups(meta)
    assert list(groups) == ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"]
    expected = {"NAT": [1, 0, 0, 1], "SOC": [0, 1, 0, 0], "LAN": [0, 0, 1, 0], "TXT": [1, 0, 1, 0],
                "IMG": [1, 1, 0, 0], "NO": [0, 0, 0, 1], "G1-6": [1, 1, 0, 0], "G7-12": [0, 0, 1, 1]}
    for name, mask in expected.items():
        np.testing.assert_array_equal(groups[name], np.array(mask, bool), err_msg=name)
    correct = SCORERS["scienceqa"].correct(["A", "B", "The answer is A.", "A. yes"], [""] * 4, meta)
    np.testing.assert_array_equal(correct, [True, False, True, True])
    scores = breakdown(correct, groups)
    assert scores["overall"] == 0.75 and scores["SOC"] == 0.0 and scores["G7-12"] == 1.0 and scores["IMG"] == 0.5


def _iconqa_meta(subtask, answer, skills, num_choices=3):
    return {"subtask": subtask, "answer": answer, "skills": skills, "num_choices": num_choices}


@pytest.mark.parametrize("prediction, meta, expected, correct", [
    ("B", _iconqa_meta("choose_txt", "1", ["counting"]), "1", True),
    ("B. two", _iconqa_meta("choose_img", "1", ["counting"]), "1", True),
    ("C", _iconqa_meta("choose_img", "1", ["counting"]), "2", False),
    ("D", _iconqa_meta("choose_txt", "3", ["counting"], num_choices=3), "FAILED", False),  # beyond the choices
    (" 7 ", _iconqa_meta("fill_in_blank", "7", ["counting"]), "7", True),
    ("7.0", _iconqa_meta("fill_in_blank", "7", ["counting"]), "7.0", False),  # string equality, no number parsing
    ("seven", _iconqa_meta("fill_in_blank", "7", ["counting"]), "seven", False),
])
def test_iconqa_compares_strings(prediction, meta, expected, correct):
    assert iconqa_prediction(prediction, meta) == expected
    assert iconqa_correct(prediction, meta) is correct


def test_iconqa_breakdown_counts_a_multi_skill_problem_under_each_skill():
    meta = [_iconqa_meta("choose_txt", "0", ["spatial", "counting"]), _iconqa_meta("fill_in_blank", "4", ["counting"]),
            _iconqa_meta("choose_img", "1", ["pattern"])]
    groups = iconqa_groups(meta)
    assert set(groups) == {"choose_img", "choose_txt", "fill_in_blank", "skill:counting", "skill:pattern",
                           "skill:spatial"}
    correct = SCORERS["iconqa"].correct(["A", "5", "B"], [""] * 3, meta)
    np.testing.assert_array_equal(correct, [True, False, True])
    scores = breakdown(correct, groups)
    assert scores["skill:counting"] == 0.5 and scores["skill:spatial"] == 1.0 and scores["fill_in_blank"] == 0.0
    assert scores["overall"] == pytest.approx(2 / 3)


def test_easyvqa_has_exact_match_and_no_breakdown():
    scorer = SCORERS["easyvqa"]
    np.testing.assert_array_equal(scorer.correct(["Red.", "blue"], ["red", "green"], []), [True, False])
    assert breakdown(np.array([True]), scorer.groups([])) == {}
