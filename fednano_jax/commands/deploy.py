"""`python -m fednano_jax.deploy --config=configs/easyvqa_tiny.py --clients=3 [--workdir=W] [--config.* overrides]`:
a whole FedNano federation on this machine, on Flower.

It starts, each as its own process with its log in W/deploy/logs/:
  - the split-step server (`python -m fednano_jax.serve`: the frozen decoder), TLS, a token per client;
  - a SuperLink (Flower's server: TLS, SuperNode authentication), its state in memory;
  - one SuperNode per client (`--clients` sets fed.num_clients), each with its registered key and its node config
    (partition-id, the split server's address, its token's file, the CA);
then runs the app (`flwr run`, pyproject.toml: fednano_jax/flower/), prints the results table and stops every process
it started, also on an error or Ctrl-C. Rerunning the same command resumes from W's last round checkpoint. With
--insecure the links are plaintext and SuperNodes unauthenticated (for debugging on this machine only).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid

from absl import flags

from fednano_jax.errors import LABELS, ConfigError
from fednano_jax.serving.local_host import free_port, tagged_processes

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONNECTION = "fednano-local"  # the SuperLink connection in W/deploy/flwr_home/config.toml
TAG = "FEDNANO_DEPLOY_TAG"  # in every started process's environment: how the stop finds their descendants too
FAILED = "ServerApp raised an exception"  # what `flwr run --stream` prints when the ServerApp fails (its code stays 0)
SENTENCES = tuple(f"{label}: " for label in set(LABELS.values()))  # the ServerApp's error sentence (server_app.main)


def define_flags() -> None:
    from fednano_jax.commands import cli

    cli.define_config_flag()
    flags.DEFINE_integer("clients", None, "SuperNodes to start, one per client: sets fed.num_clients.")
    flags.DEFINE_string("workdir", None, "Where results, checkpoints and every process's log go "
                        "(default: runs/<config.name>-flower); rerunning into it resumes.")
    flags.DEFINE_bool("insecure", False, "Plaintext links and no SuperNode authentication (debugging only).")
    flags.DEFINE_float("round_timeout_s", 1800.0, "How long a round waits for its clients before leaving out those "
                       "that did not answer (a killed SuperNode is reported by Flower after about 60 s).")
    flags.DEFINE_float("start_timeout_s", 600.0, "How long each process may take to start.")
    flags.DEFINE_string("timing_out", None, "Also run the same experiment simulated (python -m fednano_jax.main, "
                        "into WORKDIR/simulated) and write a round's wall time, deployed against simulated, with the "
                        "gap broken down (client start-up, training over the split link, Flower's round trips), to "
                        "this JSON file.")


def main() -> None:
    from fednano_jax.config import read

    config = FLAGS.config
    if FLAGS.clients is not None:
        if FLAGS.clients < 1:
            raise ConfigError(f"--clients must be at least 1, got {FLAGS.clients}.")
        config.fed.num_clients = FLAGS.clients
    experiment = read(config)
    from fednano_jax.flower.server_app import check_flower

    check_flower(experiment)
    workdir = os.path.abspath(FLAGS.workdir or os.path.join("runs", f"{config.name}-flower"))
    from fednano_jax.experiment import prepare_workdir

    prepare_workdir(workdir)
    federation = LocalFederation(experiment, workdir, secure=not FLAGS.insecure, start_timeout_s=FLAGS.start_timeout_s)
    stop_on_sigterm()
    try:
        federation.start(forwarded_config_flags())
        federation.run_app(FLAGS.round_timeout_s)
    finally:
        federation.stop()
    with open(os.path.join(workdir, "results.md")) as file:
        print(f"\n{file.read().strip()}\n\nWritten to {workdir}/results.md and results.json; logs in "
              f"{federation.logs}")
    if FLAGS.timing_out:
        write_timing(workdir, FLAGS.timing_out)


def write_timing(workdir: str, out: str) -> None:
    """Run the experiment simulated into WORKDIR/simulated, then write and print `round_timing`'s figures."""
    simulated = os.path.join(workdir, "simulated")
    print(f"Running the same experiment simulated (python -m fednano_jax.main, into {simulated}) for the timing",
          flush=True)
    command = [sys.executable, "-m", "fednano_jax.main", *forwarded_config_flags(), f"--workdir={simulated}"]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"the simulated run for --timing_out failed: {done.stderr.strip().splitlines()[-1]}")
    figures = round_timing(_records(workdir), _records(simulated))
    with open(out, "w") as file:
        json.dump({"command": " ".join(["python -m fednano_jax.deploy", *sys.argv[1:]]),
                   "date": time.strftime("%Y-%m-%d"), "methods": figures}, file, indent=1)
    print("\nSeconds per round (means over rounds): deployed, simulated, and the gap's parts")
    print("| Method | deployed | simulated | client start-up | split-link training beyond simulated "
          "| Flower round trips |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, f in figures.items():
        print(f"| {method} | {f['deployed_round_seconds']:.1f} | {f['simulated_round_seconds']:.1f} | "
              f"{f['client_start_up_seconds']:.1f} | {f['split_link_training_beyond_simulated_seconds']:.1f} | "
              f"{f['flower_round_trip_seconds']:.1f} |")
    print(f"Written to {out}")


def _records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file if line.strip()]


