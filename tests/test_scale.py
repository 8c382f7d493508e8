"""Remat policies change memory, not numbers; the benchmark and memory-plan commands write their JSON."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from fednano_jax.config import read
from fednano_jax.errors import ConfigError
from fednano_jax.federated.objective import adapter_value_and_grad
from fednano_jax.models.loss import mean_answer_nll
from fednano_jax.models.mllm import MultimodalModel, merge_model, split_model
from test_federated import tiny_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from conftest import SMALL_MODEL  # noqa: E402


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_give_the_same_loss_and_gradients(tiny_config, policy):
    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    remat_config = dataclasses.replace(tiny_config, llm=dataclasses.replace(tiny_config.llm, remat=policy))
    remat_graphdef, _, _ = split_model(MultimodalModel(remat_config, nnx.Rngs(0)))
    loss, grads = adapter_value_and_grad(graphdef, frozen, adapters, data)
    remat_loss, remat_grads = adapter_value_and_grad(remat_graphdef, frozen, adapters, data)
    np.testing.assert_allclose(loss, remat_loss, rtol=1e-6)
    for g, r in zip(nnx.to_flat_state(grads), nnx.to_flat_state(remat_grads)):
        np.testing.assert_allclose(g[1][...], r[1][...], rtol=1e-5, atol=1e-8)


def saved_for_backward(graphdef, frozen, adapters, data) -> int:
    """How many arrays the adapter gradient keeps from the forward pass for the backward pass."""
    import contextlib
    import io

    import jax.ad_checkpoint

    def loss(a):
        model = merge_model(graphdef, frozen, a)
        return mean_answer_nll(model(data["input_ids"], data["attention_mask"], data["images"]), data)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(loss, adapters)
    return len(printed.getvalue().splitlines())


def test_remat_policies_keep_fewer_activations_for_the_backward_pass(tiny_config):
    """What remat is for: `full` keeps only each layer's input, `dots` its matmul outputs too, `none` everything."""
    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    saved = {}
    for policy in ("none", "dots", "full"):
        config = dataclasses.replace(tiny_config, llm=dataclasses.replace(tiny_config.llm, remat=policy))
        saved[policy] = saved_for_backward(split_model(MultimodalModel(config, nnx.Rngs(0)))[0], frozen, adapters,
                                           data)
    assert saved["full"] < saved["dots"] < saved["none"], saved


def test_unknown_remat_policy_is_a_config_error():
    from configs.easyvqa_tiny import get_config

    config = get_config()
    config.model.remat = "some"
    with pytest.raises(ConfigError, match=r"model.remat must be one of \['dots', 'full', 'none'\], got 'some'."):
        read(config)


def run_module(module, *flags):
    env = {**os.environ, "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", module, "--config=configs/easyvqa_tiny.py", *SMALL_MODEL, *flags]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_benchmark_command_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    run_module("fednano_jax.benchmark", "--clients=2", "--steps=2", "--batch=2", "--text_tokens=4", "--repeats=1",
               f"--profile={tmp_path / 'trace'}", f"--out={out}")
    report = json.loads(out.read_text())
    profile = report["profile"]  # the vmapped round traced: its busy time by kind of XLA op, the trace kept
    assert profile["by_kind"]["matmul"]["seconds_per_run"] > 0 and list((tmp_path / "trace").rglob("*.xplane.pb"))
    assert sum(kind["share"] for kind in profile["by_kind"].values()) == pytest.approx(1.0)
    assert report["workload"] == {"clients": 2, "steps": 2, "batch": 2, "seq_len": 21, "tokens_per_round": 168}
    assert report["flops_per_client_step"] > 0 and report["left_out"] == {}  # the test environment has torch
    assert set(report["speedup"]) == {"vmap_over_loop", "vmap_over_sequential", "vmap_over_torch",
                                      "vmap_over_torch_compile", "vmap_over_torch_workers"}
    for mode in ("vmap", "sequential", "loop", "torch", "torch_compile", "torch_workers"):
        figures = report["modes"][mode]
        for key in ("round_seconds", "steps_per_second", "tokens_per_second", "client_updates_per_second",
                    "flops_per_second"):
            assert figures[key] > 0, (mode, key)
        assert 0 < figures["mfu"] < 1, mode  # against the matmul peak measured in the same run
    assert report["peak_flops_per_second"] > 1e9 and report["measured_peak_flops"]["float32"]["1"] > 1e9
    for mode in ("vmap", "sequential", "loop"):
        assert report["modes"][mode]["compile_seconds"] > 0 and report["modes"][mode]["peak_memory_bytes"] > 0
    assert report["modes"]["torch"]["model_build_seconds"] > 0 and report["modes"]["torch"]["torch_threads"] >= 1
    # torch.compile's compilation is reported apart from its rounds
    assert report["modes"]["torch_compile"]["compile_seconds"] > report["modes"]["torch_compile"]["round_seconds"]


