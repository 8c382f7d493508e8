"""Clients sharded over a device mesh give the 1-device results, and each device holds only its clients.

The multi-device tests need 8 devices: run this file with
XLA_FLAGS=--xla_force_host_platform_device_count=8, or let
`test_eight_device_tests_in_a_subprocess` do that (the rest of the suite keeps 1 device).
"""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict
from flax import nnx

from fednano_jax.data.batches import HostImages
from fednano_jax.config import read
from fednano_jax.parallel import mesh as sharding
from fednano_jax.eval.generate import greedy_generate
from fednano_jax.federated.methods import get_method
from fednano_jax.federated.client import ClientInputs
from fednano_jax.federated.rounds import compile_programs, run_method
from fednano_jax.models.mllm import MultimodalModel, split_model
from test_federated import tiny_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIGHT = "--xla_force_host_platform_device_count=8"
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS=" + EIGHT + ")")


def mesh_config(clients=-1, model=1, backbone="replicated"):
    return ConfigDict(dict(clients=clients, model=model, backbone=backbone, fsdp_min_size=256))


def run_config(num_clients, cohort, rounds=1):
    from configs.easyvqa_tiny import get_config

    config = get_config()
    config.fed.update(dict(num_clients=num_clients, clients_per_round=cohort, rounds=rounds, batch_size=2,
                           learning_rate=1e-2))
    config.eval.every_rounds = 0
    config.checkpoint.every_rounds = 0
    return config


class NoEvaluation:
    def shared(self, adapters):
        return {}

    def personal(self, adapters):
        return {}


class DecodingEvaluation:
    """Greedy answers to the first rows, decoded with the backbone the run trains with, as the Evaluator does."""

    def __init__(self, graphdef, frozen, data):
        self.graphdef = graphdef
        self.frozen = frozen
        self.inputs = (data["input_ids"][:2], data["attention_mask"][:2], data["images"][:2])

    def shared(self, adapters):
        tokens = greedy_generate(self.graphdef, self.frozen, adapters, *self.inputs, max_new_tokens=2, pad_id=0,
                                 eos_id=1)
        return {"answers": np.asarray(tokens).tolist()}

    def personal(self, stacked):
        return {"answers": [self.shared(jax.tree.map(lambda x: x[k], stacked))["answers"]
                            for k in range(jax.tree.leaves(stacked)[0].shape[0])]}


def federated_run(tiny_config, method, num_clients, cohort, mesh=None, mesh_cfg=None, rounds=1, evaluate=False,
                  client_chunk=0, packed=False, stream_images=False, fed=None):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config, rows=3 * num_clients)
    if stream_images:  # data.stream_images: the image table on the host, each step's images fetched
        data = {**data, "images": HostImages(np.asarray(data["images"]))}
    client_rows = np.array_split(np.arange(3 * num_clients), num_clients)
    client_rows[0] = np.arange(3 * num_clients)[:7]  # uneven clients, so packing has lanes to fill
    config = run_config(num_clients, cohort, rounds)
    config.fed.client_chunk, config.fed.pack_clients = client_chunk, packed
    for key, value in (fed or {}).items():  # e.g. {"secure_aggregation": True} or {"dp": {...}}
        config.fed[key].update(value) if isinstance(value, dict) else setattr(config.fed, key, value)
    config.mesh = mesh_cfg or mesh_config()
    config.eval.every_rounds = int(evaluate)
    config = read(config, run=False)
    # As experiment.py does: one copy of the backbone, placed on the mesh (or committed to the one device).
    frozen = (sharding.place_backbone(frozen, mesh, config.mesh) if mesh is not None
              else jax.device_put(frozen, jax.devices()[0]))
    evaluator = DecodingEvaluation(graphdef, frozen, data) if evaluate else NoEvaluation()
    return run_method(get_method(method, config.fed), graphdef, frozen, adapters, data, client_rows, config,
                      evaluator, lambda record: None, mesh=mesh)


