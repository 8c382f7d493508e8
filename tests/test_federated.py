import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
from flax import nnx

from conftest import fed_of, make_batch
from fednano_jax.federated.aggregation import fedavg, fisher_merge
from fednano_jax.federated.client import ClientInputs, local_update, make_client_programs
from fednano_jax.federated.fisher import diagonal_fisher
from fednano_jax.federated.methods.fedavg import FedAvg
from fednano_jax.federated.methods.fednano import FedNano
from fednano_jax.federated.objective import adapter_value_and_grad
from fednano_jax.federated.schedule import client_schedule
from fednano_jax.models.loss import answer_slots, mean_answer_nll, summed_answer_nll
from fednano_jax.models.mllm import MultimodalModel, merge_model, split_model

FED_KEYS = dict(prox_mu=0.0, fisher_floor=1e-6, num_clients=3, dpa_local_epochs=1, dpa_instances=2,
                dpa_max_weight=0.5)
FED = fed_of(**FED_KEYS)


def train(graphdef, optimizer, adapters, frozen, data, rows, valid, method=None, state=None, epoch_steps=None):
    """One client's local update -> (its upload, its new state, its mean loss)."""
    out = local_update(graphdef, optimizer, method or FedAvg(FED), epoch_steps or rows.shape[0], frozen, data,
                       {"adapters": adapters}, ClientInputs(jnp.asarray(rows), jnp.asarray(valid), state))
    return out.upload, out.state, out.loss


def trained_adapters(*args, **kwargs):
    upload, _, loss = train(*args, **kwargs)
    return upload["adapters"], loss


def tiny_setup(tiny_config, rows=12):
    graphdef, frozen, adapters = split_model(MultimodalModel(tiny_config, nnx.Rngs(0)))
    # Non-zero `up` so gradients reach both adapter matrices from the first step.
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)
    batch = make_batch(7, batch=rows)
    data = {k: jnp.asarray(v) for k, v in batch.items()}
    data["image_index"] = jnp.arange(rows)
    return graphdef, frozen, adapters, data


def test_fisher_merge_matches_hand_computation():
    params = {"a": jnp.array([[1.0, 2.0], [3.0, 6.0]]), "b": jnp.array([[4.0], [0.0]])}
    fishers = {"a": jnp.array([[1.0, 0.0], [3.0, 2.0]]), "b": jnp.array([[2.0], [2.0]])}
    merged = fisher_merge(params, fishers, [1, 3], fisher_floor=1e-6)
    w = np.array([0.25, 0.75])
    f0 = np.array([[1.0, 1e-6], [3.0, 2.0]])  # the zero Fisher is floored
    expected_a = (w[:, None] * f0 * np.array([[1.0, 2.0], [3.0, 6.0]])).sum(0) / (w[:, None] * f0).sum(0)
    np.testing.assert_allclose(merged["a"], expected_a, rtol=1e-6)
    np.testing.assert_allclose(merged["b"], [0.25 * 4.0], rtol=1e-6)
    np.testing.assert_allclose(merged["a"][1], (0.75 * 2.0 * 6.0 + 0.25 * 1e-6 * 2.0) / (0.75 * 2.0 + 0.25e-6))


def test_equal_fishers_give_fedavg_and_fedavg_weights_by_examples():
    rng = np.random.default_rng(0)
    params = {"x": jnp.asarray(rng.normal(size=(4, 3, 2)), jnp.float32)}
    counts = [10, 20, 30, 40]
    equal = {"x": jnp.full((4, 3, 2), 0.37)}
    np.testing.assert_allclose(fisher_merge(params, equal, counts)["x"], fedavg(params, counts)["x"], rtol=1e-6)
    np.testing.assert_allclose(fedavg(params, counts)["x"], np.tensordot([0.1, 0.2, 0.3, 0.4], params["x"], 1),
                               rtol=1e-6)
    # Fishers that are all below the floor also fall back to the weighted mean.
    tiny = {"x": jnp.zeros((4, 3, 2))}
    np.testing.assert_allclose(fisher_merge(params, tiny, counts)["x"], fedavg(params, counts)["x"], rtol=1e-6)


