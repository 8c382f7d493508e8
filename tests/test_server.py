"""Client faults and the privacy boundary of the server-side aggregation."""

import jax
import jax.numpy as jnp
import numpy as np

from fednano_jax.federated.aggregation import fedavg, fisher_merge
from fednano_jax.federated.server import ClientUploads, aggregate_uploads, reporting_clients

ADAPTERS = {"down": jnp.arange(24.0).reshape(3, 4, 2), "up": jnp.arange(18.0).reshape(3, 2, 3)}
COUNTS = jnp.array([10, 20, 30])
PREVIOUS = {"down": jnp.full((4, 2), -1.0), "up": jnp.full((2, 3), -1.0)}


def fedavg_fn(adapters, fishers, counts):
    return fedavg(adapters, counts)


def poison(tree, client, value=np.nan):
    return jax.tree.map(lambda x: x.at[client].set(value), tree)


def test_non_finite_client_is_left_out():
    uploads = ClientUploads(poison(ADAPTERS, 1), None, COUNTS)
    merged, used = aggregate_uploads(fedavg_fn, uploads, jnp.ones(3, bool), PREVIOUS)
    np.testing.assert_array_equal(used, [True, False, True])
    expected = jax.tree.map(lambda x: (10 * x[0] + 30 * x[2]) / 40, ADAPTERS)
    jax.tree.map(lambda m, e: np.testing.assert_allclose(m, e, rtol=1e-6), merged, expected)


def test_infinite_fisher_excludes_its_client_from_fisher_merge():
    fishers = jax.tree.map(jnp.ones_like, ADAPTERS)
    uploads = ClientUploads(ADAPTERS, poison(fishers, 0, np.inf), COUNTS)
    merge = lambda a, f, n: fisher_merge(a, f, n)
    merged, used = aggregate_uploads(merge, uploads, jnp.ones(3, bool), PREVIOUS)
    np.testing.assert_array_equal(used, [False, True, True])
    expected = jax.tree.map(lambda x: (20 * x[1] + 30 * x[2]) / 50, ADAPTERS)
    jax.tree.map(lambda m, e: np.testing.assert_allclose(m, e, rtol=1e-5), merged, expected)


def test_dropped_clients_are_left_out_and_an_empty_round_keeps_the_previous_adapters():
    uploads = ClientUploads(ADAPTERS, None, COUNTS)
    merged, used = aggregate_uploads(fedavg_fn, uploads, jnp.array([False, True, False]), PREVIOUS)
    np.testing.assert_array_equal(used, [False, True, False])
    jax.tree.map(lambda m, x: np.testing.assert_allclose(m, x[1]), merged, ADAPTERS)
    nobody, used = aggregate_uploads(fedavg_fn, uploads, jnp.zeros(3, bool), PREVIOUS)
    assert not used.any()
    jax.tree.map(np.testing.assert_array_equal, nobody, PREVIOUS)


def test_dropout_is_seeded_and_has_the_configured_rate():
    np.testing.assert_array_equal(reporting_clients(50, 0.3, 0, 7), reporting_clients(50, 0.3, 0, 7))
    assert not np.array_equal(reporting_clients(50, 0.3, 0, 7), reporting_clients(50, 0.3, 0, 8))
    assert reporting_clients(50, 0.0, 0, 7).all()
    rate = np.mean([~reporting_clients(100, 0.3, 0, r) for r in range(50)])
    assert 0.27 < rate < 0.33


def test_only_adapters_fishers_and_counts_cross_to_the_server():
    """The aggregation program's inputs are exactly the uploads' leaves: no data array crosses."""
    fishers = jax.tree.map(jnp.ones_like, ADAPTERS)
    uploads = ClientUploads(ADAPTERS, fishers, COUNTS)
    jaxpr = jax.make_jaxpr(lambda u, r, p: aggregate_uploads(lambda a, f, n: fisher_merge(a, f, n), u, r, p))(
        uploads, jnp.ones(3, bool), PREVIOUS)
    inputs = sorted(tuple(v.aval.shape) for v in jaxpr.jaxpr.invars)
    allowed = sorted([(3, 4, 2), (3, 2, 3)] * 2 + [(3,), (3,), (4, 2), (2, 3)])
    assert inputs == allowed
    assert [f.name for f in ClientUploads.__dataclass_fields__.values()] == ["adapters", "fishers", "num_examples"]
