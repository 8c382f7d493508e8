"""model.client_layers = k: the client runs the decoder's first k layers after NanoEdge, the server the rest. The
composed model is the same function (loss, adapter gradients, FedNano's Fisher); the wire carries the hidden
states after layer k, noised there; a bad k, or k with a split-step server, is one sentence."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, make_batch
from fednano_jax.backbone.build import with_client_layers
from fednano_jax.backbone import pretrain
from fednano_jax.config import load_config_file, read, resume_fingerprint
from fednano_jax.errors import ConfigError
from fednano_jax.federated import objective
from fednano_jax.federated.fisher import diagonal_fisher
from fednano_jax.federated.objective import Wire, adapter_value_and_grad
from fednano_jax.models.llama import DecoderLayer, LlamaConfig, layer_cost, positions_from_mask
from fednano_jax.models.loss import answer_slots
from fednano_jax.models.mllm import MultimodalModel, client_side, merge_model, split_model
from fednano_jax.settings import Model

ROWS = 6


@pytest.fixture(scope="module")
def setup(tiny_config):
    graphdef, frozen, adapters = split_model(MultimodalModel(tiny_config, nnx.Rngs(0)))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # non-zero `up`: gradients reach both matrices
    batch = {k: jnp.asarray(v) for k, v in make_batch(7, batch=ROWS).items()}
    positions, valid = answer_slots(np.asarray(batch["loss_mask"]))
    batch = {**batch, "image_index": jnp.arange(ROWS), "answer_positions": jnp.asarray(positions),
             "answer_valid": jnp.asarray(valid)}
    return graphdef, frozen, adapters, batch


def assert_trees_close(got, want):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got, want)


@functools.lru_cache
def losses_gradients_and_fisher(graphdef):
    """One program: (loss, adapter gradients) with the labels on the server and on the client, and FedNano's Fisher."""
    rows, valid = jnp.arange(ROWS).reshape(2, 3), jnp.ones((2, 3), bool)

    def run(frozen, adapters, batch):
        return ([adapter_value_and_grad(graphdef, frozen, adapters, batch, wire=Wire(labels_on_client=labels))
                 for labels in (False, True)], diagonal_fisher(graphdef, adapters, frozen, batch, rows, valid))

    return jax.jit(run)


@pytest.mark.parametrize("layers", [1, 2])
def test_a_client_prefix_gives_the_plain_models_loss_gradients_and_fisher(setup, tiny_config, layers):
    graphdef, frozen, adapters, batch = setup
    split, _ = with_client_layers(graphdef, tiny_config, layers)
    steps, fisher = losses_gradients_and_fisher(split)(frozen, adapters, batch)
    want_steps, want_fisher = losses_gradients_and_fisher(graphdef)(frozen, adapters, batch)
    for (loss, grads), (want_loss, want_grads) in zip(steps, want_steps):
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        assert_trees_close(grads, want_grads)
        assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    assert_trees_close(fisher, want_fisher)


def hidden_after(model, batch, layers: int):
    """The embeddings through the first `layers` decoder layers, one unstacked layer at a time (no scan)."""
    x = model.edge(batch["input_ids"], batch["images"])
    length = x.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool))[None] & batch["attention_mask"].astype(bool)[:, None, :]
    positions = positions_from_mask(batch["attention_mask"])
    graph, stacked = nnx.split(model.server.layers)
    for i in range(layers):
        x = nnx.merge(graph, jax.tree.map(lambda p: p[i], stacked))(x, positions, mask)[0]
    return x


