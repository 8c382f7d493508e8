"""Each method's defining property, through the protocol the round loop calls."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import make_batch
from fednano_jax.data.batches import gather_batch
from fednano_jax.errors import ConfigError
from fednano_jax.federated.client import ClientInputs, make_client_programs
from fednano_jax.federated.fisher import diagonal_fisher
from fednano_jax.federated.methods import METHODS, get_method
from fednano_jax.federated.methods.feddpa_f import instance_weights, mix_adapters
from fednano_jax.federated.objective import adapter_value_and_grad
from fednano_jax.federated.schedule import client_schedule
from fednano_jax.federated.server import ClientUploads, server_round
from fednano_jax.models.mllm import merge_model
from conftest import fed_of
from test_federated import FED_KEYS, tiny_setup, train, trained_adapters


def method(name, **fed):
    """The method `name` with FED's settings, `fed` overriding some."""
    return get_method(name, fed_of(**{**FED_KEYS, **fed}))


def squared_distance(a, b):
    return sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_fedprox_with_zero_mu_is_fedavg_and_positive_mu_pulls_toward_the_start(tiny_config):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    rows, valid = jnp.arange(12).reshape(3, 4), jnp.ones((3, 4), bool)
    run = lambda m: trained_adapters(graphdef, optax.sgd(0.5), adapters, frozen, data, rows, valid, m)[0]
    plain, zero_mu, strong = run(method("fedavg")), run(method("fedprox", prox_mu=0.0)), run(
        method("fedprox", prox_mu=1.0))
    jax.tree.map(np.testing.assert_array_equal, plain, zero_mu)
    assert squared_distance(strong, adapters) < squared_distance(plain, adapters)


def ef_and_extra_pass(graphdef, frozen, adapters, data, rows, valid, epochs):
    """FedNano-EF's Fisher from `epochs` epochs at learning rate 0, and the extra pass over one epoch."""
    all_rows, all_valid = jnp.concatenate([rows] * epochs), jnp.concatenate([valid] * epochs)
    upload, _, _ = train(graphdef, optax.sgd(0.0), adapters, frozen, data, all_rows, all_valid, method("fednano_ef"),
                         epoch_steps=rows.shape[0])
    return upload["fisher"], diagonal_fisher(graphdef, adapters, frozen, data, rows, valid)


def test_fednano_ef_with_one_example_per_step_is_the_extra_pass_whatever_the_epochs(tiny_config):
    """Batch 1 makes a step's squared gradient one example's: EF must then equal the extra pass exactly, and
    stay equal over more local epochs (its scale must not grow with the steps)."""
    graphdef, frozen, adapters, data = tiny_setup(tiny_config, rows=6)
    rows, valid = jnp.arange(6).reshape(6, 1), jnp.ones((6, 1), bool).at[5, 0].set(False)  # one padding step
    for epochs in (1, 3):
        ef, extra = ef_and_extra_pass(graphdef, frozen, adapters, data, rows, valid, epochs)
        jax.tree.map(lambda e, x: np.testing.assert_allclose(e, x, rtol=1e-4, atol=1e-12), ef, extra)


def test_fednano_ef_is_on_the_extra_pass_scale_on_a_converged_model(tiny_config):
    """Near a minimum the batch gradients' cross terms average out, so EF at batch 4 over two epochs has the
    extra pass's scale; summing squared token-mean gradients (EF before the fix) is not."""
    graphdef, frozen, adapters, data = tiny_setup(tiny_config, rows=12)
    every = jnp.tile(jnp.arange(12)[None], (150, 1))
    converged, _ = trained_adapters(graphdef, optax.adam(5e-2), adapters, frozen, data, every, jnp.ones_like(every, bool))
    rows, valid = jnp.arange(12).reshape(3, 4), jnp.ones((3, 4), bool)
    ef, extra = ef_and_extra_pass(graphdef, frozen, converged, data, rows, valid, epochs=2)
    mass = lambda tree: sum(float(x.sum()) for x in jax.tree.leaves(tree))
    assert 0.5 < mass(ef) / mass(extra) < 2.0
    old_scale = 0.0
    for step in range(3):
        _, grads = adapter_value_and_grad(graphdef, frozen, converged, gather_batch(data, rows[step], valid[step]))
        old_scale += 2 * mass(jax.tree.map(jnp.square, grads))  # two epochs of the same steps
    assert not 0.5 < old_scale / mass(extra) < 2.0  # the old scale fails the same check (0.22 here)


def test_methods_that_send_nothing_and_centralized_pools_every_example():
    assert METHODS["locft"].uploads == () and METHODS["centralized"].uploads == ()
    assert len(METHODS["fedavg"].uploads) == 1 and len(METHODS["fednano"].uploads) == 2
    assert len(METHODS["fednano_ef"].uploads) == 2 and METHODS["fednano"].extra_passes == 1
    assert METHODS["centralized"].pooled and not METHODS["fedavg"].pooled
    with pytest.raises(ConfigError, match="Unknown method 'fedfoo'"):
        get_method("fedfoo", fed_of(**FED_KEYS))
    pooled = [np.concatenate([np.array([0, 3, 5]), np.array([1, 2]), np.array([4, 6, 7, 8])])]
    rows, valid = client_schedule(pooled, batch_size=4, epochs=2, seed=0, round_index=0)
    seen = rows[0][valid[0]]
    assert sorted(seen[:9].tolist()) == list(range(9)) and sorted(seen[9:].tolist()) == list(range(9))


