"""Round checkpoints: round trip, refusal of other settings, corrupt and interrupted saves, kill -9 and resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, SMALL_MODEL, run_main
from fednano_jax.errors import CheckpointMismatch
from fednano_jax.federated.checkpoints import RoundCheckpoints
from fednano_jax.federated.server import reporting_clients

FINGERPRINT = {"seed": 0, "fed": {"num_clients": 5}, "model": {"adapter": {"rank": 16}}}


def state(value):
    return {"adapters": {"down": jnp.full((4, 2), value), "up": jnp.full((2, 4), value)}}


def write_rounds(directory, rounds, keep=3, fingerprint=FINGERPRINT):
    checkpoints = RoundCheckpoints(directory, keep, fingerprint)
    for r in rounds:
        checkpoints.save(r, state(float(r)), [{"round": k} for k in range(1, r + 1)])
    checkpoints.close()


def test_round_trip_keeps_the_last_few(tmp_path):
    write_rounds(tmp_path / "ck", [1, 2, 3, 4], keep=2)
    checkpoints = RoundCheckpoints(tmp_path / "ck", 2, FINGERPRINT)
    assert checkpoints.manager.all_steps() == [3, 4]
    done, restored, history = checkpoints.restore_latest(state(0.0))
    checkpoints.close()
    assert done == 4 and history == [{"round": k} for k in range(1, 5)]
    np.testing.assert_array_equal(restored["adapters"]["down"], np.full((4, 2), 4.0))


def test_checkpoint_from_other_settings_is_refused_naming_the_setting(tmp_path):
    write_rounds(tmp_path / "ck", [1])
    other = {"seed": 0, "fed": {"num_clients": 3}, "model": {"adapter": {"rank": 16}}}
    checkpoints = RoundCheckpoints(tmp_path / "ck", 3, other)
    with pytest.raises(CheckpointMismatch, match=r"written with fed.num_clients=5, but the config says 3"):
        checkpoints.restore_latest(state(0.0))
    checkpoints.close()


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    write_rounds(tmp_path / "ck", [1, 2])
    for root, _, files in os.walk(tmp_path / "ck" / "2" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    checkpoints = RoundCheckpoints(tmp_path / "ck", 3, FINGERPRINT)
    with pytest.warns(UserWarning, match="unreadable"):
        done, restored, _ = checkpoints.restore_latest(state(0.0))
    checkpoints.close()
    assert done == 1
    np.testing.assert_array_equal(restored["adapters"]["up"], np.full((2, 4), 1.0))


def test_interrupted_save_leaves_the_previous_checkpoint_usable(tmp_path):
    write_rounds(tmp_path / "ck", [1, 2])
    # What a save killed half-way leaves behind: orbax's uncommitted temporary directory.
    shutil.copytree(tmp_path / "ck" / "2", tmp_path / "ck" / "3.orbax-checkpoint-tmp-1234")
    checkpoints = RoundCheckpoints(tmp_path / "ck", 3, FINGERPRINT)
    done, _, _ = checkpoints.restore_latest(state(0.0))
    checkpoints.close()
    assert done == 2


def small_run_flags(easy_vqa_dir, tmp_path):
    """A small run of two methods with client state (LocFT's adapters, SCAFFOLD's controls) and one with server
    state beyond the adapters (SCAFFOLD's control), on a backbone pretrained for 12 steps (not the shipped one),
    with dropout."""
    return [*SMALL_MODEL, f"--config.data.dir={easy_vqa_dir}", f"--config.pretrain.cache_dir={tmp_path / 'cache'}",
            "--config.pretrain.shipped=False", "--config.pretrain.steps=12", "--config.pretrain.batch_size=16",
            "--config.data.pretrain_images=100", "--config.data.train_examples=160", "--config.data.test_examples=40",
            "--config.fed.num_clients=3", "--config.fed.methods=locft,scaffold", "--config.fed.rounds=4",
            "--config.fed.dropout=0.4", "--config.eval.batch_size=40", "--config.eval.every_rounds=2"]


def per_round(history):
    return [(r["round"], r["train_loss"], r.get("accuracy"), r["dropped"]) for r in history]


def final_checkpoint(workdir, method):
    checkpoints = RoundCheckpoints(os.path.join(workdir, "checkpoints", method), 3, {})
    meta_step = checkpoints.manager.latest_step()
    restored = checkpoints.manager.restore(meta_step)
    checkpoints.close()
    return meta_step, restored


def test_pretraining_dropout_and_a_run_killed_after_a_checkpoint_resumed_to_the_uninterrupted_result(
        easy_vqa_dir, tmp_path):
    flags = small_run_flags(easy_vqa_dir, tmp_path)
    uninterrupted = run_main(*flags, f"--workdir={tmp_path / 'a'}")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert "Pretraining the backbone" in uninterrupted.stdout
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in records] == [("untuned", 0)] + [
        (m, k) for m in ("locft", "scaffold") for k in range(1, 5)]
    assert ["accuracy" in r for r in records[1:5]] == [False, True, False, True]  # every 2 rounds and the last
    scaffold_rounds = [r for r in records if r["method"] == "scaffold"]
    assert any(r["dropped"] for r in scaffold_rounds)
    for r in scaffold_rounds:  # dropout decided per client id, as the server module draws it
        assert r["dropped"] == np.flatnonzero(~reporting_clients(np.arange(3), 0.4, 0, r["round"] - 1)).tolist()
    assert all(r["dropped"] == [] for r in records if r["method"] == "locft")  # LocFT sends nothing to lose

    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "fednano_jax.main", "--config=configs/easyvqa_tiny.py", *flags,
           f"--workdir={tmp_path / 'b'}"]
    killed = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    second_checkpoint = tmp_path / "b" / "checkpoints" / "scaffold" / "2"
    deadline = time.time() + 600
    while not second_checkpoint.is_dir() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    stdout, _ = killed.communicate()
    assert second_checkpoint.is_dir() and not (tmp_path / "b" / "results.json").exists()
    assert "Using the pretrained backbone cached in" in stdout

    resumed = run_main(*flags, f"--workdir={tmp_path / 'b'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from round" in resumed.stdout

    results = [json.loads((tmp_path / w / "results.json").read_text())["results"] for w in ("a", "b")]
    assert results[0] == results[1]
    for method in ("locft", "scaffold"):
        (step_a, ck_a), (step_b, ck_b) = final_checkpoint(tmp_path / "a", method), final_checkpoint(tmp_path / "b",
                                                                                                  method)
        assert step_a == step_b == 4
        assert per_round(ck_a["meta"]["history"]) == per_round(ck_b["meta"]["history"])
        assert set(ck_a["state"]) == {"server", "clients"}
        jax.tree.map(np.testing.assert_array_equal, ck_a["state"], ck_b["state"])
    controls = jax.tree.leaves(ck_a["state"]["server"]["control"])
    assert any(np.abs(c).max() > 0 for c in controls)  # SCAFFOLD's server state moved, and was restored

    other_rank = run_main(*flags, "--config.model.adapter.rank=8", f"--workdir={tmp_path / 'b'}")
    assert other_rank.returncode != 0
    assert other_rank.stderr.strip().splitlines()[-1].startswith("Checkpoint error: The checkpoint in ")
    assert "model.adapter.rank=16, but the config says 8" in other_rank.stderr
    assert "Mesh:" not in other_rank.stdout  # refused before the mesh, data, backbone and untuned evaluation