@pytest.mark.parametrize("layers", [0, 1])
def test_the_server_receives_the_hidden_states_after_layer_k_noised_there(setup, tiny_config, layers, monkeypatch):
    graphdef, frozen, adapters, batch = setup
    split, _ = with_client_layers(graphdef, tiny_config, layers)
    received = []
    server_side = objective.embed_grads_of

    def recorded(server, sent, *rest):  # what the server's side of the wire is handed, as the program runs
        jax.debug.callback(lambda value: received.append(np.asarray(value)), sent)
        return server_side(server, sent, *rest)

    monkeypatch.setattr(objective, "embed_grads_of", recorded)
    wire = Wire(noise=0.3, key=jax.random.key(5))
    jax.jit(lambda f, a, b: adapter_value_and_grad(split, f, a, b, wire=wire))(frozen, adapters, batch)
    model = merge_model(split, frozen, adapters)
    hidden = hidden_after(model, batch, layers)
    np.testing.assert_allclose(received[0], wire.sent(hidden), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(client_side(model, batch["input_ids"], batch["images"], batch["attention_mask"]),
                               hidden, rtol=1e-5, atol=1e-6)
    embeds = model.edge(batch["input_ids"], batch["images"])
    assert np.allclose(hidden, embeds, rtol=0, atol=1e-3) == (layers == 0)


def test_a_bad_client_layers_is_one_sentence(tiny_config):
    config = load_config_file(os.path.join(ROOT, "configs", "easyvqa_tiny.py"))
    for bad, most in ((-1, "number of layers"), (3, "2 layers")):
        config.model.client_layers = bad
        with pytest.raises(ConfigError, match=rf"^model.client_layers must be a whole number from 0 to the "
                                              rf"decoder's {most}, got {bad}\.$"):
            read(config)
    with pytest.raises(ConfigError, match=r"^model.client_layers must be a whole number .* got 1.5\.$"):
        Model(client_layers=1.5)
    graphdef = split_model(nnx.eval_shape(lambda: MultimodalModel(tiny_config, nnx.Rngs(0))))[0]
    with pytest.raises(ConfigError, match=r"from 0 to the decoder's 2 layers, got 3\.$"):
        with_client_layers(graphdef, tiny_config, 3)


def test_the_split_keeps_the_backbone_and_at_zero_an_older_runs_resume_fingerprint():
    config = load_config_file(os.path.join(ROOT, "configs", "easyvqa_tiny.py"))
    plain = resume_fingerprint(read(config), "key")
    assert "client_layers" not in plain["model"]  # as checkpoints written before the setting hold it
    key = pretrain.cache_key(read(config))
    config.model.client_layers = 2
    assert resume_fingerprint(read(config), "key")["model"]["client_layers"] == 2  # where the noise goes
    assert pretrain.cache_key(read(config)) == key  # the same backbone at every k


@pytest.mark.parametrize("command", [["fednano_jax.serve", "--port=0"],
                                     ["fednano_jax.main", "--split_server=127.0.0.1:1", "--workdir=WORKDIR"]])
def test_client_layers_with_a_split_step_server_is_refused_in_one_sentence(command, tmp_path):
    command = [part.replace("WORKDIR", str(tmp_path / "run")) for part in command]
    result = subprocess.run([sys.executable, "-m", command[0], "--config=configs/easyvqa_tiny.py",
                             "--config.model.client_layers=1", *command[1:]], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert result.returncode != 0
    assert ("Config error: model.client_layers must be 0 with a split-step server: it runs every decoder layer on "
            "the embeddings it receives, and a client process holds NanoEdge alone.") in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


def test_layer_cost_is_the_hand_count_of_one_layer():
    config = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=4, num_heads=2, num_kv_heads=1)
    cost = layer_cost(config, length=3)  # head_dim 4: q and o are 8 x 8, k and v 8 x 4
    projections = 64 + 32 + 32 + 64 + 3 * 8 * 16  # q, k, v, o, then gate, up, down: 576 weights
    assert cost.parameters == projections + 2 * 8 == 592  # and the two RMSNorm weights
    attention = 2 * (3 * 3 * 2 * 4) * 2  # q k^T and probs @ v: T x T x heads x head_dim multiply-adds each
    assert cost.forward_flops == 2 * 3 * projections + attention == 3744
    # Frozen weights: the backward multiplies by each weight once (no weight gradient); attention's two products
    # need both operands' gradients.
    assert cost.backward_flops == 2 * 3 * projections + 2 * attention == 4032
    # Kept per position: two norm inputs (8 each), q (8), k and v (4 each), gate and up (16 each); and the
    # probabilities, heads x T x T.
    assert cost.activations == 3 * (8 + 8 + 8 + 4 + 4 + 16 + 16) + 2 * 3 * 3 == 210


def test_layer_cost_is_within_a_few_percent_of_xlas_count():
    """XLA counts the elementwise work too, so it runs a little above the matmuls' FLOPs."""
    config = LlamaConfig(vocab_size=10, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=4,
                         num_kv_heads=2)
    length = 64
    graph, state = nnx.split(DecoderLayer(config, nnx.Rngs(0)))
    mask = jnp.tril(jnp.ones((length, length), bool))[None]
    positions = jnp.arange(length)[None]

    def forward(x):
        return nnx.merge(graph, state)(x, positions, mask)[0]

    def forward_and_backward(x, cotangent):
        out, backward = jax.vjp(forward, x)
        return out, backward(cotangent)[0]

    x = jnp.ones((1, length, 128))
    flops = lambda f, *args: jax.jit(f).lower(*args).compile().cost_analysis()["flops"]  # noqa: E731
    xla_forward = flops(forward, x)
    xla_backward = flops(forward_and_backward, x, x) - xla_forward
    cost = layer_cost(config, length)
    assert cost.forward_flops <= xla_forward <= 1.05 * cost.forward_flops
    assert cost.backward_flops <= xla_backward <= 1.05 * cost.backward_flops
