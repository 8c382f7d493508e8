"""Table-2-style results: rows are methods, columns C1..CK and Avg (accuracy in %; beyond 20 clients, quartiles
over the clients instead of a column each); for ScienceQA
and IconQA a second table with the official breakdown (overall, then each group's accuracy)."""

from __future__ import annotations

import json
import os

import numpy as np

MOST_CLIENT_COLUMNS = 20  # beyond this many clients the table summarises them (results.json keeps each one)


def results_table(rows: dict[str, dict], client_ranks=None) -> str:
    """`client_ranks`: each client's adapter rank, shown in its column's header (heterogeneous ranks)."""
    num_clients = len(next(iter(rows.values()))["accuracy"])
    if num_clients > MOST_CLIENT_COLUMNS:
        return population_table(rows)
    header = ["Method"] + [f"C{k + 1}" + (f" (r={client_ranks[k]})" if client_ranks is not None else "")
                           for k in range(num_clients)] + ["Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (num_clients + 1)) + "|"]
    for name, result in rows.items():
        cells = [f"{100 * a:.2f}" for a in result["accuracy"]] + [f"{100 * result['average']:.2f}"]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def population_table(rows: dict[str, dict]) -> str:
    """Methods x (clients with test examples, their accuracy's quartiles, Avg): a federation too large for a column
    per client."""
    lines = ["| Method | clients evaluated | lower quartile | median | upper quartile | Avg |", "|---|---:|---:|---:|---:|---:|"]
    for name, result in rows.items():
        scores = np.asarray(result["accuracy"], float)
        scores = 100 * scores[~np.isnan(scores)]
        quartiles = [f"{q:.2f}" for q in np.percentile(scores, [25, 50, 75])] if len(scores) else ["-"] * 3
        lines.append(f"| {name} | {len(scores)} | " + " | ".join(quartiles) + f" | {100 * result['average']:.2f} |")
    return "\n".join(lines)


def breakdown_table(rows: dict[str, dict]) -> str:
    """Methods x breakdown groups (accuracy in %); '' when no row has a breakdown."""
    columns = list(dict.fromkeys(k for result in rows.values() for k in result.get("breakdown", {})))
    if not columns:
        return ""
    lines = ["| " + " | ".join(["Method"] + columns) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    for name, result in rows.items():
        scores = result.get("breakdown", {})
        cells = [f"{100 * scores[c]:.2f}" if c in scores else "-" for c in columns]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def rank_table(rows: dict[str, dict]) -> str:
    """Methods x adapter rank: the average accuracy of each rank's clients (%); '' without heterogeneous ranks."""
    columns = list(dict.fromkeys(r for result in rows.values() for r in result.get("rank_average", {})))
    if not columns:
        return ""
    lines = ["| " + " | ".join(["Method"] + [f"rank {r}" for r in columns]) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    for name, result in rows.items():
        scores = result.get("rank_average", {})
        lines.append("| " + " | ".join([name] + [f"{100 * scores[r]:.2f}" if r in scores else "-"
                                                 for r in columns]) + " |")
    return "\n".join(lines)


def report_tables(rows: dict[str, dict], client_ranks=None) -> str:
    """The per-client table, then the breakdown table and the rank table if there are any."""
    table = results_table(rows, client_ranks)
    groups, by_rank = breakdown_table(rows), rank_table(rows)
    if groups:
        table += f"\n\nOfficial accuracy by group (%), all clients' test sets:\n{groups}"
    if by_rank:
        table += f"\n\nAverage accuracy of each adapter rank's clients (%):\n{by_rank}"
    return table


def write_report(workdir: str, rows: dict[str, dict], extra: dict, client_ranks=None) -> str:
    table = report_tables(rows, client_ranks)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    # Written last and atomically: its presence marks a finished run (the study runner relies on it).
    partial = os.path.join(workdir, "results.json.partial")
    with open(partial, "w") as f:
        json.dump({"results": rows, **extra}, f, indent=2)
    os.replace(partial, os.path.join(workdir, "results.json"))
    return table
