"""The edge: a user's config file read once into frozen records (`read`, settings.py) and checked against the
code's registries (the backbone's own checks, by its family: backbone/family/), and the resume fingerprint.

Every check raises `ConfigError` with one sentence naming the setting and what was expected; main prints that
sentence instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import os

from ml_collections import ConfigDict

from fednano_jax.backbone.family import family_of, without_derived_family
from fednano_jax.data.prompts import TEMPLATES
from fednano_jax.errors import ConfigError
from fednano_jax.privacy import dp as client_dp
from fednano_jax.settings import (DEFAULT_DATASET, FTRL, NO_SERVER_OPTIMIZER, Data, Experiment, Fed, plain,
                                  require, require_client_layers)


def read(config, known_methods: dict | None = None, run: bool = True) -> Experiment:
    """The config, read once: an `Experiment` of frozen records (settings.py), each checked as it is built, then,
    for a run (`run`), checked against the code's registries: the backbone family, the methods and what each
    refuses. Commands that need only the shapes (memory_plan, benchmark, accounting) read with run=False.
    `config`: an ml_collections ConfigDict, or an Experiment already read (returned as it is)."""
    from fednano_jax.federated.methods import METHODS

    known_methods = METHODS if known_methods is None else known_methods
    experiment = config if isinstance(config, Experiment) else Experiment.read(
        config, declared={name: m.Hyperparameters for name, m in known_methods.items()})
    if run:
        validate(experiment, known_methods)
    return experiment


def validate(experiment: Experiment, known_methods: dict) -> None:
    """What the records cannot check alone: the data's and the backbone family's own checks, the methods named,
    and the aggregators they compose with."""
    check_data(experiment)
    model = experiment.model
    require(bool(model.path) or not model.vocab_size,
            f"model.vocab_size={model.vocab_size} is a checkpoint's vocabulary but model.path is unset; "
            "set model.path to that checkpoint to run an experiment (memory_plan, benchmark and accounting need "
            "only the shapes).")
    require(model.template in TEMPLATES, f"model.prompt must be one of {sorted(TEMPLATES)}, got {model.prompt!r}.")
    family_of(experiment).check(experiment)  # model.family (or the one its keys describe) and that family's own
    check_client_layers(experiment)
    methods = experiment.fed.methods
    for name in methods:
        require(name in known_methods, f"Unknown method {name!r} in fed.methods; expected one of {sorted(known_methods)}.")
    _validate_client_ranks(experiment, known_methods)
    _validate_dp(experiment, known_methods)
    if experiment.fed.secure_aggregation:
        _without_sums(experiment, known_methods, "fed.secure_aggregation")


def check_client_layers(experiment: Experiment) -> None:
    """model.client_layers at most the decoder's layers (read from the shapes the config describes)."""
    layers = experiment.model.client_layers
    if layers:
        require_client_layers(layers, family_of(experiment).shapes(experiment, vocab_fallback=2).llm.num_layers)


def check_data(experiment: Experiment) -> None:
    """What loading the data needs beyond the record's own checks: a dataset other than easy-VQA names its root."""
    data = experiment.data
    require(data.name == DEFAULT_DATASET or bool(data.root),
            f"data.root must name the directory holding {data.name}, got {data.root!r}.")


def _without_sums(experiment: Experiment, known_methods: dict, setting: str) -> None:
    """Methods whose clients send no contribution cannot run under an aggregator that protects contributions."""
    for name in experiment.fed.methods:
        reason = known_methods[name].no_sums
        require(reason is None, f"{setting} does not apply to {name}: {reason}; drop {name} from fed.methods.")


def _validate_dp(experiment: Experiment, known_methods: dict) -> None:
    """fed.dp: a noise multiplier that reaches the target epsilon, and methods with contributions to noise."""
    fed = experiment.fed
    if not fed.dp.enabled:
        return
    try:
        problem = client_dp.check(client_dp.settings(fed, [1]))
    except (ValueError, RuntimeError) as error:  # dp-accounting could not solve for the target epsilon
        raise ConfigError(f"fed.dp.target_epsilon={fed.dp.target_epsilon} has no noise multiplier that "
                          f"reaches it ({error}).") from None
    require(problem is None, problem or "")
    _without_sums(experiment, known_methods, "fed.dp")


