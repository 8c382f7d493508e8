"""The command line as a user runs it: a complete small experiment, and clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fednano_jax.federated.server import reporting_clients

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*flags, timeout=900):
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "fednano_jax.main", "--config=configs/easyvqa_tiny.py", *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_small_experiment_end_to_end_and_cached_backbone(easy_vqa_dir, tmp_path):
    flags = [f"--config.data.dir={easy_vqa_dir}", f"--config.pretrain.cache_dir={tmp_path / 'cache'}",
             "--config.pretrain.steps=12", "--config.pretrain.batch_size=16", "--config.data.pretrain_images=100",
             "--config.data.train_examples=120", "--config.data.test_examples=40", "--config.fed.num_clients=3",
             "--config.fed.rounds=2", "--config.eval.every_rounds=0", "--config.eval.batch_size=40"]
    first = run_main(*flags, f"--workdir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Pretraining the backbone" in first.stdout
    table = (tmp_path / "a" / "results.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["Untuned", "FedAvg", "FedNano"]
    assert table[0].split("|")[2:6] == [" C1 ", " C2 ", " C3 ", " Avg "]
    results = json.loads((tmp_path / "a" / "results.json").read_text())["results"]
    for row in results.values():
        assert len(row["accuracy"]) == 3 and 0.0 <= row["average"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in records] == [("untuned", 0), ("fedavg", 1), ("fedavg", 2),
                                                            ("fednano", 1), ("fednano", 2)]
    assert "accuracy" in records[2] and "accuracy" not in records[1]  # evaluated after the last round only

    second = run_main(*flags, "--config.fed.methods=fedavg", "--config.fed.rounds=1", "--config.fed.dropout=0.5",
                      f"--workdir={tmp_path / 'b'}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Using the pretrained backbone cached" in second.stdout
    round_one = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()][1]
    assert round_one["dropped"] == np.flatnonzero(~reporting_clients(np.arange(3), 0.5, 0, 0)).tolist()
    untuned_a = results["Untuned"]
    untuned_b = json.loads((tmp_path / "b" / "results.json").read_text())["results"]["Untuned"]
    assert untuned_a == untuned_b  # the cached backbone is the same model


@pytest.mark.parametrize("flag, message", [
    ("--config.fed.roundz=3", "Unknown config key 'fed.roundz'; did you mean 'fed.rounds'?"),
    ("--config.fed.methods=fedfoo", "Unknown method 'fedfoo' in fed.methods"),
    ("--config.model.adapter.rank=0", "model.adapter.rank must be a positive integer, got 0."),
    ("--config.model.adapter.alpha=-1.0", "model.adapter.alpha must be positive"),
    ("--config.data.dirichlet_alpha=0.0", "data.dirichlet_alpha must be positive"),
    ("--config.fed.batch_size=0", "fed.batch_size must be at least 1"),
    ("--config.fed.clients_per_round=6", "fed.clients_per_round must be between 0 (all) and fed.num_clients=5"),
    ("--config.fed.dropout=1.0", "fed.dropout must be a probability in [0, 1)"),
])
def test_bad_config_stops_with_one_sentence(flag, message):
    result = run_main(flag, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("Config error: ") and message in last_line


@pytest.mark.parametrize("flag, message", [
    ("--config.data.dir=/etc/hostname", "Data error: data.dir '/etc/hostname' is a file; expected a directory"),
    ("--config.data.dir=/etc/hostname/easy_vqa", "Data error: data.dir '/etc/hostname/easy_vqa' cannot be created"),
    ("--workdir=/etc/hostname/run", "Config error: --workdir '/etc/hostname/run' cannot be created"),
])
def test_unusable_paths_stop_with_one_sentence(flag, message):
    result = run_main(flag, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)


def test_more_clients_than_examples_is_refused(easy_vqa_dir):
    from fednano_jax.data import pipeline

    splits = pipeline.load_splits(easy_vqa_dir, 50, 30, 10, seed=0)
    tokenizer = pipeline.tokenizer_for(splits)
    with pytest.raises(ValueError, match=r"fed.num_clients \(31\) exceeds the 30 federated training examples"):
        pipeline.federated_data(splits, tokenizer, 16, num_clients=31, alpha=1.0, seed=0)


def test_command_modules_import_together_without_defining_flags():
    """Each command defines its flags only when run, so importing several (a test, a notebook) never clashes."""
    modules = ["main", "study", "benchmark", "memory_plan", "accounting", "data.partition_stats", "commands.study",
               "commands.benchmark", "commands.memory_plan", "commands.accounting", "commands.partition_stats"]
    code = ("from absl import flags\n" + "".join(f"import fednano_jax.{m}\n" for m in modules) +
            "defined = [name for name in ('config', 'workdir', 'out', 'clients') if name in flags.FLAGS]\n"
            "assert not defined, defined\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
