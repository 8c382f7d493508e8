"""`python -m fednano_jax.deploy` on this machine (slow): the split-step server, a SuperLink with TLS and
authenticated SuperNodes, one SuperNode per client, `flwr run`. The table equals `main`'s; each fault of issue 28
(a SuperNode, the SuperLink, the split-step server killed mid-run; a SuperNode whose key is not registered) does what
docs/deployment.md says; and no process the command started is left."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from conftest import ROOT, free_port, run_main

from fednano_jax.commands.deploy import tagged_processes

pytestmark = pytest.mark.slow
SMALL = ["--config.data.train_examples=400", "--config.data.test_examples=100"]  # shorter rounds and evaluation


def settings(easy_vqa_dir, clients: int, *flags) -> list[str]:
    return [f"--config.data.dir={easy_vqa_dir}", *SMALL, f"--config.fed.num_clients={clients}", *flags]


def deploy(workdir, clients: int, config_flags: list[str], tag: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT, "FEDNANO_TEST_TAG": tag}
    return subprocess.Popen([sys.executable, "-m", "fednano_jax.deploy", "--config=configs/easyvqa_tiny.py",
                             f"--clients={clients}", f"--workdir={workdir}", *config_flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen, tag: str, timeout: float = 900) -> tuple[str, str]:
    """Its output once it ends (killed, with what it left, past `timeout`); nothing it started may remain."""
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        leftovers = tagged_processes(tag)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    assert leftovers == [], "a process the deploy command started is still running"
    return out, err


def until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.5)


def started(tag: str, *words: str) -> list[int]:
    """The tagged processes whose command line holds every word (a SuperNode, the SuperLink, the split server)."""
    return [pid for pid in tagged_processes(tag) if all(word in cmdline(pid) for word in words)]


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def training(tag: str, partition: int) -> bool:
    """Whether client `partition`'s SuperNode runs a ClientApp process now (Flower starts one per message, under
    the node's SuperExec, on the node's runtime API port)."""
    for node in started(tag, "flower-supernode", f"partition-id={partition}"):
        port = re.search(r"--port (\d+)", cmdline(node)).group(1)
        if started(tag, "flwr-clientapp", f"127.0.0.1:{port}"):
            return True
    return False


def rounds_began(workdir) -> bool:
    """The untuned evaluation is logged: the hellos are answered, and the next messages are round one's."""
    return os.path.isfile(workdir / "metrics.jsonl") and '"untuned"' in (workdir / "metrics.jsonl").read_text()


def accuracy_rows(workdir) -> dict:
    return json.loads(open(os.path.join(workdir, "results.json")).read())["results"]


def records(workdir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()]


def adapters(workdir, method: str, round_: int):
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(workdir, "checkpoints", method, str(round_), "state"))["server"][
            "adapters"]


def client_test_sizes(stdout: str) -> list[int]:
    """Each client's test examples, as a run prints them ("... test examples [49, 51]")."""
    return json.loads(re.search(r"test examples (\[[0-9, ]+\])", stdout).group(1))


def assert_tables_agree(mine: dict, theirs: dict, sizes: list[int]) -> None:
    """Every accuracy (a fraction) within one test example of its client (the split server batches and so rounds
    differently from the simulation)."""
    assert mine.keys() == theirs.keys()
    for method, row in theirs.items():
        for got, want, size in zip(mine[method]["accuracy"], row["accuracy"], sizes, strict=True):
            assert abs(got - want) <= 1.0 / size + 1e-9, (method, mine[method], row)


def assert_adapters_agree(mine, theirs, tolerance: float) -> None:
    import jax

    for got, want in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)


