"""FedNano on Flower (`fednano_jax/flower/`): the messages, SecAgg+ as an exact adder of the simulation's fixed
point, and the ServerApp's view of its SuperNodes over an in-process Grid (`flower_grid.py`: every message through
Flower's protobuf serde, a ClientApp's exception answered as an error reply) with stand-in ClientApps (fast)."""

import json
import re

import numpy as np
import pytest
from flower_grid import InProcessGrid
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fednano_jax.errors import ClientProcessError
from fednano_jax.federated.client import ClientInputs
from fednano_jax.federated.secure import flat
from fednano_jax.flower.client_app import secagg_when_asked
from fednano_jax.flower.messages import (from_limbs, limb_bits, reply_content, reply_of, round_content, round_of,
                                         secagg_ranges, to_limbs)
from fednano_jax.flower.supernodes import FlowerClients
from fednano_jax.privacy.secagg import dequantise, quantise


def test_round_and_reply_messages_keep_nested_trees_none_and_the_header():
    trees = {"broadcast": {"adapters": {"a": np.arange(6.0).reshape(2, 3)}}, "state": None,
             "rows": np.arange(4, dtype=np.int32)}
    got, header = round_of(round_content(trees, {"method": "fednano", "client": "2"}))
    assert header == {"method": "fednano", "client": "2"} and got["state"] is None
    np.testing.assert_array_equal(got["broadcast"]["adapters"]["a"], trees["broadcast"]["adapters"]["a"])
    assert got["rows"].dtype == np.int32
    got, metrics = reply_of(reply_content({"upload": {"x": np.ones(3, np.float32)}}, {"loss": 0.5, "error": "no"}))
    assert metrics == {"loss": 0.5, "error": "no"} and got["upload"]["x"].dtype == np.float32


@pytest.mark.parametrize("cohort", [2, 3, 7, 100])
def test_digits_pass_flowers_quantiser_unchanged_and_add_to_the_simulations_fixed_point_sum(cohort):
    """What SecAgg+ does to each client's digits (`quantize`, stochastic rounding), the ring's sum and its read-back
    (`dequantize`, the offset, the mean it hands over), undone by the server: exactly Σ quantise(v_k)."""
    rng = np.random.default_rng(cohort)
    vectors = [rng.normal(size=500) * 10.0 ** rng.uniform(-9, 5, size=500) for _ in range(cohort)]
    bits, ranges = limb_bits(cohort), secagg_ranges(cohort)
    clip, levels, modulus = ranges["clipping_range"], ranges["quantization_range"], ranges["modulus_range"]
    digits = [to_limbs(v, bits) for v in vectors]
    assert max(np.abs(d).max() for client in digits for d in client) <= clip
    quantised = [quantize(client, clip, levels) for client in digits]
    assert all(np.array_equal(q, d + clip) for client, dq in zip(quantised, digits) for q, d in zip(client, dq))
    ring = [sum(client[i].astype(np.int64) for client in quantised) % modulus for i in range(len(digits[0]))]
    assert cohort * levels < modulus  # SecAgg+'s weight factor (2^q per client) does not wrap either
    mean = [(x - (cohort - 1) * clip) / cohort for x in dequantize(ring, clip, levels)]  # as its unmask stage
    got = from_limbs([m * cohort for m in mean], bits)
    np.testing.assert_array_equal(got, dequantise(sum(quantise(v) for v in vectors)))
    np.testing.assert_allclose(got, sum(vectors), rtol=1e-14, atol=cohort * 2.0 ** -40)


