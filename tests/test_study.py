"""The study runner: grids, resumption, tables and plots."""

import os
import subprocess
import sys

import numpy as np
import pytest

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


def test_confidence_intervals_and_the_paired_test_are_the_textbook_ones():
    from scipy import stats

    from fednano_jax.commands.study import mean_ci, paired_test

    fednano, fedavg = [0.70, 0.72, 0.75, 0.71, 0.74], [0.69, 0.72, 0.73, 0.70, 0.74]
    mean, half = mean_ci(fednano)
    values = 100 * np.array(fednano)
    assert mean == pytest.approx(72.4)
    assert half == pytest.approx(2.7764451 * values.std(ddof=1) / np.sqrt(5), rel=1e-6)  # t(0.975, 4 dof)
    diff, diff_half, p = paired_test(fednano, fedavg)
    assert diff == pytest.approx(0.8) and diff_half == pytest.approx(mean_ci(np.subtract(fednano, fedavg))[1])
    assert p == pytest.approx(stats.ttest_rel(fednano, fedavg).pvalue) and 0.0 < p < 0.1


def fake_results(cells_of_study: dict, seeds: int, labels_of) -> dict:
    rng = np.random.default_rng(0)
    return {(s, cell): {"results": {label: {"average": float(rng.uniform(0.6, 0.8))} for label in labels_of(cell)}}
            for s in range(seeds) for cell in cells_of_study}


def test_the_merge_study_compares_each_aggregation_with_fedavg_under_the_same_server_step(tmp_path):
    from fednano_jax.commands.study import MERGE_CELLS, merge_table, paired_test

    seeds = 5
    results = fake_results(MERGE_CELLS, seeds, lambda cell: MERGE_CELLS[cell][0])
    table = merge_table(results, seeds, str(tmp_path)).splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    assert list(rows) == ["FedAvg", "Fisher merge", "Fisher merge without example weights", "FedAvg + server Adam",
                          "Fisher merge + server Adam", "Fisher merge without example weights + server Adam"]
    values = lambda cell, label: [results[(s, cell)]["results"][label]["average"] for s in range(seeds)]  # noqa
    diff, half, p = paired_test(values("merge_equal_adam", "FedNano + server Adam"),
                                values("merge_adam", "FedAvg + server Adam"))
    assert rows["Fisher merge without example weights + server Adam"][1:] == [f"{diff:+.2f} ± {half:.2f}", f"{p:.3f}"]
    assert rows["FedAvg"][1:] == ["-", "-"]
    assert (tmp_path / "merge.csv").exists() and (tmp_path / "accuracy_by_merge.png").stat().st_size > 1000


def test_the_clients_and_heterogeneity_grids():
    from configs.easyvqa_tiny import get_config
    from fednano_jax.commands.study import cells, compared_table

    config = get_config()
    grid = cells("clients", config)
    assert [(o["fed.num_clients"], o["fed.clients_per_round"]) for o in grid.values()] == [
        (5, 0), (10, 0), (20, 10), (50, 10)]
    heterogeneity = cells("heterogeneity", config)
    assert [o["data.partition"] for o in heterogeneity.values()] == ["dirichlet"] * 5 + ["pathological"]
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        table = compared_table("heterogeneity", fake_results(heterogeneity, 5, lambda _: ("FedAvg", "FedNano")), 5,
                               workdir, config).splitlines()
    assert table[0] == "| Partition | FedAvg | FedNano | FedNano - FedAvg | p (paired t) |"
    assert table[2].startswith("| Dirichlet 0.05 |") and table[-1].startswith("| pathological, 2 categories each |")


