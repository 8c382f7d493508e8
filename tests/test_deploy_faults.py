"""Faults of a deployment on this machine (slow; docs/deployment.md): a SuperNode killed while it trains is left out
and the rounds go on; the split-step server killed mid-run stops the run with the round's sentence; no process the
command started is left."""

import os
import signal
import uuid

import pytest
from deploy_helpers import deploy, finished, records, rounds_began, settings, started, training, until

pytestmark = pytest.mark.slow


def test_a_killed_supernode_is_left_out_and_a_killed_split_server_stops_the_run_with_its_sentence(easy_vqa_dir,
                                                                                                tmp_path):
    """SIGKILL to client 2's SuperNode (and the ClientApp it runs) while it trains round one: SuperLink answers for
    it after its missed heartbeats (about a minute), round one ends with clients 0 and 1, and so does round two.
    Then SIGKILL to the split-step server while round three trains: every client's link fails, so the round fails
    with the previous issue's sentence, and the command stops every process."""
    tag = uuid.uuid4().hex
    workdir = tmp_path / "deployed"
    run = deploy(workdir, 3, settings(easy_vqa_dir, 3, "--config.fed.methods=fedavg", "--config.fed.rounds=3"), tag)
    try:
        until(lambda: (rounds_began(workdir) and training(tag, 2)) or run.poll() is not None, 600,
              "client 2's training in round one")
        for pid in started(tag, "flower-supernode", "partition-id=2"):
            os.killpg(pid, signal.SIGKILL)
        until(lambda: (os.path.isdir(workdir / "checkpoints" / "fedavg" / "2") and training(tag, 0))
              or run.poll() is not None, 600, "client 0's training in round three")
        for pid in started(tag, "fednano_jax.serve"):
            os.kill(pid, signal.SIGKILL)
    finally:
        out, err = finished(run, tag, timeout=900)
    assert run.returncode != 0
    assert "Client error: the Flower run stopped (Client error: Round 3 failed: no client finished its update" in err
    rounds = [r for r in records(workdir) if r["method"] == "fedavg"]
    assert [r["failed"] for r in rounds] == [[2], [2]] and [r["used"] for r in rounds] == [[0, 1], [0, 1]]
    assert "Node Unavailable" in rounds[0]["failures"][0]
