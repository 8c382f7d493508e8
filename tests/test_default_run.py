"""The README's default command, end to end (one shared run, the `default_run` fixture): it reports what the
README says it reports, tuning helps, and the README's measured table is what it gives."""

import os
import re

import numpy as np
import pytest

from conftest import ROOT

# How far a fresh run may land from the README's table, in accuracy points: same shipped backbone, same seed;
# what can still differ across machines is float rounding in XLA's CPU kernels.
CELL_TOLERANCE, AVERAGE_TOLERANCE = 3.0, 1.0  # two CPUs of the same machine kind gave cells 2.1 apart
MARGIN = 20.0  # points by which FedAvg and FedNano must beat the untuned model


def readme_table(section: str = "## Measured results\n") -> dict[str, list[float]]:
    """Method -> [C1 .. C5, Avg] from the README's table under the heading `section`."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index(section):]
    section = section[: section.index("\n## ", 3)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and re.fullmatch(r"[\d.]+", cells[-1]):
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def accuracy_row(result: dict) -> list[float]:
    return [100 * a for a in result["accuracy"]] + [100 * result["average"]]


def test_default_command_uses_the_shipped_backbone_and_logs_every_round(default_run):
    assert "Using the pretrained backbone shipped with the repository" in default_run.stdout
    assert "Pretraining" not in default_run.stdout
    table = (default_run.workdir / "results.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["Untuned", "FedAvg", "FedNano"]
    assert [c.strip() for c in table[0].split("|")[2:8]] == ["C1", "C2", "C3", "C4", "C5", "Avg"]
    records = default_run.records
    assert [(r["method"], r["round"]) for r in records] == (
        [("untuned", 0)] + [(m, k) for m in ("fedavg", "fednano") for k in range(1, 6)])
    for method in ("fedavg", "fednano"):
        rounds = [r for r in records if r["method"] == method]
        assert all("accuracy" in r and r["eval_seconds"] > 0 and r["round_seconds"] > 0 for r in rounds)
        # Compiled once: the first round's compilation is reported apart, later rounds compile nothing.
        assert rounds[0]["compile_seconds"] > 1.0
        assert all(r["compile_seconds"] < 0.1 * rounds[0]["compile_seconds"] for r in rounds[1:])
        assert all(r["uploaded_bytes"] > 0 and r["dropped"] == [] for r in rounds)


def test_tuning_beats_the_untuned_model_by_a_margin(default_run):
    results = default_run.results["results"]
    untuned = 100 * results["Untuned"]["average"]
    for label in ("FedAvg", "FedNano"):
        assert 100 * results[label]["average"] > untuned + MARGIN, (label, results[label]["average"], untuned)


def test_readme_table_is_what_the_default_command_gives(default_run):
    readme = readme_table()
    results = default_run.results["results"]
    assert set(readme) == set(results), (sorted(readme), sorted(results))
    for label, row in readme.items():
        got = accuracy_row(results[label])
        assert len(got) == len(row), label
        np.testing.assert_allclose(got[:-1], row[:-1], atol=CELL_TOLERANCE, err_msg=label)
        np.testing.assert_allclose(got[-1], row[-1], atol=AVERAGE_TOLERANCE, err_msg=label)


def tensorboard_scalars(directory) -> dict[tuple[str, int], float]:
    """(tag, step) -> value from the TensorBoard event files in `directory` (TFRecord framing, read by hand)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    values = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                values[(value.tag, event.step)] = value.simple_value
    return values


def test_every_round_is_in_tensorboard_as_in_metrics_jsonl(default_run):
    """Each method is its own TensorBoard run, stepped by round, with metrics.jsonl's numbers."""
    for method in ("untuned", "fedavg", "fednano"):
        scalars = tensorboard_scalars(default_run.workdir / "tensorboard" / method)
        records = [r for r in default_run.records if r["method"] == method]
        assert records and {step for _, step in scalars} == {r["round"] for r in records}
        for record in records:
            step = record["round"]
            np.testing.assert_allclose(scalars[("average_accuracy", step)], record["average"], rtol=1e-6)
            np.testing.assert_allclose(scalars[("client_accuracy/C2", step)], record["accuracy"][1], rtol=1e-6)
            if method != "untuned":
                np.testing.assert_allclose(scalars[("train_loss", step)], np.mean(record["train_loss"]), rtol=1e-6)
                assert scalars[("uploaded_bytes", step)] == record["uploaded_bytes"]


def test_the_run_reports_its_seconds_by_phase(default_run):
    """results.json and the last line give the run's wall seconds by phase, which add up to its total, the
    start-up (interpreter and imports) included; compilation is told apart within them."""
    phases = default_run.results["phase_seconds"]
    named = {k: v for k, v in phases.items() if k not in ("compilation_within", "total")}
    assert list(named) == ["start-up", "data", "backbone", "evaluation", "rounds", "writing"]
    assert all(v >= 0 for v in named.values()) and named["start-up"] > 0.5 and named["rounds"] > 1.0
    assert abs(sum(named.values()) - phases["total"]) < 0.05
    assert 1.0 < phases["compilation_within"] < phases["total"]
    assert default_run.stdout.rstrip().splitlines()[-1].startswith("Seconds by phase: start-up ")
    # The compiled programs are kept beside the backbone cache, for a second run to load instead of compiling.
    assert len(os.listdir(default_run.workdir.parent / "xla")) > 5


def test_phases_book_each_stretch_to_its_phase():
    import time

    from fednano_jax.metrics import Phases

    phases = Phases()
    phases.seconds = {}  # this test's process started long ago
    time.sleep(0.05)
    phases.mark("data")
    time.sleep(0.02)
    phases.mark("rounds")
    phases.move(0.01, "rounds", "evaluation")
    figures = phases.report()
    assert list(figures)[:3] == ["data", "rounds", "evaluation"]
    assert figures["data"] >= 0.05 and 0.005 <= figures["rounds"] < figures["data"] and figures["evaluation"] == 0.01
    assert figures["total"] == pytest.approx(figures["data"] + figures["rounds"] + figures["evaluation"], abs=0.02)
