"""Reproduce the paper's tables and figures: a grid of runs, resumable, summarised over seeds.

    python -m fednano_jax.study --config=configs/easyvqa_tiny.py --study=main [--seeds=3]

Studies: `main` (Table 2: every method), `adapters` (Table 3: A_T only, A_I only,
both), `rank` (Fig. 2a: adapter rank) and `frequency` (Fig. 2b: rounds x local
epochs at a fixed budget of local epochs); and the questions the paper's reviewers asked,
each over 5 seeds by default with a 95% confidence interval and a paired test of FedNano
against FedAvg (same seeds, same partitions): `clients` (5 to 50 clients, cohorts of 10
beyond 10), `heterogeneity` (Dirichlet alpha 0.05 to 10, and pathological), `merge`
(FedAvg, the Fisher merge, the Fisher merge without its |D_k| weights, each with and
without a server Adam step) and `ranks` (clients in rank tiers 16/8/4, aggregated under
their masks or zero-padded as HetLoRA does, against everyone at rank 4 and everyone at 16); and `dp`
(3 seeds): client-level DP at population scale, 1,000 clients over every training question with
cohorts of about 100, FedAvg and FedNano non-private and at ε 8, 3 and 1 (δ = 1/N^1.1, the noise solved
for the rounds) under DP-FedAvg with Poisson cohorts (fixed and adaptive clipping) and DP-FTRL with
cyclic turns, against non-private FedNano (paired), with a plot of accuracy against ε.
Each cell is one `fednano_jax.main` run
in `<workdir>/seed<s>/<cell>`; a cell whose results.json exists is not run again,
and a half-finished one resumes from its round checkpoints. Every method sees the
same data, partition, backbone and seeds. Writes `<study>.md`, `<study>.csv` and
PNG plots to the study's workdir.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import time

import numpy as np
from absl import flags

from fednano_jax.commands import cli
from fednano_jax.errors import ConfigError
from fednano_jax.federated.methods import PAPER_METHODS


MAIN_METHODS = PAPER_METHODS
COMPARED = ("fedavg", "fednano")
RANKS = (8, 16, 32, 64, 128)
ADAPTERS = {"A_T only": (False, True), "A_I only": (True, False), "A_I + A_T": (True, True)}


CLIENT_COUNTS = (5, 10, 20, 50)
COHORT = 10  # clients per round once there are more
ALPHAS = (0.05, 0.1, 0.5, 1.0, 10.0)
SERVER_ADAM = {"fed.server_optimizer": "adam", "fed.server_learning_rate": 0.01}
MERGE_CELLS = {  # cell -> (the rows it gives: method label -> row name, its overrides)
    "merge": ({"FedAvg": "FedAvg", "FedNano": "Fisher merge"}, {}),
    "merge_equal": ({"FedNano": "Fisher merge without example weights"},
                    {"fed.methods": ("fednano",), "fed.fisher_example_weights": False}),
    "merge_adam": ({"FedAvg + server Adam": "FedAvg + server Adam", "FedNano + server Adam":
                    "Fisher merge + server Adam"}, SERVER_ADAM),
    "merge_equal_adam": ({"FedNano + server Adam": "Fisher merge without example weights + server Adam"},
                         {"fed.methods": ("fednano",), "fed.fisher_example_weights": False, **SERVER_ADAM}),
}
TIERS = (16, 8, 4)  # the ranks study's client tiers, cycled over the clients
RANK_CELLS = {  # cell -> (its row name, its overrides)
    "ranks_full": (f"everyone at rank {TIERS[0]}", {}),
    "ranks_tiers": ("tiers " + "/".join(map(str, TIERS)) + ", masked average",
                    {"model.adapter.client_ranks": TIERS}),
    "ranks_tiers_zero_pad": ("tiers " + "/".join(map(str, TIERS)) + ", zero-padded (HetLoRA)",
                             {"model.adapter.client_ranks": TIERS, "fed.rank_aggregation": "zero_pad"}),
    "ranks_smallest": (f"everyone at rank {TIERS[-1]}", {"model.adapter.client_ranks": TIERS[-1:]}),
}
# DP at population scale: 1,000 clients over every training question, Poisson cohorts of about 100, δ = 1/N^1.1,
# the noise solved for each ε over the run's rounds; the rounds and C from the sweep in docs/privacy.md.
POPULATION, EXPECTED_COHORT, DP_ROUNDS, DP_CLIP = 1000, 100, 10, 0.3
EPSILONS = (8.0, 3.0, 1.0)
DP_POPULATION = {"fed.methods": COMPARED, "fed.num_clients": POPULATION, "fed.clients_per_round": EXPECTED_COHORT,
                 "fed.rounds": DP_ROUNDS, "data.train_examples": 0, "data.test_examples": 2000,
                 "eval.every_rounds": 0}
DP_MECHANISMS = {  # cell prefix -> (row name, overrides)
    "dpfedavg": ("DP-FedAvg, fixed C", {"fed.cohort_sampling": "poisson"}),
    "dpfedavg_adaptive": ("DP-FedAvg, adaptive C", {"fed.cohort_sampling": "poisson", "fed.dp.adaptive": True}),
    "dpftrl": ("DP-FTRL (BandMF, cyclic turns), fixed C", {"fed.cohort_sampling": "cyclic", "fed.dp.mechanism": "ftrl"}),
}
DEFAULT_SEEDS = {"clients": 5, "heterogeneity": 5, "merge": 5, "ranks": 5, "dp": 3}  # the others: 1


def frequency_grid(config) -> list[tuple[int, int]]:
    """(rounds, local epochs) pairs with the config's budget of rounds x local epochs."""
    budget = config.fed.rounds * config.fed.local_epochs
    return [(budget // epochs, epochs) for epochs in range(1, budget + 1) if budget % epochs == 0]


def cells(study: str, config) -> dict[str, dict]:
    """cell name -> config overrides (dotted keys)."""
    if study == "main":
        return {"all_methods": {"fed.methods": MAIN_METHODS}}
    if study == "adapters":
        return {name.replace(" ", "_").replace("+", "and"): {"fed.methods": COMPARED, "model.adapter.image": image,
                                                             "model.adapter.text": text}
                for name, (image, text) in ADAPTERS.items()}
    if study == "rank":
        return {f"rank{r}": {"fed.methods": COMPARED, "model.adapter.rank": r} for r in RANKS}
    if study == "clients":
        return {f"clients{n}": {"fed.methods": COMPARED, "fed.num_clients": n,
                                "fed.clients_per_round": 0 if n <= COHORT else COHORT} for n in CLIENT_COUNTS}
    if study == "heterogeneity":
        grid = {f"alpha{a:g}": {"fed.methods": COMPARED, "data.partition": "dirichlet", "data.dirichlet_alpha": a}
                for a in ALPHAS}
        return {**grid, "pathological2": {"fed.methods": COMPARED, "data.partition": "pathological",
                                          "data.categories_per_client": 2}}
    if study == "merge":
        return {name: {"fed.methods": COMPARED, **overrides} for name, (_, overrides) in MERGE_CELLS.items()}
    if study == "ranks":
        return {name: {"fed.methods": COMPARED, "model.adapter.rank": TIERS[0], **overrides}
                for name, (_, overrides) in RANK_CELLS.items()}
    if study == "dp":
        return dp_cells()
    return {f"rounds{r}_epochs{e}": {"fed.methods": COMPARED, "fed.rounds": r, "fed.local_epochs": e}
            for r, e in frequency_grid(config)}


def dp_cells() -> dict[str, dict]:
    """The non-private run, then each mechanism at each ε."""
    private = {"fed.dp.enabled": True, "fed.dp.accountant": "pld", "fed.dp.delta": POPULATION ** -1.1,
               "fed.dp.clip_norm": DP_CLIP}
    grid = {"nodp": {**DP_POPULATION, "fed.cohort_sampling": "poisson"}}
    for prefix, (_, overrides) in DP_MECHANISMS.items():
        for epsilon in EPSILONS:
            grid[f"{prefix}_eps{epsilon:g}"] = {**DP_POPULATION, **private, **overrides, "fed.dp.target_epsilon": epsilon}
    return grid


def with_overrides(config, overrides: dict, seed: int):
    cell = copy.deepcopy(config)
    cell.seed = seed
    for dotted, value in overrides.items():
        node = cell
        *parents, key = dotted.split(".")
        for parent in parents:
            node = node[parent]
        node[key] = value
    return cell


def run_grid(config, study: str, seeds: int, workdir: str) -> dict:
    """-> {(seed, cell): results.json contents}; runs only the cells that have none yet."""
    from fednano_jax.experiment import run_experiment

    results = {}
    grid = cells(study, config)
    for seed in range(seeds):
        for name, overrides in grid.items():
            cell_dir = os.path.join(workdir, f"seed{seed}", name)
            done = os.path.join(cell_dir, "results.json")
            if not os.path.exists(done):
                print(f"\n=== {study}: seed {seed}, {name} ===")
                run_experiment(with_overrides(config, overrides, seed), cell_dir)
            else:
                print(f"=== {study}: seed {seed}, {name}: done, reusing {done}")
            with open(done) as f:
                results[(seed, name)] = json.load(f)
    return results


def mean_std(values) -> str:
    values = 100 * np.asarray(values, float)
    return f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else f"{values.mean():.2f}"


def mean_ci(values) -> tuple[float, float]:
    """(mean, half-width of its 95% Student-t confidence interval) of accuracies, in points."""
    from scipy import stats

    values = 100 * np.asarray(values, float)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))