def test_split_learning_gradient_equals_direct_gradient(tiny_config):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config)

    def direct(a):
        logits = merge_model(graphdef, frozen, a)(data["input_ids"], data["attention_mask"], data["images"])
        return mean_answer_nll(logits, data)

    loss, grads = adapter_value_and_grad(graphdef, frozen, adapters, data)
    ref_loss, ref_grads = jax.value_and_grad(direct)(adapters)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7), grads, ref_grads)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("slots", [False, True])
def test_labels_on_the_client_give_the_same_loss_gradients_and_fisher(tiny_config, slots, monkeypatch):
    """The server computes logits from embeddings, the attention mask and the answer positions only (a
    token id or loss mask reaching it would raise), the client the loss; gradients are today's."""
    from fednano_jax.federated import objective
    from fednano_jax.federated.objective import Wire, per_example_adapter_grads
    from fednano_jax.models.loss import summed_answer_nll

    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    data = with_slots(data) if slots else data
    seen = []
    wire = objective.wire_batch
    monkeypatch.setattr(objective, "wire_batch", lambda batch: seen.append(sorted(wire(batch))) or wire(batch))
    loss, grads = adapter_value_and_grad(graphdef, frozen, adapters, data, wire=Wire(labels_on_client=True))
    ref_loss, ref_grads = adapter_value_and_grad(graphdef, frozen, adapters, data)
    assert seen == [["answer_positions", "attention_mask"] if slots else ["attention_mask"]]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-8), grads, ref_grads)
    per_example = per_example_adapter_grads(graphdef, frozen, adapters, data, summed_answer_nll,
                                            Wire(labels_on_client=True))
    reference = per_example_adapter_grads(graphdef, frozen, adapters, data, summed_answer_nll)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-8), per_example, reference)


def test_wire_noise_is_added_to_what_the_server_receives_and_repeats_for_the_same_batch_and_seed():
    from fednano_jax.federated.objective import Wire

    fed = fed_of(wire_noise=0.3)
    rows = jnp.arange(8)
    embeds = jnp.zeros((8, 50, 64))
    sent = Wire.of(fed, rows).sent(embeds)
    assert float(jnp.std(sent)) == pytest.approx(0.3, rel=0.02)
    np.testing.assert_array_equal(sent, Wire.of(fed, rows).sent(embeds))  # the same batch, the same noise
    assert not np.allclose(sent, Wire.of(fed, rows[::-1]).sent(embeds))  # another batch, other noise
    assert not np.allclose(sent, Wire.of(fed, rows, seed=1).sent(embeds))  # another run seed, other noise
    np.testing.assert_array_equal(Wire.of(fed_of(), rows).sent(embeds), embeds)  # no noise configured: as it was


def with_slots(data):
    positions, valid = answer_slots(np.asarray(data["loss_mask"]))
    return {**data, "answer_positions": jnp.asarray(positions), "answer_valid": jnp.asarray(valid)}


def test_answer_only_logits_give_the_full_logits_loss_gradients_and_fisher(tiny_config):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    data = {**data, "loss_mask": data["loss_mask"].at[3, -4:].set(True)}  # rows with answers of other lengths
    slotted = with_slots(data)
    assert slotted["answer_positions"].shape[1] < data["input_ids"].shape[1] - 1  # really fewer positions
    for loss_fn in (mean_answer_nll, summed_answer_nll):
        full = adapter_value_and_grad(graphdef, frozen, adapters, data, loss_fn)
        lean = adapter_value_and_grad(graphdef, frozen, adapters, slotted, loss_fn)
        np.testing.assert_allclose(lean[0], full[0], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), lean[1], full[1])
    rows, valid = jnp.array([[0, 1, 2, 3], [4, 5, 0, 0]]), jnp.array([[True] * 4, [True, True, False, False]])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-10),
                 diagonal_fisher(graphdef, adapters, frozen, slotted, rows, valid),
                 diagonal_fisher(graphdef, adapters, frozen, data, rows, valid))


