"""The command line as a user runs it: clear errors, and commands that import together."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_main


@pytest.mark.parametrize("flag, message", [
    ("--config.fed.roundz=3", "Unknown config key 'fed.roundz'; did you mean 'fed.rounds'?"),
    ("--config.fed.methods=fedfoo", "Unknown method 'fedfoo' in fed.methods"),
    ("--config.model.adapter.rank=0", "model.adapter.rank must be a positive integer, got 0."),
    ("--config.model.adapter.alpha=-1.0", "model.adapter.alpha must be positive"),
    ("--config.data.dirichlet_alpha=0.0", "data.dirichlet_alpha must be positive"),
    ("--config.fed.batch_size=0", "fed.batch_size must be at least 1"),
    ("--config.fed.clients_per_round=6", "fed.clients_per_round must be between 0 (all) and fed.num_clients=5"),
    ("--config.fed.dropout=1.0", "fed.dropout must be a probability in [0, 1)"),
    ("--presett=llava15_7b", "Unknown command line flag 'presett'"),  # absl's own error, as one sentence
    ("--config.fed.dp.noise_multiplier=0.5", "--config.fed.dp.noise_multiplier has no effect unless "
     "fed.dp.enabled=True; add --config.fed.dp.enabled=True or drop it."),  # would train without DP
])
def test_bad_config_stops_with_one_sentence(flag, message):
    result = run_main(flag, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("Config error: ") and message in last_line


def test_an_unknown_chat_template_is_one_sentence():
    result = run_main("--config.model.prompt=alpaca", config="configs/easyvqa_minigpt4_tiny.py", timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("Config error: model.prompt must be one of ['llava', "
                                                      "'minigpt4'], got 'alpaca'.")


@pytest.mark.parametrize("flag, message", [
    ("--config.data.dir=/etc/hostname", "Data error: data.dir '/etc/hostname' is a file; expected a directory"),
    ("--config.data.dir=/etc/hostname/easy_vqa", "Data error: data.dir '/etc/hostname/easy_vqa' cannot be created"),
    ("--workdir=/etc/hostname/run", "Config error: --workdir '/etc/hostname/run' cannot be created"),
])
def test_unusable_paths_stop_with_one_sentence(flag, message):
    result = run_main(flag, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)


def test_more_clients_than_examples_is_refused(easy_vqa_dir):
    from fednano_jax.data import pipeline
    from fednano_jax.data.partition import Partition

    splits = pipeline.load_splits(easy_vqa_dir, 50, 30, 10, seed=0)
    tokenizer = pipeline.tokenizer_for(splits)
    with pytest.raises(ValueError, match=r"fed.num_clients \(31\) exceeds the 30 federated training examples"):
        pipeline.federated_data(splits, tokenizer, 16, num_clients=31, partition=Partition(), seed=0)


def test_command_modules_import_together_without_defining_flags():
    """Each command defines its flags only when run, so importing several (a test, a notebook) never clashes."""
    modules = ["main", "study", "benchmark", "memory_plan", "accounting", "data.partition_stats", "commands.study",
               "commands.benchmark", "commands.memory_plan", "commands.accounting", "commands.partition_stats"]
    code = ("from absl import flags\n" + "".join(f"import fednano_jax.{m}\n" for m in modules) +
            "defined = [name for name in ('config', 'workdir', 'out', 'clients') if name in flags.FLAGS]\n"
            "assert not defined, defined\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def parsed_config(*overrides: str, config: str = "configs/easyvqa_tiny.py"):
    """The config as a command's absl flags parse it, with `overrides` applied."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["command", f"--config={os.path.join(ROOT, config)}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


@pytest.mark.parametrize("flags, message", [
    (["--config.fed.dp.noise_multiplier=0.5"], "--config.fed.dp.noise_multiplier has no effect unless "
                                               "fed.dp.enabled=True; add --config.fed.dp.enabled=True or drop it."),
    (["--config.fed.dp.enabled=False", "--config.fed.dp.clip_norm=0.5"], "--config.fed.dp.clip_norm has no effect"),
    (["--config.fed.secagg_threshold=3"], "unless fed.secure_aggregation=True"),
    (["--config.fed.server_learning_rate=0.01"], "unless fed.server_optimizer is avgm, adagrad, adam or yogi"),
    (["--config.fed.server_optimizer=adam", "--config.fed.server_momentum=0.5"], "unless fed.server_optimizer=avgm"),
    (["--config.fed.rank_aggregation=zero_pad"], "unless model.adapter.client_ranks is set"),
    (["--config.fed.prox_mu=0.1"], "--config.fed.prox_mu has no effect unless fed.methods includes fedprox; "
                                   "add fedprox to --config.fed.methods or drop it."),
    (["--config.fed.methods=fedavg,fednano", "--config.fed.dpa_max_weight=0.3"],
     "unless fed.methods includes feddpa_f"),
    (["--config.fed.methods=fedavg", "--config.fed.fisher_floor=1e-4"], "unless fed.methods includes fednano or "
                                                                         "fednano_ef"),
    (["--config.fed.methods=fednano_ef", "--config.fed.fisher_examples=64"], "unless fed.methods includes fednano;"),
])
def test_an_override_the_run_would_ignore_is_refused(flags, message):
    from fednano_jax.commands import cli
    from fednano_jax.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        cli.check_inactive(parsed_config(*flags), flags)
    assert message in str(error.value)


