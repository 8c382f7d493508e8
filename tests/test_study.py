"""The study runner: grids, resumption, tables and plots."""

import os
import subprocess
import sys

from conftest import ROOT, SMALL_MODEL


def tiny_study_flags(easy_vqa_dir, tmp_path):
    return [*SMALL_MODEL, f"--config.data.dir={easy_vqa_dir}", f"--config.pretrain.cache_dir={tmp_path / 'cache'}",
            "--config.pretrain.steps=12", "--config.pretrain.batch_size=16", "--config.data.pretrain_images=100",
            "--config.data.train_examples=90", "--config.data.test_examples=30", "--config.fed.num_clients=3",
            "--config.fed.rounds=1", "--config.eval.batch_size=30", f"--workdir={tmp_path / 'study'}"]


def run_study(*flags):
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "fednano_jax.study", "--config=configs/easyvqa_tiny.py", *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def test_main_study_runs_every_method_and_resumes(easy_vqa_dir, tmp_path):
    """One seed (a second is the same code path at twice the suite's time; mean ± std has its own test)."""
    flags = tiny_study_flags(easy_vqa_dir, tmp_path)
    first = run_study("--study=main", "--seeds=1", *flags)
    assert first.returncode == 0, first.stderr[-3000:]
    table = (tmp_path / "study" / "main.md").read_text().splitlines()
    methods = [line.split("|")[1].strip() for line in table[2:]]
    assert methods == ["Untuned", "Centralized", "LocFT", "FedAvg", "FedProx", "FedDPA-F", "FedNano", "FedNano-EF"]
    csv_rows = (tmp_path / "study" / "main.csv").read_text().splitlines()
    assert csv_rows[0].startswith("Method,C1,C2,C3,Avg") and len(csv_rows) == 9
    locft = next(line for line in table if line.startswith("| LocFT "))
    assert locft.split("|")[-2].strip() == "0.0 KiB"  # LocFT uploads nothing
    assert (tmp_path / "study" / "accuracy_per_round.png").stat().st_size > 1000

    again = run_study("--study=main", "--seeds=1", *flags)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done, reusing") == 1 and "=== main: seed 0, all_methods ===" not in again.stdout
    assert (tmp_path / "study" / "main.md").read_text().splitlines() == table


def test_cells_over_seeds_show_mean_and_std():
    from fednano_jax.commands.study import mean_std

    assert mean_std([0.5, 0.7]) == "60.00 ± 10.00"  # population std over the seeds, in points
    assert mean_std([0.625]) == "62.50"  # one seed: no spread to show


def test_sweep_grids():
    from ml_collections import ConfigDict

    from fednano_jax.commands.study import cells, frequency_grid, with_overrides

    config = ConfigDict({"seed": 0, "fed": {"rounds": 6, "local_epochs": 1, "methods": ("fedavg",)},
                         "model": {"adapter": {"rank": 16, "image": True, "text": True}}})
    assert frequency_grid(config) == [(6, 1), (3, 2), (2, 3), (1, 6)]
    assert list(cells("rank", config)) == ["rank8", "rank16", "rank32", "rank64", "rank128"]
    adapters = cells("adapters", config)
    assert [(o["model.adapter.image"], o["model.adapter.text"]) for o in adapters.values()] == [
        (False, True), (True, False), (True, True)]
    cell = with_overrides(config, cells("frequency", config)["rounds2_epochs3"], seed=4)
    assert (cell.seed, cell.fed.rounds, cell.fed.local_epochs) == (4, 2, 3)
    assert (config.seed, config.fed.rounds) == (0, 6)  # the base config is untouched
