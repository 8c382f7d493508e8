"""FedNano's ServerApp (`pyproject.toml`'s `serverapp`): the experiment's rounds, aggregation, checkpoints and report,
its clients on Flower's SuperNodes.

It runs what `python -m fednano_jax.main --split_server` runs (`experiment.run_experiment`), with the clients' rounds
going through Flower's Grid to one SuperNode per client (`flower/supernodes.py`) instead of to processes of its own:
the same cohorts (the run's streams), the same schedules, the same aggregation and checkpoints, so the same table.
It evaluates as that command does: NanoEdge alone here, decoding each client's test rows as that client over the
split link. Its run config (`flwr run . FEDERATION --run-config "key=value ..."`; defaults in pyproject.toml):
    config            the experiment: a config file (configs/*.py) or the JSON `python -m fednano_jax.deploy` writes
    overrides         a JSON object of dotted config keys -> values, applied to `config` ('{"fed.rounds": 2}')
    workdir           where checkpoints, metrics.jsonl, TensorBoard and results.* go; rerunning resumes there
    split-address     HOST:PORT of the split-step server (`python -m fednano_jax.serve`)
    split-tokens      optional: the server's --tokens file (client id -> token), to decode as each client
    split-root-cert   optional: the server's PEM certificate (TLS)
    node-timeout-s    how long to wait for fed.num_clients SuperNodes and their first answer
    round-timeout-s   how long a round waits for its clients before leaving out those that did not answer
"""

from __future__ import annotations

import json
import os

import ml_collections
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fednano_jax.config import load_config_file, read
from fednano_jax.errors import LABELS, ConfigError, label_of
from fednano_jax.experiment import run_experiment
from fednano_jax.flower.supernodes import FlowerClients
from fednano_jax.serving.client_processes import SplitLink

app = ServerApp()


def experiment_config(run_config) -> ml_collections.ConfigDict:
    """The run config's `config` file (.py or .json) with its `overrides` applied."""
    path = checkout_path(str(run_config.get("config", "")))
    if path.endswith(".json"):
        if not os.path.isfile(path):
            raise ConfigError(f"run config 'config' names {path!r}, which does not exist.")
        with open(path) as file:
            config = ml_collections.ConfigDict(json.load(file))
    else:
        config = load_config_file(path)
    overrides = str(run_config.get("overrides", "") or "{}")
    try:
        pairs = json.loads(overrides)
    except json.JSONDecodeError:
        raise ConfigError(f"run config 'overrides' must be a JSON object of dotted keys, got {overrides!r}.") from None
    for key, value in pairs.items():
        node, *path_to, last = [config, *key.split(".")]
        for part in path_to:
            if part not in node:
                raise ConfigError(f"run config 'overrides' names {key!r}, which is no config key.")
            node = node[part]
        if last not in node:
            raise ConfigError(f"run config 'overrides' names {key!r}, which is no config key.")
        if isinstance(node[last], tuple) and isinstance(value, (str, list)):  # "a,b" as the command line takes it
            value = tuple(value.split(",") if isinstance(value, str) else value)
        try:
            node[last] = value
        except TypeError:
            raise ConfigError(f"run config 'overrides' sets {key!r} to {value!r}, but it holds a "
                              f"{type(node[last]).__name__}.") from None
    return config


def checkout_path(path: str) -> str:
    """A relative path as given when it exists from here, else from the checkout fednano_jax is imported from (a
    ServerApp runs from Flower's app directory)."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), path)


def check_flower(config) -> None:
    """What a run on SuperNodes cannot do, one sentence each."""
    fed = config.fed
    if fed.dropout:
        raise ConfigError("SuperNodes drop out for real (a failed or late client is left out of its round); "
                          "fed.dropout simulates dropouts and must be 0 on Flower.")
    if fed.secure_aggregation:
        if fed.cohort_size < 2:
            raise ConfigError("Flower's SecAgg+ needs at least 2 clients a round; raise fed.clients_per_round.")
        from fednano_jax.federated.methods import get_method

        for name in fed.methods:
            if get_method(name, fed, config.seed).client_state_init({}) is not None:
                raise ConfigError(f"{name} keeps client state that would reach the ServerApp in the clear beside "
                                  "SecAgg+'s sums; run it without fed.secure_aggregation.")


def split_link(run_config) -> SplitLink:
    address = str(run_config.get("split-address", ""))
    if ":" not in address:
        raise ConfigError(f"run config 'split-address' must be HOST:PORT of the split-step server, got {address!r}.")
    tokens, certificate = None, None
    if run_config.get("split-tokens"):
        with open(str(run_config["split-tokens"])) as file:
            tokens = {int(client): token for client, token in json.load(file).items()}
    if run_config.get("split-root-cert"):
        with open(str(run_config["split-root-cert"]), "rb") as file:
            certificate = file.read()
    return SplitLink(address, tokens, certificate)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run(grid, context.run_config)
    except tuple(LABELS) as error:  # the sentence first, for `flwr run --stream` and the deploy command
        print(f"{label_of(error)}: {error}", flush=True)
        raise


def run(grid: Grid, run_config) -> None:
    config = read(experiment_config(run_config))
    check_flower(config)
    workdir = str(run_config.get("workdir", "runs/flower"))
    node_timeout = float(run_config.get("node-timeout-s", 600))
    round_timeout = float(run_config.get("round-timeout-s", 1800))

    def supernodes(experiment, workdir, link):
        return FlowerClients(grid, experiment.fed.num_clients, json.dumps(experiment.as_dict()), node_timeout,
                             round_timeout)

    run_experiment(config, workdir, split_link(run_config), clients=supernodes)
