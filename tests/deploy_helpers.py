"""What the deployment tests (test_deploy.py, test_deploy_faults.py) share: `python -m fednano_jax.deploy` started and
waited for, the processes it started found by an environment tag, and its results read back."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
from conftest import ROOT

from fednano_jax.serving.local_host import tagged_processes

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


