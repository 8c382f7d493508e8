"""Heterogeneous adapter ranks (`model.adapter.client_ranks`): masked clients, masked aggregation, the run."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import SMALL_MODEL, fed_of, run_main
from fednano_jax.config import read
from fednano_jax.errors import ConfigError
from fednano_jax.eval.evaluate import Evaluator
from fednano_jax.federated.aggregation import fedavg, fisher_merge
from fednano_jax.federated.client import ClientInputs, local_update, make_client_programs
from fednano_jax.federated.methods import get_method
from fednano_jax.federated.methods.fednano import FedNano
from fednano_jax.settings import Adapter
from fednano_jax.models.adapter_ranks import client_ranks, rank_axis, rank_bytes, rank_mask, truncate
from fednano_jax.federated.schedule import client_schedule
from fednano_jax.federated.server import Aggregation, ClientUploads, server_round
from fednano_jax.models.mllm import MultimodalModel, split_model
from test_federated import FED, packed_outputs, tiny_setup


def slice_rank(adapters, r):
    """The first r components of rank-R adapters, as a rank-r adapter's weights."""
    return jax.tree_util.tree_map_with_path(lambda path, x: jax.lax.slice_in_dim(x, 0, r, axis=rank_axis(path, x)),
                                            adapters)


def test_a_client_at_rank_r_trains_what_an_unmasked_rank_r_adapter_would(tiny_config):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config)  # rank 4, alpha 8
    r = 2
    # The masked client keeps the rank-4 adapter's scale alpha / 4: an unmasked rank-2 adapter with alpha 8 * 2 / 4.
    small = dataclasses.replace(tiny_config, adapter=dataclasses.replace(tiny_config.adapter, rank=r, alpha=4.0))
    small_graphdef, _, _ = split_model(MultimodalModel(small, nnx.Rngs(0)))
    rows, valid = client_schedule([np.arange(12)], 3, 2, seed=0, round_index=0)
    optimizer, method = optax.adamw(1e-2, weight_decay=0.1), FedNano(FED)

    def train(graph, start, rank):
        client = ClientInputs(jnp.asarray(rows[0]), jnp.asarray(valid[0]), None, rank)
        return local_update(graph, optimizer, method, rows.shape[1] // 2, frozen, data, {"adapters": start}, client)

    masked = train(graphdef, adapters, jnp.asarray(r))
    unmasked = train(small_graphdef, slice_rank(adapters, r), None)
    for name in ("adapters", "fisher"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
                     slice_rank(masked.upload[name], r), unmasked.upload[name])
        for leaf, mask in zip(jax.tree.leaves(masked.upload[name]), jax.tree.leaves(rank_mask(adapters, r))):
            assert np.all(np.asarray(leaf)[np.asarray(mask) == 0] == 0)  # nothing beyond rank r is sent
    np.testing.assert_allclose(masked.loss, unmasked.loss, rtol=1e-5)
    # A client at the full rank is the unmasked client.
    full = train(graphdef, adapters, jnp.asarray(4))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), full.upload,
                 train(graphdef, adapters, None).upload)


def test_mixed_ranks_run_in_one_vmapped_and_one_packed_program_as_each_client_alone(tiny_config):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    client_rows = [np.arange(0, 5), np.arange(5, 8), np.arange(8, 12)]
    ranks = np.array([4, 2, 1])
    rows, valid = client_schedule(client_rows, 2, 1, seed=0, round_index=0)
    clients = ClientInputs(jnp.asarray(rows), jnp.asarray(valid), None, jnp.asarray(ranks))
    vmapped, sequential = make_client_programs(graphdef, optax.adamw(1e-2), FedNano(FED), rows.shape[1])
    broadcast = {"adapters": adapters}
    together = jax.jit(vmapped)(frozen, data, broadcast, clients)
    alone = sequential(frozen, data, broadcast, clients)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), together, alone)
    _, packed = packed_outputs(graphdef, frozen, data, broadcast, FedNano(FED), client_rows, 1, 0.5, ranks=ranks)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), packed.upload,
                 together.upload)
    down = np.asarray(together.upload["adapters"]["edge"]["adapter_text"]["down"])
    assert np.all(down[1, :, 2:] == 0) and np.all(down[2, :, 1:] == 0) and np.any(down[0, :, 3] != 0)


# Three clients of ranks 2, 1, 2 on a rank-2 adapter with one `down` [1, 2] and one `up` [2, 1].
PARAMS = {"a": {"down": jnp.array([[[1.0, 2.0]], [[3.0, 9.0]], [[5.0, 6.0]]]),
                "up": jnp.array([[[1.0], [4.0]], [[2.0], [9.0]], [[3.0], [8.0]]])}}