def round_timing(deployed: list[dict], simulated: list[dict]) -> dict:
    """Per method, means over its rounds (seconds): a round's wall time deployed (as the ServerApp times it) and
    simulated, and the gap's parts, which sum to the deployed round: client start-up (the slowest client's ClientApp
    process, from its start to NanoEdge and the data loaded), training over the split link beyond the simulated
    round (the slowest client's training, link and server included, less the simulated round), and Flower's round
    trips (the rest: polling, message transfer, starting the ClientApp processes)."""
    def mean(values):
        return sum(values) / len(values)

    figures = {}
    for method in sorted({r["method"] for r in deployed if "client_start_seconds" in r}):
        mine = [r for r in deployed if r["method"] == method and "client_start_seconds" in r]
        theirs = [r for r in simulated if r["method"] == method and "round_seconds" in r]
        deployed_round = mean([r["round_seconds"] + r.get("compile_seconds", 0.0) for r in mine])
        simulated_round = mean([r["round_seconds"] + r.get("compile_seconds", 0.0) for r in theirs])
        start = mean([max(r["client_start_seconds"]) for r in mine])
        train = mean([max(r["client_train_seconds"]) for r in mine])
        figures[method] = {"rounds": len(mine), "deployed_round_seconds": deployed_round,
                           "simulated_round_seconds": simulated_round, "client_start_up_seconds": start,
                           "split_link_training_beyond_simulated_seconds": train - simulated_round,
                           "flower_round_trip_seconds": deployed_round - start - train}
    return figures


def forwarded_config_flags() -> list[str]:
    """The command line's --config and --config.* flags, and fed.num_clients, for the split-step server."""
    forwarded = [arg for arg in sys.argv[1:] if arg.startswith("--config")]
    return forwarded + [f"--config.fed.num_clients={FLAGS.config.fed.num_clients}"]


