"""The README's memory-plan table is what the committed plans say (docs/bench/plans/*.json, written by
`python -m fednano_jax.memory_plan ... --out`): a number in it that no plan gave would be a stale table."""

import json
import os
import re

from conftest import ROOT

TARGETS = {"A100 80GB": "a100-80gb_x1", "H100 80GB": "h100-80gb_x1", "8 x H100 80GB": "h100-80gb_x8",
           "TPU v5p, 4 chips": "tpu-v5p-2x2x1_x4"}
CONFIGS = {"ScienceQA": "scienceqa_llava15_7b", "IconQA": "iconqa_llava15_7b"}


def readme_plan_rows(title: str = "GiB per device") -> tuple[list[str], list[list[str]]]:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## The paper's 7B configs on the paper's GPUs"):]
    lines = [line for line in section[: section.index("\n## ", 3)].splitlines() if line.startswith("|")]
    tables, table = [], []
    for line in lines:  # a header row starts each table
        if line.startswith("| GiB per device") or line.startswith("| MiniGPT-4-7B"):
            table = []
            tables.append(table)
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    wanted = [t for t in tables if t[0][0] == title]
    return wanted[0][0], wanted[0][2:]


def test_the_readme_plan_table_is_the_committed_plans():
    header, rows = readme_plan_rows()
    assert header[1:] == list(TARGETS)
    checked = 0
    for row in rows:
        match = re.fullmatch(r"(ScienceQA|IconQA), `([\w:]+)`", row[0])
        if not match:
            continue
        config, program = CONFIGS[match.group(1)], match.group(2)
        for target, cell in zip(TARGETS.values(), row[1:]):
            plan = json.load(open(os.path.join(ROOT, "docs", "bench", "plans", f"{config}_{target}.json")))
            assert cell == f"{plan['programs'][program]['per_device_total_gib']:.2f}", (config, program, target)
            checked += 1
    assert checked >= 2 * 4 * 4  # both configs, every target, at least four programs each


def test_the_readme_minigpt4_plan_table_is_the_committed_plans():
    header, rows = readme_plan_rows("MiniGPT-4-7B, GiB per device")
    targets = {"A100 80GB": "a100-80gb_x1", "H100 80GB": "h100-80gb_x1"}
    assert header[1:] == list(targets)
    for row in rows:
        config, program = re.fullmatch(r"(ScienceQA|IconQA), `([\w:]+)`", row[0]).groups()
        name = {"ScienceQA": "scienceqa_minigpt4_7b", "IconQA": "iconqa_minigpt4_7b"}[config]
        for target, cell in zip(targets.values(), row[1:]):
            plan = json.load(open(os.path.join(ROOT, "docs", "bench", "plans", f"{name}_{target}.json")))
            assert cell == f"{plan['programs'][program]['per_device_total_gib']:.2f}", (name, program, target)
    assert len(rows) == 6