def paired_test(treated, control) -> tuple[float, float, float]:
    """(mean difference, its 95% CI half-width, two-sided p of the paired t-test) in points, seed by seed."""
    from scipy import stats

    treated, control = np.asarray(treated, float), np.asarray(control, float)
    mean, half = mean_ci(treated - control)
    p = float(stats.ttest_rel(treated, control).pvalue) if len(treated) > 1 else float("nan")
    return mean, half, p


def with_ci(values) -> str:
    mean, half = mean_ci(values)
    return f"{mean:.2f}" if np.isnan(half) else f"{mean:.2f} ± {half:.2f}"


def difference(treated, control) -> list[str]:
    mean, half, p = paired_test(treated, control)
    return [f"{mean:+.2f}" if np.isnan(half) else f"{mean:+.2f} ± {half:.2f}", "-" if np.isnan(p) else f"{p:.3f}"]


def method_costs(result: dict, label: str) -> tuple[float, float]:
    """(training seconds summed over rounds, bytes uploaded per client per round) from a run's history."""
    history = result["history"][label]
    seconds = sum(r["round_seconds"] for r in history)
    per_client = [r["uploaded_bytes"] / max(len(r["clients"]), 1) for r in history]
    return seconds, float(np.mean(per_client))


def write_table(path: str, header: list[str], rows: list[list[str]]) -> str:
    with open(path + ".csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def main_table(results: dict, seeds: int, workdir: str) -> str:
    first = results[(0, "all_methods")]["results"]
    num_clients = len(first["Untuned"]["accuracy"])
    header = ["Method"] + [f"C{k + 1}" for k in range(num_clients)] + ["Avg", "train s", "upload/client/round"]
    rows = []
    for label in first:
        runs = [results[(s, "all_methods")] for s in range(seeds)]
        accuracy = np.array([r["results"][label]["accuracy"] for r in runs])
        average = [r["results"][label]["average"] for r in runs]
        row = [label] + [mean_std(accuracy[:, k]) for k in range(num_clients)] + [mean_std(average)]
        if label == "Untuned":
            row += ["-", "-"]
        else:
            costs = np.array([method_costs(r, label) for r in runs])
            row += [f"{costs[:, 0].mean():.0f}", f"{costs[:, 1].mean() / 1024:.1f} KiB"]
        rows.append(row)
    plot_rounds(results, seeds, os.path.join(workdir, "accuracy_per_round.png"))
    return write_table(os.path.join(workdir, "main"), header, rows)


def plot_rounds(results: dict, seeds: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    histories = results[(0, "all_methods")]["history"]
    for label in histories:
        curves = []
        for s in range(seeds):
            run = results[(s, "all_methods")]
            records = [r for r in run["history"][label] if "average" in r]
            start = (0, run["results"]["Untuned"]["average"])  # round 0: the untuned model
            curves.append([start] + [(r["round"], r["average"]) for r in records])
        rounds = [r for r, _ in curves[0]]
        mean = 100 * np.mean([[a for _, a in c] for c in curves], axis=0)
        ax.plot(rounds, mean, marker="o", label=label)
    ax.set_xlabel("round (0 = untuned)")
    ax.set_xticks(rounds)
    ax.set_ylabel("average client accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_table(study: str, results: dict, seeds: int, workdir: str, config) -> str:
    grid = cells(study, config)
    labels = ["FedAvg", "FedNano"]
    header = [{"adapters": "Adapters", "rank": "Rank", "frequency": "Rounds x local epochs"}[study]] + labels
    names = {"adapters": list(ADAPTERS), "rank": [str(r) for r in RANKS],
             "frequency": [f"{r} x {e}" for r, e in frequency_grid(config)]}[study]
    rows, series = [], {label: [] for label in labels}
    for display, cell in zip(names, grid):
        row = [display]
        for label in labels:
            averages = [results[(s, cell)]["results"][label]["average"] for s in range(seeds)]
            row.append(mean_std(averages))
            series[label].append(100 * float(np.mean(averages)))
        rows.append(row)
    if study != "adapters":
        plot_sweep(names, series, header[0], os.path.join(workdir, f"accuracy_vs_{study}.png"))
    return write_table(os.path.join(workdir, study), header, rows)


def averages(results: dict, seeds: int, cell: str, label: str) -> list[float]:
    return [results[(s, cell)]["results"][label]["average"] for s in range(seeds)]


def compared_table(study: str, results: dict, seeds: int, workdir: str, config) -> str:
    """clients / heterogeneity: per cell, FedAvg's and FedNano's mean ± 95% CI, and their paired difference."""
    grid = cells(study, config)
    title = {"clients": "Clients (cohort)", "heterogeneity": "Partition"}[study]
    header = [title, "FedAvg", "FedNano", "FedNano - FedAvg", "p (paired t)"]
    rows, series, bands = [], {"FedAvg": [], "FedNano": []}, {"FedAvg": [], "FedNano": []}
    for cell, overrides in grid.items():
        fedavg, fednano = averages(results, seeds, cell, "FedAvg"), averages(results, seeds, cell, "FedNano")
        rows.append([_cell_name(study, overrides), with_ci(fedavg), with_ci(fednano), *difference(fednano, fedavg)])
        for label, values in (("FedAvg", fedavg), ("FedNano", fednano)):
            mean, half = mean_ci(values)
            series[label].append(mean)
            bands[label].append(0.0 if np.isnan(half) else half)
    plot_sweep([row[0] for row in rows], series, title, os.path.join(workdir, f"accuracy_vs_{study}.png"), bands)
    return write_table(os.path.join(workdir, study), header, rows)


def _cell_name(study: str, overrides: dict) -> str:
    if study == "clients":
        cohort = overrides["fed.clients_per_round"]
        return f"{overrides['fed.num_clients']}" + (f" ({cohort} per round)" if cohort else "")
    if overrides["data.partition"] == "pathological":
        return f"pathological, {overrides['data.categories_per_client']} categories each"
    return f"Dirichlet {overrides['data.dirichlet_alpha']:g}"


def merge_table(results: dict, seeds: int, workdir: str) -> str:
    """The merge ablation: each aggregation with and without server Adam, against FedAvg with the same server."""
    header = ["Aggregation", "Avg", "- FedAvg (same server step)", "p (paired t)"]
    rows, series = [], {}
    for cell, (labels, overrides) in MERGE_CELLS.items():
        baseline_cell = "merge_adam" if "fed.server_optimizer" in overrides else "merge"
        baseline = averages(results, seeds, baseline_cell, "FedAvg + server Adam" if baseline_cell == "merge_adam"
                            else "FedAvg")
        for label, name in labels.items():
            values = averages(results, seeds, cell, label)
            compared = ["-", "-"] if name.startswith("FedAvg") else difference(values, baseline)
            rows.append([name, with_ci(values), *compared])
            series[name] = mean_ci(values)
    plot_bars(series, os.path.join(workdir, "accuracy_by_merge.png"))
    return write_table(os.path.join(workdir, "merge"), header, rows)


def tier_averages(result: dict, label: str) -> list[float]:
    """The average accuracy of each tier's clients (client k in tier TIERS[k % len]), whatever ranks the cell ran."""
    from fednano_jax.models.adapter_ranks import client_ranks
    from fednano_jax.settings import Adapter

    accuracy = np.asarray(result["results"][label]["accuracy"], float)
    tiers = client_ranks(Adapter(rank=max(TIERS), client_ranks=TIERS), len(accuracy))
    return [float(np.nanmean(accuracy[tiers == rank])) for rank in TIERS]


def ranks_table(results: dict, seeds: int, workdir: str) -> str:
    """The ranks study: per setting and method, the average, each tier's clients, paired differences, upload."""
    header = ["Setting", "Method", "Avg"] + [f"rank-{r} tier" for r in TIERS] + [
        f"- everyone at rank {TIERS[-1]}", "p", "FedNano - FedAvg", "p", "upload/client/round"]
    rows, series = [], {}
    for cell, (setting, _) in RANK_CELLS.items():
        for label in ("FedAvg", "FedNano"):
            values = averages(results, seeds, cell, label)
            tiers = np.array([tier_averages(results[(s, cell)], label) for s in range(seeds)])
            smallest = (["-", "-"] if cell == "ranks_smallest"
                        else difference(values, averages(results, seeds, "ranks_smallest", label)))
            versus = difference(values, averages(results, seeds, cell, "FedAvg")) if label == "FedNano" else ["-", "-"]
            upload = np.mean([method_costs(results[(s, cell)], label)[1] for s in range(seeds)])
            rows.append([setting, label, with_ci(values), *[with_ci(tiers[:, t]) for t in range(len(TIERS))],
                         *smallest, *versus, f"{upload / 1024:.1f} KiB"])
            series[f"{label}, {setting}"] = mean_ci(values)
    plot_bars(series, os.path.join(workdir, "accuracy_by_ranks.png"))
    return write_table(os.path.join(workdir, "ranks"), header, rows)


def dp_table(results: dict, seeds: int, workdir: str) -> str:
    """The dp study: per mechanism and ε, FedAvg's and FedNano's mean ± 95% CI, FedNano against non-private FedNano
    (paired), the noise multiplier and the noise's norm on the mean update against C (the first seed's run)."""
    header = ["Mechanism", "ε", "z", "noise ‖·‖ / C", "FedAvg", "FedNano", "FedNano - non-private FedNano", "p"]
    plain = {label: averages(results, seeds, "nodp", label) for label in ("FedAvg", "FedNano")}
    rows = [["none (non-private)", "∞", "-", "-", with_ci(plain["FedAvg"]), with_ci(plain["FedNano"]), "-", "-"]]
    curves = {}
    for prefix, (name, _) in DP_MECHANISMS.items():
        for epsilon in EPSILONS:
            cell = f"{prefix}_eps{epsilon:g}"
            labels = {_base_label(label): label for label in results[(0, cell)]["history"]}
            values = {base: averages(results, seeds, cell, label) for base, label in labels.items()}
            last = results[(0, cell)]["history"][labels["FedNano"]][-1]
            ratio = last["update_noise_norm"] / last["round_clip_norm"]
            z = last["noise_multiplier"]
            rows.append([name, f"{epsilon:g}", f"{z:.3f}", f"{ratio:.2f}", with_ci(values["FedAvg"]),
                         with_ci(values["FedNano"]), *difference(values["FedNano"], plain["FedNano"])])
            for base, series in values.items():
                curves.setdefault(f"{base}, {name}", []).append(mean_ci(series))
    plot_epsilon(curves, {base: mean_ci(v) for base, v in plain.items()}, os.path.join(workdir, "accuracy_vs_epsilon.png"))
    return write_table(os.path.join(workdir, "dp"), header, rows)


def _base_label(label: str) -> str:
    """'FedNano + DP (ε=3.00, δ=0.0005)' -> 'FedNano'."""
    return label.split(" + DP")[0]


def plot_epsilon(curves: dict[str, list], plain: dict[str, tuple[float, float]], path: str) -> None:
    """Accuracy against ε (log axis), mean and 95% CI, one line per method and mechanism; non-private as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        means, halves = np.array([m for m, _ in points]), np.nan_to_num([h for _, h in points])
        ax.errorbar(EPSILONS, means, yerr=halves, marker="o", capsize=3, label=name,
                    linestyle="-" if name.startswith("FedNano") else "--")
    for base, (mean, _) in plain.items():
        ax.axhline(mean, color="grey", linestyle="-" if base == "FedNano" else "--", alpha=0.6)
        ax.annotate(f"{base}, non-private", (EPSILONS[0], mean), fontsize=7, va="bottom", ha="right")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(EPSILONS, [f"{e:g}" for e in EPSILONS])
    ax.set_xlabel("ε (δ = 1/N^1.1)")
    ax.set_ylabel("average client accuracy (%): mean, 95% CI")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(series: dict[str, tuple[float, float]], path: str) -> None:
    """name -> (mean, 95% CI half-width): a dot with its interval per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(series)
    means, halves = np.array([series[n][0] for n in names]), np.nan_to_num([series[n][1] for n in names])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.errorbar(means, range(len(names)), xerr=halves, fmt="o", capsize=4)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("average client accuracy (%): mean, 95% CI")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(names, series, xlabel, path, bands=None) -> None:
    """One line per method over the cells; `bands` (method -> 95% CI half-widths) shades each line's interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        ax.plot(names, values, marker="o", label=label)
        if bands:
            low, high = np.subtract(values, bands[label]), np.add(values, bands[label])
            ax.fill_between(range(len(names)), low, high, alpha=0.2)
    if max(len(str(name)) for name in names) > 6:  # long cell names: slant them so they do not overlap
        plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("average client accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = flags.FLAGS
    config, study = args.config, args.study
    seeds = args.seeds if args.seeds is not None else DEFAULT_SEEDS.get(study, 1)
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}.")
    if args.dry_run:
        from fednano_jax.preflight import study_dry_run

        grid = cells(study, config)
        print(f"{study} study: {len(grid)} cell(s) x {seeds} seed(s); every cell's config checked, the first in full:")
        print(study_dry_run({name: (overrides, with_overrides(config, overrides, 0)) for name, overrides in grid.items()}))
        return
    workdir = args.workdir or os.path.join("runs", config.name, f"study_{study}")
    started = time.perf_counter()
    results = run_grid(config, study, seeds, workdir)
    if study == "main":
        table = main_table(results, seeds, workdir)
    elif study == "merge":
        table = merge_table(results, seeds, workdir)
    elif study == "ranks":
        table = ranks_table(results, seeds, workdir)
    elif study in ("clients", "heterogeneity"):
        table = compared_table(study, results, seeds, workdir, config)
    elif study == "dp":
        table = dp_table(results, seeds, workdir)
    else:
        table = sweep_table(study, results, seeds, workdir, config)
    print(f"\n{study} study, {seeds} seed(s), average client accuracy (%):\n{table}")
    print(f"\nTables and plots in {workdir} ({time.perf_counter() - started:.0f} s)")


def define_flags() -> None:
    """Command-line flags, defined only when run as a command (importing this module defines none)."""
    cli.define_config_flag(lock=False)
    flags.DEFINE_enum("study", "main", ["main", "adapters", "rank", "frequency", "clients", "heterogeneity", "merge",
                                               "ranks", "dp"],
                      "Which study to run.")
    flags.DEFINE_integer("seeds", None, "Number of seeds (0..seeds-1): 5 for clients, heterogeneity, merge and ranks, "
                         "3 for dp (mean ± 95% CI, paired test), else 1 (mean ± std).")
    flags.DEFINE_string("workdir", None, "Study directory (default: runs/<config.name>/study_<study>).")
    flags.DEFINE_bool("dry_run", False, "Check every cell as `main --dry_run` does and stop: nothing is trained.")