def test_the_ranks_study_compares_tiers_with_everyone_at_the_smallest_rank(tmp_path):
    from configs.easyvqa_tiny import get_config
    from fednano_jax.commands.study import RANK_CELLS, cells, mean_ci, paired_test, ranks_table

    grid = cells("ranks", get_config())
    assert grid["ranks_tiers"]["model.adapter.client_ranks"] == (16, 8, 4)
    assert grid["ranks_tiers_zero_pad"]["fed.rank_aggregation"] == "zero_pad"
    assert grid["ranks_smallest"]["model.adapter.client_ranks"] == (4,)
    assert "model.adapter.client_ranks" not in grid["ranks_full"]
    seeds, rng = 5, np.random.default_rng(1)
    results = {}
    for s in range(seeds):
        for cell in RANK_CELLS:
            rows = {label: {"accuracy": rng.uniform(0.5, 0.9, size=5).tolist()} for label in ("FedAvg", "FedNano")}
            for row in rows.values():
                row["average"] = float(np.mean(row["accuracy"]))
            history = {label: [{"round_seconds": 1.0, "uploaded_bytes": 2048 * 5, "clients": list(range(5))}]
                       for label in rows}
            results[(s, cell)] = {"results": rows, "history": history}
    table = ranks_table(results, seeds, str(tmp_path)).splitlines()
    assert len(table) == 2 + 2 * len(RANK_CELLS)
    tiers = [c.strip() for c in table[4].split("|")[1:-1]]  # the tiers cell's FedAvg row
    assert tiers[:2] == ["tiers 16/8/4, masked average", "FedAvg"]
    # The rank-8 tier is clients 2 and 5 (indices 1 and 4) of each seed.
    tier8 = [np.mean(np.asarray(results[(s, "ranks_tiers")]["results"]["FedAvg"]["accuracy"])[[1, 4]])
             for s in range(seeds)]
    mean, half = mean_ci(tier8)
    assert tiers[4] == f"{mean:.2f} ± {half:.2f}"
    values = lambda cell, label: [results[(s, cell)]["results"][label]["average"] for s in range(seeds)]  # noqa
    diff, half, p = paired_test(values("ranks_tiers", "FedAvg"), values("ranks_smallest", "FedAvg"))
    assert tiers[6:8] == [f"{diff:+.2f} ± {half:.2f}", f"{p:.3f}"] and tiers[8:10] == ["-", "-"]
    assert table[-1].split("|")[7:9] == [" - ", " - "]  # everyone at rank 4 is the baseline itself
    assert tiers[-1] == "2.0 KiB" and (tmp_path / "accuracy_by_ranks.png").stat().st_size > 1000


def test_tier_averages_are_each_rank_tiers_clients():
    """The ranks study's tiers cycle over the clients: (16, 8, 4, 16, 8) -> clients {0, 3}, {1, 4}, {2}."""
    from fednano_jax.commands.study import tier_averages

    result = {"results": {"FedNano": {"accuracy": [10.0, 20.0, 30.0, 50.0, 40.0]}}}
    assert tier_averages(result, "FedNano") == [30.0, 30.0, 30.0]
    result = {"results": {"FedNano": {"accuracy": [10.0, 20.0, 60.0, 50.0, 80.0]}}}
    assert tier_averages(result, "FedNano") == [30.0, 50.0, 60.0]


def test_the_dp_study_sets_each_mechanism_against_non_private_fednano(tmp_path):
    from configs.easyvqa_tiny import get_config
    from fednano_jax.commands.study import DP_MECHANISMS, EPSILONS, cells, dp_table, paired_test

    grid = cells("dp", get_config())
    assert len(grid) == 1 + len(DP_MECHANISMS) * len(EPSILONS)
    assert grid["dpftrl_eps3"]["fed.cohort_sampling"] == "cyclic" and grid["dpfedavg_eps1"]["fed.dp.target_epsilon"] == 1
    assert all(o["fed.num_clients"] == 1000 and o["fed.dp.delta"] == pytest.approx(1000 ** -1.1)
               for name, o in grid.items() if name != "nodp")
    seeds = 3

    def labels(cell):
        return ("FedAvg", "FedNano") if cell == "nodp" else ("FedAvg + DP (ε=3.00, δ=0.0005)",
                                                             "FedNano + DP (ε=3.00, δ=0.0005)")

    results = fake_results(grid, seeds, labels)
    for (seed, cell), result in results.items():
        last = {"update_noise_norm": 0.6, "round_clip_norm": 0.3, "noise_multiplier": 1.25}
        result["history"] = {label: [last] for label in labels(cell)}
    table = dp_table(results, seeds, str(tmp_path)).splitlines()
    assert table[0].startswith("| Mechanism | ε | z | noise ‖·‖ / C | FedAvg | FedNano |")
    assert len(table) == 2 + len(grid)
    ftrl_one = next(line for line in table if line.startswith("| DP-FTRL") and "| 1 |" in line)
    values = lambda cell, label: [results[(s, cell)]["results"][label]["average"] for s in range(seeds)]  # noqa
    diff, half, p = paired_test(values("dpftrl_eps1", labels("x")[1]), values("nodp", "FedNano"))
    assert ftrl_one.split("|")[3:5] == [" 1.250 ", " 2.00 "]
    assert ftrl_one.split("|")[7:9] == [f" {diff:+.2f} ± {half:.2f} ", f" {p:.3f} "]
    assert (tmp_path / "dp.csv").exists() and (tmp_path / "accuracy_vs_epsilon.png").stat().st_size > 1000
