"""The round loop: broadcast, local updates, (Fisher), aggregate, evaluate, log."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np
import optax
from tqdm import tqdm

from fednano_jax.federated.client import make_client_updates
from fednano_jax.federated.fisher import make_client_fishers
from fednano_jax.federated.methods import Method

OPTIMIZERS = {"adamw": lambda lr: optax.adamw(lr, weight_decay=0.0), "sgd": optax.sgd, "adam": optax.adam}


def client_schedule(client_rows: list[np.ndarray], batch_size: int, epochs: int, seed: int, round_index: int):
    """-> rows, valid [K, steps, batch]: each client's shuffled epochs, padded to the longest client.

    Steps are the same in every round, so the round program compiles once.
    """
    steps = max(-(-len(r) // batch_size) for r in client_rows) * epochs
    rows = np.zeros((len(client_rows), steps, batch_size), np.int32)
    valid = np.zeros_like(rows, bool)
    for k, client in enumerate(client_rows):
        rng = np.random.default_rng([seed, round_index, k])
        batches = []
        for _ in range(epochs):
            order = rng.permutation(client)
            padded = np.full(-(-len(order) // batch_size) * batch_size, -1)
            padded[: len(order)] = order
            batches.append(padded.reshape(-1, batch_size))
        client_batches = np.concatenate(batches)
        rows[k, : len(client_batches)] = np.maximum(client_batches, 0)
        valid[k, : len(client_batches)] = client_batches >= 0
    return rows, valid


def make_optimizer(fed) -> optax.GradientTransformation:
    if fed.optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown fed.optimizer {fed.optimizer!r}; expected one of {sorted(OPTIMIZERS)}.")
    return OPTIMIZERS[fed.optimizer](fed.learning_rate)


@dataclasses.dataclass
class RunResult:
    adapters: object
    history: list[dict]


def run_federated(method: Method, graphdef, frozen, init_adapters, device_data: dict,
                  client_rows: list[np.ndarray], config, evaluate: Callable, log: Callable) -> RunResult:
    fed = config.fed
    vmapped, sequential = make_client_updates(graphdef, make_optimizer(fed))
    update_clients = vmapped if fed.mode == "vmap" else sequential
    client_fishers = make_client_fishers(graphdef) if method.needs_fisher else None
    num_examples = np.array([len(r) for r in client_rows])
    global_adapters, history = init_adapters, []
    for round_index in tqdm(range(fed.rounds), desc=f"{method.label} rounds", unit="round"):
        start = time.perf_counter()
        rows, valid = client_schedule(client_rows, fed.batch_size, fed.local_epochs, config.seed, round_index)
        client_adapters, losses = update_clients(global_adapters, frozen, device_data, rows, valid)
        fishers = None
        if client_fishers is not None:
            fisher_rows, fisher_valid = client_schedule(client_rows, fed.batch_size, 1, config.seed, round_index)
            fishers = client_fishers(client_adapters, frozen, device_data, fisher_rows, fisher_valid)
        global_adapters = method.aggregate(client_adapters, fishers, num_examples, fed)
        jax.block_until_ready(global_adapters)
        record = {"method": method.name, "round": round_index + 1, "train_loss": np.asarray(losses).tolist(),
                  "round_seconds": time.perf_counter() - start}
        if config.eval.every_rounds and (round_index + 1) % config.eval.every_rounds == 0 or round_index + 1 == fed.rounds:
            record.update(evaluate(global_adapters))
        history.append(record)
        log(record)
    return RunResult(global_adapters, history)
