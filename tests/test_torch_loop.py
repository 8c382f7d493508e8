"""The benchmark's PyTorch baseline computes what our JAX client update computes, on the same weights."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch baseline needs torch==2.13.0 (requirements-test.txt)")

from fednano_jax.settings import Fed
from fednano_jax import load_pretrained
from fednano_jax.backbone import synthetic
from fednano_jax.commands import torch_loop  # noqa: E402
from fednano_jax.errors import ConfigError  # noqa: E402
from fednano_jax.federated.client import ClientInputs, local_update  # noqa: E402
from fednano_jax.federated.methods.fedavg import FedAvg  # noqa: E402
from fednano_jax.federated.objective import adapter_value_and_grad  # noqa: E402
from fednano_jax.federated.rounds import make_optimizer  # noqa: E402
from conftest import make_batch  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def both_models(tiny_config, tmp_path_factory):
    """The torch model with transformers' random weights, and the same checkpoint loaded by our loader."""
    model = torch_loop.random_model(tiny_config, CPU, seed=3)
    directory = str(tmp_path_factory.mktemp("llava"))
    model.llava.save_pretrained(directory)
    ours = load_pretrained(directory, dtype="float32", adapter=tiny_config.adapter)
    adapters = jax.tree.map(lambda x: x + 0.05 * np.sign(np.sin(np.arange(x.size))).reshape(x.shape),
                            ours.adapters)  # non-zero `up`, so both adapter matrices get gradients
    model.adapters.load_state_dict(torch_loop.adapters_from_jax(adapters))
    return model, ours, adapters


def test_loss_and_adapter_gradients_match_ours(both_models):
    model, ours, adapters = both_models
    batch = make_batch(5, batch=3, length=12)  # right-padded rows, answers of two tokens
    loss, grads = adapter_value_and_grad(ours.graphdef, ours.frozen, adapters, batch)
    torch_batch = torch_loop.host_batch({**batch, "image_index": np.arange(3)}, np.arange(3), np.ones(3, bool), CPU)
    model.zero_grad()
    torch_loss = model.loss(torch_batch)
    torch_loss.backward()
    np.testing.assert_allclose(torch_loss.item(), float(loss), rtol=1e-5)
    expected = torch_loop.adapters_from_jax(grads)
    for name, parameter in model.adapters.named_parameters():
        np.testing.assert_allclose(parameter.grad.numpy(), expected[name].numpy(), rtol=1e-3, atol=1e-6)


def test_a_client_round_ends_at_our_adapters(both_models, tiny_config):
    """Three AdamW steps (weight decay 0.1), the last one padding only: same adapters as our scanned local update."""
    assert_round_ends_at_ours(*both_models)


def test_under_torch_compile_a_client_round_ends_at_our_adapters(both_models, tiny_config):
    """The benchmark's `torch_compile` mode: the same model and loop with the loss under torch.compile, the same
    adapters as our scanned local update."""
    _, ours, adapters = both_models
    compiled = torch_loop.random_model(tiny_config, CPU, seed=3, compiled=True)  # both_models' weights
    assert compiled.loss._torchdynamo_orig_callable is not None  # the loss is TorchDynamo's, not the eager one
    assert_round_ends_at_ours(compiled, ours, adapters)


def test_worker_processes_give_the_one_process_loops_uploads_and_stop(both_models, tiny_config):
    """The benchmark's `torch_workers` mode (pfl's way): the cohort split over two worker processes, each with the
    same model on one thread, gives the uploads the one-process loop gives, in cohort order; close() stops them."""
    model, ours, adapters = both_models
    work = synthetic.Workload(clients=3, steps=2, batch=2, seq_len=synthetic.sequence_length(ours.config, 6))
    data, rows, valid = synthetic.synthetic_data(ours.config, work, seed=2)
    fed = Fed(optimizer="adamw", learning_rate=1e-2, weight_decay=0.1)
    start, data = torch_loop.adapters_from_jax(adapters), torch_loop.host_dataset(data)
    want = torch_loop.run_round(model, start, data, rows, valid, fed)
    rounds = torch_loop.WorkerRounds(tiny_config, data, fed, workers=2, seed=3)  # both_models' weights
    try:
        got = rounds(start, rows, valid)
        processes = list(rounds.pool._processes.values())
    finally:
        rounds.close()
    assert len(got) == 3 and len(processes) == 2 and not any(p.is_alive() for p in processes)
    for mine, theirs in zip(got, want):
        for name in theirs:
            np.testing.assert_allclose(mine[name].numpy(), theirs[name].numpy(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(got[0]["text.up"].numpy(), got[1]["text.up"].numpy())  # the clients differ


def assert_round_ends_at_ours(model, ours, adapters):
    work = synthetic.Workload(clients=1, steps=3, batch=2, seq_len=synthetic.sequence_length(ours.config, 6))
    data, rows, valid = synthetic.synthetic_data(ours.config, work, seed=1)
    valid[0, 2] = False
    fed = Fed(optimizer="adamw", learning_rate=1e-2, weight_decay=0.1)
    outputs = local_update(ours.graphdef, make_optimizer(fed), FedAvg(fed), 3, ours.frozen, data,
                           {"adapters": adapters}, ClientInputs(rows[0], valid[0]))
    expected = outputs.upload["adapters"]
    upload, losses = torch_loop.client_update(model, torch_loop.adapters_from_jax(adapters),
                                              torch_loop.host_dataset(data), rows[0], valid[0], fed)
    assert len(losses) == 2
    for name, value in torch_loop.adapters_from_jax(expected).items():
        np.testing.assert_allclose(upload[name].numpy(), value.numpy(), rtol=1e-4, atol=1e-6)
        assert not np.allclose(value.numpy(), torch_loop.adapters_from_jax(adapters)[name].numpy())


def test_a_model_llava_cannot_express_is_refused(tiny_config):
    import dataclasses

    with pytest.raises(ConfigError, match="needs a vision tower and model.connector='mlp2x_gelu'"):
        torch_loop.hf_llava_config(dataclasses.replace(tiny_config, connector="linear"))
