"""ScienceQA: the official layout and the parquet mirror, prompts, images, pretraining set, errors, partition,
and the tiny config end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fednano_jax.data import datasets
from fednano_jax.errors import DataError
from fednano_jax.data.images import mean_colour
from fednano_jax.data.partition import Partition, dirichlet_proportions
from fednano_jax.data.pipeline import client_partition, tokenizer_for
from fednano_jax.data.tokenizer import IMAGE
from fednano_jax.config import load_config_file, read
from fednano_jax.federated.methods import PAPER_METHODS
from conftest import SMALL_MODEL
from official_fixtures import SCIENCEQA_TOPICS, SPLIT_SIZES, write_scienceqa, write_scienceqa_parquet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scienceqa"))
    return root, write_scienceqa(root)


def tiny_config(root, data_dir, name="scienceqa_tiny", **data):
    config = load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
    config.data.root, config.data.dir = root, str(data_dir)
    config.data.pretrain_examples, config.data.train_examples, config.data.test_examples = 10, 0, 0
    config.data.update(data)
    return read(config, run=False)


def test_official_layout_gives_every_problem_with_its_llava_prompt(release, tmp_path):
    root, problems = release
    splits = datasets.load_splits(tiny_config(root, tmp_path))
    assert len(splits.federated_train) == SPLIT_SIZES["train"] - 10
    assert (len(splits.federated_val), len(splits.federated_test)) == (SPLIT_SIZES["val"], SPLIT_SIZES["test"])
    assert splits.category_order == tuple(sorted(SCIENCEQA_TOPICS)) and splits.lowercase is False
    test = splits.federated_test
    for prompt, answer, meta, topic in zip(test.prompts, test.answers, test.meta, test.categories):
        problem = problems["test"][meta["pid"]]
        options = " ".join(f"({'ABCDE'[i]}) {c}" for i, c in enumerate(problem["choices"]))
        body = (f"Context: {problem['hint'] or 'N/A'}\nQuestion: {problem['question']}\nOptions: {options}\n"
                "Answer with the option's letter from the given choices directly.")
        image = f"{IMAGE}\n" if problem["image"] else ""
        assert prompt == f"USER: {image}{body} ASSISTANT:"
        assert answer == "ABCDE"[problem["answer"]] and topic == problem["topic"]
        assert meta == {"pid": meta["pid"], "answer_index": problem["answer"], "num_choices": len(problem["choices"]),
                        "subject": problem["subject"], "grade": problem["grade"], "has_text": bool(problem["hint"]),
                        "has_image": bool(problem["image"])}


def test_text_only_problems_point_at_the_blank_row_and_images_are_padded_to_square(release, tmp_path):
    root, problems = release
    splits = datasets.load_splits(tiny_config(root, tmp_path))
    test = splits.federated_test
    has_image = np.array([m["has_image"] for m in test.meta])
    assert has_image.any() and (~has_image).any()  # the fixture mixes both
    assert np.all(test.image_index[~has_image] == 0) and np.all(test.image_index[has_image] > 0)
    assert len(set(test.image_index[has_image].tolist())) == has_image.sum()
    assert np.all(splits.federated_val.image_index == 0)  # validation is not evaluated: no image decoded for it
    used = {*splits.pretrain.image_index.tolist(), *splits.federated_train.image_index.tolist(), *test.image_index}
    assert len(splits.images) == len(used | {0})  # exactly the images a run uses, and the blank row
    for row, meta in zip(test.image_index[has_image], np.array(test.meta)[has_image]):
        image = splits.images[row]
        assert image.shape == (64, 64, 3)
        red = int(meta["pid"]) * 7 % 256
        np.testing.assert_allclose(image[32, 32], [red, 0, 0], atol=3)  # the 24x16 picture, centred
        np.testing.assert_allclose(image[2, 32], mean_colour(), atol=3)  # LLaVA's padding above it


def test_pretraining_set_is_text_only_problems_and_captions_of_the_held_aside_ones(release, tmp_path):
    root, problems = release
    splits = datasets.load_splits(tiny_config(root, tmp_path))
    pretrain = splits.pretrain
    text_only = [i for i, p in enumerate(pretrain.prompts) if IMAGE not in p]
    captions = [i for i, p in enumerate(pretrain.prompts) if IMAGE in p]
    assert len(text_only) == 10  # one per held-aside problem
    assert all(pretrain.answers[i] in "ABCDE" for i in text_only)
    assert all(pretrain.image_index[i] > 0 for i in captions) and 0 < len(captions) <= 10
    held_questions = {p.split("Question: ")[1].split("\n")[0] for p in (pretrain.prompts[i] for i in text_only)}
    federated_questions = {p.split("Question: ")[1].split("\n")[0] for p in splits.federated_train.prompts}
    assert held_questions.isdisjoint(federated_questions)
    tokenizer = tokenizer_for(splits)
    ids = tokenizer("B", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "B"  # case kept: the official rule needs the capital letter


def test_parquet_mirror_gives_the_same_problems(release, tmp_path):
    root, _ = release
    official = datasets.load_splits(tiny_config(root, tmp_path / "a"))
    mirror_root = str(tmp_path / "mirror")
    write_scienceqa_parquet(mirror_root)
    mirror = datasets.load_splits(tiny_config(mirror_root, tmp_path / "b", format="parquet"))
    for name in ("pretrain", "federated_train", "federated_val", "federated_test"):
        a, b = getattr(official, name), getattr(mirror, name)
        assert a.prompts == b.prompts and a.answers == b.answers and a.categories == b.categories, name
    np.testing.assert_array_equal(official.images, mirror.images)


def test_sample_sizes_are_capped(release, tmp_path):
    root, _ = release
    splits = datasets.load_splits(tiny_config(root, tmp_path, train_examples=12, test_examples=5))
    assert (len(splits.federated_train), len(splits.federated_val), len(splits.federated_test)) == (12, 5, 5)
    capped = datasets.load_splits(tiny_config(root, tmp_path, pretrain_examples=1000))
    assert len(capped.federated_train) == SPLIT_SIZES["train"] // 2  # at most half the train split held aside


@pytest.mark.parametrize("breakage, message", [
    (lambda root: os.remove(os.path.join(root, "problems.json")), "problems.json is missing"),
    (lambda root: open(os.path.join(root, "pid_splits.json"), "w").write("{not json"), "pid_splits.json is not valid"),
    (lambda root: open(os.path.join(root, "pid_splits.json"), "w").write('{"train": [], "test": []}'),
     "pid_splits.json lacks val"),
    (lambda root: os.remove(os.path.join(root, "images", "test", "50", "image.png")), "image.png is missing"),
])
def test_a_broken_release_stops_with_one_sentence_naming_the_layout(tmp_path, breakage, message):
    text = broken_release_sentence(write_scienceqa, breakage, tiny_config(str(tmp_path / "release"), tmp_path / "t"))
    assert message in text and "https://github.com/lupantech/ScienceQA" in text and "images/<split>/<pid>" in text


def broken_release_sentence(write_release, breakage, config) -> str:
    """The DataError that loading a release written at config.data.root, then broken, raises: one sentence."""
    write_release(config.data.root)
    breakage(config.data.root)
    with pytest.raises(DataError) as error:
        datasets.load_splits(config)
    text = str(error.value)
    assert "\n" not in text and text.endswith(".")
    return text


def test_missing_parquet_split_names_the_mirror(tmp_path):
    write_scienceqa_parquet(str(tmp_path / "mirror"))
    os.remove(tmp_path / "mirror" / "data" / "validation-00000-of-00001.parquet")
    with pytest.raises(DataError, match="no validation-\\*.parquet file; .*derek-thomas/ScienceQA"):
        datasets.load_splits(tiny_config(str(tmp_path / "mirror"), tmp_path / "tfds", format="parquet"))


def test_one_dirichlet_draw_partitions_train_val_and_test_by_topic(release, tmp_path):
    root, _ = release
    config = tiny_config(root, tmp_path)
    splits = datasets.load_splits(config, with_images=False)
    assert splits.images.shape[0] == 1  # nothing decoded
    clients = client_partition(splits, 3, Partition(alpha=1.0), seed=7)
    proportions = dirichlet_proportions(len(splits.category_order), 3, 1.0, 7)
    for split, pool in (("train", splits.federated_train), ("val", splits.federated_val),
                        ("test", splits.federated_test)):
        rows = np.concatenate(clients[split])
        assert sorted(rows.tolist()) == list(range(len(pool)))  # every example, exactly once
        topics = np.array(pool.categories)
        for c, topic in enumerate(splits.category_order):
            total = (topics == topic).sum()
            for k in range(3):
                count = (topics[clients[split][k]] == topic).sum()
                assert abs(count - proportions[c, k] * total) <= 1, (split, topic, k)


def run_module(module, config, *flags, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", module, f"--config=configs/{config}.py", *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", ["scienceqa_llava15_7b", "scienceqa_minigpt4_7b"])
def test_paper_config_prints_its_partition_statistics(release, tmp_path, name):
    root, _ = release
    result = run_module("fednano_jax.data.partition_stats", name, f"--config.data.root={root}",
                        f"--config.data.dir={tmp_path}", f"--png={tmp_path / 'clients.png'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "clients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the per-client histogram
    out = result.stdout
    assert "scienceqa: 5 clients, Dirichlet alpha 1.0, 4 categories" in out
    first_table = out.split("Examples per client and split:\n")[1].split("\n\n")[0].splitlines()
    assert first_table[0] == "| Client | train | val | test |"
    sizes = [line.split("|")[1:-1] for line in first_table[2:]]
    assert [s.strip() for s in sizes[-1]] == ["all", str(SPLIT_SIZES["train"]), str(SPLIT_SIZES["val"]),
                                               str(SPLIT_SIZES["test"])]
    assert sum(int(s[1]) for s in sizes[:5]) == SPLIT_SIZES["train"]
    for topic in SCIENCEQA_TOPICS:
        assert f"| {topic} |" in out


@pytest.mark.parametrize("name, dataset", [("scienceqa_llava15_7b", "scienceqa"), ("iconqa_llava15_7b", "iconqa"),
                                           ("scienceqa_minigpt4_7b", "scienceqa"), ("iconqa_minigpt4_7b", "iconqa")])
def test_paper_configs_are_the_papers_setup(name, dataset):
    config = load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
    config.data.root = "/data"
    config = read(config)
    fed = config.fed
    assert (fed.num_clients, fed.rounds, fed.local_epochs, fed.batch_size) == (5, 10, 1, 8)
    assert config.model.adapter.rank == 64 and config.data.dirichlet_alpha == 1.0
    assert fed.methods == PAPER_METHODS
    if "minigpt4" in name:  # Vicuna-7B with MiniGPT-4's files: EVA ViT-g at 224 px, 32 queries, its template
        assert config.model.path == "~/models/vicuna-7b" and config.model.vision.image_size == 224
        assert config.model.qformer.num_query_tokens == 32 and config.model.prompt == "minigpt4"
        assert config.model.minigpt4.projection.endswith("prerained_minigpt4_7b.pth")
    else:
        assert config.model.path == "~/models/llava-1.5-7b-hf" and config.model.vision.image_size == 336
    assert config.data.name == dataset and config.data.train_examples == config.data.test_examples == 0


@pytest.mark.parametrize("flag, message", [
    ("--config.data.name=vqav2", "Config error: data.name must be one of ['easyvqa', 'iconqa', 'scienceqa']"),
    ("--config.data.format=csv", "Config error: data.format must be one of ['official', 'parquet'] for scienceqa"),
    ("--config.data.root=", "Config error: data.root must name the directory holding scienceqa"),
])
def test_bad_dataset_settings_stop_with_one_sentence(flag, message):
    result = run_module("fednano_jax.main", "scienceqa_tiny", "--config.data.root=/nonexistent", flag, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)


SMOKE_FLAGS = (*SMALL_MODEL, "--config.data.pretrain_examples=10", "--config.data.train_examples=24",
               "--config.data.test_examples=12", "--config.pretrain.steps=5", "--config.pretrain.batch_size=8",
               "--config.fed.rounds=1", "--config.eval.batch_size=12", "--config.checkpoint.every_rounds=0")


def run_tiny(config: str, root: str, tmp_path, *flags):
    """A tiny config on a fixture release, smoke-sized -> (the finished process, results.json's results)."""
    result = run_module("fednano_jax.main", config, f"--config.data.root={root}",
                        f"--config.data.dir={tmp_path / 'tfds'}", f"--config.pretrain.cache_dir={tmp_path / 'cache'}",
                        *SMOKE_FLAGS, *flags, f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads((tmp_path / "run" / "results.json").read_text())["results"]


def test_tiny_config_runs_end_to_end_with_the_scienceqa_breakdown(release, tmp_path):
    result, results = run_tiny("scienceqa_tiny", release[0], tmp_path, "--config.fed.num_clients=3",
                               "--config.fed.methods=fednano")
    assert "| Method | overall | NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 |" in result.stdout
    assert list(results) == ["Untuned", "FedNano"]
    for row in results.values():
        assert len(row["accuracy"]) == 3
        assert set(row["breakdown"]) <= {"overall", "NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"}
        assert {"overall", "NAT", "SOC", "LAN", "IMG"} <= set(row["breakdown"])
        assert all(0.0 <= v <= 1.0 for v in row["breakdown"].values())
