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
    found = []
    for pid in tagged_processes(tag):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                line = file.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if all(word in line for word in words):
            found.append(pid)
    return found


def log_has(workdir, name: str, text: str) -> bool:
    path = os.path.join(workdir, "deploy", "logs", f"{name}.log")
    return os.path.isfile(path) and text in open(path, errors="replace").read()


def accuracy_rows(workdir) -> dict:
    return json.loads(open(os.path.join(workdir, "results.json")).read())["results"]


def records(workdir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()]


def adapters(workdir, method: str, round_: int):
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(workdir, "checkpoints", method, str(round_), "state"))["server"][
            "adapters"]


def test_sizes(stdout: str) -> list[int]:
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


def test_deploy_gives_mains_table_on_two_supernodes_and_stops_every_process(easy_vqa_dir, tmp_path):
    """The acceptance run, smaller: 2 SuperNodes, 1 round of FedAvg and FedNano."""
    tag = uuid.uuid4().hex
    flags = settings(easy_vqa_dir, 2, "--config.fed.methods=fedavg,fednano", "--config.fed.rounds=1")
    out, err = finished(deploy(tmp_path / "deployed", 2, flags, tag), tag)
    assert "Written to" in out, err[-3000:]
    assert "TLS, authenticated SuperNodes" in out and "| FedNano |" in out.split("Written to")[-2]
    simulated = run_main(*flags, f"--workdir={tmp_path / 'simulated'}")
    assert simulated.returncode == 0, simulated.stderr[-3000:]
    assert_tables_agree(accuracy_rows(tmp_path / "deployed"), accuracy_rows(tmp_path / "simulated"),
                        test_sizes(simulated.stdout))
    for method in ("fedavg", "fednano"):
        assert_adapters_agree(adapters(tmp_path / "deployed", method, 1), adapters(tmp_path / "simulated", method, 1),
                              5e-4)
    logs = sorted(os.listdir(tmp_path / "deployed" / "deploy" / "logs"))
    assert {"split_server.log", "superlink.log", "supernode_0.log", "supernode_1.log", "flwr_run.log"} <= set(logs)


def test_a_killed_superlink_stops_the_run_and_the_same_command_resumes_to_the_uninterrupted_adapters(
        easy_vqa_dir, tmp_path):
    """Under SecAgg+: SIGKILL to the SuperLink once round one's checkpoint is written; the command says so and stops
    everything; rerun, it resumes from round one and ends where the uninterrupted (simulated) run ends."""
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
    assert "Resuming from round 1 of 2" in out
    simulated = run_main(*flags, f"--workdir={tmp_path / 'simulated'}")
    assert simulated.returncode == 0, simulated.stderr[-3000:]
    assert_adapters_agree(adapters(workdir, "fedavg", 2), adapters(tmp_path / "simulated", "fedavg", 2), 5e-4)


def test_a_killed_supernode_is_left_out_of_its_rounds_and_the_others_go_on(easy_vqa_dir, tmp_path):
    """SIGKILL to client 2's SuperNode (and the ClientApp it runs) once the rounds start: Flower answers for it
    after its missed heartbeats (about a minute), round one ends with clients 0 and 1, and so does round two."""
    tag = uuid.uuid4().hex
    workdir = tmp_path / "deployed"
    run = deploy(workdir, 3, settings(easy_vqa_dir, 3, "--config.fed.methods=fedavg", "--config.fed.rounds=2"), tag)
    try:
        until(lambda: log_has(workdir, "flwr_run", "FedAvg rounds") or run.poll() is not None, 600, "the rounds")
        for pid in started(tag, "flower-supernode", "partition-id=2"):
            os.killpg(pid, signal.SIGKILL)
    finally:
        out, err = finished(run, tag, timeout=900)
    assert run.returncode == 0, err[-3000:]
    rounds = [r for r in records(workdir) if r["method"] == "fedavg"]
    assert [r["failed"] for r in rounds] == [[2], [2]] and [r["used"] for r in rounds] == [[0, 1], [0, 1]]
    assert "did not answer" in rounds[0]["failures"][0] or "reported" in rounds[0]["failures"][0]


def test_a_killed_split_server_stops_the_run_with_the_rounds_sentence(easy_vqa_dir, tmp_path):
    """The previous issue's behaviour under Flower: every client's link fails, so the round fails with one sentence
    naming it, and the command stops every process."""
    tag = uuid.uuid4().hex
    workdir = tmp_path / "deployed"
    run = deploy(workdir, 2, settings(easy_vqa_dir, 2, "--config.fed.methods=fedavg", "--config.fed.rounds=1"), tag)
    try:
        until(lambda: log_has(workdir, "flwr_run", "FedAvg rounds") or run.poll() is not None, 600, "the rounds")
        for pid in started(tag, "fednano_jax.serve"):
            os.kill(pid, signal.SIGKILL)
    finally:
        out, err = finished(run, tag)
    assert run.returncode != 0
    assert "Client error: the Flower run stopped (Client error: Round 1 failed: no client finished its update" in err


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