# ----------------------------------------------------------- the ServerApp's SuperNodes, stand-in ClientApps
def stand_in_app(partition_of_node=None) -> ClientApp:
    """A ClientApp that trains by adding its id to the broadcast; under SecAgg+ its contribution is {"delta":
    broadcast + id, "weight": [id + 1]}, sent as digits (the real app's reply, without a model)."""
    app = ClientApp(mods=[secagg_when_asked])

    @app.query()
    def hello(msg, context):
        return Message(RecordDict({"hello": ConfigRecord({"partition": int(context.node_config["partition-id"]),
                                                          "weights_bytes": 7})}), reply_to=msg)

    @app.train()
    def train(msg, context):
        trees, header = round_of(msg.content)
        me = int(context.node_config["partition-id"])
        if header["method"] == "refuse" and me == 1:
            return Message(reply_content({}, {"error": "The split-step server refused client 1's step."}),
                           reply_to=msg)
        if header.get("secure") == "1":
            contribution = contribution_of(me, trees["server"]["adapters"])
            layout = {"skeleton": {"delta": {"a": 0}, "weight": 0},
                      "shapes": [list(x.shape) for x in (contribution["delta"]["a"], contribution["weight"])]}
            digits = to_limbs(flat(contribution), int(header["limb_bits"]))
            return Message(reply_content({"digits": {str(i): d for i, d in enumerate(digits)}},
                                         {"loss": float(me), "used": 1, "layout": json.dumps(layout)}), reply_to=msg)
        upload = {"adapters": {"a": trees["broadcast"]["adapters"]["a"] + me}}
        return Message(reply_content({"upload": upload, "state": trees["state"], "loss": np.float32(me)},
                                     {"loss": float(me), "split_sent": 10 * me}), reply_to=msg)

    return app


def contribution_of(client: int, adapters) -> dict:
    return {"delta": {"a": adapters["a"] + client}, "weight": np.array([client + 1.0], np.float32)}


BROADCAST = {"adapters": {"a": np.full((2, 3), 0.25, np.float32)}}


def inputs(count: int) -> ClientInputs:
    rows = np.arange(count * 4, dtype=np.int32).reshape(count, 2, 2)
    return ClientInputs(rows, np.ones_like(rows, bool), None)


def supernodes(count: int = 3, dead=(), partitions=None) -> tuple[FlowerClients, InProcessGrid]:
    partitions = list(range(count)) if partitions is None else partitions
    grid = InProcessGrid(stand_in_app(), [{"partition-id": k} for k in partitions])
    clients = FlowerClients(grid, count, "{}", node_timeout_s=5, round_timeout_s=5)
    grid.dead = {1000 + partitions.index(k) for k in dead}  # killed after they said hello
    return clients, grid


def test_each_client_trains_on_its_own_supernode_by_partition_id():
    clients, _ = supernodes(partitions=[2, 0, 1])
    assert clients.node_of == {2: 1000, 0: 1001, 1: 1002} and clients.ready == [{"weights_bytes": 7}] * 3
    outputs, failures, traffic = clients.local_updates("fedavg", False, 2, BROADCAST, np.array([2, 0]), inputs(2))
    assert failures == [None, None] and [t["split_sent"] for t in traffic] == [20, 0]
    np.testing.assert_array_equal(outputs.upload["adapters"]["a"][:, 0, 0], [2.25, 0.25])
    np.testing.assert_array_equal(outputs.loss, [2.0, 0.0])


def test_a_refused_or_silent_client_is_left_out_with_its_sentence_and_a_round_none_finish_is_an_error():
    clients, _ = supernodes(dead=[2])
    _, failures, _ = clients.local_updates("refuse", False, 2, BROADCAST, np.array([0, 1, 2]), inputs(3))
    assert failures[0] is None and "refused client 1" in failures[1] and "did not answer within 5 s" in failures[2]
    with pytest.raises(ClientProcessError, match="no client finished its update"):
        clients.local_updates("refuse", False, 2, BROADCAST, np.array([1, 2]), inputs(2))


def test_supernodes_that_share_a_partition_or_never_connect_stop_the_run_with_one_sentence():
    with pytest.raises(ClientProcessError, match="partition-id 1 is out of 0..2 or taken by another node"):
        supernodes(partitions=[0, 1, 1])
    grid = InProcessGrid(stand_in_app(), [{"partition-id": 0}])
    with pytest.raises(ClientProcessError, match="1 of the 3 SuperNodes"):
        FlowerClients(grid, 3, "{}", node_timeout_s=1.5)