@pytest.mark.parametrize("flags", [
    [],  # the file sets prox_mu, dpa_*, server_momentum... for methods it does not run: a file may
    ["--config.fed.dp.enabled=False"],  # the enabling key itself
    ["--config.fed.dp.enabled=True", "--config.fed.dp.noise_multiplier=0.5", "--config.fed.dp.clip_norm=0.5"],
    ["--config.fed.secure_aggregation=True", "--config.fed.secagg_threshold=3"],
    ["--config.fed.server_optimizer=adam", "--config.fed.server_learning_rate=0.01"],
    ["--config.fed.server_optimizer=avgm", "--config.fed.server_momentum=0.5"],
    ["--config.model.adapter.client_ranks=16,8,4", "--config.fed.rank_aggregation=zero_pad"],
    ["--config.fed.methods=fedavg,fedprox", "--config.fed.prox_mu=0.1"],
    ["--config.fed.methods=feddpa_f", "--config.fed.dpa_max_weight=0.3", "--config.fed.dpa_instances=3"],
    ["--config.fed.methods=fednano_ef", "--config.fed.fisher_floor=1e-4", "--config.fed.fisher_example_weights=False"],
    ["--config.fed.methods=fednano", "--config.fed.fisher_examples=64"],
    ["--config.fed.wire_noise=0.1"],
])
def test_an_override_with_what_enables_it_passes(flags):
    from fednano_jax.commands import cli

    cli.check_inactive(parsed_config(*flags), flags)


def test_a_command_that_sets_the_methods_itself_is_not_second_guessed():
    """The study's cells choose fed.methods (its main study runs FedProx): prox_mu may matter there."""
    from fednano_jax.commands import cli
    from fednano_jax.errors import ConfigError

    flags = ["--config.fed.prox_mu=0.1"]
    cli.check_inactive(parsed_config(*flags), flags, command="fednano_jax.commands.study")
    with pytest.raises(ConfigError):
        cli.check_inactive(parsed_config(*flags), flags, command="fednano_jax.main")
    flags = ["--config.fed.dp.noise_multiplier=0.5"]  # no study cell enables DP
    with pytest.raises(ConfigError):
        cli.check_inactive(parsed_config(*flags), flags, command="fednano_jax.commands.study")


def test_cpu_devices_makes_that_many_devices_before_jax_starts(easy_vqa_dir):
    """`mesh.cpu_devices`: the command makes that many CPU devices, and the mesh spreads the clients over them."""
    result = run_main(f"--config.data.dir={easy_vqa_dir}", "--config.mesh.cpu_devices=3", "--dry_run", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Mesh: 3 (clients) x 1 (model) over 3 cpu devices" in result.stdout


@pytest.mark.parametrize("flag, message", [
    ("--config.mesh.cpu_devices=-2", "mesh.cpu_devices must be 0 (XLA's own), a number of devices or -1 (one per "
                                     "CPU core), got -2."),
    ("--config.mesh.cpu_devices=2", "mesh.cpu_devices=2 and XLA_FLAGS' --xla_force_host_platform_device_count "
                                    "both say how many CPU devices to make; pass one of them."),
])
def test_cpu_devices_that_cannot_apply_are_one_sentence(flag, message, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    result = run_main(flag, "--dry_run", timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"Config error: {message}"


def test_cpu_devices_after_jax_started_with_others_is_one_sentence():
    """In Python, where JAX has started with other CPU devices, the mesh says why the setting cannot apply."""
    import jax

    from fednano_jax.errors import MeshError
    from fednano_jax.parallel.mesh import make_mesh
    from fednano_jax.settings import Mesh

    started = len(jax.devices())
    asked = started + 2
    with pytest.raises(MeshError, match=rf"^mesh.cpu_devices={asked} asks for {asked} CPU devices, but JAX started "
                                        rf"with {started}: the commands set it before JAX starts; in Python, call "
                                        rf"jax.config.update\('jax_num_cpu_devices', {asked}\) before"):
        make_mesh(Mesh(cpu_devices=asked))
    assert make_mesh(Mesh()).devices.size == started
