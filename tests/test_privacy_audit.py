"""`python -m fednano_jax.privacy_audit` end to end on tiny settings, and its attacks on known answers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from fednano_jax.privacy import wire_audit


def test_nearest_rows_and_the_inverter_name_tokens_they_have_seen():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(30, 16)).astype(np.float32)
    tokens = rng.integers(0, 30, size=200)
    np.testing.assert_array_equal(wire_audit.nearest_rows(table[tokens] + 0.01, table), tokens)
    inverter = wire_audit.train_inverter(table[tokens], tokens, 30, steps=300)
    assert wire_audit.recovery_rate(wire_audit.invert(inverter, table[tokens]), tokens) > 0.9


def test_the_audit_reports_recovery_by_defence_and_client_layers_beside_accuracy(easy_vqa_dir, tmp_path):
    workdir = tmp_path / "audit"
    result = subprocess.run(
        [sys.executable, "-m", "fednano_jax.privacy_audit", "--config=configs/easyvqa_tiny.py",
         f"--config.data.dir={easy_vqa_dir}", f"--workdir={workdir}", "--noise=0,0.5", "--client_layers=0,1",
         "--rows=16", "--public=40", "--config.fed.rounds=1", "--config.data.train_examples=200",
         "--config.data.test_examples=50", "--config.eval.batch_size=50"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((workdir / "privacy_audit.json").read_text())
    assert (workdir / "privacy_audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| client layers k | wire noise |" in (workdir / "privacy_audit.md").read_text()
    by = {(r["client_layers"], r["wire_noise"], r["a_t"], r["labels"]): r for r in rows}
    clear = by[(0, 0.0, "untrained", "server")]
    assert clear["nn_prompt"] == clear["nn_answer"] == 1.0  # A_T at identity: the table's own rows
    assert clear["labels_answer"] == 1.0 and by[(0, 0.0, "untrained", "client")]["labels_answer"] == 0.0
    noisy = by[(0, 0.5, "untrained", "client")]
    assert noisy["nn_answer"] < 1.0 and noisy["nn_prompt"] < clear["nn_prompt"]
    assert 0 < by[(0, 0.0, "trained", "client")]["accuracy"] <= 100
    prefix = by[(1, 0.0, "trained", "client")]
    assert prefix["nn_prompt"] is None and 0 <= prefix["inverter_answer"] <= 1  # hidden states: no table rows
    assert prefix["accuracy"] == pytest.approx(by[(0, 0.0, "trained", "client")]["accuracy"], abs=0.5)  # one model
    assert clear["tiny_flops"] == 0 < prefix["tiny_flops"] < prefix["llava15_7b_flops"]
    assert prefix["llava15_7b_frozen_bytes"] == 202_383_360 * 2  # one LLaMA-7B layer's weights in bf16
