"""IconQA: the official layout, the three sub-tasks' prompts, composed choice images, skills, errors, and the tiny
config end to end."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from fednano_jax.data import datasets
from fednano_jax.data.iconqa import GAP, LABEL_HEIGHT, compose_choices
from fednano_jax.data.tokenizer import IMAGE
from official_fixtures import ICONQA_SKILLS, MULTI_SKILL_PID, SPLIT_SIZES, write_iconqa
from test_scienceqa import broken_release_sentence, run_module, run_tiny, tiny_config

INSTRUCTION = "Answer with the option's letter from the given choices directly."


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("iconqa"))
    return root, write_iconqa(root)


def iconqa_config(root, data_dir, **data):
    return tiny_config(root, data_dir, name="iconqa_tiny", **data)


def problems_json(root) -> dict:
    with open(os.path.join(root, "problems.json")) as file:
        return json.load(file)


def test_every_subtask_gets_its_prompt_and_target(release, tmp_path):
    root, listing = release
    problems = problems_json(root)
    splits = datasets.load_splits(iconqa_config(root, tmp_path))
    test = splits.federated_test
    assert len(test) == SPLIT_SIZES["test"] and len(splits.federated_val) == SPLIT_SIZES["val"]
    assert {m["subtask"] for m in test.meta} == {"choose_img", "choose_txt", "fill_in_blank"}
    for prompt, answer, meta in zip(test.prompts, test.answers, test.meta):
        problem = problems[meta["pid"]]
        question = f"Question: {problem['question']}"
        if meta["subtask"] == "fill_in_blank":
            body = f"{question}\nAnswer the question using a single word or phrase."
            assert answer == problem["answer"] == meta["answer"]
        elif meta["subtask"] == "choose_txt":
            options = " ".join(f"({'ABC'[k]}) {c}" for k, c in enumerate(problem["choices"]))
            body = f"{question}\nOptions: {options}\n{INSTRUCTION}"
            assert answer == "ABC"[problem["answer"]] and meta["answer"] == str(problem["answer"])
        else:
            options = " ".join(f"({'ABC'[k]}) image {'ABC'[k]}" for k in range(len(problem["choices"])))
            body = f"{question}\nOptions: {options}\n{INSTRUCTION}"
            assert answer == "ABC"[problem["answer"]]
        assert prompt == f"USER: {IMAGE}\n{body} ASSISTANT:"
    assert np.all(test.image_index > 0)  # every IconQA problem has an image


def test_a_multi_skill_problem_goes_to_its_first_skill_and_keeps_all(release, tmp_path):
    root, _ = release
    splits = datasets.load_splits(iconqa_config(root, tmp_path, pretrain_examples=0))
    train = splits.federated_train
    row = [m["pid"] for m in train.meta].index(MULTI_SKILL_PID)
    assert train.categories[row] == "spatial" and train.meta[row]["skills"] == ["spatial", "counting"]
    assert splits.category_order == tuple(sorted(ICONQA_SKILLS))


def test_choice_images_are_composed_below_the_question_with_labels():
    question = Image.new("RGB", (30, 20), (0, 200, 0))
    choices = [Image.new("RGB", (12, 12), (0, 0, 60 * (k + 1))) for k in range(3)]
    composed = np.asarray(compose_choices(question, choices))
    width = GAP + 3 * (12 + GAP)
    assert composed.shape == (20 + 2 * GAP + LABEL_HEIGHT + 12, width, 3)
    left = (width - 30) // 2
    np.testing.assert_array_equal(composed[10, left + 15], [0, 200, 0])  # the question image, centred on top
    for k in range(3):
        x, y = GAP + k * (12 + GAP), 20 + GAP
        np.testing.assert_array_equal(composed[y + LABEL_HEIGHT + 6, x + 6], [0, 0, 60 * (k + 1)])
        label = composed[y: y + LABEL_HEIGHT, x: x + 12 + GAP]
        assert (label.sum(axis=-1) < 200).any()  # the "(A)" label is drawn in black above it
    assert (composed[20: 20 + GAP] == 255).all()  # white between the pieces


def test_a_choose_img_problem_shows_its_choices(release, tmp_path):
    root, _ = release
    splits = datasets.load_splits(iconqa_config(root, tmp_path, pretrain_examples=0))
    train = splits.federated_train
    rows = {m["subtask"]: train.image_index[i] for i, m in enumerate(train.meta)}
    composed, plain = splits.images[rows["choose_img"]], splits.images[rows["choose_txt"]]
    blue = lambda image: ((image[..., 2] > 40) & (image[..., 0] < 30) & (image[..., 1] < 30)).sum()  # noqa: E731
    assert blue(composed) > 20 and blue(plain) == 0


@pytest.mark.parametrize("breakage, message", [
    (lambda root: os.remove(os.path.join(root, "pid2skills.json")), "pid2skills.json is missing"),
    (lambda root: os.remove(os.path.join(root, "iconqa", "train", "choose_img", "1", "choice_1.png")),
     "choice_1.png is missing"),
    (lambda root: open(os.path.join(root, "pid_splits.json"), "w").write('{"choose_txt_train": []}'),
     "pid_splits.json has no val key (such as choose_txt_val)"),
    (lambda root: open(os.path.join(root, "pid2skills.json"), "w").write('{}'),
     "pid2skills.json lacks pid 1 that pid_splits.json lists under choose_img_train"),
])
def test_a_broken_release_stops_with_one_sentence_naming_the_layout(tmp_path, breakage, message):
    text = broken_release_sentence(write_iconqa, breakage, iconqa_config(str(tmp_path / "release"), tmp_path / "t"))
    assert message in text and "https://github.com/lupantech/IconQA" in text and "pid2skills.json" in text


@pytest.mark.parametrize("name", ["iconqa_llava15_7b", "iconqa_minigpt4_7b"])
def test_paper_config_prints_its_partition_statistics(release, tmp_path, name):
    root, _ = release
    result = run_module("fednano_jax.data.partition_stats", name, f"--config.data.root={root}",
                        f"--config.data.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "iconqa: 5 clients, Dirichlet alpha 1.0, 4 categories" in result.stdout
    per_skill = result.stdout.split("Training examples per category and client:\n")[1].splitlines()
    totals = {line.split("|")[1].strip(): int(line.split("|")[-2]) for line in per_skill[2:]}
    assert set(totals) == set(ICONQA_SKILLS) and sum(totals.values()) == SPLIT_SIZES["train"]


def test_tiny_config_runs_end_to_end_with_the_iconqa_breakdown(release, tmp_path):
    result, results = run_tiny("iconqa_tiny", release[0], tmp_path, "--config.fed.num_clients=2",
                               "--config.fed.methods=fedavg")
    assert list(results) == ["Untuned", "FedAvg"]
    for row in results.values():
        assert len(row["accuracy"]) == 2
        assert {"overall", "choose_img", "choose_txt", "fill_in_blank"} <= set(row["breakdown"])
        assert any(key.startswith("skill:") for key in row["breakdown"])
    assert "| Method | overall | choose_img | choose_txt | fill_in_blank | skill:" in result.stdout
