"""Client-level DP (privacy/dp.py, privacy/accountant.py): the accountant is dp-accounting's, clipping
bounds every update, the noise has the stated scale, no noise and no clipping is today's aggregate, adaptive
clipping moves C the way Andrew et al. move it, and the DP state survives a round checkpoint."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import fed_of
from fednano_jax.config import read
from fednano_jax.errors import ConfigError
from fednano_jax.federated.methods import get_method
from fednano_jax.federated.aggregation import fisher_merge, plain_sums
from fednano_jax.federated.server import Aggregation, ClientUploads, client_contributions, server_round
from fednano_jax.privacy import accountant
from fednano_jax.privacy import dp as client_dp

GLOBAL = {"down": jnp.zeros((4, 2)), "up": jnp.ones((2, 3))}
UPLOADS = {"down": jnp.arange(24.0).reshape(3, 4, 2) / 10, "up": 1 + jnp.arange(18.0).reshape(3, 2, 3) / 5}
COUNTS = jnp.array([10.0, 20.0, 30.0])


def sampled(q: float, num_clients: int = 100):
    """Fixed-size cohorts at rate q, as the accountant sees them."""
    cohort = round(q * num_clients)
    return accountant.Participation("fixed", num_clients, cohort, cohort)


def fed(fed_keys=None, **dp):
    keys = {**dict(num_clients=3, clients_per_round=0, rounds=4, fisher_floor=1e-6), **(fed_keys or {})}
    return fed_of(**keys, dp={"enabled": True, **dp})


def settings(**dp):
    return client_dp.settings(fed(**dp), COUNTS)


def state(dp_settings):
    return client_dp.init_state(dp_settings, {"adapters": GLOBAL})


@pytest.mark.parametrize("name", ["rdp", "pld"])
@pytest.mark.parametrize("z, q, rounds", [(1.0, 1.0, 10), (0.8, 0.1, 100)])
def test_epsilon_is_dp_accountings_own(name, z, q, rounds):
    ledger = dp_accounting.rdp.RdpAccountant() if name == "rdp" else dp_accounting.pld.PLDAccountant()
    event = dp_accounting.GaussianDpEvent(z)
    ledger.compose(event if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, event), rounds)
    ours = accountant.epsilon(z, sampled(q), rounds, 1e-5, name)
    assert ours == pytest.approx(ledger.get_epsilon(1e-5), rel=1e-9)
    assert ours > accountant.epsilon(2 * z, sampled(q), rounds, 1e-5, name)


def test_target_epsilon_solves_the_noise_for_the_runs_rounds():
    dp = settings(target_epsilon=3.0)
    assert dp.epsilon(4) == pytest.approx(3.0, rel=0.01) and dp.epsilon(4) <= 3.0 + 1e-6
    assert accountant.epsilon(0.9 * dp.noise_multiplier, sampled(1.0, 3), 4, 1e-5) > 3.0  # less would overspend


def private_round(name, dp, key=jax.random.key(0), fishers=None, reporting=(True, True, True)):
    trees = {"adapters": UPLOADS} if fishers is None else {"adapters": UPLOADS, "fisher": fishers}
    new, _ = server_round(get_method(name, fed(enabled=False)), state(dp), ClientUploads(trees, COUNTS),
                          jnp.asarray(reporting), key, aggregation=Aggregation(dp=dp))
    return new


def test_clipped_contributions_have_norm_at_most_their_bound():
    delta = jax.tree.map(lambda u, g: u[0] - g, UPLOADS, GLOBAL)
    clipped, norm = client_dp.clip_contribution({"delta": delta, "weight": jnp.ones(())}, {"delta": (0.5, 1.0)})
    assert float(norm) > 0.5  # clipped here
    assert float(optax.tree.norm(clipped["delta"])) == pytest.approx(0.5, rel=1e-5)
    small, _ = client_dp.clip_contribution({"delta": delta}, {"delta": (1e6, 1.0)})
    jax.tree.map(np.testing.assert_array_equal, small["delta"], delta)  # within C: untouched


def test_no_noise_and_no_clipping_is_todays_aggregate():
    dp = settings(noise_multiplier=0.0, clip_norm=math.inf)
    private = private_round("fedavg", dp)
    plain, _ = server_round(get_method("fedavg", fed(enabled=False)), {"adapters": GLOBAL},
                            ClientUploads({"adapters": UPLOADS}, COUNTS), jnp.ones(3, bool))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), private["adapters"],
                 plain["adapters"])


def test_the_noise_is_z_c_w_max_over_the_expected_weight():
    dp = settings(noise_multiplier=2.0, clip_norm=0.5)
    noiseless = private_round("fedavg", settings(noise_multiplier=0.0, clip_norm=0.5))["adapters"]
    keys = jax.random.split(jax.random.key(1), 4000)
    noised = jax.vmap(lambda k: private_round("fedavg", dp, k)["adapters"])(keys)
    std = 2.0 * 0.5 * 30.0 / float(COUNTS.sum())  # z * C * w_max / (q W), q = 1
    for name in ("down", "up"):
        noise = np.asarray(noised[name] - noiseless[name][None])
        assert abs(noise.mean()) < 0.05 * std
        assert noise.std() == pytest.approx(std, rel=0.03)


def test_adaptive_clipping_moves_c_toward_the_quantile():
    norms = [float(optax.tree.norm(jax.tree.map(lambda u, g: u[k] - g, UPLOADS, GLOBAL))) for k in range(3)]
    lr = 0.2
    for clip_norm, fraction in ((max(norms) * 2, 1.0), (min(norms) / 2, 0.0)):
        dp = settings(noise_multiplier=0.0, clip_norm=clip_norm, adaptive=True, count_stddev=1e-9,
                      clip_learning_rate=lr)
        new = private_round("fedavg", dp)
        expected = clip_norm * math.exp(-lr * (fraction - 0.5))  # all within C: C shrinks; none: it grows
        assert float(new["dp"]["clip_norm"]) == pytest.approx(expected, rel=1e-5)


def test_adaptive_noise_split_keeps_the_total_multiplier():
    dp = settings(noise_multiplier=1.0, adaptive=True, count_stddev=1.0)
    z_update, z_count = dp.update_noise_multiplier, 2 * dp.count_stddev
    assert (z_update ** -2 + z_count ** -2) ** -0.5 == pytest.approx(1.0)


def test_the_dp_state_survives_a_round_checkpoint(tmp_path):
    from fednano_jax.federated.checkpoints import RoundCheckpoints

    dp = settings(adaptive=True, noise_multiplier=0.2, count_stddev=1.0, clip_norm=0.7)
    after = private_round("fedavg", dp, jax.random.key(3))
    saved = {"server": jax.tree.map(np.asarray, after)}
    checkpoints = RoundCheckpoints(str(tmp_path), 2, {"x": 1})
    checkpoints.save(1, saved, [{"round": 1, "epsilon": dp.epsilon(1)}])
    checkpoints.close()
    checkpoints = RoundCheckpoints(str(tmp_path), 2, {"x": 1})
    done, restored, history = checkpoints.restore_latest({"server": jax.tree.map(np.asarray, state(dp))})
    checkpoints.close()
    assert done == 1 and history[0]["epsilon"] == dp.epsilon(1)
    jax.tree.map(np.testing.assert_array_equal, restored["server"], saved["server"])
    assert float(restored["server"]["dp"]["clip_norm"]) != 0.7  # the adapted C, not the starting one


def tiny_dp_config(**dp):
    from configs.easyvqa_tiny import get_config

    config = get_config()
    config.fed.dp.update(enabled=True, **dp)
    return config


def mean_one(fishers):
    """Each client's floored Fisher rescaled to mean one in every leaf, as FedNano's DP contribution does."""
    floored = jax.tree.map(lambda f: np.maximum(np.asarray(f, np.float64), 1e-6), fishers)
    return jax.tree.map(lambda x: x / x.reshape(3, -1).mean(axis=1).reshape((-1,) + (1,) * (x.ndim - 1)), floored)


def test_the_fisher_merge_without_noise_or_clipping_is_eq1_over_mean_one_fishers():
    """Hand computation: θ_i = Σ_k w_k F̂_ki θ_ki / Σ_k w_k F̂_ki with F̂_k the client's Fisher at mean one per
    leaf; and exactly Eq. 1 when the clients' Fishers have equal means."""
    fishers = jax.tree.map(lambda u: jnp.abs(jnp.sin(u)) * 1e-3 * jnp.array([1.0, 3.0, 0.5]).reshape(
        (3,) + (1,) * (u.ndim - 1)), UPLOADS)
    private = private_round("fednano", settings(noise_multiplier=0.0, clip_norm=math.inf), fishers=fishers)
    f_hat, w = mean_one(fishers), np.asarray(COUNTS, np.float64)
    expected = jax.tree.map(lambda f, p: np.tensordot(w, f * np.asarray(p), 1) / np.tensordot(w, f, 1), f_hat,
                            UPLOADS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), private["adapters"], expected)
    equal_means = jax.tree.map(lambda f: jnp.asarray(f * 1e-3, jnp.float32), f_hat)  # each client's the same
    private = private_round("fednano", settings(noise_multiplier=0.0, clip_norm=math.inf), fishers=equal_means)
    plain = fisher_merge(UPLOADS, equal_means, COUNTS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), private["adapters"], plain)


