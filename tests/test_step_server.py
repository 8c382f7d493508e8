"""The split-step server over gRPC on 127.0.0.1: each client's loss and embedding gradients are what the
simulation's wire computes, concurrent clients' steps are batched into shared calls, and every bad request is
refused with its sentence while other clients' steps go on."""

import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import make_batch
from fednano_jax.federated.objective import embed_grads_of
from fednano_jax.models.loss import answer_slots, mean_answer_nll, summed_answer_nll
from fednano_jax.models.mllm import MultimodalModel, merge_model, split_model
from fednano_jax.serving.step_client import SplitStepError, StepClient
from fednano_jax.serving.step_server import STEP_TENSORS, Limits, StepServer, grpc_server, merge_requests
from fednano_jax.serving.wire_format import encode

TOKENS = {0: "zero", 1: "one", 2: "two"}


@pytest.fixture(scope="module")
def model(tiny_config):
    graphdef, frozen, adapters = split_model(MultimodalModel(tiny_config, nnx.Rngs(0)))
    return merge_model(graphdef, frozen, jax.tree.map(lambda x: x + 0.01, adapters))


@pytest.fixture(scope="module")
def served(model):
    """A server for 3 clients with tokens, its port; stopped (and its batcher joined) after the module."""
    steps = StepServer(model.server, num_clients=3, tokens=TOKENS, limits=Limits(max_rows=16, max_wait_ms=200,
                                                                                 max_bytes=2**20))
    server, port = grpc_server(steps, "127.0.0.1:0")
    yield steps, port
    server.stop(grace=None)
    steps.close()


@nnx.jit
def edge_embeds(model, input_ids, images):
    return model.edge(input_ids, images)


@nnx.jit(static_argnums=3)
def wire_step(model, embeds, batch, loss_fn):
    return embed_grads_of(model.server, embeds, batch, loss_fn, False)


def client_batch(model, seed, rows=3, length=12):
    """A batch with answer slots and its NanoEdge embeddings, as a client computes them."""
    batch = make_batch(seed, batch=rows, length=length)
    positions, valid = answer_slots(batch["loss_mask"])
    batch = {**batch, "answer_positions": positions, "answer_valid": valid}
    return np.asarray(edge_embeds(model, batch["input_ids"], batch["images"])), batch


def expected(model, embeds, batch, loss_fn=mean_answer_nll):
    """The simulation's wire (labels on the server) on the same embeddings."""
    loss, grads = wire_step(model, embeds, {k: v for k, v in batch.items() if k != "images"}, loss_fn)
    return float(loss), np.asarray(grads)


def test_concurrent_clients_get_their_own_steps_from_shared_calls(model, served):
    steps, port = served
    before = dict(steps.stats)
    requests = {k: client_batch(model, seed=k, rows=2 + k, length=10 + 2 * k) for k in range(3)}
    answers, errors = {}, []

    def run(k):
        client = StepClient(f"127.0.0.1:{port}", k, TOKENS[k])
        try:
            answers[k] = client.step(*requests[k], kind="sum" if k == 2 else "mean")
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and sorted(answers) == [0, 1, 2]
    for k, (loss, grads) in answers.items():
        want_loss, want_grads = expected(model, *requests[k], summed_answer_nll if k == 2 else mean_answer_nll)
        assert loss == pytest.approx(want_loss, rel=1e-5)
        np.testing.assert_allclose(grads, want_grads, rtol=1e-4, atol=1e-5 * np.abs(want_grads).max())
    calls = steps.stats["calls"] - before["calls"]
    assert steps.stats["requests"] - before["requests"] == 3 and calls < 3  # batched: fewer calls than requests


def test_merged_rows_are_padded_to_buckets_and_padding_counts_for_nothing(model):
    (e1, b1), (e2, b2) = client_batch(model, 0, rows=3, length=10), client_batch(model, 1, rows=2, length=13)
    tensors = [{"embeds": e, **{k: b[k] for k in ("attention_mask", "input_ids", "loss_mask", "answer_positions",
                                                  "answer_valid")}} for e, b in ((e1, b1), (e2, b2))]
    merged, segments, per_token, sizes = merge_requests(tensors, ["mean", "sum"], max_rows=16)
    assert merged["embeds"].shape[:2] == (8, 16) and sizes == [3, 2]  # 5 rows -> 8, 13 positions -> 16
    assert segments.tolist() == [0, 0, 0, 1, 1, 16, 16, 16] and per_token.tolist() == [True] + [False] * 16
    assert not merged["answer_valid"][5:].any()