def test_local_steps_reduce_loss(tiny_config):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    rows = jnp.tile(jnp.arange(12).reshape(1, 12), (20, 1))
    valid = jnp.ones((20, 12), bool)
    trained, _ = trained_adapters(graphdef, optax.adam(5e-2), adapters, frozen, data, rows, valid)
    before = adapter_value_and_grad(graphdef, frozen, adapters, data)[0]
    after = adapter_value_and_grad(graphdef, frozen, trained, data)[0]
    assert after < before - 0.2  # nats per answer token, from ln(40) ~ 3.7 at a random start


def test_masked_padding_steps_change_nothing(tiny_config):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    optimizer = optax.adam(1e-2)
    rows = jnp.arange(12).reshape(3, 4)
    valid = jnp.ones((3, 4), bool).at[2, 3].set(False)  # a partial last batch
    short, short_loss = trained_adapters(graphdef, optimizer, adapters, frozen, data, rows, valid)
    padded_rows = jnp.concatenate([rows, jnp.zeros((2, 4), int)])
    padded_valid = jnp.concatenate([valid, jnp.zeros((2, 4), bool)])
    padded, padded_loss = trained_adapters(graphdef, optimizer, adapters, frozen, data, padded_rows, padded_valid)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), short, padded)
    np.testing.assert_allclose(short_loss, padded_loss, rtol=1e-6)
    # The invalid example of the partial batch must not count either.
    other_rows = rows.at[2, 3].set(0)
    other, _ = trained_adapters(graphdef, optimizer, adapters, frozen, data, other_rows, valid)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), short, other)


def test_vmapped_and_sequential_clients_agree(tiny_config):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    rows, valid = client_schedule([np.arange(0, 5), np.arange(5, 8), np.arange(8, 12)], 2, 1, seed=0,
                                  round_index=0)
    vmapped, sequential = make_client_programs(graphdef, optax.adamw(1e-2), FedNano(FED), rows.shape[1])
    clients = ClientInputs(jnp.asarray(rows), jnp.asarray(valid))
    a = jax.jit(vmapped)(frozen, data, {"adapters": adapters}, clients)
    b = sequential(frozen, data, {"adapters": adapters}, clients)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
    # Clients really differ (they trained on different data).
    leaf = jax.tree.leaves(a.upload["adapters"])[0]
    assert not np.allclose(leaf[0], leaf[1])


def test_clients_in_chunks_equal_one_vmap(tiny_config):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    client_rows = [np.arange(0, 5), np.arange(5, 8), np.arange(8, 10), np.arange(10, 12), np.arange(3, 9),
                   np.arange(1, 3)]
    rows, valid = client_schedule(client_rows, 2, 1, seed=0, round_index=0)
    clients = ClientInputs(jnp.asarray(rows), jnp.asarray(valid))
    broadcast = {"adapters": adapters}
    whole, _ = make_client_programs(graphdef, optax.adamw(1e-2), FedNano(FED), rows.shape[1])
    expected = jax.jit(whole)(frozen, data, broadcast, clients)
    # 6 clients in chunks of 4 (the last padded with dummies); as 2 "devices" of 3 clients two at a time.
    for chunk, devices in ((4, 1), (2, 2)):
        chunked, _ = make_client_programs(graphdef, optax.adamw(1e-2), FedNano(FED), rows.shape[1], chunk, devices)
        got = jax.jit(chunked)(frozen, data, broadcast, clients)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected)


