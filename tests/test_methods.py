"""Each method's defining property."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from conftest import make_batch
from fednano_jax.federated.client import LocalOptions, gather_batch, local_update
from fednano_jax.federated.feddpa import instance_weights, mix_adapters
from fednano_jax.federated.methods import METHODS
from fednano_jax.federated.objective import adapter_value_and_grad
from fednano_jax.federated.simulation import client_schedule, training_clients
from fednano_jax.models.mllm import merge_model
from test_federated import tiny_setup


def test_fedprox_with_zero_mu_is_fedavg_and_positive_mu_pulls_toward_the_start(tiny_config):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    rows, valid = jnp.arange(12).reshape(3, 4), jnp.ones((3, 4), bool)
    run = lambda options: local_update(graphdef, optax.sgd(0.5), options, adapters, frozen, data, rows, valid)[0]
    plain, zero_mu, strong = run(LocalOptions()), run(LocalOptions(prox_mu=0.0)), run(LocalOptions(prox_mu=1.0))
    jax.tree.map(np.testing.assert_array_equal, plain, zero_mu)
    distance = lambda tree: sum(float(jnp.sum((a - s) ** 2)) for a, s in zip(jax.tree.leaves(tree),
                                                                           jax.tree.leaves(adapters)))
    assert distance(strong) < distance(plain)
    assert METHODS["fedprox"].local_options(type("Fed", (), {"prox_mu": 0.01})()).prox_mu == 0.01
    assert METHODS["fedavg"].local_options(type("Fed", (), {"prox_mu": 0.01})()).prox_mu == 0.0


def test_fednano_ef_fisher_is_the_sum_of_the_squared_batch_gradients_it_saw(tiny_config):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    rows = jnp.array([[0, 1, 2, 3], [4, 5, 6, 7], [0, 0, 0, 0]])
    valid = jnp.array([[True] * 4, [True, True, True, False], [False] * 4])  # the last step is padding
    optimizer = optax.sgd(0.3)
    _, _, fisher = local_update(graphdef, optimizer, LocalOptions(accumulate_fisher=True), adapters, frozen, data,
                                rows, valid)
    params, expected = adapters, jax.tree.map(jnp.zeros_like, adapters)
    for step in range(2):
        _, grads = adapter_value_and_grad(graphdef, frozen, params, gather_batch(data, rows[step], valid[step]))
        expected = jax.tree.map(lambda e, g: e + g ** 2, expected, grads)
        params = jax.tree.map(lambda p, g: p - 0.3 * g, params, grads)
    jax.tree.map(lambda f, e: np.testing.assert_allclose(f, e, rtol=1e-4, atol=1e-12), fisher, expected)


def test_locft_sends_nothing_and_centralized_sees_every_example_once_per_epoch():
    assert METHODS["locft"].aggregate is None and METHODS["locft"].uploads == 0
    assert METHODS["fedavg"].uploads == 1 and METHODS["fednano"].uploads == 2 and METHODS["fednano_ef"].uploads == 2
    clients = [np.array([0, 3, 5]), np.array([1, 2]), np.array([4, 6, 7, 8])]
    pooled = training_clients(METHODS["centralized"], clients)
    assert len(pooled) == 1
    rows, valid = client_schedule(pooled, batch_size=4, epochs=2, seed=0, round_index=0)
    seen = rows[0][valid[0]]
    assert sorted(seen[:9].tolist()) == list(range(9)) and sorted(seen[9:].tolist()) == list(range(9))
    assert training_clients(METHODS["fedavg"], clients) is clients


def test_feddpa_weight_lies_in_zero_to_max():
    rng = np.random.default_rng(0)
    test, refs = jnp.asarray(rng.normal(size=(50, 8))), jnp.asarray(rng.normal(size=(5, 8)))
    weights = instance_weights(test, refs, max_weight=0.5)
    assert weights.shape == (50,) and float(weights.min()) >= 0.0 and float(weights.max()) <= 0.5
    same = instance_weights(refs[:1], jnp.tile(refs[:1], (5, 1)), max_weight=0.5)
    np.testing.assert_allclose(same, [0.5], rtol=1e-6)  # identical inputs: full similarity, capped


def test_feddpa_mix_is_the_weighted_adapter_sum_and_a_copy_of_global_changes_nothing(tiny_config):
    graphdef, frozen, adapters, _ = tiny_setup(tiny_config)
    batch = make_batch(3)
    args = (batch["input_ids"], batch["attention_mask"], batch["images"])
    logits = lambda a: merge_model(graphdef, frozen, a)(*args)
    local = jax.tree.map(lambda x: x * 3.0 + 0.05, adapters)
    for weight in (0.0, 0.3, 0.5):
        np.testing.assert_allclose(logits(mix_adapters(adapters, adapters, weight)), logits(adapters),
                                   rtol=1e-5, atol=1e-5)
    # The mix is exact: embeddings equal (1 - w) * global delta + w * local delta on every input.
    edge = lambda a: merge_model(graphdef, frozen, a).edge.embed_text(batch["input_ids"])
    base = merge_model(graphdef, frozen, jax.tree.map(jnp.zeros_like, adapters)).edge.embed_text(batch["input_ids"])
    expected = base + 0.7 * (edge(adapters) - base) + 0.3 * (edge(local) - base)
    np.testing.assert_allclose(edge(mix_adapters(adapters, local, 0.3)), expected, rtol=1e-5, atol=1e-6)