def _validate_client_ranks(experiment: Experiment, known_methods: dict) -> None:
    """model.adapter.client_ranks: methods that can train heterogeneous ranks."""
    if not experiment.model.adapter.client_ranks:
        return
    for name in experiment.fed.methods:
        reason = known_methods[name].no_ranks
        require(reason is None, f"model.adapter.client_ranks does not apply to {name}: {reason}; drop {name} from "
                "fed.methods or leave client_ranks empty.")


# Settings a config could leave out when checkpoints were first written (added later, or optional): at their
# default (settings.py) they stay out of the fingerprint, so older workdirs still resume.
ADDED_LATER = {"fed": ("fisher_examples", "server_optimizer", "server_learning_rate", "server_momentum",
                       "fisher_example_weights", "rank_aggregation", "dp", "secure_aggregation", "secagg_threshold",
                       "labels_on_client", "wire_noise", "cohort_sampling", "cohort_capacity"),
               "dp": ("mechanism", "ftrl_bands"),
               "adapter": ("client_ranks",),
               "model": ("client_layers",),
               "data": ("name", "partition", "min_client_size", "categories_per_client", "size_exponent", "natural_key")}
HOW_TO_RUN = ("rounds", "mode", "methods", "client_chunk", "pack_clients", "pack_padding")  # fed keys left out


def _defaults(record_class) -> dict:
    """Every field's default, as as_dict writes values (None included)."""
    record = record_class()
    return {f.name: plain(getattr(record, f.name)) for f in dataclasses.fields(record)}


def _fed_fingerprint(fed) -> dict:
    from fednano_jax.federated.methods import METHODS

    defaults = {**_defaults(Fed), **{k: v for m in METHODS.values() for k, v in _defaults(m.Hyperparameters).items()}}
    out = {k: v for k, v in fed.as_dict().items()
           if k not in HOW_TO_RUN and not (k in ADDED_LATER["fed"] and v == defaults[k])}
    if "dp" in out:
        dp_defaults = _defaults(type(fed.dp))
        out["dp"] = {k: v for k, v in out["dp"].items() if not (k in ADDED_LATER["dp"] and v == dp_defaults[k])}
        if fed.dp.mechanism == FTRL:  # its noise matrix and its guarantee are planned for the run's rounds
            out["rounds"] = fed.rounds
    if fed.server_optimizer != NO_SERVER_OPTIMIZER:  # the step it really takes (0: the optimizer's own)
        out["server_learning_rate"] = fed.effective_server_learning_rate
    return out


def resume_fingerprint(experiment: Experiment, backbone_key: str) -> dict:
    """The settings a run resumed from a round checkpoint must share with the run that wrote it.

    Left out: how long to run (fed.rounds), how to run it (fed.mode, fed.client_chunk, fed.pack_clients,
    fed.pack_padding, data.stream_images, model.scan_unroll: same numbers), which methods (each has its own checkpoints), evaluation,
    checkpointing and paths.
    """
    data_defaults = _defaults(Data)
    unused = "pretrain_examples" if experiment.data.name == DEFAULT_DATASET else "pretrain_images"  # the other's
    data = {k: v for k, v in experiment.data.as_dict().items() if k not in ("dir", "root", "stream_images", unused)
            and not (k in ADDED_LATER["data"] and v == data_defaults[k])}
    model = without_derived_family(experiment.model)  # naming a config's own family keeps its fingerprint
    model["adapter"] = {k: v for k, v in model["adapter"].items() if not (k in ADDED_LATER["adapter"] and not v)}
    model = {k: v for k, v in model.items() if not (k in ADDED_LATER["model"] and not v) and k != "scan_unroll"}
    return {"seed": experiment.seed, "model": model, "data": data, "fed": _fed_fingerprint(experiment.fed),
            "backbone": backbone_key}


def load_config_file(path: str) -> ConfigDict:
    """get_config() of a config file, with a clear error for a missing file."""
    import runpy

    if not os.path.isfile(path):
        raise ConfigError(f"Config file {path!r} does not exist; pass --config=configs/<name>.py.")
    return runpy.run_path(path)["get_config"]()