def test_every_bad_request_is_refused_with_its_sentence_while_others_go_on(model, served):
    steps, port = served
    embeds, batch = client_batch(model, 5)
    good = {name: np.asarray(embeds if name == "embeds" else batch[name], dtype)
            for name, (dtype, _) in STEP_TENSORS.items()}
    cases = {
        "client": ({"client": "7", "token": "x", "kind": "mean"}, good, "client must be a client id between 0 and 2"),
        "token": ({"client": "1", "token": "zero", "kind": "mean"}, good, "The token of client 1 is not the one"),
        "non-ascii token": ({"client": "1", "token": "zéro", "kind": "mean"}, good, "The token of client 1 is not"),
        "kind": ({"client": "1", "token": "one", "kind": "eval"}, good,
                 "kind must be one of ['mean', 'sum', 'next', 'logits', 'backward']"),
        "decoding": ({"client": "1", "token": "one", "kind": "next"}, good,
                     "A 'next' request holds the tensors ['attention_mask', 'embeds']"),
        "name": ({"client": "1", "token": "one", "kind": "mean"}, {**good, "labels": good["input_ids"]},
                 "A step holds the tensors"),
        "dtype": ({"client": "1", "token": "one", "kind": "mean"},
                  {**good, "embeds": good["embeds"].astype(np.float64)}, "embeds must be float32 of rank 3"),
        "width": ({"client": "1", "token": "one", "kind": "mean"}, {**good, "embeds": good["embeds"][..., :5]},
                  "embeds must have 32 features"),
        "positions": ({"client": "1", "token": "one", "kind": "mean"},
                      {**good, "answer_positions": good["answer_positions"] + 100}, "answer_positions must lie in"),
    }
    client = StepClient(f"127.0.0.1:{port}", 1, "one")
    try:
        for name, (header, tensors, sentence) in cases.items():
            with pytest.raises(Exception) as refused:
                client._send(encode(tensors, header))
            assert sentence in str(refused.value), name
            assert isinstance(refused.value, SplitStepError)
            loss, _ = client.step(embeds, batch)  # the server still serves
            assert loss == pytest.approx(expected(model, embeds, batch)[0], rel=1e-5)
        with pytest.raises(SplitStepError, match="not a safetensors blob"):
            client._send(b"not a tensor")
    finally:
        client.close()
    oversized = StepClient(f"127.0.0.1:{port}", 1, "one")
    try:
        with pytest.raises(SplitStepError, match="over the server's limit"):
            oversized._send(b"\0" * (steps.limits.max_bytes + 1))
    finally:
        oversized.close()


def test_decoding_over_the_link_gives_the_kv_cache_decoders_tokens(model, served):
    """Evaluation decoding with the decoder across the link (one round trip per token, no cache there) gives the
    tokens the KV-cache decoder gives with the whole model in one program; rows beyond one request are split."""
    from fednano_jax.eval.generate import greedy_generate, linked_generate

    _, port = served
    graphdef, frozen, adapters = split_model(model)
    batch = make_batch(3, batch=20, length=12)  # more rows than the server's max_rows (16)
    mask = np.ones(batch["input_ids"].shape, bool)
    inputs = (batch["input_ids"], mask, batch["images"])
    decode = dict(max_new_tokens=5, pad_id=0, eos_id=2)
    want = np.asarray(greedy_generate(graphdef, frozen, adapters, *inputs, **decode))
    client = StepClient(f"127.0.0.1:{port}", 2, "two")
    try:
        got = linked_generate(lambda e, m: client.next_tokens(e, m, max_rows=16), graphdef, frozen, adapters,
                              *inputs, **decode)
    finally:
        client.close()
    np.testing.assert_array_equal(got, want)
    assert len(set(want.ravel().tolist())) > 1  # not one token everywhere


