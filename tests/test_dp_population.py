"""DP at population scale (privacy/accountant.py, privacy/ftrl.py, federated/schedule.py): Poisson and cyclic
cohorts, DP-FTRL's correlated noise, and ε per round equal to the accountant libraries' own for both mechanisms."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_privacy.accounting import accountants, analysis

from conftest import fed_of
from fednano_jax.errors import ConfigError
from fednano_jax.federated.schedule import cyclic_groups, poisson_cohort, round_cohort
from fednano_jax.privacy import accountant, ftrl
from fednano_jax.privacy import dp as client_dp

DELTA = 1e-5
# jax-privacy's RDP accountant at dp-accounting's default orders (its own default grid is coarser)
RDP = accountants.RdpAccountantConfig(orders=dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


def single_release(noise_multiplier: float) -> float:
    """jax-privacy's ε for un-amplified DP-FTRL: one Gaussian release."""
    params = analysis.DpParams(noise_multipliers=noise_multiplier, num_samples=100, delta=DELTA, batch_size=10)
    return analysis.SingleReleaseTrainingAccountant(RDP).compute_epsilon(1, params)


def test_poisson_cohorts_draw_each_client_at_rate_q_and_truncate_at_the_capacity():
    sizes, seen = [], np.zeros(200)
    for round_index in range(300):
        ids, sampled = poisson_cohort(200, 0.1, 30, seed=0, round_index=round_index)
        assert len(ids) == 30 and len(set(ids.tolist())) == 30  # fillers are other clients, never a repeat
        assert sampled[: sampled.sum()].all() and not sampled[sampled.sum():].any()
        sizes.append(int(sampled.sum()))
        seen[ids[sampled]] += 1
    assert np.mean(sizes) == pytest.approx(20, abs=0.6)  # 200 x 0.1, std of the mean 0.25
    assert seen.min() > 10 and seen.max() < 55  # every client at about 300 x 0.1
    truncated = [poisson_cohort(200, 0.1, 15, 0, r)[1].sum() for r in range(50)]
    assert max(truncated) == 15  # draws of more than 15 were cut to 15
    again = poisson_cohort(200, 0.1, 30, seed=0, round_index=7)
    np.testing.assert_array_equal(again[0], poisson_cohort(200, 0.1, 30, 0, 7)[0])  # a resumed run draws the same


def test_cyclic_cohorts_give_each_client_one_turn_per_cycle():
    groups = cyclic_groups(12, 4, seed=3)
    assert groups.shape == (4, 3) and sorted(groups.ravel().tolist()) == list(range(12))
    fed = fed_of(num_clients=12, clients_per_round=3, cohort_sampling="cyclic")
    turns = np.zeros(12)
    for round_index in range(8):
        ids, sampled = round_cohort(fed, 12, 3, round_index)
        assert sampled.all()
        turns[ids] += 1
        np.testing.assert_array_equal(ids, groups[round_index % 4])
    assert (turns == 2).all()


@pytest.mark.parametrize("rounds", [1, 7, 20])
def test_epsilon_per_round_is_the_libraries_own_for_each_participation(rounds):
    z = 1.1
    poisson = accountant.Participation("poisson", 1000, 100, 130)
    ledger = dp_accounting.pld.PLDAccountant()
    ledger.compose(dp_accounting.TruncatedSubsampledGaussianDpEvent(1000, 0.1, 130, z), rounds)
    assert accountant.epsilon(z, poisson, rounds, DELTA, "pld") == pytest.approx(ledger.get_epsilon(DELTA), rel=1e-6)
    # jax-privacy's cyclic accountant: a group of 100 in turn out of 1000 is every one of them every 10 rounds
    cyclic = accountant.Participation("cyclic", 1000, 100, 100, cycle=10)
    params = analysis.DpParams(noise_multipliers=z, num_samples=1000, delta=DELTA, batch_size=100, cycle_length=10)
    expected = analysis.DpsgdTrainingAccountant(RDP).compute_epsilon(rounds, params)
    assert accountant.epsilon(z, cyclic, rounds, DELTA) == pytest.approx(expected, rel=1e-9)
    # DP-FTRL planned for 20 rounds: after t rounds one Gaussian release at z √(k_20 / k_t), k_t = ceil(t / 10)
    ours = accountant.epsilon(z, cyclic, rounds, DELTA, mechanism="ftrl", planned_rounds=20)
    assert ours == pytest.approx(single_release(z * math.sqrt(2 / math.ceil(rounds / 10))), rel=1e-9)


def test_target_epsilon_is_solved_for_dp_ftrl():
    fed = fed_of(num_clients=100, clients_per_round=10, rounds=20, cohort_sampling="cyclic",
                 dp=dict(enabled=True, mechanism="ftrl", target_epsilon=3.0, clip_norm=0.5))
    dp = client_dp.settings(fed, np.ones(100))
    assert dp.epsilon(20) == pytest.approx(3.0, rel=1e-3) and dp.epsilon(20) <= 3.0 + 1e-6
    assert dp.epsilon(5) < dp.epsilon(20)
    assert single_release(dp.noise_multiplier) == pytest.approx(dp.epsilon(20), rel=1e-9)


def ftrl_settings(rounds=6, cycle=3, z=0.7):
    fed = fed_of(num_clients=3 * cycle, clients_per_round=3, rounds=rounds, cohort_sampling="cyclic",
                 dp=dict(enabled=True, mechanism="ftrl", noise_multiplier=z, clip_norm=1.0))
    return client_dp.settings(fed, np.ones(3 * cycle))


