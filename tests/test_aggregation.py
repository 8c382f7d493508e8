"""Aggregation as sums (federated/aggregation.py, server.py, secure.py, privacy/dp.py): Eq. 1 is one function,
every aggregator over FedNano's contributions equals the hand computation, and every combination of DP (central
or distributed), secure aggregation, heterogeneous ranks and a server optimizer, for every method, either runs
through the same round code as a real run or stops with its one sentence."""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fednano_jax.config import read
from fednano_jax.errors import ConfigError
from fednano_jax.federated.aggregation import fedavg, fisher_merge
from fednano_jax.federated.methods import METHODS, get_method
from fednano_jax.federated.rounds import RunContext, aggregate, compile_programs, initial_server_state, public_weight
from fednano_jax.federated.server import Aggregation
from fednano_jax.models.adapter_ranks import client_ranks, stacked_masks
from fednano_jax.privacy import dp as client_dp

K, RANK = 5, 4
RNG = np.random.default_rng(0)
GLOBAL = {"text": {"down": jnp.asarray(RNG.normal(size=(6, RANK)) * 0.1, jnp.float32),
                   "up": jnp.asarray(RNG.normal(size=(RANK, 6)) * 0.1, jnp.float32)}}
PARAMS = jax.tree.map(lambda g: g[None] + jnp.asarray(RNG.normal(size=(K,) + g.shape), jnp.float32), GLOBAL)
FISHERS = jax.tree.map(lambda p: jnp.asarray(RNG.gamma(0.5, 1e-3, size=p.shape), jnp.float32), PARAMS)
COUNTS = np.array([10, 20, 30, 40, 55])
TIERS = (4, 2, 1)  # client k holds rank TIERS[k % 3]


def hand_eq1(params, fishers, counts, floor=1e-6, masks=None, previous=None):
    """Eq. 1 entry by entry in float64: Σ_k w_k F_k θ_k / Σ_k w_k F_k over the clients holding the entry."""
    def one(p, f, m, old):
        importance = np.maximum(np.asarray(f, np.float64), floor) * np.asarray(m, np.float64)
        w = np.asarray(counts, np.float64).reshape((-1,) + (1,) * (p.ndim - 1))
        den = (w * importance).sum(0)
        return np.where(den > 0, (w * importance * np.asarray(p, np.float64)).sum(0) / np.where(den > 0, den, 1),
                        np.asarray(old, np.float64))
    masks = masks if masks is not None else jax.tree.map(jnp.ones_like, params)
    previous = previous if previous is not None else jax.tree.map(lambda p: jnp.zeros(p.shape[1:]), params)
    return jax.tree.map(one, params, fishers, masks, previous)


def close(a, b, atol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float64), y, rtol=1e-4, atol=atol), a, b)


def test_eq1_is_the_hand_computation_and_equal_fishers_are_fedavg():
    close(fisher_merge(PARAMS, FISHERS, COUNTS), hand_eq1(PARAMS, FISHERS, COUNTS))
    masks = stacked_masks(GLOBAL, jnp.array([TIERS[k % 3] for k in range(K)]))
    close(fisher_merge(PARAMS, FISHERS, COUNTS, masks=masks, previous=GLOBAL),
          hand_eq1(PARAMS, FISHERS, COUNTS, masks=masks, previous=GLOBAL))
    equal = jax.tree.map(lambda f: jnp.broadcast_to(f[:1], f.shape), FISHERS)
    close(fisher_merge(PARAMS, equal, COUNTS), jax.tree.map(np.asarray, fedavg(PARAMS, COUNTS)))


# ------------------------------------------------------------------ one round through rounds.aggregate
def experiment(name, dp=None, secure=False, ranks=False, server_optimizer="none", threshold=0):
    from configs.easyvqa_tiny import get_config

    config = get_config()
    config.fed.num_clients, config.fed.methods = K, (name,)
    config.model.adapter.rank = RANK
    config.model.adapter.client_ranks = TIERS if ranks else ()
    config.fed.secure_aggregation, config.fed.secagg_threshold = secure, threshold
    config.fed.server_optimizer = server_optimizer
    if dp is not None:
        config.fed.dp.update(enabled=True, noise_multiplier=0.0, clip_norm=math.inf, noise=dp)
    return config


def uploads_of(method, ranks):
    adapters = PARAMS if ranks is None else jax.tree.map(jnp.multiply, PARAMS, stacked_masks(GLOBAL, jnp.asarray(ranks)))
    trees = {} if method.name == "locft" else {"adapters": adapters}
    if "fisher" in method.uploads:
        trees["fisher"] = FISHERS
    if "control_delta" in method.uploads:
        trees["control_delta"] = jax.tree.map(lambda p: 0.01 * p, PARAMS)
    return trees


def one_round(config, reporting=(True,) * K):
    """A round as `rounds.run_round` aggregates it -> (new server state, used, costs)."""
    run, state, uploads = make_run(config)
    return aggregate(run, state, uploads, np.arange(K), np.array(reporting), 0)


def make_run(config):
    """What `rounds.run_method` sets up for the aggregation: DP settings, programs, public weight, server state."""
    config = read(config, run=False)
    fed = config.fed
    method = get_method(config.fed.methods[0], fed)
    weights = np.array([method.client_weight(n) for n in COUNTS], np.float64)
    ranks = client_ranks(config.model.adapter, K)
    dp = client_dp.settings(fed, weights)
    aggregation = Aggregation(fed.rank_aggregation, dp)
    programs = compile_programs(method, None, fed, 1, None, aggregation,
                                public_weight(dp, GLOBAL, weights, ranks, aggregation.rank_aggregation))
    state = initial_server_state(method, fed, GLOBAL, dp)
    run = RunContext(method, programs, None, None, [np.arange(n) for n in COUNTS], COUNTS, 1, config, None, ranks,
                aggregation)
    return run, state, uploads_of(method, ranks)