def test_a_client_steps_flops_count_every_decoder_layer_whether_scanned_or_not():
    """XLA counts a while loop's body once: the benchmark counts FLOPs on the step with its layers unrolled, so a
    scanned model reports the work of both its layers, not the scanned step's own count of one."""
    from fednano_jax.commands.benchmark import build_problem, model_flops_per_step
    from fednano_jax.config import load_config_file
    from fednano_jax.federated.client import initial_carry, train_step
    from fednano_jax.parallel.xla_stats import flops_of

    config = load_config_file(os.path.join(ROOT, "configs", "easyvqa_tiny.py"))
    config.model.scan_unroll = 1
    scanned = build_problem(read(config, run=False), None, clients=2, steps=1, batch=2, text_tokens=4)
    step = jax.jit(functools.partial(train_step, scanned.graphdef, scanned.optimizer, scanned.method))
    start = initial_carry(scanned.optimizer, scanned.method, scanned.adapters)
    as_scanned = flops_of(step.lower(scanned.frozen, scanned.data, {"adapters": scanned.adapters}, None,
                                     scanned.adapters, start, scanned.rows[0, 0], scanned.valid[0, 0]))
    assert model_flops_per_step(scanned) > 1.5 * as_scanned  # two layers of the decoder counted, not one


def test_the_measured_matmul_peak_counts_every_device_it_runs_on():
    """The benchmark's peak: FLOP/s of dense matmuls timed here, on one device and on two at once (a CPU split into
    devices shares its cores, so two reach about what one does, never twice as much by assumption)."""
    import jax

    from fednano_jax.commands.benchmark import matmul_flops

    one = matmul_flops("float32", jax.devices()[:1], repeats=3, size=256)
    assert one > 1e8
    if len(jax.devices()) > 1:
        both = matmul_flops("float32", jax.devices()[:2], repeats=3, size=256)
        assert 0.3 * one < both < 3 * one


def tiny_shapes():
    from fednano_jax.backbone.synthetic import synthetic_model_config
    from fednano_jax.config import load_config_file

    return synthetic_model_config(read(load_config_file(os.path.join(ROOT, "configs", "easyvqa_tiny.py")), run=False))


def test_benchmark_leaves_the_torch_mode_out_where_torch_is_missing(monkeypatch):
    from fednano_jax.commands import benchmark

    real_find_spec = benchmark.importlib.util.find_spec
    monkeypatch.setattr(benchmark.importlib.util, "find_spec", lambda name: None if name == "torch" else
                        real_find_spec(name))
    modes, left_out = benchmark.available_modes("all", tiny_shapes())
    assert modes == ("loop", "sequential", "vmap") and "PyTorch is not installed" in left_out["torch"]
    assert benchmark.available_modes("torch", tiny_shapes()) == (("torch",), {})


