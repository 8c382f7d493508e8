"""Table-2-style results: rows are methods, columns C1..CK and Avg (accuracy in %)."""

from __future__ import annotations

import json
import os


def results_table(rows: dict[str, dict]) -> str:
    num_clients = len(next(iter(rows.values()))["accuracy"])
    header = ["Method"] + [f"C{k + 1}" for k in range(num_clients)] + ["Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (num_clients + 1)) + "|"]
    for name, result in rows.items():
        cells = [f"{100 * a:.2f}" for a in result["accuracy"]] + [f"{100 * result['average']:.2f}"]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def write_report(workdir: str, rows: dict[str, dict], extra: dict) -> str:
    table = results_table(rows)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    # Written last and atomically: its presence marks a finished run (the study runner relies on it).
    partial = os.path.join(workdir, "results.json.partial")
    with open(partial, "w") as f:
        json.dump({"results": rows, **extra}, f, indent=2)
    os.replace(partial, os.path.join(workdir, "results.json"))
    return table