FISHERS = {"a": {"down": jnp.array([[[1.0, 1.0]], [[2.0, 0.0]], [[3.0, 3.0]]]),
                 "up": jnp.array([[[2.0], [1.0]], [[1.0], [0.0]], [[1.0], [3.0]]])}}
PREVIOUS = {"a": {"down": jnp.array([[7.0, 7.0]]), "up": jnp.array([[7.0], [7.0]])}}
COUNTS = jnp.array([1.0, 2.0, 1.0])  # w = 1/4, 1/2, 1/4


def masks_of(ranks):
    return jax.vmap(lambda r: rank_mask(PREVIOUS, r))(jnp.asarray(ranks))


def test_masked_fedavg_averages_each_rank_slice_over_its_holders():
    merged = fedavg(PARAMS, COUNTS, masks_of([2, 1, 2]), PREVIOUS)
    # Component 0: every client (1/4, 1/2, 1/4); component 1: clients 0 and 2 only (1/2, 1/2).
    np.testing.assert_allclose(merged["a"]["down"], [[0.25 * 1 + 0.5 * 3 + 0.25 * 5, 0.5 * 2 + 0.5 * 6]])
    np.testing.assert_allclose(merged["a"]["up"], [[0.25 * 1 + 0.5 * 2 + 0.25 * 3], [0.5 * 4 + 0.5 * 8]])
    # A slice no client holds keeps its value; zero-padding (no masks) averages in the zeros it was sent.
    alone = fedavg(PARAMS, COUNTS, masks_of([1, 1, 1]), PREVIOUS)
    np.testing.assert_allclose(alone["a"]["down"], [[3.0, 7.0]])
    zero_padded = {"a": jax.tree.map(lambda p, m: p * m, PARAMS["a"], masks_of([2, 1, 2])["a"])}
    np.testing.assert_allclose(fedavg(zero_padded, COUNTS)["a"]["down"][0, 1], 0.25 * 2 + 0.25 * 6)


def test_masked_fisher_merge_gives_a_slice_its_holders_fisher_only():
    floor = 1e-6
    merged = fisher_merge(PARAMS, FISHERS, COUNTS, floor, masks_of([2, 1, 2]), PREVIOUS)
    w = np.array([0.25, 0.5, 0.25])
    f0, p0 = np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 5.0])  # down component 0: all hold it
    f1, p1 = np.array([1.0, 0.0, 3.0]), np.array([2.0, 0.0, 6.0])  # component 1: client 1 does not (zero Fisher)
    np.testing.assert_allclose(merged["a"]["down"][0], [(w * f0 * p0).sum() / (w * f0).sum(),
                                                        (w * f1 * p1).sum() / (w * f1).sum()], rtol=1e-6)
    # Without masks the floor would give client 1's (zeroed) slice a say.
    unmasked = fisher_merge(PARAMS, FISHERS, COUNTS, floor)
    assert not np.isclose(unmasked["a"]["down"][0, 1], merged["a"]["down"][0, 1], rtol=1e-9, atol=0)


def test_the_server_round_aggregates_under_the_clients_ranks_or_zero_padded():
    fed = fed_of(fisher_floor=1e-6, fisher_example_weights=True)
    uploads = {"adapters": jax.tree.map(lambda p, m: p * m, PARAMS, masks_of([2, 1, 2])), "fisher": FISHERS}
    state = {"adapters": PREVIOUS}
    for name in ("fedavg", "fednano"):
        method = get_method(name, fed)
        masked, used = server_round(method, state, ClientUploads(uploads, COUNTS, jnp.array([2, 1, 2])),
                                    jnp.ones(3, bool))
        expected = (fedavg(PARAMS, COUNTS, masks_of([2, 1, 2]), PREVIOUS) if name == "fedavg" else
                    fisher_merge(PARAMS, FISHERS, COUNTS, 1e-6, masks_of([2, 1, 2]), PREVIOUS))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), masked["adapters"], expected)
        padded, _ = server_round(method, state, ClientUploads(uploads, COUNTS, jnp.array([2, 1, 2])),
                                 jnp.ones(3, bool), aggregation=Aggregation(rank_aggregation="zero_pad"))
        plain, _ = server_round(method, state, ClientUploads(uploads, COUNTS), jnp.ones(3, bool))
        jax.tree.map(np.testing.assert_array_equal, padded, plain)


def test_ranks_cycle_over_clients_and_upload_bytes_count_each_clients_rank():
    np.testing.assert_array_equal(client_ranks(Adapter(client_ranks=(16, 8, 4)), 5), [16, 8, 4, 16, 8])
    assert client_ranks(Adapter(), 5) is None
    adapters = {"t": {"down": np.zeros((32, 16), np.float32), "up": np.zeros((16, 32), np.float32)}}
    assert rank_bytes(adapters, None) == 2 * 32 * 16 * 4
    assert rank_bytes(adapters, 4) == 2 * 32 * 4 * 4
    truncated = truncate({"t": {"down": jnp.ones((3, 4)), "up": jnp.ones((4, 3))}}, 1)
    assert float(truncated["t"]["down"].sum()) == 3 and float(truncated["t"]["up"].sum()) == 3