def test_the_fisher_merge_noises_each_released_sum_at_its_sensitivity_over_its_share():
    """FedNano releases FedAvg's sum and two Fisher corrections, each with N(0, (z_Δ s_e / √share_e)²): s = w_max C
    for Σ w Δ (share 0.9) and Σ w G Δ (0.05), w_max √(16 d) for Σ w G (0.05)."""
    dp = settings(noise_multiplier=0.5, clip_norm=0.3)
    method = get_method("fednano", fed(enabled=True))
    uploads = ClientUploads({"adapters": UPLOADS, "fisher": jax.tree.map(jnp.abs, UPLOADS)}, COUNTS)
    stacked, used = client_contributions(method, state(dp), uploads, jnp.ones(3, bool), Aggregation(dp=dp))
    sums = plain_sums(stacked)
    stds = client_dp.noise_stds(dp, method.dp_bounds(0.3, GLOBAL), method.unweighted)
    entries = sum(x.size for x in jax.tree.leaves(GLOBAL))
    assert stds == pytest.approx({"delta": 0.5 * 0.3 * 30.0 / math.sqrt(0.9),
                                  "delta_correction": 0.5 * 0.3 * 30.0 / math.sqrt(0.05),
                                  "weight_correction": 0.5 * 30.0 * math.sqrt(16 * entries) / math.sqrt(0.05)})
    draws = jax.vmap(lambda k: client_dp.release(dp, sums, stds, k, state(dp)[client_dp.STATE]))(
        jax.random.split(jax.random.key(3), 3000))
    for name, std in stds.items():
        noise = np.concatenate([np.asarray(d - s[None]).ravel() for d, s in
                                zip(jax.tree.leaves(draws[name]), jax.tree.leaves(sums[name]))])
        assert noise.std() == pytest.approx(std, rel=0.03) and abs(noise.mean()) < 0.05 * std