def test_images_streamed_from_the_host_give_the_device_tables_outputs(tiny_config):
    """`data.stream_images`: the step's images come from a host callback, not a device table; same numbers,
    vmapped, chunked and packed, and the compiled program no longer takes the table as an argument."""
    from fednano_jax.data.batches import HostImages

    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    streamed = {**data, "images": HostImages(np.asarray(data["images"]))}
    client_rows = [np.arange(0, 5), np.arange(5, 8), np.arange(8, 12)]
    rows, valid = client_schedule(client_rows, 2, 1, seed=0, round_index=0)
    clients = ClientInputs(jnp.asarray(rows), jnp.asarray(valid))
    broadcast = {"adapters": adapters}
    program = jax.jit(make_client_programs(graphdef, optax.adamw(1e-2), FedNano(FED), rows.shape[1], 2)[0])
    compiled = [program.lower(frozen, d, broadcast, clients).compile() for d in (data, streamed)]  # chunks of 2
    expected, got = (c(frozen, d, broadcast, clients) for c, d in zip(compiled, (data, streamed)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, expected)
    arguments = [c.memory_analysis().argument_size_in_bytes for c in compiled]
    assert arguments[0] - arguments[1] == data["images"].nbytes
    _, packed_expected = packed_outputs(graphdef, frozen, data, broadcast, FedNano(FED), client_rows, 1, 0.5)
    _, packed_got = packed_outputs(graphdef, frozen, streamed, broadcast, FedNano(FED), client_rows, 1, 0.5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), packed_got, packed_expected)


def packed_outputs(graphdef, frozen, data, broadcast, method, client_rows, epochs, max_padding, cap=0, states=None,
                   ranks=None):
    from fednano_jax.federated.client import make_packed_program
    from fednano_jax.federated.packing import packed_schedule

    packed = packed_schedule(client_rows, 2, epochs, 0, 0, range(len(client_rows)), cap, max_padding=max_padding,
                             states=states, ranks=ranks)
    program = jax.jit(make_packed_program(graphdef, optax.adamw(1e-2), method))
    outputs = program(frozen, data, broadcast, jax.tree.map(jnp.asarray, packed.lanes))
    order = packed.order()
    return packed, jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[order], outputs)


def test_packed_clients_give_the_unpacked_adapters_uploads_and_losses(tiny_config):
    from fednano_jax.federated.methods.locft import LocFT

    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    client_rows = [np.arange(0, 7), np.arange(7, 9), np.arange(9, 10), np.arange(10, 12), np.arange(2, 5)]
    broadcast = {"adapters": adapters}
    rows, valid = client_schedule(client_rows, 2, 2, seed=0, round_index=0)  # 2 epochs, padded to 4 steps each
    for method, cap in ((FedNano(FED), 3),):  # FedNano's Fisher pass, capped at 3 examples, is packed too
        unpacked, _ = make_client_programs(graphdef, optax.adamw(1e-2), method, 4, extra_pass_examples=cap)
        expected = jax.jit(unpacked)(frozen, data, broadcast, ClientInputs(jnp.asarray(rows), jnp.asarray(valid)))
        packed, got = packed_outputs(graphdef, frozen, data, broadcast, method, client_rows, 2, 0.1, cap)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got, expected)
        assert packed.lanes.rows.shape[0] < len(client_rows)  # several clients really shared a lane
        assert packed.padded_client_steps - packed.client_steps <= 0.1 * packed.client_steps
        assert packed.client_steps == 2 * (4 + 1 + 1 + 1 + 2)
    # A method with client state: LocFT starts each client from its own adapters.
    personal = jax.tree.map(lambda x: jnp.stack([x + 0.01 * k for k in range(5)]), adapters)
    locft = LocFT(FED)
    unpacked, _ = make_client_programs(graphdef, optax.adamw(1e-2), locft, 4)
    expected = jax.jit(unpacked)(frozen, data, broadcast, ClientInputs(jnp.asarray(rows), jnp.asarray(valid),
                                                                       personal))
    _, got = packed_outputs(graphdef, frozen, data, broadcast, locft, client_rows, 2, 0.1, states=personal)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got, expected)


def test_fisher_examples_caps_the_extra_pass_to_the_first_examples(tiny_config):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config, rows=6)
    rows = jnp.array([[3, 1, 4, 0], [5, 2, 0, 0], [0, 0, 0, 0]])
    valid = jnp.array([[True] * 4, [True, True, False, False], [False] * 4])  # padding after the examples
    out = local_update(graphdef, optax.sgd(0.0), FedNano(FED), 3, frozen, data, {"adapters": adapters},
                       ClientInputs(rows, valid), extra_pass_examples=5)
    first_five = diagonal_fisher(graphdef, adapters, frozen, data, jnp.array([[3, 1, 4, 0], [5, 0, 0, 0]]),
                                 jnp.array([[True] * 4, [True, False, False, False]]))
    jax.tree.map(lambda f, e: np.testing.assert_allclose(f, e, rtol=1e-4, atol=1e-10), out.upload["fisher"],
                 first_five)
    every = local_update(graphdef, optax.sgd(0.0), FedNano(FED), 3, frozen, data, {"adapters": adapters},
                         ClientInputs(rows, valid)).upload["fisher"]
    assert not np.allclose(jax.tree.leaves(every)[0], jax.tree.leaves(first_five)[0])  # the cap changed it


