import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from fednano_jax.serving.local_host import free_port  # noqa: F401 - the tests import it from here

# The suite runs JAX on this host's CPU. With the compile-only GPU and TPU plugins installed
# (requirements-aot.txt), JAX would otherwise look for those devices in every process the tests start.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A one-layer vision tower and LLM: what end-to-end tests of the machinery (not of accuracy) run, to compile fast.
SMALL_MODEL = ("--config.model.llm.hidden_size=32", "--config.model.llm.intermediate_size=64",
               "--config.model.llm.num_layers=1", "--config.model.vision.num_layers=1")


# What `python -m pytest -m "not slow"` leaves out, so that a developer's loop takes minutes (the plain
# `python -m pytest`, which the README and CI run, still runs everything): whole test files, or `file::test`
# (all its parametrizations). Whole files where a module or session fixture is the cost.
SLOW = {
    "test_backbone_from_checkpoint.py",  # aligns a vision side to a checkpoint's LLM (module fixture)
    # three runs end to end: a pretraining, a run killed after a checkpoint, and its resume
    "test_checkpoint.py::test_pretraining_dropout_and_a_run_killed_after_a_checkpoint_resumed_to_the_uninterrupted_result",
    "test_command_matrix.py::test_command_on_config",  # every command on every shipped config (~60 pairs)
    "test_default_run.py",  # the README's default command end to end (session fixture): FedAvg and FedNano, 5 rounds
    "test_minigpt4_models.py",  # converts MiniGPT-4's files and runs an experiment on them (module fixture)
    "test_minigpt4_run.py",  # the MiniGPT-4-shaped tiny run end to end, and its untuned baseline
    "test_privacy_audit.py",  # trains FedNano once per wire-noise level, then fits an inverter
    "test_sharding.py",  # eight-device and two-process runs, each in its own Python process
    "test_study.py",  # the study command: every paper method, then a resume
    "test_iconqa.py::test_tiny_config_runs_end_to_end_with_the_iconqa_breakdown",  # a training run end to end
    "test_scienceqa.py::test_tiny_config_runs_end_to_end_with_the_scienceqa_breakdown",  # a training run end to end
    "test_ranks.py::test_a_run_with_client_ranks_and_server_adam_reports_by_rank",  # a training run end to end
    "test_ranks.py::test_a_client_at_rank_r_trains_what_an_unmasked_rank_r_adapter_would",  # trains each rank twice
    "test_ranks.py::test_mixed_ranks_run_in_one_vmapped_and_one_packed_program_as_each_client_alone",  # 3 programs
    # h100_plans (module fixture): three memory plans compiled by XLA's GPU and TPU compilers
    "test_scale.py::test_memory_plan_plans_every_program_of_the_run_for_an_h100",  # h100_plans
    "test_scale.py::test_the_gpu_plan_keeps_fewer_activations_with_remat",  # h100_plans
    "test_scale.py::test_streamed_images_leave_the_image_table_out_of_the_devices_arguments",  # h100_plans
    "test_scale.py::test_the_tpu_plan_spreads_the_clients_over_the_slices_chips",  # h100_plans
    "test_scale.py::test_memory_plan_on_the_cpu_target_and_its_exit_when_a_program_does_not_fit",  # two commands
    "test_scale.py::test_benchmark_command_writes_every_figure",  # the benchmark command, every mode timed
    "test_scale.py::test_remat_policies_give_the_same_loss_and_gradients",  # a backward pass per remat policy
    "test_scale.py::test_with_remat_rebuilds_the_graph_for_the_same_parameters",  # gradients with and without remat
    "test_federated.py::test_fisher_is_mean_squared_per_example_gradient",  # one backward pass per example
    "test_federated.py::test_packed_clients_give_the_unpacked_adapters_uploads_and_losses",  # packed and unpacked
    "test_federated.py::test_per_example_gradients_from_one_batched_pass_equal_one_backward_pass_per_example",  # same
    "test_federated.py::test_vmapped_and_sequential_clients_agree",  # a round compiled both ways
    "test_federated.py::test_clients_in_chunks_equal_one_vmap",  # a round compiled once per chunking
    "test_federated.py::test_images_streamed_from_the_host_give_the_device_tables_outputs",  # a round compiled twice
    "test_federated.py::test_masked_padding_steps_change_nothing",  # rounds with and without padded steps
    "test_federated.py::test_answer_only_logits_give_the_full_logits_loss_gradients_and_fisher",  # both logits ways
    "test_federated.py::test_labels_on_the_client_give_the_same_loss_gradients_and_fisher",  # both label sides
    "test_federated.py::test_fisher_examples_caps_the_extra_pass_to_the_first_examples",  # capped and uncapped
    "test_methods.py::test_fedprox_with_zero_mu_is_fedavg_and_positive_mu_pulls_toward_the_start",  # three trainings
    "test_methods.py::test_fednano_ef_is_on_the_extra_pass_scale_on_a_converged_model",  # trains to convergence
    "test_methods.py::test_fednano_ef_with_one_example_per_step_is_the_extra_pass_whatever_the_epochs",  # per epoch
    # composition (module fixture): one round for every method x DP x secure aggregation x ranks x server optimizer
    "test_aggregation.py::test_every_combination_runs_or_stops_with_its_sentence",  # composition
    "test_aggregation.py::test_secure_aggregation_and_distributed_noise_change_no_aggregate",  # composition
    "test_dp.py::test_a_dp_round_reports_epsilon_and_without_noise_or_clipping_trains_as_today",  # two DP runs
    "test_secagg.py::test_rounds_under_secure_aggregation_give_the_plain_rounds_adapters",  # masked and plain rounds
    "test_server.py::test_no_data_array_reaches_the_servers_program",  # lowers every method's server program
    "test_models.py::test_kv_cache_decoding_equals_full_recomputation",  # generates token by token both ways
    "test_accounting.py::test_llava15_7b_adapters_are_the_papers_1_05m_and_components_match_transformers",  # LLaVA
    "test_accounting.py::test_minigpt4_7b_client_side_matches_transformers_blip2_modules",  # transformers' BLIP-2
    "test_pretrained.py::test_smollm2_answers_a_chat_prompt_as_transformers_does",  # SmolLM2 in JAX and transformers
    "test_step_server.py::test_the_serve_command_serves_once_listening_and_stops_on_sigterm",  # loads the backbone
    "test_torch_loop.py::test_under_torch_compile_a_client_round_ends_at_our_adapters",  # TorchInductor compiles
    "test_torch_loop.py::test_worker_processes_give_the_one_process_loops_uploads_and_stop",  # spawns 2 workers
    # a split-step server, a run with a process per client, and the simulated run (~2 min)
    "test_client_processes.py::test_main_with_a_split_server_runs_each_client_as_a_process_and_gives_the_simulations_results",
    "test_client_processes.py::test_a_split_server_that_is_not_there_stops_the_run_with_one_sentence_and_no_process_left",
}