def test_a_step_over_grpcs_default_message_size_is_streamed_both_ways(model):
    """gRPC refuses messages over 4 MiB by default: a 5 MB message goes as a stream of chunks and reaches the server
    whole (it is read, and refused for its tensors, not for its size); a stream over the server's limit is refused
    with its sentence; and a streamed step and its streamed gradients carry the simulation's numbers."""
    steps = StepServer(model.server, num_clients=3, tokens=TOKENS, limits=Limits(max_rows=16, max_bytes=8 * 2**20))
    server, port = grpc_server(steps, "127.0.0.1:0")
    client = StepClient(f"127.0.0.1:{port}", 0, "zero")
    try:
        large = encode({"embeds": np.zeros((5 * 2**20 // 4,), np.float32)}, {"client": "0", "token": "zero",
                                                                              "kind": "mean"})
        with pytest.raises(SplitStepError, match="A step holds the tensors"):
            client._send(large)
        assert client.streamed == 1
        with pytest.raises(SplitStepError, match="over the server's limit of 8,388,608"):
            client._send(b"\0" * (9 * 2**20))
        client.unary_limit = 2**10  # so that a small step, and its gradients, go as streams of chunks too
        embeds, batch = client_batch(model, 9)
        loss, grads = client.step(embeds, batch)
        want_loss, want_grads = expected(model, embeds, batch)
        assert client.streamed == 3 and loss == pytest.approx(want_loss, rel=1e-5)
        np.testing.assert_allclose(grads, want_grads, rtol=1e-4, atol=1e-5 * np.abs(want_grads).max())
    finally:
        client.close()
        server.stop(grace=None)
        steps.close()


def test_a_client_retries_a_server_that_is_not_there_and_fails_with_one_sentence():
    client = StepClient("127.0.0.1:9", 0, attempts=3, backoff_s=0.01, timeout_s=2)  # nothing listens on port 9
    try:
        with pytest.raises(SplitStepError, match="did not answer client 0 after 3 attempts"):
            client._send(b"")
    finally:
        client.close()


def test_the_serve_command_serves_once_listening_and_stops_on_sigterm(easy_vqa_dir, tmp_path):
    """`python -m fednano_jax.serve` on the default config: it says it is plaintext, serves a step of the tiny
    backbone's width once it prints its address, and exits on SIGTERM; the process is stopped whatever happens."""
    import os
    import signal
    import subprocess
    import sys
    from conftest import ROOT, free_port, wait_for_line

    port = free_port()
    (tmp_path / "tokens.json").write_text('{"0": "a", "1": "b", "2": "c", "3": "d", "4": "e"}')
    command = [sys.executable, "-m", "fednano_jax.serve", "--config=configs/easyvqa_tiny.py",
               f"--config.data.dir={easy_vqa_dir}", f"--port={port}", f"--tokens={tmp_path / 'tokens.json'}"]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        lines = wait_for_line(process, "Serving split steps")
        assert any("No TLS: the split-step link is plaintext" in line for line in lines)
        batch = make_batch(0, batch=2, length=12)
        positions, valid = answer_slots(batch["loss_mask"])
        batch = {**batch, "answer_positions": positions, "answer_valid": valid}
        embeds = np.random.default_rng(0).normal(size=(2, 12, 128)).astype(np.float32)  # the tiny LLM's width
        client = StepClient(f"127.0.0.1:{port}", 3, "d")
        try:
            loss, grads = client.step(embeds, batch)
            assert np.isfinite(loss) and loss > 0 and grads.shape == embeds.shape and np.abs(grads).sum() > 0
            with pytest.raises(SplitStepError, match="The token of client 3 is not the one"):
                StepClient(f"127.0.0.1:{port}", 3, "a").step(embeds, batch)
        finally:
            client.close()
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0 and "Stopped after 1 steps in 1 batched calls (1 refused); peak memory" in out, out
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def self_signed(tmp_path):
    """A certificate and key for 127.0.0.1 (PEM files), made with `cryptography`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    return str(tmp_path / "server.pem"), str(tmp_path / "server.key")


def test_a_tls_server_serves_a_client_that_trusts_its_certificate_and_no_plaintext_one(model, tmp_path):
    from fednano_jax.commands.serve import credentials

    cert, key = self_signed(tmp_path)
    steps = StepServer(model.server, num_clients=1, limits=Limits(max_rows=8, max_wait_ms=1, max_bytes=2**20))
    server, port = grpc_server(steps, "127.0.0.1:0", credentials(cert, key))
    embeds, batch = client_batch(model, 9, rows=2)
    trusted = StepClient(f"127.0.0.1:{port}", 0, root_certificates=open(cert, "rb").read())
    plaintext = StepClient(f"127.0.0.1:{port}", 0, attempts=2, backoff_s=0.01, timeout_s=5)
    try:
        loss, _ = trusted.step(embeds, batch)
        assert loss == pytest.approx(expected(model, embeds, batch)[0], rel=1e-5)
        with pytest.raises(SplitStepError, match="did not answer client 0 after 2 attempts"):
            plaintext.step(embeds, batch)
    finally:
        trusted.close()
        plaintext.close()
        server.stop(grace=None)
        steps.close()


def test_the_batching_benchmark_shares_calls_only_when_batching(model):
    """benchmark --compare=split_batching's runs: with batching, concurrent clients' steps share calls; without,
    every step is its own call (the throughput figures themselves are the benchmark's, not a test's)."""
    from fednano_jax.commands.benchmark import split_steps

    embeds, batch = client_batch(model, 3, rows=2)
    batch = {name: np.asarray(batch[name], dtype) for name, (dtype, _) in STEP_TENSORS.items() if name != "embeds"}
    alone = split_steps(model.server, batch, embeds, clients=4, steps=3, batched=False)
    shared = split_steps(model.server, batch, embeds, clients=4, steps=3, batched=True)
    assert alone["calls_per_step"] == 1.0 and shared["calls_per_step"] < 1.0
    assert alone["client_steps_per_second"] > 0 and shared["latency_ms_p95"] >= shared["latency_ms_p50"] > 0


def one_client(tiny_config):
    """One client's tiny model and six rows with answer slots, and its federation's settings."""
    from conftest import fed_of
    from test_federated import tiny_setup

    graphdef, frozen, adapters, data = tiny_setup(tiny_config, rows=6)
    positions, valid = answer_slots(np.asarray(data["loss_mask"]))
    data = {**data, "answer_positions": jax.numpy.asarray(positions), "answer_valid": jax.numpy.asarray(valid)}
    return graphdef, frozen, adapters, data, fed_of(num_clients=1, learning_rate=1e-2)


def local_update_of(method, graphdef, frozen, adapters, data, fed):
    """Three steps of two rows: the simulation's client program."""
    from fednano_jax.federated.client import ClientInputs, local_update
    from fednano_jax.federated.rounds import make_optimizer

    rows = np.arange(6, dtype=np.int32).reshape(3, 2)
    return local_update(graphdef, make_optimizer(fed), method, 3, frozen, data, {"adapters": adapters},
                        ClientInputs(rows, np.ones_like(rows, bool), None))


@pytest.mark.parametrize("name, labels_on_client", [("fedavg", False), ("fednano", False), ("fednano", True)])
def test_a_clients_local_update_over_the_link_is_the_simulations(tiny_config, name, labels_on_client):
    """The simulation's client program with its wire sent to a split-step server (a host callback inside the
    scanned step, `Method.remote`): the same upload (adapters, and FedNano's Fisher from its extra pass). With labels
    on the client, every step is two round trips (logits, then the backward pass) and no token id is sent."""
    import dataclasses

    from fednano_jax.federated.methods import get_method

    graphdef, frozen, adapters, data, fed = one_client(tiny_config)
    fed = dataclasses.replace(fed, labels_on_client=labels_on_client)
    simulated = get_method(name, fed)
    served = StepServer(merge_model(graphdef, frozen, adapters).server, num_clients=1,
                        limits=Limits(max_rows=8, max_wait_ms=0, max_bytes=2**20))
    server, port = grpc_server(served, "127.0.0.1:0")
    client = StepClient(f"127.0.0.1:{port}", 0)
    try:
        remote = get_method(name, fed)
        remote.remote = client.wire
        want = local_update_of(simulated, graphdef, frozen, adapters, data, fed)
        got = local_update_of(remote, graphdef, frozen, adapters, data, fed)
    finally:
        client.close()
        server.stop(grace=None)
        served.close()
    # 3 steps (and FedNano's 3-batch Fisher pass), each two requests with labels on the client
    assert served.stats["requests"] == (6 if name == "fednano" else 3) * (2 if labels_on_client else 1)
    assert client.bytes_sent > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got.upload, want.upload)
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-5)