def test_mesh_shape_resolves_the_rest_and_refuses_impossible_shapes():
    assert sharding.mesh_shape(-1, 1, 8) == (8, 1)
    assert sharding.mesh_shape(-1, 2, 8) == (4, 2)
    assert sharding.mesh_shape(2, -1, 8) == (2, 4)
    with pytest.raises(sharding.MeshError, match="must use all 8 devices, got 3 x 0"):
        sharding.mesh_shape(3, -1, 8)
    with pytest.raises(sharding.MeshError, match="cannot both be -1"):
        sharding.mesh_shape(-1, -1, 8)


def test_fsdp_rule_shards_only_large_matrices_on_a_divisible_dimension():
    P = jax.sharding.PartitionSpec
    assert sharding.backbone_spec((4096, 11008), "fsdp", 8, 1024) == P("model")
    assert sharding.backbone_spec((30, 4096), "fsdp", 8, 1024) == P(None, "model")
    assert sharding.backbone_spec((4096,), "fsdp", 8, 1024) == P()  # norms stay replicated
    assert sharding.backbone_spec((16, 16), "fsdp", 8, 1024) == P()  # too small to be worth it
    assert sharding.backbone_spec((4096, 11008), "replicated", 8, 1024) == P()
    # Stacked decoder layers [layers, in, out]: the layer axis the scan slices is never sharded.
    assert sharding.backbone_spec((32, 4096, 11008), "fsdp", 8, 1024, stacked=True) == P(None, "model")
    assert sharding.backbone_spec((32, 4096), "fsdp", 8, 1024, stacked=True) == P()  # stacked norms


def test_only_the_decoder_layers_are_seen_as_stacked(tiny_config):
    """The vision tower's layers are a list (`layers/0/...`); the decoder's are one stacked module."""
    _, frozen, _ = split_model(MultimodalModel(tiny_config, nnx.Rngs(0)))
    stacked = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(frozen)
               if sharding.is_layer_stack(path)}
    assert stacked and all(name.startswith("['server']['layers']") for name in stacked)
    assert any("['vision']['layers']" in jax.tree_util.keystr(path)
               for path, _ in jax.tree_util.tree_leaves_with_path(frozen))
    # As a restored checkpoint spells them: layer numbers as strings.
    restored = {"vision": {"layers": {"0": {"fc1": np.zeros(2)}}}, "layers": {"mlp": np.zeros(2)}}
    assert {jax.tree_util.keystr(path): sharding.is_layer_stack(path)
            for path, _ in jax.tree_util.tree_leaves_with_path(restored)} == {
        "['vision']['layers']['0']['fc1']": False, "['layers']['mlp']": True}


def test_round_time_follows_the_cohort_not_the_population(tiny_config, monkeypatch):
    """1000 clients, a cohort of 4: each round's program sees only the cohort's 4 clients."""
    from fednano_jax.federated import rounds

    seen = []
    original = rounds.compile_programs

    def spying(*args, **kwargs):
        programs = original(*args, **kwargs)

        def local(frozen, data, broadcast, clients):
            seen.append(clients.rows.shape)
            return programs.local(frozen, data, broadcast, clients)

        return dataclasses.replace(programs, local=local)

    monkeypatch.setattr(rounds, "compile_programs", spying)
    result = federated_run(tiny_config, "fedavg", num_clients=1000, cohort=4, rounds=2)
    assert [s[0] for s in seen] == [4, 4]
    assert len(result.history[0]["clients"]) == 4 and result.history[0]["clients"] != result.history[1]["clients"]


