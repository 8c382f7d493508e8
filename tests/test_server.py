"""Client faults, random streams, and the privacy boundary of the server's program."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
from conftest import fed_of

from fednano_jax.federated.aggregation import fedavg
from fednano_jax.federated.methods import get_method
from fednano_jax.federated.schedule import client_schedule, sample_cohort
from fednano_jax.federated.server import ClientUploads, reporting_clients, server_round
from fednano_jax.streams import Purpose, generator

ADAPTERS = {"down": jnp.arange(24.0).reshape(3, 4, 2), "up": jnp.arange(18.0).reshape(3, 2, 3)}
COUNTS = jnp.array([10, 20, 30])
PREVIOUS = {"adapters": {"down": jnp.full((4, 2), -1.0), "up": jnp.full((2, 3), -1.0)}}
FED = fed_of(fisher_floor=1e-6, num_clients=3)


def poison(tree, client, value=np.nan):
    return jax.tree.map(lambda x: x.at[client].set(value), tree)


def run_server(name, trees, reporting=(True, True, True)):
    return server_round(get_method(name, FED), PREVIOUS, ClientUploads(trees, COUNTS), jnp.array(reporting))


def test_non_finite_client_is_left_out():
    merged, used = run_server("fedavg", {"adapters": poison(ADAPTERS, 1)})
    np.testing.assert_array_equal(used, [True, False, True])
    expected = jax.tree.map(lambda x: (10 * x[0] + 30 * x[2]) / 40, ADAPTERS)
    jax.tree.map(lambda m, e: np.testing.assert_allclose(m, e, rtol=1e-6), merged["adapters"], expected)


def test_infinite_fisher_excludes_its_client_from_fisher_merge():
    fishers = jax.tree.map(jnp.ones_like, ADAPTERS)
    merged, used = run_server("fednano", {"adapters": ADAPTERS, "fisher": poison(fishers, 0, np.inf)})
    np.testing.assert_array_equal(used, [False, True, True])
    expected = jax.tree.map(lambda x: (20 * x[1] + 30 * x[2]) / 50, ADAPTERS)
    jax.tree.map(lambda m, e: np.testing.assert_allclose(m, e, rtol=1e-5), merged["adapters"], expected)


def test_dropped_clients_are_left_out_and_an_empty_round_keeps_the_previous_state():
    merged, used = run_server("fedavg", {"adapters": ADAPTERS}, (False, True, False))
    np.testing.assert_array_equal(used, [False, True, False])
    jax.tree.map(lambda m, x: np.testing.assert_allclose(m, x[1]), merged["adapters"], ADAPTERS)
    nobody, used = run_server("fedavg", {"adapters": ADAPTERS}, (False, False, False))
    assert not used.any()
    jax.tree.map(np.testing.assert_array_equal, nobody, PREVIOUS)


def test_dropout_is_seeded_and_has_the_configured_rate():
    ids = np.arange(50)
    np.testing.assert_array_equal(reporting_clients(ids, 0.3, 0, 7), reporting_clients(ids, 0.3, 0, 7))
    assert not np.array_equal(reporting_clients(ids, 0.3, 0, 7), reporting_clients(ids, 0.3, 0, 8))
    assert reporting_clients(ids, 0.0, 0, 7).all()
    rate = np.mean([~reporting_clients(np.arange(100), 0.3, 0, r) for r in range(50)])
    assert 0.27 < rate < 0.33


def test_a_client_in_two_cohorts_is_dropped_in_both_or_in_neither():
    """20 clients, cohorts of 5 and of 10, dropout 0.5: whether a client reports depends on its id, not on
    who else was sampled or its position in the cohort."""
    agreements = 0
    for round_index in range(30):
        small, large = (sample_cohort(20, size, 0, round_index) for size in (5, 10))
        reports = {size: dict(zip(cohort.tolist(), reporting_clients(cohort, 0.5, 0, round_index)))
                   for size, cohort in ((5, small), (10, large))}
        for client in set(small) & set(large):
            assert reports[5][client] == reports[10][client]
            agreements += 1
    assert agreements > 30


def test_random_streams_never_share_a_key():
    """Cohort sampling used to draw from [seed, round, 0xC0]: the stream of client 192's shuffling."""
    draws = {purpose: generator(0, purpose, 3, 192).random(4).tolist() for purpose in Purpose}
    assert len({tuple(v) for v in draws.values()}) == len(Purpose)
    rows, _ = client_schedule([np.arange(10)], 10, 1, seed=0, round_index=3, client_ids=[192])
    np.testing.assert_array_equal(rows[0, 0], generator(0, Purpose.SHUFFLE, 3, 192).permutation(10))
    # A client's batches are its own: the same whoever shares its round.
    alone, _ = client_schedule([np.arange(10)], 5, 1, seed=0, round_index=3, client_ids=[7])
    together, _ = client_schedule([np.arange(20, 26), np.arange(10)], 5, 1, seed=0, round_index=3,
                                  client_ids=[2, 7])
    np.testing.assert_array_equal(alone[0], together[1])


