"""Server optimizers on the pseudo-gradient (Reddi et al.): hand computations, and exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fed_of
from fednano_jax.federated.aggregation import fedavg, fisher_merge
from fednano_jax.federated.checkpoints import RoundCheckpoints
from fednano_jax.federated.methods import get_method
from fednano_jax.federated.server import ClientUploads, server_round
from fednano_jax.federated.server_optimizer import STATE, init_state, server_optimizer
from fednano_jax.settings import DEFAULT_SERVER_LEARNING_RATES as DEFAULT_LEARNING_RATES

UPLOADS = {"down": jnp.array([[[1.0, -2.0]], [[3.0, 0.5]]]), "up": jnp.array([[[0.25]], [[-1.0]]])}
FISHER = {"down": jnp.array([[[1.0, 4.0]], [[2.0, 1.0]]]), "up": jnp.array([[[3.0]], [[1.0]]])}
GLOBAL = {"down": jnp.array([[0.5, 0.5]]), "up": jnp.array([[1.0]])}
COUNTS = jnp.array([10, 30])


def fed(**settings):
    defaults = dict(fisher_floor=1e-6, num_clients=2, server_optimizer="none", server_learning_rate=1.0,
                    server_momentum=0.9)
    return fed_of(**{**defaults, **settings})


def one_round(name, config, state=None):
    method = get_method(name, config)
    optimizer = server_optimizer(config, method)
    state = state or init_state(optimizer, {"adapters": GLOBAL})
    trees = {"adapters": UPLOADS, "fisher": FISHER} if name == "fednano" else {"adapters": UPLOADS}
    new, _ = server_round(method, state, ClientUploads(trees, COUNTS), jnp.ones(2, bool), optimizer=optimizer)
    return new


@pytest.mark.parametrize("name, proposal", [
    ("fedavg", lambda: fedavg(UPLOADS, COUNTS)),
    ("fednano", lambda: fisher_merge(UPLOADS, FISHER, COUNTS, 1e-6)),  # the Fisher merge plus server Adam
])
def test_one_round_of_server_adam_is_the_hand_computed_step(name, proposal):
    new = one_round(name, fed(server_optimizer="adam", server_learning_rate=0.1))
    for key in GLOBAL:  # Adam's first step: bias-corrected m = g, v = g^2, so the step is lr * g / (|g| + eps)
        g = np.asarray(GLOBAL[key]) - np.asarray(proposal()[key])
        np.testing.assert_allclose(new["adapters"][key], GLOBAL[key] - 0.1 * g / (np.abs(g) + 1e-8), atol=2e-6)
    assert int(new[STATE][0].count) == 1


@pytest.mark.parametrize("name, rate", [("avgm", 1.0), ("adagrad", 0.1), ("adam", 0.01), ("yogi", 0.01)])
def test_a_zero_server_learning_rate_is_the_optimizers_own_default(name, rate):
    """Reddi et al.'s neighbourhoods: FedAdam at the shared 1.0 collapses FedNano on the tiny config."""
    assert DEFAULT_LEARNING_RATES[name] == rate
    assert fed(server_optimizer=name, server_learning_rate=0.0).effective_server_learning_rate == rate
    assert fed(server_optimizer=name, server_learning_rate=0.5).effective_server_learning_rate == 0.5  # explicit
    by_default = one_round("fedavg", fed(server_optimizer=name, server_learning_rate=0.0))
    explicit = one_round("fedavg", fed(server_optimizer=name, server_learning_rate=rate))
    jax.tree.map(np.testing.assert_array_equal, by_default["adapters"], explicit["adapters"])


def test_the_shipped_config_leaves_the_step_to_the_optimizer():
    from conftest import ROOT
    from fednano_jax.config import load_config_file

    assert load_config_file(f"{ROOT}/configs/easyvqa_tiny.py").fed.server_learning_rate == 0.0


def test_two_rounds_of_server_momentum_are_the_hand_computed_steps():
    config = fed(server_optimizer="avgm", server_learning_rate=0.5, server_momentum=0.9)
    first = one_round("fedavg", config)
    second = one_round("fedavg", config, first)
    mean = fedavg(UPLOADS, COUNTS)
    for key in GLOBAL:
        g1 = np.asarray(GLOBAL[key]) - np.asarray(mean[key])
        x1 = np.asarray(GLOBAL[key]) - 0.5 * g1
        g2 = x1 - np.asarray(mean[key])
        np.testing.assert_allclose(first["adapters"][key], x1, rtol=1e-6)
        np.testing.assert_allclose(second["adapters"][key], x1 - 0.5 * (0.9 * g1 + g2), rtol=1e-6)


def test_no_server_optimizer_and_a_unit_step_without_momentum_are_the_plain_aggregate():
    plain = one_round("fedavg", fed())
    unit = one_round("fedavg", fed(server_optimizer="avgm", server_momentum=0.0))
    expected = fedavg(UPLOADS, COUNTS)
    assert STATE not in plain and STATE in unit
    for key in GLOBAL:
        np.testing.assert_allclose(plain["adapters"][key], expected[key], rtol=1e-6)
        np.testing.assert_allclose(unit["adapters"][key], expected[key], rtol=1e-6)
    # Methods with no global adapters to step (LocFT) or pooled data (Centralized) take none.
    assert server_optimizer(fed(server_optimizer="adam"), get_method("locft", fed())) is None
    assert server_optimizer(fed(server_optimizer="adam"), get_method("centralized", fed())) is None


@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad"])
def test_the_server_optimizer_state_resumes_exactly_from_a_checkpoint(tmp_path, name):
    config = fed(server_optimizer=name, server_learning_rate=0.1)
    first = jax.tree.map(np.asarray, one_round("fedavg", config))
    checkpoints = RoundCheckpoints(tmp_path / name, 2, {"fed": config.as_dict()})
    checkpoints.save(1, {"server": first}, [{"round": 1}])
    checkpoints.close()
    template = {"server": init_state(server_optimizer(config, get_method("fedavg", config)), {"adapters": GLOBAL})}
    checkpoints = RoundCheckpoints(tmp_path / name, 2, {"fed": config.as_dict()})
    _, restored, _ = checkpoints.restore_latest(jax.tree.map(np.asarray, template))
    checkpoints.close()
    resumed = one_round("fedavg", config, jax.tree.map(jnp.asarray, restored["server"]))
    uninterrupted = one_round("fedavg", config, jax.tree.map(jnp.asarray, first))
    jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)


def test_a_checkpoint_remembers_the_step_its_server_optimizer_took():
    """The default step (0: the optimizer's own) is part of the resume fingerprint as the rate it resolves to, so a
    workdir written at another step is not resumed at this one."""
    from configs.easyvqa_tiny import get_config
    from fednano_jax.config import read, resume_fingerprint

    config = get_config()
    assert "server_learning_rate" not in resume_fingerprint(read(config), "b")["fed"]  # no server optimizer: no step
    config.fed.server_optimizer = "adam"
    assert resume_fingerprint(read(config), "b")["fed"]["server_learning_rate"] == DEFAULT_LEARNING_RATES["adam"]
    config.fed.server_learning_rate = 1.0
    assert resume_fingerprint(read(config), "b")["fed"]["server_learning_rate"] == 1.0
