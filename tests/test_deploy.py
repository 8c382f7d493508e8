"""`python -m fednano_jax.deploy` on this machine (slow): the split-step server, a SuperLink with TLS and
authenticated SuperNodes, one SuperNode per client, `flwr run`. Under SecAgg+ its table and adapters equal `main`'s,
also after a killed SuperLink and a rerun; a SuperNode whose key is not registered is refused. (The other faults:
test_deploy_faults.py, a file of its own so that the two test workers share the deployments.)"""

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from conftest import free_port, run_main
from deploy_helpers import (accuracy_rows, adapters, assert_adapters_agree, assert_tables_agree, client_test_sizes,
                            deploy, finished, settings, started, until)

from fednano_jax.serving.local_host import tagged_processes

pytestmark = pytest.mark.slow


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
    assert_tables_agree(accuracy_rows(workdir), accuracy_rows(tmp_path / "simulated"),
                        client_test_sizes(simulated.stdout))
    assert_adapters_agree(adapters(workdir, "fedavg", 2), adapters(tmp_path / "simulated", "fedavg", 2), 5e-4)


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