@needs_8
@pytest.mark.parametrize("method, num_clients, cohort, clients, model, backbone, chunk, packed, stream", [
    # A cohort of 5 padded to 8 on 4 client devices x 2 FSDP devices, each device training its 2 clients one
    # at a time (fed.client_chunk=1); the Fisher pass is sharded too; images streamed from the host.
    ("fednano", 6, 5, 4, 2, "fsdp", 1, False, True),
    ("locft", 8, 8, -1, 1, "replicated", 0, False, False),  # one client per device; personal adapters sharded
    ("fednano", 4, 4, 2, 4, "fsdp", 1, True, True),  # packed lanes sharded over 2 client devices, a lane at a time
])
def test_sharded_round_matches_one_device(tiny_config, method, num_clients, cohort, clients, model, backbone, chunk,
                                          packed, stream):
    cfg = mesh_config(clients, model, backbone)
    single = federated_run(tiny_config, method, num_clients, cohort)
    sharded = federated_run(tiny_config, method, num_clients, cohort, sharding.make_mesh(cfg), cfg,
                            client_chunk=chunk, packed=packed, stream_images=stream)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, (single.server, single.clients), (sharded.server, sharded.clients))
    np.testing.assert_allclose(single.history[0]["train_loss"], sharded.history[0]["train_loss"], rtol=1e-5)
    assert sharded.history[0]["client_steps"] == single.history[0]["client_steps"]
    if packed:  # the lanes really ran fewer steps than one lane per client
        assert sharded.history[0]["padded_client_steps"] < single.history[0]["padded_client_steps"]


@needs_8
@pytest.mark.parametrize("method", ["fedavg", "locft"])
def test_evaluation_of_mesh_trained_adapters_matches_one_device(tiny_config, method):
    """Decoding with the backbone placed on the mesh (the run's one copy) takes adapters trained on the mesh
    (global, or personal and sharded) and answers as one device does. (An FSDP-sharded backbone sums its
    matmuls in another order, which can flip a near-tie argmax of this random model: tokens are compared
    exactly, so the backbone here is replicated.)"""
    cfg = mesh_config()
    single = federated_run(tiny_config, method, 8, 8, evaluate=True)
    sharded = federated_run(tiny_config, method, 8, 8, sharding.make_mesh(cfg), cfg, evaluate=True)
    assert sharded.history[0]["answers"] == single.history[0]["answers"]


@needs_8
def test_each_device_holds_only_its_clients(tiny_config):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config, rows=16)
    mesh = sharding.make_mesh(mesh_config())
    fed = read(run_config(8, 8), run=False).fed
    programs = compile_programs(get_method("fedavg", fed), graphdef, fed, 1, mesh)
    rows = np.arange(16).reshape(8, 1, 2)
    outputs = programs.local(frozen, data, {"adapters": adapters}, ClientInputs(rows, np.ones_like(rows, bool)))
    devices_seen = set()
    for leaf in jax.tree.leaves(outputs.upload) + [outputs.loss]:
        assert leaf.sharding.spec[0] == sharding.CLIENTS
        for shard in leaf.addressable_shards:
            client = shard.index[0].start
            assert shard.data.shape[0] == 1 and shard.index[0].stop == client + 1
            np.testing.assert_array_equal(shard.data[0], np.asarray(leaf)[client])
            devices_seen.add((shard.device, client))
    assert len({device for device, _ in devices_seen}) == 8
    assert len({client for _, client in devices_seen}) == 8


@pytest.mark.skipif(jax.device_count() >= 8, reason="already running on 8 devices")
def test_eight_device_tests_in_a_subprocess():
    env = {**os.environ, "XLA_FLAGS": EIGHT, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider", __file__,
               "-k", "matches_one_device or holds_only"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "6 passed" in result.stdout and "skipped" not in result.stdout


@pytest.mark.skipif(jax.device_count() >= 8, reason="runs from the 1-device suite")
def test_two_processes_give_the_one_device_round(tiny_config):
    """2 processes x 2 CPU devices (jax.distributed, gloo): a padded cohort gives the 1-device result."""
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": f"{ROOT}:{os.path.join(ROOT, 'tests')}"}
    script = os.path.join(ROOT, "tests", "multihost_round.py")
    processes = [subprocess.Popen([sys.executable, script, port, str(i)], cwd=ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    results = []
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    single = federated_run(tiny_config, "fedavg", num_clients=4, cohort=3)
    assert [r["devices"] for r in results] == [4, 4]
    for r in results:
        np.testing.assert_allclose(r["loss"], single.history[0]["train_loss"], rtol=1e-5)
        for got, want in zip(r["adapters"], jax.tree.leaves(single.server["adapters"])):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