def test_a_server_restarted_in_the_middle_of_an_epoch_costs_the_client_nothing(tiny_config):
    """The server goes down after the client's first step and comes back on the same port 0.5 s later: the
    client's retries (bounded backoff) carry the epoch through, to the same upload as an uninterrupted one."""
    from fednano_jax.federated.methods import get_method

    graphdef, frozen, adapters, data, fed = one_client(tiny_config)
    decoder = merge_model(graphdef, frozen, adapters).server
    limits = Limits(max_rows=8, max_wait_ms=0, max_bytes=2**20)
    first = StepServer(decoder, 1, limits=limits)
    server, port = grpc_server(first, "127.0.0.1:0")
    running = {"server": server, "steps": first}
    client = StepClient(f"127.0.0.1:{port}", 0, attempts=8, backoff_s=0.05, timeout_s=60)
    restarts = []

    def restart():
        time.sleep(0.5)
        steps = StepServer(decoder, 1, limits=limits)
        running["server"], _ = grpc_server(steps, f"127.0.0.1:{port}")
        running["steps"] = steps

    def flaky_wire(*args, kind):
        answer = client.wire(*args, kind=kind)
        if not restarts:  # after the first step: the server goes down and comes back
            running["server"].stop(grace=None).wait(10)
            running["steps"].close()
            restarts.append(threading.Thread(target=restart))
            restarts[0].start()
        return answer

    try:
        method = get_method("fedavg", fed)
        method.remote = flaky_wire
        got = local_update_of(method, graphdef, frozen, adapters, data, fed)
    finally:
        for thread in restarts:
            thread.join(timeout=30)
        client.close()
        running["server"].stop(grace=None)
        running["steps"].close()
    want = local_update_of(get_method("fedavg", fed), graphdef, frozen, adapters, data, fed)
    assert len(restarts) == 1 and running["steps"] is not first and running["steps"].stats["requests"] == 2
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got.upload, want.upload)