def test_scaffold_server_state_survives_a_round_nobody_reports():
    scaffold = get_method("scaffold", FED)
    state = scaffold.server_init({"w": jnp.ones((2,))})
    uploads = ClientUploads({"adapters": {"w": jnp.ones((3, 2)) * 5}, "control_delta": {"w": jnp.ones((3, 2))}},
                            COUNTS)
    kept, used = server_round(scaffold, state, uploads, jnp.zeros(3, bool))
    assert not used.any()
    jax.tree.map(np.testing.assert_array_equal, kept, state)
    updated, _ = server_round(scaffold, state, uploads, jnp.array([True, False, True]))
    np.testing.assert_allclose(updated["adapters"]["w"], [5.0, 5.0])
    np.testing.assert_allclose(updated["control"]["w"], [2 / 3, 2 / 3])  # two deltas of 1, over N = 3
    np.testing.assert_allclose(fedavg({"w": jnp.ones((3, 2)) * 5}, COUNTS)["w"], [5.0, 5.0])


def test_no_data_array_reaches_the_servers_program(tiny_config, monkeypatch):
    """In real rounds of every uploading method, the server's program gets the server state, the uploads, the
    example counts and who reported: leaves shaped like the adapters (per client or not) and [K] vectors.
    None of the client data (token ids, masks, images, rows) nor the training losses cross."""
    from fednano_jax.federated import rounds
    from test_sharding import federated_run

    received = []
    original = rounds.compile_programs

    def spying(*args, **kwargs):
        programs = original(*args, **kwargs)

        def server(state, uploads, reporting, noise_key=None, client_keys=None):  # keys: DP noise (fed.dp)
            received.append(jax.tree.leaves((state, uploads, reporting)))
            return programs.server(state, uploads, reporting, noise_key, client_keys)

        return dataclasses.replace(programs, server=server)

    monkeypatch.setattr(rounds, "compile_programs", spying)
    for name in ("fedavg", "fednano", "fednano_ef", "scaffold"):
        received.clear()
        result = federated_run(tiny_config, name, num_clients=4, cohort=4)
        adapter_shapes = {tuple(x.shape) for x in jax.tree.leaves(result.server["adapters"])}
        allowed = adapter_shapes | {(4,) + s for s in adapter_shapes} | {(4,)}
        assert received and all(tuple(np.shape(leaf)) in allowed for leaf in received[0]), name
        vectors = [np.asarray(leaf) for leaf in received[0] if np.shape(leaf) == (4,)]
        assert len(vectors) == 2  # the example counts and who reported, nothing else per client
        losses = np.asarray(result.history[0]["train_loss"])
        assert not any(np.allclose(v, losses) for v in vectors)


def test_the_fisher_merge_without_example_weights_weighs_every_usable_client_alike():
    """fed.fisher_example_weights=False (the `merge` study's ablation): Fisher alone decides, not |D_k|."""
    from fednano_jax.federated.aggregation import fisher_merge

    fishers = jax.tree.map(lambda x: jnp.abs(x) + 1.0, ADAPTERS)
    method = get_method("fednano", fed_of(fisher_floor=1e-6, num_clients=3, fisher_example_weights=False))
    merged, _ = server_round(method, PREVIOUS, ClientUploads({"adapters": ADAPTERS, "fisher": fishers}, COUNTS),
                             jnp.array([True, False, True]))
    expected = fisher_merge(ADAPTERS, fishers, jnp.array([1.0, 0.0, 1.0]), 1e-6)
    jax.tree.map(lambda m, e: np.testing.assert_allclose(m, e, rtol=1e-6), merged["adapters"], expected)
    weighted, _ = run_server("fednano", {"adapters": ADAPTERS, "fisher": fishers}, (True, False, True))
    assert not np.allclose(weighted["adapters"]["down"], merged["adapters"]["down"])