# The files that take a worker longest, longest first (2026-12-05's CI log): pytest.ini turns off xdist's ordering
# by test count, which ran these few-test files last, so that one worker sat idle while the other ran a
# deployment; started first, the many short files fill in around them. (Adding the module-fixture files after
# these made the suite slower: 21:36 against 20:13.)
LONGEST_FIRST = ("test_deploy.py", "test_deploy_faults.py", "test_client_processes.py", "test_scale.py",
                 "test_default_run.py", "test_study.py", "test_aggregation.py", "test_sharding.py",
                 "test_checkpoint.py", "test_federated.py", "test_ranks.py", "test_privacy_audit.py")


def pytest_collection_modifyitems(config, items):
    for name in LONGEST_FIRST:
        if not (pathlib.Path(__file__).parent / name).is_file():
            raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names {name!r}, which does not exist.")
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    for entry in SLOW:  # a renamed test would otherwise drop out of SLOW silently
        file, _, test = entry.partition("::")
        path = pathlib.Path(__file__).parent / file
        if not path.is_file() or (test and f"def {test}(" not in path.read_text()):
            raise pytest.UsageError(f"tests/conftest.py SLOW names {entry!r}, which does not exist.")
    for item in items:
        if item.path.name in SLOW or f"{item.path.name}::{getattr(item, 'originalname', item.name)}" in SLOW:
            item.add_marker(pytest.mark.slow)


