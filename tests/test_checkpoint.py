"""Round checkpoints: round trip, refusal of other settings, corrupt and interrupted saves, kill -9 and resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from fednano_jax.federated.checkpoints import CheckpointMismatch, RoundCheckpoints
from test_cli import ROOT, run_main

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
    return [f"--config.data.dir={easy_vqa_dir}", f"--config.pretrain.cache_dir={tmp_path / 'cache'}",
            "--config.pretrain.steps=12", "--config.pretrain.batch_size=16", "--config.data.pretrain_images=100",
            "--config.data.train_examples=160", "--config.data.test_examples=40", "--config.fed.num_clients=3",
            "--config.fed.methods=fednano", "--config.fed.rounds=5", "--config.eval.batch_size=40"]


def per_round(history):
    return [(r["round"], r["train_loss"], r.get("accuracy")) for r in history]


def final_checkpoint(workdir):
    checkpoints = RoundCheckpoints(os.path.join(workdir, "checkpoints", "fednano"), 3, {})
    meta_step = checkpoints.manager.latest_step()
    restored = checkpoints.manager.restore(meta_step)
    checkpoints.close()
    return meta_step, restored


def test_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(easy_vqa_dir, tmp_path):
    flags = small_run_flags(easy_vqa_dir, tmp_path)
    uninterrupted = run_main(*flags, f"--workdir={tmp_path / 'a'}")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "fednano_jax.main", "--config=configs/easyvqa_tiny.py", *flags,
           f"--workdir={tmp_path / 'b'}"]
    killed = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_checkpoint = tmp_path / "b" / "checkpoints" / "fednano" / "2"
    deadline = time.time() + 600
    while not first_checkpoint.is_dir() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert first_checkpoint.is_dir() and not (tmp_path / "b" / "results.json").exists()

    resumed = run_main(*flags, f"--workdir={tmp_path / 'b'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from round" in resumed.stdout

    results = [json.loads((tmp_path / w / "results.json").read_text())["results"] for w in ("a", "b")]
    assert results[0] == results[1]
    (step_a, ck_a), (step_b, ck_b) = final_checkpoint(tmp_path / "a"), final_checkpoint(tmp_path / "b")
    assert step_a == step_b == 5
    assert per_round(ck_a["meta"]["history"]) == per_round(ck_b["meta"]["history"])
    for name in ("down", "up"):
        for side in ("adapter_image", "adapter_text"):
            np.testing.assert_array_equal(ck_a["state"]["server"]["adapters"]["edge"][side][name],
                                          ck_b["state"]["server"]["adapters"]["edge"][side][name])

    other_rank = run_main(*flags, "--config.model.adapter.rank=8", f"--workdir={tmp_path / 'b'}")
    assert other_rank.returncode != 0
    assert other_rank.stderr.strip().splitlines()[-1].startswith("Checkpoint error: The checkpoint in ")
    assert "model.adapter.rank=16, but the config says 8" in other_rank.stderr