@pytest.mark.parametrize("cohort, leave", [
    (3, {}),
    (3, {1: Stage.SETUP}),  # gone before the round: Flower 1.42 alone would halt at the unmask stage
    (3, {2: Stage.COLLECT_MASKED_VECTORS}),  # killed while training: its masks are removed from the others'
    (5, {1: Stage.SHARE_KEYS, 3: Stage.COLLECT_MASKED_VECTORS, 4: Stage.COLLECT_MASKED_VECTORS}),
])
def test_secagg_plus_hands_the_server_the_survivors_sum_alone(cohort, leave):
    """Flower's SecAgg+ (workflow and mod) over the Grid: the sum of the surviving clients' contributions to 2^-40,
    and no reply the ServerApp holds carries a client's digits in the clear (the spy is the Grid itself)."""
    server = {"adapters": BROADCAST["adapters"]}
    clients, grid = supernodes(cohort)
    grid.dies_at = {1000 + k: stage for k, stage in leave.items()}
    ids = np.arange(cohort)
    outputs, failures, _, sums, used, _ = clients.secure_updates("fedavg", 2, server, ids, inputs(cohort), 0,
                                                                  threshold=2)
    summed = [k for k in ids if k not in leave]
    want = sum(contribution_of(k, server["adapters"])["delta"]["a"] for k in summed)
    np.testing.assert_allclose(sums["delta"]["a"], want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(sums["weight"], [sum(k + 1.0 for k in summed)], rtol=0, atol=1e-9)
    assert used.tolist() == [k in summed for k in ids] and [f is None for f in failures] == used.tolist()
    np.testing.assert_array_equal(outputs.loss[used], np.array(summed, np.float64))
    clip = secagg_ranges(cohort)["clipping_range"]
    plain = [d + clip for k in summed for d in to_limbs(flat(contribution_of(k, server["adapters"])),
                                                          limb_bits(cohort))]
    masked_seen = 0
    for reply in grid.received:  # all the ServerApp was handed: no array in the clear, no unmasked digit
        assert not [a for record in reply.content.array_records.values() for a in record.values()]
        for blob in reply.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.MASKED_PARAMETERS, []):
            vector, masked_seen = bytes_to_ndarray(blob), masked_seen + 1
            assert all(np.mean(vector == digits) < 0.01 for digits in plain if digits.shape == vector.shape)
    assert masked_seen == len(summed) * (len(plain) // len(summed) + 1)  # each digit array and SecAgg+'s factor


# -------------------------------------------------------------------------- the ServerApp's run config
def test_the_run_configs_overrides_reach_the_config_and_a_wrong_one_is_one_sentence(tmp_path):
    from fednano_jax.errors import ConfigError
    from fednano_jax.flower.server_app import experiment_config

    config = experiment_config({"config": "configs/easyvqa_tiny.py",
                                "overrides": json.dumps({"fed.rounds": 2, "fed.methods": "fedavg,fednano"})})
    assert config.fed.rounds == 2 and tuple(config.fed.methods) == ("fedavg", "fednano")
    saved = tmp_path / "experiment.json"
    saved.write_text(json.dumps(config.to_dict()))
    assert experiment_config({"config": str(saved)}).fed.rounds == 2
    for overrides, gist in (('{"fed.round": 2}', "names 'fed.round', which is no config key"),
                            ('{"fed.rounds": "two"}', "sets 'fed.rounds' to 'two', but it holds a int"),
                            ("fed.rounds=2", "must be a JSON object of dotted keys")):
        with pytest.raises(ConfigError, match=re.escape(gist)):
            experiment_config({"config": "configs/easyvqa_tiny.py", "overrides": overrides})


@pytest.mark.parametrize("overrides, gist", [
    ({"fed.dropout": 0.2}, "fed.dropout simulates dropouts and must be 0 on Flower"),
    ({"fed.secure_aggregation": True, "fed.num_clients": 4, "fed.clients_per_round": 1},
     "SecAgg+ needs at least 2 clients a round"),
    ({"fed.secure_aggregation": True, "fed.methods": "scaffold"}, "scaffold keeps client state"),
])
def test_what_flower_cannot_run_is_refused_with_one_sentence(overrides, gist):
    from fednano_jax.config import read
    from fednano_jax.errors import ConfigError
    from fednano_jax.flower.server_app import check_flower, experiment_config

    config = read(experiment_config({"config": "configs/easyvqa_tiny.py", "overrides": json.dumps(overrides)}))
    with pytest.raises(ConfigError, match=re.escape(gist)):
        check_flower(config)