def wait_for_line(process, text: str, timeout_s: float = 300) -> list[str]:
    """The lines a text-mode process prints until one holds `text` (or it ends, or `timeout_s` passes)."""
    import time

    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline and not any(text in line for line in lines):
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
    assert any(text in line for line in lines), "".join(lines)[-3000:]
    return lines


def run_main(*flags, config="configs/easyvqa_tiny.py", timeout=900):
    """`python -m fednano_jax.main` as a user runs it, from the repository root."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "fednano_jax.main", f"--config={config}", *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@dataclasses.dataclass(frozen=True)
class Run:
    stdout: str
    workdir: pathlib.Path

    @property
    def results(self) -> dict:
        return json.loads((self.workdir / "results.json").read_text())

    @property
    def records(self) -> list[dict]:
        return [json.loads(line) for line in (self.workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def default_run(easy_vqa_dir, tmp_path_factory) -> Run:
    """The README's default command, run once per session and shared by the end-to-end tests: the shipped
    backbone (an empty cache, so a cached one cannot stand in for it), FedAvg and FedNano, 5 rounds."""
    root = tmp_path_factory.mktemp("default_run")
    result = run_main("--config.mesh.cpu_devices=-1", f"--config.data.dir={easy_vqa_dir}",
                      f"--config.pretrain.cache_dir={root / 'cache'}", f"--workdir={root / 'run'}", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return Run(result.stdout, root / "run")


@pytest.fixture(scope="session")
def easy_vqa_dir(tmp_path_factory) -> str:
    """The real easy-VQA dataset, built once per test session (a few seconds)."""
    from fednano_jax.data.easy_vqa_builder import prepared_builder

    data_dir = str(tmp_path_factory.mktemp("easy_vqa"))
    prepared_builder(data_dir)
    return data_dir


TINY_VOCAB = 40
IMAGE_TOKEN = 4


@pytest.fixture(scope="session")
def tiny_config():
    from fednano_jax.models.llama import LlamaConfig
    from fednano_jax.models.mllm import AdapterConfig, MllmConfig
    from fednano_jax.models.vision import VisionConfig

    return MllmConfig(
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=2,
                            num_heads=2),
        llm=LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2),
        adapter=AdapterConfig(rank=4, alpha=8.0),
        image_token_id=IMAGE_TOKEN,
    )


def make_batch(seed: int, batch: int = 3, length: int = 12, num_image_tokens: int = 4, image_size: int = 16):
    """Right-padded rows `<s> <image>*N text... answer` with loss on the last two real tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(5, TINY_VOCAB, size=(batch, length)).astype(np.int32)
    ids[:, 0] = 2
    ids[:, 1: 1 + num_image_tokens] = IMAGE_TOKEN
    lengths = rng.integers(num_image_tokens + 4, length + 1, size=batch)
    attention = np.arange(length)[None] < lengths[:, None]
    ids = np.where(attention, ids, 0)
    loss = attention & (np.arange(length)[None] >= lengths[:, None] - 2)
    images = rng.integers(0, 256, size=(batch, image_size, image_size, 3)).astype(np.uint8)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss, "images": images}


def fed_of(**keys):
    """A settings.Fed from `fed` section keys (the rest at their defaults), read as config.read reads it: method
    hyperparameters (fisher_floor, prox_mu, ...) go to the methods that declare them."""
    from ml_collections import ConfigDict

    from fednano_jax.federated.methods import METHODS
    from fednano_jax.settings import Fed

    return Fed.read(ConfigDict(keys), "fed", {name: m.Hyperparameters for name, m in METHODS.items()})