def stop_on_sigterm() -> None:
    """SIGTERM ends the command as Ctrl-C does: through its `finally`, which stops every process."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


class LocalFederation:
    """The split-step server, a SuperLink and a SuperNode per client on 127.0.0.1, and `flwr run`."""

    def __init__(self, experiment, workdir: str, secure: bool, start_timeout_s: float):
        self.experiment, self.workdir, self.secure = experiment, workdir, secure
        self.start_timeout_s = start_timeout_s
        self.base = os.path.join(workdir, "deploy")
        self.logs = os.path.join(self.base, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.tag = uuid.uuid4().hex
        self.started: list[tuple[str, subprocess.Popen, object]] = []
        self.env = {**os.environ, TAG: self.tag, "FLWR_HOME": os.path.join(self.base, "flwr_home"),
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
                    "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}

    # ------------------------------------------------------------------------------------------- start
    def start(self, config_flags: list[str]) -> None:
        from fednano_jax.data import datasets

        print(f"Deploying {self.experiment.fed.num_clients} clients on Flower on this machine "
              f"({'TLS, authenticated SuperNodes' if self.secure else 'INSECURE: plaintext, no authentication'}); "
              f"logs in {self.logs}", flush=True)
        datasets.load_splits(self.experiment)  # built once here, before the processes that read it
        self.experiment_file = os.path.join(self.base, "experiment.json")
        with open(self.experiment_file, "w") as file:
            json.dump(self.experiment.as_dict(), file, indent=1)
        self.tls = None
        if self.secure:
            from fednano_jax.serving.certificates import local_tls

            self.tls = local_tls(os.path.join(self.base, "tls"))
        self._start_split_server(config_flags)
        self._start_superlink()
        self._start_supernodes()

    def _start_split_server(self, config_flags: list[str]) -> None:
        tokens = {k: secrets.token_hex(16) for k in range(self.experiment.fed.num_clients)}
        directory = os.path.join(self.base, "tokens")
        os.makedirs(directory, exist_ok=True)
        self.tokens_file = self._private(os.path.join(directory, "all.json"), json.dumps(tokens))
        self.token_files = [self._private(os.path.join(directory, f"client_{k}"), token) for k, token in tokens.items()]
        self.split_address = f"127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "fednano_jax.serve", *config_flags,
                   f"--port={self.split_address.split(':')[1]}", f"--tokens={self.tokens_file}"]
        if self.tls:
            command += [f"--tls_cert={self.tls.certificate}", f"--tls_key={self.tls.key}"]
        self._spawn("split_server", command)
        self._wait(lambda: "Serving split steps" in self._log("split_server"), "the split-step server", "split_server")

    def _start_superlink(self) -> None:
        self.superlink_port = free_port()
        command = ["flower-superlink", "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                   "--port", str(self.superlink_port)]  # its state in memory: each run registers its nodes anew
        command += (["--ssl-certfile", self.tls.certificate, "--ssl-keyfile", self.tls.key, "--ssl-ca-certfile",
                     self.tls.authority, "--enable-supernode-auth"] if self.tls else ["--insecure"])
        self._spawn("superlink", command)
        self._wait(self._superlink_healthy, "the SuperLink", "superlink")
        self._write_connection()

    def _superlink_healthy(self) -> bool:
        scheme = "https" if self.tls else "http"
        context = ssl.create_default_context(cafile=self.tls.authority) if self.tls else None
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{self.superlink_port}/health", timeout=2,
                                        context=context) as answer:
                return answer.status == 200
        except OSError:
            return False

    def _write_connection(self) -> None:
        home = self.env["FLWR_HOME"]
        os.makedirs(home, exist_ok=True)
        security = f'root-certificates = "{self.tls.authority}"' if self.tls else "insecure = true"
        with open(os.path.join(home, "config.toml"), "w") as file:
            file.write(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                       f'address = "127.0.0.1:{self.superlink_port}"\n{security}\n')

    def _start_supernodes(self) -> None:
        from fednano_jax.serving.certificates import node_key

        for k in range(self.experiment.fed.num_clients):
            settings = [f"partition-id={k}", f"split-address='{self.split_address}'",
                        f"split-token-file='{self.token_files[k]}'"]
            command = ["flower-supernode", "--superlink", f"127.0.0.1:{self.superlink_port}", "--host", "127.0.0.1",
                       "--port", str(free_port()), "--max-wait-time", str(int(self.start_timeout_s))]
            if self.tls:
                private, public = node_key(os.path.join(self.base, "node_keys"), f"client_{k}")
                self._flwr(["supernode", "register", public, CONNECTION, "--name", f"client_{k}"], f"register_{k}")
                settings.append(f"split-root-cert='{self.tls.authority}'")
                command += ["--root-certificates", self.tls.authority, "--auth-supernode-private-key", private]
            else:
                command.append("--insecure")
            self._spawn(f"supernode_{k}", command + ["--node-config", " ".join(settings)])

    # --------------------------------------------------------------------------------------------- run
    def run_app(self, round_timeout_s: float) -> None:
        """`flwr run` of this checkout's app, its output streamed here and to the log; a failed ServerApp (Flower's
        exit code stays 0) is a ClientProcessError with the log's name."""
        from fednano_jax.errors import ClientProcessError

        run_config = {"config": self.experiment_file, "workdir": self.workdir, "split-address": self.split_address,
                      "split-tokens": self.tokens_file, "round-timeout-s": float(round_timeout_s),
                      "node-timeout-s": float(self.start_timeout_s)}
        if self.tls:
            run_config["split-root-cert"] = self.tls.authority
        text = " ".join(f"{key}={json.dumps(value)}" for key, value in run_config.items())
        name, log_path = "flwr_run", os.path.join(self.logs, "flwr_run.log")
        started = time.time()
        with open(log_path, "w") as log:
            run = subprocess.Popen(["flwr", "run", ROOT, CONNECTION, "--stream", "--run-config", text], cwd=ROOT,
                                   env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
            self.started.append((name, run, None))
            failed, said = False, ""
            for line in run.stdout:
                log.write(line)
                log.flush()
                print(line, end="", flush=True)
                failed |= FAILED in line
                said = line.strip() if line.startswith(SENTENCES) else said
            code = run.wait()
        results = os.path.join(self.workdir, "results.md")
        if failed or code != 0 or not os.path.isfile(results) or os.path.getmtime(results) < started:
            raise ClientProcessError(f"the Flower run stopped ({said or f'exit code {code}'}); see {log_path} and the "
                                     f"other logs in {self.logs}. Rerunning the same command resumes from the last "
                                     "round checkpoint.")

    # -------------------------------------------------------------------------------------- processes
    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.logs, f"{name}.log"), "w")
        try:
            process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as error:
            log.close()
            raise ConfigError(f"could not start {name} ({command[0]}: {error.strerror}); is requirements-deploy.txt "
                              "installed in this environment?") from None
        self.started.append((name, process, log))
        return process

    def _flwr(self, arguments: list[str], name: str) -> None:
        from fednano_jax.errors import ClientProcessError

        log_path = os.path.join(self.logs, f"{name}.log")
        with open(log_path, "w") as log:
            done = subprocess.run(["flwr", *arguments], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=120)
        if done.returncode != 0:
            raise ClientProcessError(f"flwr {arguments[0]} {arguments[1]} failed; see {log_path}.")

    def _wait(self, ready, what: str, name: str) -> None:
        from fednano_jax.errors import ClientProcessError

        process = next(p for n, p, _ in self.started if n == name)
        deadline = time.monotonic() + self.start_timeout_s
        while not ready():
            if process.poll() is not None:
                raise ClientProcessError(f"{what} exited (code {process.returncode}) before it was ready; see "
                                         f"{os.path.join(self.logs, name + '.log')}.")
            if time.monotonic() > deadline:
                raise ClientProcessError(f"{what} was not ready within {self.start_timeout_s:.0f} s; see "
                                         f"{os.path.join(self.logs, name + '.log')}.")
            time.sleep(0.5)

    def stop(self, grace_s: float = 15.0) -> None:
        """Every process started here and every one they started (found by the environment tag, also those Flower
        starts in sessions of their own): SIGTERM, then SIGKILL to those left after `grace_s`."""
        for _, process, _ in reversed(self.started):
            _signal_group(process.pid, signal.SIGTERM)
        for pid in tagged_processes(self.tag):
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while tagged_processes(self.tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in tagged_processes(self.tag):
            _signal(pid, signal.SIGKILL)
        for _, process, log in self.started:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            if log is not None:
                log.close()

    def _log(self, name: str) -> str:
        with open(os.path.join(self.logs, f"{name}.log"), errors="replace") as file:
            return file.read()

    @staticmethod
    def _private(path: str, text: str) -> str:
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
            file.write(text)
        return path


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except OSError:
        pass


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError:
        pass