def test_a_correction_is_kept_without_noise_and_dropped_when_noise_swamps_it():
    correction = jnp.linspace(-1.0, 3.0, 1000)
    np.testing.assert_array_equal(client_dp.shrink_toward_zero(correction, 0.0), correction)
    noised = correction + 1e3 * jax.random.normal(jax.random.key(0), correction.shape)
    assert float(jnp.abs(client_dp.shrink_toward_zero(noised, 1e3)).max()) < 0.05 * 1e3


def test_dp_settings_that_cannot_run_are_one_sentence():
    with pytest.raises(ConfigError, match="fed.dp does not apply to centralized: Centralized pools every client's "
                                          "raw data"):
        config = tiny_dp_config()
        config.fed.methods = ("centralized", "fedavg")
        read(config)
    read(tiny_dp_config())  # FedAvg and FedNano, the default methods
    config = tiny_dp_config(adaptive=True, noise_multiplier=2.0)
    config.fed.methods = ("fedavg",)
    with pytest.raises(ConfigError, match=r"fed.dp.adaptive needs 2 \* count_stddev > noise_multiplier"):
        read(config)
    config = tiny_dp_config(clip_norm=0.0)
    config.fed.methods = ("fedavg",)
    with pytest.raises(ConfigError, match="fed.dp.clip_norm must be positive"):
        read(config)
    config.fed.dp.clip_norm = 1.0
    assert get_method("fedavg", read(config).fed).label.startswith("FedAvg + DP (ε=")


def test_pld_refuses_noise_too_small_to_discretise():
    with pytest.raises(ValueError, match="The PLD accountant needs fed.dp.noise_multiplier >= 0.3"):
        accountant.epsilon(0.01, sampled(1.0), 5, 1e-5, "pld")
    config = tiny_dp_config(accountant="pld", noise_multiplier=0.1)
    with pytest.raises(ConfigError, match="use fed.dp.accountant='rdp'"):
        read(config)


def test_a_dp_round_reports_epsilon_and_without_noise_or_clipping_trains_as_today(tiny_config):
    from test_sharding import federated_run

    plain = federated_run(tiny_config, "fedavg", num_clients=4, cohort=4)
    exact = federated_run(tiny_config, "fedavg", num_clients=4, cohort=4, fed={"dp": dict(
        enabled=True, noise_multiplier=0.0, clip_norm=math.inf)})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), exact.server["adapters"],
                 plain.server["adapters"])
    noised = federated_run(tiny_config, "fedavg", num_clients=4, cohort=2, fed={"dp": dict(
        enabled=True, noise_multiplier=1.0, clip_norm=0.1)})
    assert noised.history[0]["epsilon"] == accountant.epsilon(1.0, sampled(0.5, 4), 1, 1e-5)
    assert noised.history[0]["clip_norm"] == pytest.approx(0.1)


def test_distributed_shares_sum_to_at_least_the_central_noise_and_the_server_knows_how_much():
    """Each of the t clients counted on adds σ/√t; the sum of n ≥ t shares carries σ √(n/t), which is what the
    server's post-processing is told."""
    config = fed(dict(secagg_threshold=3, num_clients=5, secure_aggregation=True), noise_multiplier=1.0,
                 clip_norm=0.5, noise="distributed")
    dp = client_dp.settings(config, [1, 2, 3, 4, 5])
    assert dp.distributed and dp.noise_shares == 3
    assert client_dp.client_share_scale(dp) == pytest.approx(1 / math.sqrt(3))
    in_sums = client_dp.noise_in_sums(dp, {"delta": 2.0}, jnp.asarray(5), {})
    assert float(in_sums["delta"]) == pytest.approx(2.0 * math.sqrt(5 / 3))
    central = client_dp.settings(fed(noise_multiplier=1.0, clip_norm=0.5), [1, 2, 3])
    assert not central.distributed
    assert client_dp.noise_in_sums(central, {"delta": 2.0}, jnp.asarray(3), {}) == {"delta": 2.0}
