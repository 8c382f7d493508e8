"""The config read once (settings.py, config.read): frozen records with one set of defaults, a typo in a config
file is one sentence, methods declare their own hyperparameters, every table the code keys by a setting's value
names exactly the choices the records accept, and no module below the edge reads the config with `.get`."""

import ast
import dataclasses
import glob
import os

import pytest
from ml_collections import ConfigDict

from conftest import ROOT, fed_of
from fednano_jax import settings
from fednano_jax.config import load_config_file, read
from fednano_jax.errors import ConfigError
from fednano_jax.federated.methods import METHODS, get_method
from fednano_jax.settings import Experiment, Fed

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def tiny():
    return load_config_file(os.path.join(ROOT, "configs", "easyvqa_tiny.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_reads_into_records_that_write_back_the_same(path):
    experiment = read(load_config_file(path), run=False)
    again = read(ConfigDict(experiment.as_dict()), run=False)
    assert again == experiment


def test_records_are_frozen_and_a_missing_key_takes_the_one_default():
    config = tiny()
    del config.fed["pack_padding"], config.fed.dp["fisher_mean_square"], config.fed["prox_mu"]
    experiment = read(config)
    assert experiment.fed.pack_padding == Fed.pack_padding == 0.1
    assert experiment.fed.dp.fisher_mean_square == settings.Dp.fisher_mean_square
    assert get_method("fedprox", experiment.fed).hyperparameters.prox_mu == 0.01
    with pytest.raises(dataclasses.FrozenInstanceError):
        experiment.fed.rounds = 3


def test_a_typo_in_a_config_file_is_one_sentence_naming_the_closest_key():
    config = tiny()
    config.fed.learning_rat = 0.1
    with pytest.raises(ConfigError, match=r"^Unknown setting fed.learning_rat; did you mean fed.learning_rate\?$"):
        read(config)
    config = tiny()
    config.fed.prox_muu = 0.1  # a method's key is among the section's keys
    with pytest.raises(ConfigError, match=r"did you mean fed.prox_mu\?"):
        read(config)
    config = tiny()
    config.meshh = ConfigDict()
    with pytest.raises(ConfigError, match=r"^Unknown setting config.meshh; did you mean config.mesh\?$"):
        read(config)


def test_a_method_declares_its_hyperparameters_and_checks_them():
    assert get_method("fedprox", fed_of(prox_mu=0.5)).hyperparameters.prox_mu == 0.5
    assert get_method("fednano", fed_of(fisher_examples=64)).extra_pass_examples == 64
    assert get_method("fednano_ef", fed_of(fisher_examples=64)).extra_pass_examples == 0  # it has no extra pass
    assert get_method("fedavg", fed_of(fisher_examples=64)).extra_pass_examples == 0
    with pytest.raises(ConfigError, match="^fed.dpa_max_weight must lie in \\[0, 1\\], got 2.0.$"):
        fed_of(dpa_max_weight=2.0)
    # Every hyperparameter key is one of its method's, with one default wherever two methods declare it.
    defaults = {}
    for method in METHODS.values():
        for field in dataclasses.fields(method.Hyperparameters):
            assert defaults.setdefault(field.name, field.default) == field.default
    assert not set(defaults) & {f.name for f in dataclasses.fields(Fed)}


def test_every_table_keyed_by_a_setting_names_exactly_its_choices():
    from fednano_jax.data import datasets, prompts
    from fednano_jax.data.partition import Partition
    from fednano_jax.federated import rounds, server_optimizer
    from fednano_jax.models import llama
    from fednano_jax.privacy import accountant, dp

    assert set(llama.REMAT_POLICIES) == set(settings.REMAT_POLICIES)
    assert set(rounds.OPTIMIZERS) == set(settings.OPTIMIZERS)
    assert set(server_optimizer.OPTIMIZERS) == set(settings.SERVER_OPTIMIZERS) == set(server_optimizer.LABELS)
    assert set(settings.DEFAULT_SERVER_LEARNING_RATES) == set(settings.SERVER_OPTIMIZERS)
    assert set(datasets.LOADERS) == set(settings.DATASET_FORMATS)
    assert settings.DEFAULT_TEMPLATE in prompts.TEMPLATES
    for kind in settings.PARTITIONS:
        assert Partition(kind=kind).describe()
    for name in settings.ACCOUNTANTS:
        assert accountant.epsilon(1.0, accountant.Participation("fixed", 2, 2, 2), 1, 1e-5, name) > 0
    assert {dp.CENTRAL, dp.DISTRIBUTED, dp.AUTO} == set(settings.NOISE_PLACEMENTS)


BELOW_THE_EDGE = ("models", "weights", "data", "eval", "backbone", "parallel", "privacy", "federated",
                  "experiment.py", "preflight.py", "metrics.py")
SECTIONS = ("config", "fed", "dp", "model", "data", "pretrain", "adapter", "mesh", "eval", "checkpoint", "section")


def config_gets(path: str) -> list[str]:
    """`X.get("key", ...)` calls whose X ends in a config section's name (config.fed, dp, ...)."""
    tree = ast.parse(open(path).read())
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            owner = ast.unparse(node.func.value)
            if owner.split(".")[-1] in SECTIONS:
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_module_below_the_edge_reads_the_config_with_get():
    package = os.path.join(ROOT, "fednano_jax")
    paths = [p for unit in BELOW_THE_EDGE for p in (glob.glob(os.path.join(package, unit, "**", "*.py"),
                                                              recursive=True) or [os.path.join(package, unit)])]
    assert len(paths) > 50
    assert [call for path in paths for call in config_gets(path)] == []


def test_the_check_catches_a_config_get(tmp_path):
    """The scan above would see one."""
    module = tmp_path / "module.py"
    module.write_text("def f(config):\n    return config.fed.get('client_chunk', 0)\n")
    assert config_gets(str(module)) == [f"{os.path.relpath(module, ROOT)}:2 config.fed.get('client_chunk', 0)"]


def test_an_experiment_with_everything_at_its_defaults_is_the_tiny_defaults():
    """The records' defaults are the settings the default config states (a default moved in one place only would
    change what a config without that key runs)."""
    stated = read(tiny(), run=False)
    defaults = Experiment()
    for section in ("fed", "mesh", "checkpoint", "eval"):
        for field in dataclasses.fields(getattr(defaults, section)):
            if field.name in ("hyperparameters", "pack_clients", "methods"):
                continue
            assert getattr(getattr(stated, section), field.name) == getattr(getattr(defaults, section), field.name), (
                section, field.name)