def tiny_experiment(**adapter):
    from configs.easyvqa_tiny import get_config

    config = get_config()
    config.model.adapter.update(adapter)
    return config


@pytest.mark.parametrize("ranks, methods, message", [
    ((16, 32), ("fedavg",), "between 1 and model.adapter.rank=16"),
    ((8, 4), ("fedavg", "scaffold"), "client_ranks does not apply to scaffold: its server control variate"),
    ((8, 4), ("centralized",), "client_ranks does not apply to centralized"),
    (("8,x",), ("fedavg",), "ranks like 16,8,4"),  # what the command line makes of --config...client_ranks=8,x
])
def test_bad_client_ranks_get_one_sentence(ranks, methods, message):
    config = tiny_experiment(client_ranks=ranks)
    config.fed.methods = methods
    with pytest.raises(ConfigError, match=message):
        read(config)
    config.fed.methods, config.model.adapter.client_ranks = ("fedavg",), (8, 4)
    config.fed.rank_aggregation = "median"
    with pytest.raises(ConfigError, match="fed.rank_aggregation must be one of"):
        read(config)


def test_each_client_is_evaluated_with_the_shared_adapters_at_its_own_rank():
    evaluator = Evaluator.__new__(Evaluator)
    evaluator.ranks = np.array([4, 2, 4])
    evaluator.data = type("Data", (), {"client_test": [np.array([0, 1]), np.array([2]), np.array([3, 4])]})()
    seen = {}

    def generate(rows, adapters):
        for row in rows.tolist():
            seen[row] = int(np.count_nonzero(adapters["t"]["down"]))
        return ["x"] * len(rows)

    evaluator._generate, evaluator.score = generate, lambda predictions: predictions
    predictions = evaluator.shared({"t": {"down": jnp.ones((3, 4)), "up": jnp.ones((4, 3))}})
    assert sorted(predictions) == [0, 1, 2, 3, 4]
    assert seen == {0: 12, 1: 12, 2: 6, 3: 12, 4: 12}


def test_a_run_with_client_ranks_and_server_adam_reports_by_rank(easy_vqa_dir, tmp_path):
    """The acceptance commands, on a small model: `client_ranks=16,8,4` with FedAvg, FedNano and LocFT, and
    FedNano's Fisher merge plus server Adam, in one run."""
    result = run_main(*SMALL_MODEL, f"--config.data.dir={easy_vqa_dir}",
                      f"--config.pretrain.cache_dir={tmp_path / 'cache'}", "--config.pretrain.shipped=False",
                      "--config.pretrain.steps=12", "--config.pretrain.batch_size=16",
                      "--config.data.pretrain_images=100", "--config.data.train_examples=160",
                      "--config.data.test_examples=60", "--config.fed.num_clients=3", "--config.fed.rounds=2",
                      "--config.fed.methods=fedavg,fednano,locft", "--config.model.adapter.client_ranks=16,8,4",
                      "--config.fed.server_optimizer=adam", "--config.fed.server_learning_rate=0.01",
                      "--config.eval.batch_size=60", f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    assert set(results) == {"Untuned", "FedAvg + server Adam", "FedNano + server Adam", "LocFT"}
    for row in results.values():
        assert list(row["rank_average"]) == ["16", "8", "4"]
        for rank, client in (("16", 0), ("8", 1), ("4", 2)):  # one client per rank here
            assert row["rank_average"][rank] == pytest.approx(row["accuracy"][client])
    assert "| C1 (r=16) | C2 (r=8) | C3 (r=4) |" in (tmp_path / "run" / "results.md").read_text()
    assert "Average accuracy of each adapter rank's clients" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    full = 2 * 2 * 32 * 16 * 4  # two adapters x (down, up), each 32 x 16 at rank 16, float32
    per_tree = full * (16 + 8 + 4) // 16
    uploads = {r["method"]: r["uploaded_bytes"] for r in records if r.get("round") == 1}
    assert uploads == {"fedavg": per_tree, "fednano": 2 * per_tree, "locft": 0}


def test_workdirs_written_before_client_ranks_existed_still_resume():
    from fednano_jax.config import resume_fingerprint

    config = tiny_experiment()
    older = tiny_experiment()
    del older.model.adapter["client_ranks"], older.fed["rank_aggregation"]  # a config from before the settings
    assert resume_fingerprint(read(config), "key") == resume_fingerprint(read(older), "key")
    assert (resume_fingerprint(read(tiny_experiment(client_ranks=(8, 4))), "key")
            != resume_fingerprint(read(config), "key"))
