"""Client-level DP (privacy/dp.py, privacy/accountant.py): the accountant is dp-accounting's, clipping
bounds every update, the noise has the stated scale, no noise and no clipping is today's aggregate, adaptive
clipping moves C the way Andrew et al. move it, and the DP state survives a round checkpoint."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from fednano_jax.config import LATER_DEFAULTS, validate
from fednano_jax.errors import ConfigError
from fednano_jax.federated.methods import METHODS, get_method
from fednano_jax.federated.server import ClientUploads, server_round
from fednano_jax.privacy import accountant
from fednano_jax.privacy import dp as privacy

GLOBAL = {"down": jnp.zeros((4, 2)), "up": jnp.ones((2, 3))}
UPLOADS = {"down": jnp.arange(24.0).reshape(3, 4, 2) / 10, "up": 1 + jnp.arange(18.0).reshape(3, 2, 3) / 5}
COUNTS = jnp.array([10.0, 20.0, 30.0])


def fed(**dp):
    return ConfigDict(dict(num_clients=3, clients_per_round=0, rounds=4, fisher_floor=1e-6,
                           dp={**LATER_DEFAULTS["fed"]["dp"], "enabled": True, **dp}))


def settings(**dp):
    return privacy.settings(fed(**dp), COUNTS)


def state(dp_settings):
    return privacy.init_state(dp_settings, {"adapters": GLOBAL})


@pytest.mark.parametrize("name", ["rdp", "pld"])
@pytest.mark.parametrize("z, q, rounds", [(1.0, 1.0, 10), (0.8, 0.1, 100)])
def test_epsilon_is_dp_accountings_own(name, z, q, rounds):
    ledger = dp_accounting.rdp.RdpAccountant() if name == "rdp" else dp_accounting.pld.PLDAccountant()
    event = dp_accounting.GaussianDpEvent(z)
    ledger.compose(event if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, event), rounds)
    assert accountant.epsilon(z, q, rounds, 1e-5, name) == pytest.approx(ledger.get_epsilon(1e-5), rel=1e-9)
    assert accountant.epsilon(z, q, rounds, 1e-5, name) > accountant.epsilon(2 * z, q, rounds, 1e-5, name)


def test_target_epsilon_solves_the_noise_for_the_runs_rounds():
    dp = settings(target_epsilon=3.0)
    assert dp.epsilon(4) == pytest.approx(3.0, rel=0.01) and dp.epsilon(4) <= 3.0 + 1e-6
    assert accountant.epsilon(0.9 * dp.noise_multiplier, 1.0, 4, 1e-5) > 3.0  # less noise would overspend


def test_clipped_updates_have_norm_at_most_c():
    deltas = jax.tree.map(lambda u, g: u - g[None], UPLOADS, GLOBAL)
    clipped, norms = privacy.clip(deltas, 0.5)
    assert float(norms.min()) > 0.5  # every update is clipped here
    np.testing.assert_allclose(privacy.update_norms(clipped), 0.5, rtol=1e-5)
    small, _ = privacy.clip(deltas, 1e6)
    jax.tree.map(np.testing.assert_array_equal, small, deltas)  # within C: untouched


def test_no_noise_and_no_clipping_is_todays_aggregate():
    dp = settings(noise_multiplier=0.0, clip_norm=math.inf)
    reporting = jnp.ones(3, bool)
    private, _ = server_round(get_method("fedavg", fed(enabled=False)), state(dp), ClientUploads({"adapters": UPLOADS}, COUNTS),
                              reporting, jax.random.key(0), dp=dp)
    plain, _ = server_round(get_method("fedavg", fed(enabled=False)), {"adapters": GLOBAL},
                            ClientUploads({"adapters": UPLOADS}, COUNTS), reporting)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), private["adapters"],
                 plain["adapters"])


def test_the_noise_is_z_c_w_max_over_the_expected_weight():
    dp = settings(noise_multiplier=2.0, clip_norm=0.5)
    noiseless = privacy.private_update(settings(noise_multiplier=0.0, clip_norm=0.5), state(dp), UPLOADS, COUNTS,
                                       jax.random.key(0))["adapters"]
    keys = jax.random.split(jax.random.key(1), 4000)
    noised = jax.vmap(lambda k: privacy.private_update(dp, state(dp), UPLOADS, COUNTS, k)["adapters"])(keys)
    std = 2.0 * 0.5 * 30.0 / float(COUNTS.sum())  # z * C * w_max / (q W), q = 1
    for name in ("down", "up"):
        noise = np.asarray(noised[name] - noiseless[name][None])
        assert abs(noise.mean()) < 0.05 * std
        assert noise.std() == pytest.approx(std, rel=0.03)


def test_adaptive_clipping_moves_c_toward_the_quantile():
    norms = privacy.update_norms(jax.tree.map(lambda u, g: u - g[None], UPLOADS, GLOBAL))
    lr = 0.2
    for clip_norm, fraction in ((float(norms.max()) * 2, 1.0), (float(norms.min()) / 2, 0.0)):
        dp = settings(noise_multiplier=0.0, clip_norm=clip_norm, adaptive=True, count_stddev=1e-9,
                      clip_learning_rate=lr)
        new = privacy.private_update(dp, state(dp), UPLOADS, COUNTS, jax.random.key(0))
        expected = clip_norm * math.exp(-lr * (fraction - 0.5))  # all within C: C shrinks; none: it grows
        assert float(new["dp"]["clip_norm"]) == pytest.approx(expected, rel=1e-5)


def test_adaptive_noise_split_keeps_the_total_multiplier():
    dp = settings(noise_multiplier=1.0, adaptive=True, count_stddev=1.0)
    z_update, z_count = dp.update_noise_multiplier, 2 * dp.count_stddev
    assert (z_update ** -2 + z_count ** -2) ** -0.5 == pytest.approx(1.0)


def test_the_dp_state_survives_a_round_checkpoint(tmp_path):
    from fednano_jax.federated.checkpoints import RoundCheckpoints

    dp = settings(adaptive=True, noise_multiplier=0.2, count_stddev=1.0, clip_norm=0.7)
    after = privacy.private_update(dp, state(dp), UPLOADS, COUNTS, jax.random.key(3))
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


def test_the_fisher_merge_without_noise_or_clipping_is_todays():
    fishers = jax.tree.map(lambda u: jnp.abs(jnp.sin(u)) * 1e-3, UPLOADS)
    trees = {"adapters": UPLOADS, "fisher": fishers}
    dp = settings(noise_multiplier=0.0, clip_norm=math.inf, fisher_clip_norm=math.inf)
    method = get_method("fednano", fed(enabled=False))
    private, _ = server_round(method, state(dp), ClientUploads(trees, COUNTS), jnp.ones(3, bool), jax.random.key(0),
                              dp=dp)
    plain, _ = server_round(method, {"adapters": GLOBAL}, ClientUploads(trees, COUNTS), jnp.ones(3, bool))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), private["adapters"],
                 plain["adapters"])


def test_the_fisher_merge_noises_both_sums_at_root_two_times_their_sensitivity():
    """With a constant Fisher (every client's clipped to the same F) the merge's numerator noise is visible:
    A / B with B's noise small against the clamp, A's std √2 z C C_F w_max over B."""
    fishers = jax.tree.map(lambda u: jnp.full_like(u, 0.01), UPLOADS)
    trees_f = fishers
    dp = settings(noise_multiplier=1e-3, clip_norm=0.5, fisher_clip_norm=1.0)
    quiet = settings(noise_multiplier=0.0, clip_norm=0.5, fisher_clip_norm=1.0)
    base = privacy.private_update(quiet, state(quiet), UPLOADS, COUNTS, jax.random.key(0), trees_f)["adapters"]
    keys = jax.random.split(jax.random.key(2), 3000)
    noised = jax.vmap(lambda k: privacy.private_update(dp, state(dp), UPLOADS, COUNTS, k, trees_f)["adapters"])(keys)
    assert float(privacy.update_norms(fishers).max()) < 1.0  # C_F clips nothing here
    b = float(COUNTS.sum()) * 0.01  # every entry's denominator, noise aside (its noise is 7% of it)
    std = math.sqrt(2) * 1e-3 * 0.5 * 1.0 * 30.0 / b
    noise = np.asarray(noised["down"] - base["down"][None])
    assert noise.std() == pytest.approx(std, rel=0.05)


def test_dp_settings_that_cannot_run_are_one_sentence():
    with pytest.raises(ConfigError, match="fed.dp works with fedavg, fedprox, feddpa_f, fednano, fednano_ef, not "
                                          "centralized"):
        config = tiny_dp_config()
        config.fed.methods = ("centralized", "fedavg")
        validate(config, METHODS)
    validate(tiny_dp_config(), METHODS)  # FedAvg and FedNano, the default methods
    config = tiny_dp_config(adaptive=True, noise_multiplier=2.0)
    config.fed.methods = ("fedavg",)
    with pytest.raises(ConfigError, match=r"fed.dp.adaptive needs 2 \* count_stddev > noise_multiplier"):
        validate(config, METHODS)
    config = tiny_dp_config(clip_norm=0.0)
    config.fed.methods = ("fedavg",)
    with pytest.raises(ConfigError, match="fed.dp.clip_norm must be positive"):
        validate(config, METHODS)
    config.fed.dp.clip_norm = 1.0
    validate(config, METHODS)
    assert get_method("fedavg", config.fed).label.startswith("FedAvg + DP (ε=")


def test_pld_refuses_noise_too_small_to_discretise():
    with pytest.raises(ValueError, match="The PLD accountant needs fed.dp.noise_multiplier >= 0.3"):
        accountant.epsilon(0.01, 1.0, 5, 1e-5, "pld")
    config = tiny_dp_config(accountant="pld", noise_multiplier=0.1)
    with pytest.raises(ConfigError, match="use fed.dp.accountant='rdp'"):
        validate(config, METHODS)


def test_a_dp_round_reports_epsilon_and_without_noise_or_clipping_trains_as_today(tiny_config):
    from test_sharding import federated_run

    plain = federated_run(tiny_config, "fednano", num_clients=4, cohort=4)
    exact = federated_run(tiny_config, "fednano", num_clients=4, cohort=4, fed={"dp": dict(
        enabled=True, noise_multiplier=0.0, clip_norm=math.inf, fisher_clip_norm=math.inf)})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), exact.server["adapters"],
                 plain.server["adapters"])
    noised = federated_run(tiny_config, "fedavg", num_clients=4, cohort=2, fed={"dp": dict(
        enabled=True, noise_multiplier=1.0, clip_norm=0.1)})
    assert noised.history[0]["epsilon"] == accountant.epsilon(1.0, 0.5, 1, 1e-5)
    assert noised.history[0]["clip_norm"] == pytest.approx(0.1)