def test_deploy_under_secagg_equals_main_and_resumes_after_a_killed_superlink(easy_vqa_dir, tmp_path):
    """The end-to-end run on two SuperNodes, under SecAgg+, with a fault: SIGKILL to the SuperLink once round one's
    checkpoint is written. The command says so and stops everything; the same command again resumes from round one
    and ends with `main`'s table (within one test example) and adapters (within the split link's 5e-4)."""
    flags = settings(easy_vqa_dir, 2, "--config.fed.methods=fedavg", "--config.fed.rounds=2",
                     "--config.fed.secure_aggregation=True")
    workdir = tmp_path / "deployed"
    tag = uuid.uuid4().hex
    first = deploy(workdir, 2, flags, tag)
    try:
        until(lambda: os.path.isdir(workdir / "checkpoints" / "fedavg" / "1") or first.poll() is not None, 600,
              "round one's checkpoint")
        for pid in started(tag, "flower-superlink"):
            os.kill(pid, signal.SIGKILL)
    finally:
        out, err = finished(first, tag)
    assert first.returncode != 0 and "Client error: the Flower run stopped" in err, (out[-2000:], err[-2000:])
    again = deploy(workdir, 2, flags, tag)
    out, err = finished(again, tag)
    assert again.returncode == 0, err[-3000:]
    assert "Resuming from round 1 of 2" in out and "TLS, authenticated SuperNodes" in out
    assert "| FedAvg |" in out.split("Written to")[-1] or "| FedAvg |" in out
    logs = set(os.listdir(workdir / "deploy" / "logs"))
    assert {"split_server.log", "superlink.log", "supernode_0.log", "supernode_1.log", "flwr_run.log"} <= logs
    simulated = run_main(*flags, f"--workdir={tmp_path / 'simulated'}")
    assert simulated.returncode == 0, simulated.stderr[-3000:]
    assert_tables_agree(accuracy_rows(workdir), accuracy_rows(tmp_path / "simulated"), client_test_sizes(simulated.stdout))
    assert_adapters_agree(adapters(workdir, "fedavg", 2), adapters(tmp_path / "simulated", "fedavg", 2), 5e-4)


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


def test_a_supernode_whose_key_is_not_registered_is_refused(tmp_path):
    """SuperNode authentication: a SuperLink with --enable-supernode-auth refuses a node whose key nobody
    registered, and the node exits (Flower's 'Failed to activate SuperNode')."""
    from fednano_jax.serving.certificates import local_tls, node_key

    tls = local_tls(str(tmp_path / "tls"))
    private, _ = node_key(str(tmp_path / "keys"), "stranger")
    port, tag = free_port(), uuid.uuid4().hex
    env = {**os.environ, "FEDNANO_TEST_TAG": tag, "FLWR_HOME": str(tmp_path / "home")}
    bin_dir = os.path.dirname(sys.executable)
    link = subprocess.Popen([os.path.join(bin_dir, "flower-superlink"), "--disable-runtime-dependency-installation",
                             "--host", "127.0.0.1", "--port", str(port), "--ssl-certfile", tls.certificate,
                             "--ssl-keyfile", tls.key, "--ssl-ca-certfile", tls.authority, "--enable-supernode-auth"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = tmp_path / "supernode.log"
    try:
        time.sleep(3)
        with open(log, "w") as out:  # a file, not a pipe: the node's SuperExec child would hold a pipe open
            node = subprocess.Popen([os.path.join(bin_dir, "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                                     "--root-certificates", tls.authority, "--auth-supernode-private-key", private,
                                     "--host", "127.0.0.1", "--port", str(free_port()), "--max-wait-time", "60",
                                     "--node-config", "partition-id=0"], env=env, stdout=out, stderr=out,
                                    start_new_session=True)
            code = node.wait(timeout=120)
    finally:
        for group in (link.pid, node.pid if "node" in locals() else None):
            if group is not None:
                try:
                    os.killpg(group, signal.SIGTERM)
                except OSError:
                    pass
        link.wait(timeout=30)
        time.sleep(1)
        for pid in tagged_processes(tag):
            os.kill(pid, signal.SIGKILL)
    assert code != 0 and "Failed to activate SuperNode" in log.read_text()