def test_fisher_is_mean_squared_per_example_gradient(tiny_config):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config, rows=6)
    rows = jnp.array([[0, 1, 2, 3], [4, 5, 0, 0]])
    valid = jnp.array([[True] * 4, [True, True, False, False]])
    fisher = diagonal_fisher(graphdef, adapters, frozen, data, rows, valid)
    squares = []
    for i in range(6):
        one = {k: v[i: i + 1] for k, v in data.items() if k != "image_index"}
        squares.append(jax.tree.map(jnp.square, adapter_value_and_grad(graphdef, frozen, adapters, one,
                                                                       summed_answer_nll)[1]))
    expected = jax.tree.map(lambda *s: sum(s) / 6, *squares)
    jax.tree.map(lambda f, e: np.testing.assert_allclose(f, e, rtol=1e-4, atol=1e-10), fisher, expected)
    # FedNano's upload: the extra pass over the client's first epoch, at the adapters it trained (here: lr 0).
    upload, _, _ = train(graphdef, optax.sgd(0.0), adapters, frozen, data, jnp.concatenate([rows, rows]),
                         jnp.concatenate([valid, valid]), FedNano(FED), epoch_steps=2)
    jax.tree.map(lambda f, e: np.testing.assert_allclose(f, e, rtol=1e-4, atol=1e-10), upload["fisher"], expected)


def test_client_schedule_covers_each_client_once_per_epoch():
    clients = [np.array([3, 4, 5, 6, 7]), np.array([0, 1]), np.array([2])]
    rows, valid = client_schedule(clients, batch_size=2, epochs=2, seed=1, round_index=3)
    assert rows.shape == (3, 6, 2)  # longest client: 3 batches per epoch x 2 epochs
    for k, client in enumerate(clients):
        seen = rows[k][valid[k]]
        assert sorted(seen.tolist()) == sorted(np.concatenate([client, client]).tolist())
        assert sorted(rows[k, :3][valid[k, :3]].tolist()) == sorted(client.tolist())  # the first 3 steps: one epoch
    # Client 2's one example opens each epoch; the rest of each epoch is invalid padding.
    np.testing.assert_array_equal(valid[2].any(axis=1), [True, False, False, True, False, False])
    again, _ = client_schedule(clients, batch_size=2, epochs=2, seed=1, round_index=3)
    other, _ = client_schedule(clients, batch_size=2, epochs=2, seed=1, round_index=4)
    np.testing.assert_array_equal(rows, again)
    assert not np.array_equal(rows, other)


def test_per_example_gradients_from_one_batched_pass_equal_one_backward_pass_per_example(tiny_config):
    """The Fisher pass's per-example adapter gradients (one batched backward through the LLM) are those of
    each example's own backward pass, padding rows included (zero)."""
    from fednano_jax.data.batches import gather_batch
    from fednano_jax.federated.objective import per_example_adapter_grads

    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    batch = gather_batch(with_slots(data), jnp.array([0, 3, 5, 7]), jnp.array([True, True, True, False]))
    got = per_example_adapter_grads(graphdef, frozen, adapters, batch, summed_answer_nll)
    for i in range(4):
        one = jax.tree.map(lambda x: x[i:i + 1], batch)
        expected = adapter_value_and_grad(graphdef, frozen, adapters, one, summed_answer_nll)[1]
        jax.tree.map(lambda g, e: np.testing.assert_allclose(g[i], e, rtol=1e-4, atol=1e-8), got, expected)
    assert all(float(jnp.abs(g[3]).max()) == 0.0 for g in jax.tree.leaves(got))  # the padding row
