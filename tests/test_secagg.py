"""Secure aggregation (privacy/secagg.py, federated/secure.py): Shamir shares, masks that cancel, the
plain aggregate within the quantisation error with and without dropped clients, and a server that never
holds one client's unmasked upload."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fed_of

from fednano_jax.federated import secure
from fednano_jax.federated.methods import get_method
from fednano_jax.federated.server import ClientUploads, client_contributions, finalize_round, server_round
from fednano_jax.privacy import secagg

FED = fed_of(num_clients=5, clients_per_round=0, fisher_floor=1e-6, secagg_threshold=3)
RNG = np.random.default_rng(0)
ADAPTERS = {"down": jnp.asarray(RNG.normal(size=(5, 6, 2)), jnp.float32),
            "up": jnp.asarray(RNG.normal(size=(5, 2, 6)) * 0.1, jnp.float32)}
FISHER = jax.tree.map(lambda x: jnp.abs(x) * 1e-3, ADAPTERS)
COUNTS = np.array([10, 20, 30, 40, 55])
GLOBAL = {"adapters": jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), ADAPTERS)}
TOLERANCE = 5 * 2.0 ** -(secagg.FRACTION_BITS + 1)  # five clients' rounding, before dividing by the weights


def test_shamir_recovers_the_secret_from_any_t_shares_and_not_from_fewer():
    secret = int.from_bytes(b"\x07" * 32, "big")
    shares = secagg.shamir_split(secret, list(range(5)), 3, np.random.default_rng(1))
    assert secagg.shamir_combine({h: shares[h] for h in (0, 2, 4)}) == secret
    assert secagg.shamir_combine({h: shares[h] for h in (1, 3, 4)}) == secret
    assert secagg.shamir_combine({h: shares[h] for h in (1, 3)}) != secret


@pytest.mark.parametrize("dropped", [(), (1,), (0, 3)])
def test_the_unmasked_sum_is_the_survivors_plain_sum(dropped):
    vectors = [np.random.default_rng(k).normal(size=40) * 50 for k in range(5)]
    protocol = secagg.SecureRound(5, 3, seed=0, round_index=2, client_ids=[3, 7, 8, 11, 12])
    masked = {k: protocol.mask(k, v) for k, v in enumerate(vectors) if k not in dropped}
    total = protocol.unmask(masked, 40)
    expected = sum(v for k, v in enumerate(vectors) if k not in dropped)
    np.testing.assert_allclose(total, expected, rtol=0, atol=TOLERANCE)
    for k, vector in masked.items():  # one masked vector is no quantised contribution
        assert not np.array_equal(vector, secagg.quantise(vectors[k]))


def test_fewer_survivors_than_the_threshold_void_the_round():
    protocol = secagg.SecureRound(5, 3, seed=0, round_index=0, client_ids=range(5))
    masked = {k: protocol.mask(k, np.ones(4)) for k in (0, 4)}
    assert protocol.unmask(masked, 4) is None


def plain(name, reporting):
    new, used = server_round(get_method(name, FED), GLOBAL, ClientUploads(
        {"adapters": ADAPTERS, "fisher": FISHER} if name == "fednano" else {"adapters": ADAPTERS},
        jnp.asarray(COUNTS)), jnp.asarray(reporting))
    return new["adapters"], np.asarray(used)


def secure_round(name, reporting, threshold=3):
    """A round as `rounds.aggregate` runs it under secure aggregation: the clients' contributions, their secure
    sum, the server's program on that sum."""
    method = get_method(name, FED)
    uploads = {"adapters": ADAPTERS, "fisher": FISHER} if name == "fednano" else {"adapters": ADAPTERS}
    stacked, used = client_contributions(method, GLOBAL, ClientUploads(uploads, jnp.asarray(COUNTS)),
                                         jnp.asarray(reporting))
    sums, used, cost = secure.secure_sums(jax.tree.map(np.asarray, stacked), np.asarray(used), np.arange(5),
                                          threshold, seed=0, round_index=1)
    new = GLOBAL if sums is None else finalize_round(method, GLOBAL, sums, jnp.asarray(used.sum()))  # a void round
    return new, used, cost, stacked, sums


@pytest.mark.parametrize("name", ["fedavg", "fednano"])
@pytest.mark.parametrize("reporting", [(True,) * 5, (True, False, True, True, False)])
def test_the_secure_aggregate_is_the_plain_one_within_quantisation(name, reporting):
    new, used, cost, _, _ = secure_round(name, reporting)
    expected, expected_used = plain(name, reporting)
    np.testing.assert_array_equal(used, expected_used)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), new["adapters"], expected)
    assert cost["secagg_extra_bytes_per_client"] > 0 and cost["secagg_seconds"] > 0


def test_too_few_survivors_leave_no_sum():
    _, used, _, _, sums = secure_round("fedavg", (True, False, False, True, False))
    assert sums is None and not used.any()


def test_no_array_reaching_the_server_is_one_clients_unmasked_upload(monkeypatch):
    """Everything the server side receives (the masked vectors it unmasks, the sums its program takes) is
    compared with every client's contribution, quantised and not, and its plain upload."""
    seen = []
    unmask = secagg.SecureRound.unmask

    def spying_unmask(self, masked, length):
        seen.extend(np.asarray(v) for v in masked.values())
        return unmask(self, masked, length)

    monkeypatch.setattr(secagg.SecureRound, "unmask", spying_unmask)
    _, _, _, stacked, sums = secure_round("fednano", (True,) * 5)
    seen.extend(np.asarray(x) for x in jax.tree.leaves(sums))
    assert len(seen) == 5 + 4  # five masked vectors; numerator and denominator of two leaves
    private = []
    for k in range(5):
        vector = secure.flat(jax.tree.map(lambda x: x[k], stacked))
        upload = [np.asarray(x[k]) for x in jax.tree.leaves((ADAPTERS, FISHER))]
        private += [vector, secagg.quantise(vector), *upload, *[np.asarray(x[k]) for x in jax.tree.leaves(stacked)]]
    for array in seen:
        for secret in private:
            assert array.shape != secret.shape or not np.allclose(array.astype(np.float64), secret, atol=1e-6)


@pytest.mark.parametrize("name", ["fednano"])  # FedAvg's sums: the server_round test above
def test_rounds_under_secure_aggregation_give_the_plain_rounds_adapters(tiny_config, name):
    from test_sharding import federated_run

    plain_run = federated_run(tiny_config, name, num_clients=4, cohort=4)
    secure_run = federated_run(tiny_config, name, num_clients=4, cohort=4, fed={"secure_aggregation": True})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), secure_run.server["adapters"],
                 plain_run.server["adapters"])
    assert secure_run.history[0]["secagg_extra_bytes_per_client"] > 0
    assert "secagg_extra_bytes_per_client" not in plain_run.history[0]