def test_each_aggregator_over_fednanos_contributions_equals_the_hand_computation():
    expected = hand_eq1(PARAMS, FISHERS, COUNTS, previous=GLOBAL)
    for secure in (False, True):  # plain sums, then secure aggregation (within quantisation)
        server, used, _ = one_round(experiment("fednano", secure=secure))
        assert used.all()
        close(server["adapters"], expected)
    masks = stacked_masks(GLOBAL, jnp.array([TIERS[k % 3] for k in range(K)]))
    masked_uploads = jax.tree.map(jnp.multiply, PARAMS, masks)
    for secure in (False, True):  # rank-masked sums, plain and secure
        server, _, _ = one_round(experiment("fednano", secure=secure, ranks=True))
        close(server["adapters"], hand_eq1(masked_uploads, FISHERS, COUNTS, masks=masks, previous=GLOBAL))
    mean_one = jax.tree.map(lambda f: np.maximum(np.asarray(f, np.float64), 1e-6), FISHERS)
    mean_one = jax.tree.map(lambda f: f / f.reshape(K, -1).mean(1).reshape(K, 1, 1), mean_one)
    for noise, secure in (("central", False), ("distributed", False), ("distributed", True), ("central", True)):
        server, _, _ = one_round(experiment("fednano", dp=noise, secure=secure))  # DP, no noise, no clipping
        close(server["adapters"], hand_eq1(PARAMS, mean_one, COUNTS, floor=0.0, previous=GLOBAL))


COMBINATIONS = list(itertools.product(sorted(METHODS), (None, "central", "distributed"), (False, True),
                                      (False, True), ("none", "adam")))


def refusal(name, dp, secure, ranks):
    """The sentence a combination stops with, or None: methods without sums refuse DP and secure aggregation,
    methods without per-client ranks refuse heterogeneous ranks."""
    if ranks and METHODS[name].no_ranks:
        return "model.adapter.client_ranks does not apply to " + name
    if (dp or secure) and METHODS[name].no_sums:
        return "does not apply to " + name
    return None


@pytest.fixture(scope="module")
def composition():
    """Every combination's round (or its refusal), run once for the module's tests."""
    results = {}
    for combination in COMBINATIONS:
        config = experiment(*combination[:2], secure=combination[2], ranks=combination[3],
                            server_optimizer=combination[4])
        try:
            read(config)
        except ConfigError as error:
            results[combination] = str(error)
            continue
        server, used, _ = one_round(config)
        results[combination] = (jax.tree.map(np.asarray, server), used)
    return results


def test_every_combination_runs_or_stops_with_its_sentence(composition):
    for (name, dp, secure, ranks, optimizer), result in composition.items():
        expected = refusal(name, dp, secure, ranks)
        if expected is None:
            assert not isinstance(result, str), (name, dp, secure, ranks, optimizer, result)
            server, used = result
            finite = all(np.isfinite(x).all() for x in jax.tree.leaves(server["adapters"]))
            assert used.all() and finite, (name, dp, secure, ranks, optimizer)
        else:
            assert isinstance(result, str) and expected in result, (name, dp, secure, ranks, optimizer, result)
            assert result.count(".") >= 1 and "\n" not in result


def test_secure_aggregation_and_distributed_noise_change_no_aggregate(composition):
    """Without noise or clipping: secure sums equal plain ones within quantisation, for every method, rank
    setting and server optimizer; distributed DP equals central DP; DP equals no DP for FedAvg's mean."""
    for (name, dp, secure, ranks, optimizer), result in composition.items():
        if isinstance(result, str):
            continue
        if secure:
            close(result[0]["adapters"], composition[(name, dp, False, ranks, optimizer)][0]["adapters"])
        if dp == "distributed":
            close(result[0]["adapters"], composition[(name, "central", secure, ranks, optimizer)][0]["adapters"])
        if dp and METHODS[name].contribution is METHODS["fedavg"].contribution:
            close(result[0]["adapters"], composition[(name, None, secure, ranks, optimizer)][0]["adapters"])
        if optimizer == "adam" and not METHODS[name].pooled and METHODS[name].uploads:  # it stepped (LocFT and
            # Centralized have no pseudo-gradient to follow)
            assert "server_optimizer" in result[0]


def test_distributed_noise_under_secure_aggregation_has_central_noises_mean_and_variance():
    """FedAvg and FedNano with z = 1, C = 0.5: the global adapters over 200 draws (seeds) under secure
    aggregation with each client adding its share (threshold: the whole cohort) against the server adding
    the noise: the same mean and standard deviation, entry by entry, within sampling error."""
    for name in ("fedavg", "fednano"):
        draws = {}
        for noise, secure in (("central", False), ("distributed", True)):
            config = experiment(name, dp=noise, secure=secure, threshold=K if secure else 0)
            config.fed.dp.update(noise_multiplier=1.0, clip_norm=0.5)
            run, state, uploads = make_run(config)
            draws[noise] = []
            for seed in range(200):
                run.config = dataclasses.replace(run.config, seed=seed)  # the noise keys come from (seed, round)
                server, _, _ = aggregate(run, state, uploads, np.arange(K), np.ones(K, bool), 0)
                draws[noise].append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(server["adapters"])]))
            draws[noise] = np.stack(draws[noise])
        central, distributed = draws["central"], draws["distributed"]
        std = central.std(0)
        assert np.abs(distributed.mean(0) - central.mean(0)).max() < 5 * std.max() / math.sqrt(200)
        np.testing.assert_allclose(distributed.std(0), std, rtol=0.25)
        np.testing.assert_allclose(distributed.std(0).mean(), std.mean(), rtol=0.05)