def test_locft_trains_each_client_from_its_own_adapters_and_the_server_keeps_nothing(tiny_config):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    locft = method("locft")
    own = jax.tree.map(lambda x: x * 2.0, adapters)
    rows, valid = jnp.arange(8).reshape(2, 4), jnp.ones((2, 4), bool)
    upload, state, _ = train(graphdef, optax.sgd(0.0), adapters, frozen, data, rows, valid, locft, state=own)
    assert upload == {}
    jax.tree.map(np.testing.assert_array_equal, state, own)  # lr 0: it stayed at its own adapters, not the global
    server = locft.server_init(adapters)
    assert locft.contribution(upload, locft.broadcast(server)) == {}
    assert locft.finalize(server, {}) is server


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


def scaffold_round(tiny_config, server_state, client_states, learning_rate=0.1):
    """One SCAFFOLD round of 3 clients with SGD -> (new server state, new client states, trained adapters, steps)."""
    graphdef, frozen, _, data = tiny_setup(tiny_config)
    scaffold = method("scaffold", num_clients=3)
    rows, valid = client_schedule([np.arange(0, 4), np.arange(4, 10), np.arange(10, 12)], 2, 1, seed=0,
                                  round_index=0)
    vmapped, _ = make_client_programs(graphdef, optax.sgd(learning_rate), scaffold, rows.shape[1])
    outputs = jax.jit(vmapped)(frozen, data, scaffold.broadcast(server_state),
                               ClientInputs(jnp.asarray(rows), jnp.asarray(valid), client_states))
    uploads = ClientUploads(outputs.upload, jnp.array([4, 6, 2]))
    new_server, used = server_round(scaffold, server_state, uploads, jnp.ones(3, bool))
    assert bool(used.all())
    return new_server, outputs.state, outputs.upload["adapters"], valid.any(axis=2).sum(axis=1)


def test_scaffold_controls_are_option_two_under_sgd_and_the_server_control_is_their_mean(tiny_config):
    _, _, adapters, _ = tiny_setup(tiny_config)
    scaffold = method("scaffold", num_clients=3)
    server = scaffold.server_init(adapters)
    # Non-zero controls, so the correction g - c_i + c is exercised.
    server["control"] = jax.tree.map(lambda x: jnp.full_like(x, 0.01), server["control"])
    clients = jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), {"control": server["control"]})
    new_server, new_clients, trained, steps = scaffold_round(tiny_config, server, clients)
    for k in range(3):
        # Option II: c_i+ = c_i - c + (x - y_i) / (K_i lr)
        expected = jax.tree.map(lambda ci, c, x, y: ci[k] - c + (x - y[k]) / (int(steps[k]) * 0.1),
                                clients["control"], server["control"], adapters, trained)
        got = jax.tree.map(lambda c: c[k], new_clients["control"])
        jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-6), got, expected)
    # c <- c + (1/N) sum_i (c_i+ - c_i) over the N = 3 clients.
    for leaf_server, leaf_old, leaf_new, leaf_c in zip(jax.tree.leaves(new_server["control"]),
                                                       jax.tree.leaves(clients["control"]),
                                                       jax.tree.leaves(new_clients["control"]),
                                                       jax.tree.leaves(server["control"])):
        np.testing.assert_allclose(leaf_server, leaf_c + (leaf_new - leaf_old).sum(axis=0) / 3, rtol=1e-5,
                                   atol=1e-7)
    assert any(float(jnp.abs(x).max()) > 1e-4 for x in jax.tree.leaves(new_server["control"]))


def test_scaffold_with_matching_controls_trains_as_fedavg(tiny_config):
    """When every client's control equals the server's, the correction vanishes: the same adapters as FedAvg."""
    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    scaffold = method("scaffold", num_clients=3)
    server = scaffold.server_init(adapters)
    server["control"] = jax.tree.map(lambda x: jnp.full_like(x, 0.02), server["control"])
    clients = jax.tree.map(lambda x: jnp.stack([x, x, x]), {"control": server["control"]})
    _, _, trained, _ = scaffold_round(tiny_config, server, clients)
    rows, valid = client_schedule([np.arange(0, 4), np.arange(4, 10), np.arange(10, 12)], 2, 1, seed=0,
                                  round_index=0)
    vmapped, _ = make_client_programs(graphdef, optax.sgd(0.1), method("fedavg"), rows.shape[1])
    plain = jax.jit(vmapped)(frozen, data, {"adapters": adapters}, ClientInputs(jnp.asarray(rows), jnp.asarray(valid)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), trained,
                 plain.upload["adapters"])