def test_ftrl_noise_has_the_factorisations_covariance_over_rounds():
    """Round t's noise is row t of C⁻¹z: over the 20,000 entries of one draw per round, the rounds' noise has
    covariance σ² C⁻¹C⁻ᵀ, with the correlations BandMF builds in (not independent noise)."""
    dp = ftrl_settings()
    sums, stds = {"delta": jnp.zeros(20_000)}, {"delta": 2.0}
    key = client_dp.noise_key(dp, seed=5, round_index=0)
    draws = np.stack([np.asarray(client_dp.release(dp, sums, stds, key, {"step": jnp.int32(t)})["delta"])
                      for t in range(dp.rounds)])
    inverse = ftrl.noising_matrix(dp.rounds, dp.bands).astype(np.float64)
    expected = 4.0 * inverse @ inverse.T
    assert np.abs(expected - np.diag(np.diag(expected))).max() > 0.5  # correlated across rounds
    np.testing.assert_allclose(np.cov(draws), expected, atol=0.06 * expected.max())
    np.testing.assert_allclose(client_dp.noise_in_sums(dp, stds, None, {"step": 4})["delta"],
                               2.0 * np.linalg.norm(inverse[4]), rtol=1e-5)


def test_ftrl_noise_is_scaled_by_a_clients_turns_and_strategy_is_bandmf():
    dp = ftrl_settings(rounds=6, cycle=3)
    strategy = ftrl.strategy_matrix(6, 3)
    assert np.allclose(np.linalg.norm(strategy, axis=0), 1.0)  # column-normalised
    assert np.allclose(np.triu(strategy, 1), 0) and np.allclose(np.tril(strategy, -3), 0)  # 3 bands, lower
    stds = client_dp.noise_stds(dp, {"delta": (1.0, 1.0)}, ())
    assert stds["delta"] == pytest.approx(0.7 * math.sqrt(2) * dp.max_weight)  # two turns in six rounds


def test_a_dp_ftrl_run_reports_the_single_release_epsilon_each_round(tiny_config):
    from test_sharding import federated_run

    run = federated_run(tiny_config, "fedavg", num_clients=4, cohort=2, rounds=3, fed={
        "cohort_sampling": "cyclic", "dp": dict(enabled=True, mechanism="ftrl", noise_multiplier=1.0,
                                                clip_norm=0.5)})
    turns = [1, 1, 2]  # a client of the first group takes part in rounds 1 and 3 of the 3 planned
    for record, k in zip(run.history, turns):
        assert record["epsilon"] == pytest.approx(single_release(math.sqrt(2 / k)), rel=1e-9)
    assert [len(record["clients"]) for record in run.history] == [2, 2, 2]
    assert int(run.server[client_dp.STATE]["step"]) == 3


def test_a_poisson_round_counts_only_the_clients_drawn(tiny_config):
    from test_sharding import federated_run

    run = federated_run(tiny_config, "fedavg", num_clients=4, cohort=2, rounds=2, fed={
        "cohort_sampling": "poisson", "dp": dict(enabled=True, noise_multiplier=1.0, clip_norm=0.5,
                                                 accountant="pld")})
    for index, record in enumerate(run.history):
        ids, sampled = poisson_cohort(4, 0.5, 4, 0, index)  # capacity: 2 + 3 √(2 x 0.5), at most the 4 clients
        assert record["clients"] == ids[sampled].tolist() == record["used"]
        assert len(record["train_loss"]) == len(record["clients"])


@pytest.mark.parametrize("keys, sentence", [
    (dict(cohort_sampling="cyclic", clients_per_round=3), "fed.num_clients=10 must be a multiple of "
                                                          "fed.clients_per_round=3"),
    (dict(cohort_sampling="poisson", clients_per_round=0), "needs fed.clients_per_round between 1"),
    (dict(cohort_capacity=4, clients_per_round=2), "fed.cohort_capacity applies only to fed.cohort_sampling="),
    (dict(cohort_sampling="poisson", clients_per_round=2, dp=dict(enabled=True)), "only the PLD accountant"),
    (dict(clients_per_round=2, dp=dict(enabled=True, mechanism="ftrl")), "set fed.cohort_sampling='cyclic'"),
    (dict(cohort_sampling="cyclic", clients_per_round=2, dp=dict(enabled=True, mechanism="ftrl", ftrl_bands=6)),
     "fed.dp.ftrl_bands must be at most the cycle"),
    (dict(cohort_sampling="cyclic", clients_per_round=2, dp=dict(enabled=True, mechanism="ftrl", adaptive=True)),
     "fed.dp.adaptive does not apply to fed.dp.mechanism='ftrl'"),
])
def test_participation_settings_that_cannot_run_are_one_sentence(keys, sentence):
    with pytest.raises(ConfigError, match=sentence.replace("(", r"\(").replace(")", r"\)")):
        fed_of(num_clients=10, **keys)


def test_a_population_table_summarises_the_clients_it_cannot_list():
    from fednano_jax.eval.report import results_table

    accuracy = [float("nan")] * 5 + [i / 20 for i in range(20)]  # 25 clients, 5 without test examples
    table = results_table({"FedAvg": {"accuracy": accuracy, "average": 0.475}}).splitlines()
    assert table[0] == "| Method | clients evaluated | lower quartile | median | upper quartile | Avg |"
    assert table[2] == "| FedAvg | 20 | 23.75 | 47.50 | 71.25 | 47.50 |"
    assert "C1" in results_table({"FedAvg": {"accuracy": accuracy[5:], "average": 0.475}})  # 20: a column each