def test_benchmark_leaves_a_cpu_torch_out_of_a_gpu_comparison(monkeypatch):
    import torch

    from fednano_jax.commands import benchmark

    monkeypatch.setattr(benchmark.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    modes, left_out = benchmark.available_modes("all", tiny_shapes())
    assert "torch" not in modes and "no CUDA" in left_out["torch"]


def test_benchmark_leaves_the_torch_mode_out_for_a_model_transformers_llava_cannot_mirror():
    pytest.importorskip("torch")
    from fednano_jax.commands import benchmark

    mirrored = tiny_shapes()
    assert benchmark.available_modes("all", mirrored) == (benchmark.MODES, {})
    grown = dataclasses.replace(mirrored, embed_vocab_size=mirrored.llm.vocab_size + 1)  # a text LLM's <image> row
    modes, left_out = benchmark.available_modes("all", grown)
    assert "torch" not in modes and "one vocabulary" in left_out["torch"]


PLANNED = ("--methods=fedavg,fednano,feddpa_f", "--config.model.llm.num_layers=2", "--config.eval.batch_size=4")


def planned(tmp_path, *flags) -> dict:
    out = tmp_path / "plan.json"
    run_module("fednano_jax.memory_plan", *PLANNED, *flags, f"--out={out}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def h100_plans(tmp_path_factory):
    """The tiny config's run planned for one H100 by XLA's CUDA compiler, with and without remat (and
    without, its images streamed from the host), and for a TPU v5p slice of 4 chips by libtpu's. The H100 plans scan
    the decoder layers, as a 7B plan does (the tiny config unrolls its two): remat saves per scanned layer."""
    scanned = "--config.model.scan_unroll=1"
    return {"full": planned(tmp_path_factory.mktemp("full"), "--target=h100-80gb", "--remat=full", scanned),
            "none": planned(tmp_path_factory.mktemp("none"), "--target=h100-80gb", "--remat=none", "--methods=fedavg",
                            "--config.data.stream_images=True", scanned),
            "tpu": planned(tmp_path_factory.mktemp("tpu"), "--target=tpu:v5p:2x2x1", "--methods=fedavg")}


RUN_PROGRAMS = {"local:fedavg", "server:fedavg", "local:fednano", "server:fednano", "local:feddpa_f",
                "server:feddpa_f", "local:feddpa_f_local_phase", "eval:feddpa_f_features", "eval:feddpa_f_generate",
                "eval:generate"}


def test_memory_plan_plans_every_program_of_the_run_for_an_h100(h100_plans):
    report = h100_plans["full"]
    assert report["target"] == "h100-80gb" and "H100" in report["device_kind"]
    assert report["device_memory_gib"] == pytest.approx(79.11, abs=0.01)  # the description file's bytes
    assert set(report["programs"]) == RUN_PROGRAMS
    for name, program in report["programs"].items():
        assert program["per_device_total_gib"] > 0, name
        assert set(program) >= {"arguments", "temporaries", "outputs", "per_device_total_gib"}
    # The device dataset (easy-VQA's 2,600 rows of 64 px images, about 31 MiB) is an argument of every local update.
    assert report["programs"]["local:fedavg"]["arguments"] > 2600 * 64 * 64 * 3 / 2**30
    # FedDPA-F's aggregation is FedAvg's: one module, compiled once.
    assert report["programs"]["server:feddpa_f"].get("same_module_as") == "server:fedavg"
    assert report["packed"]  # the tiny config packs clients, and its packed programs were planned


def test_the_gpu_plan_keeps_fewer_activations_with_remat(h100_plans):
    none, full = (h100_plans[p]["programs"]["local:fedavg"]["temporaries"] for p in ("none", "full"))
    assert full < none


def test_streamed_images_leave_the_image_table_out_of_the_devices_arguments(h100_plans):
    on_device, streamed = (h100_plans[p]["programs"]["local:fedavg"]["arguments"] for p in ("full", "none"))
    table = h100_plans["full"]["sizes"]["images"] * 64 * 64 * 3 / 2**30  # uint8 images at 64 px
    assert on_device - streamed == pytest.approx(table, rel=1e-3)


def test_the_tpu_plan_spreads_the_clients_over_the_slices_chips(h100_plans):
    report = h100_plans["tpu"]
    assert report["target"] == "tpu:v5p:2x2x1" and report["devices"] == 4 and report["device_kind"].startswith("TPU v5")
    assert report["mesh"] == {"clients": 4, "model": 1}
    assert report["device_memory_gib"] == pytest.approx(95.0, abs=1.0)
    assert {"local:fedavg", "server:fedavg", "eval:generate"} <= set(report["programs"])


def test_memory_plan_on_the_cpu_target_and_its_exit_when_a_program_does_not_fit(tmp_path):
    report = planned(tmp_path, "--target=cpu", "--methods=fedavg")
    assert report["target"] == "cpu" and set(report["programs"]) == {"local:fedavg", "server:fedavg", "eval:generate"}
    command = [sys.executable, "-m", "fednano_jax.memory_plan", "--config=configs/easyvqa_tiny.py", *SMALL_MODEL,
               *PLANNED, "--target=h100-80gb", "--methods=fedavg", "--batch=60000"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT},
                            timeout=600)
    assert result.returncode == 1
    assert "Program local:fedavg needs" in result.stderr and "over 90% of its 79.1 GiB" in result.stderr


def test_unknown_targets_and_missing_devices_are_config_errors():
    from fednano_jax.errors import ConfigError
    from fednano_jax.parallel import targets

    with pytest.raises(ConfigError, match="is not a target"):
        targets.resolve("h100")
    with pytest.raises(ConfigError, match="no TPU generation"):
        targets.resolve("tpu:v9:2x2")
    with pytest.raises(ConfigError, match="needs that many CPU devices"):
        targets.resolve("cpu", devices=64)


def test_with_remat_rebuilds_the_graph_for_the_same_parameters(tiny_config):
    from fednano_jax.backbone.build import with_remat

    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    remat_graphdef, remat_config = with_remat(graphdef, tiny_config, "full")
    assert remat_config.llm.remat == "full" and with_remat(graphdef, tiny_config, "none") == (graphdef, tiny_config)
    loss, _ = adapter_value_and_grad(graphdef, frozen, adapters, data)
    remat_loss, _ = adapter_value_and_grad(remat_graphdef, frozen, adapters, data)
    np.testing.assert_allclose(loss, remat_loss, rtol=1e-6)


def test_an_unrolled_layer_scan_computes_the_same_loss_and_gradients(tiny_config):
    """model.scan_unroll: how the layer scan runs, not what it computes; so neither the backbone's cache key nor
    a resume's fingerprint holds it, and a bad value is one sentence."""
    from fednano_jax.backbone import pretrain
    from fednano_jax.backbone.build import with_remat
    from fednano_jax.config import load_config_file, resume_fingerprint

    graphdef, frozen, adapters, data = tiny_setup(tiny_config)
    unrolled, unrolled_config = with_remat(graphdef, tiny_config, "none", scan_unroll=2)
    assert unrolled_config.llm.scan_unroll == 2
    loops = {name: jax.jit(lambda a, g=g: adapter_value_and_grad(g, frozen, a, data)).lower(adapters).as_text()
             .count("stablehlo.while") for name, g in (("scanned", graphdef), ("unrolled", unrolled))}
    assert loops["unrolled"] < loops["scanned"]  # the decoder's two layers in one iteration: no loop left
    loss, grads = adapter_value_and_grad(graphdef, frozen, adapters, data)
    unrolled_loss, unrolled_grads = adapter_value_and_grad(unrolled, frozen, adapters, data)
    np.testing.assert_allclose(unrolled_loss, loss, rtol=1e-6)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, g, rtol=1e-5, atol=1e-8), unrolled_grads, grads)
    config = load_config_file(os.path.join(ROOT, "configs", "easyvqa_tiny.py"))
    config.model.scan_unroll = 1
    key, fingerprint = pretrain.cache_key(read(config)), resume_fingerprint(read(config), "key")
    config.model.scan_unroll = 2
    assert pretrain.cache_key(read(config)) == key and resume_fingerprint(read(config), "key") == fingerprint
    config.model.scan_unroll = 0
    with pytest.raises(ConfigError, match=r"^model.scan_unroll must be a whole number of decoder layers, at least 1, "
                                          r"got 0\.$"):
        read(config)
