"""Checks on a user's experiment config (the backbone's own, by its family: backbone/family/).

Every check raises `ConfigError` with one sentence naming the setting and what was
expected; main prints that sentence instead of a traceback.
"""

from __future__ import annotations

import os

from ml_collections import ConfigDict

from fednano_jax.backbone.family import family_of, without_derived_family
from fednano_jax.data.partition import PARTITIONS, Partition
from fednano_jax.data.prompts import DEFAULT_TEMPLATE, TEMPLATES
from fednano_jax.errors import ConfigError
from fednano_jax.models import adapter_ranks as ranks
from fednano_jax.privacy import dp as client_dp
from fednano_jax.privacy.accountant import ACCOUNTANTS
from fednano_jax.federated.server_optimizer import OPTIMIZERS as SERVER_OPTIMIZERS
from fednano_jax.federated.server_optimizer import learning_rate as server_learning_rate
from fednano_jax.models.llama import REMAT_POLICIES


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_data(data: ConfigDict) -> None:
    """config.data.name / root / format (dataset names and formats from data.datasets)."""
    from fednano_jax.data.datasets import DEFAULT, FORMATS

    name = data.get("name", DEFAULT)
    _require(name in FORMATS, f"data.name must be one of {sorted(FORMATS)}, got {name!r}.")
    if name == DEFAULT:
        return
    _require(bool(data.get("root")), f"data.root must name the directory holding {name}, got {data.get('root')!r}.")
    data_format = data.get("format", "official")
    _require(data_format in FORMATS[name],
             f"data.format must be one of {list(FORMATS[name])} for {name}, got {data_format!r}.")
    for key in ("pretrain_examples", "train_examples", "test_examples"):
        _require(data.get(key, 0) >= 0, f"data.{key} must be non-negative (0 = all), got {data.get(key)}.")


def validate(config: ConfigDict, known_methods) -> None:
    fed, data, adapter = config.fed, config.data, config.model.adapter
    validate_data(data)
    _require(adapter.rank > 0, f"model.adapter.rank must be a positive integer, got {adapter.rank}.")
    _require(adapter.alpha > 0, f"model.adapter.alpha must be positive, got {adapter.alpha}.")
    _require(adapter.image or adapter.text, "At least one of model.adapter.image and model.adapter.text must be True.")
    _require(fed.num_clients >= 1, f"fed.num_clients must be at least 1, got {fed.num_clients}.")
    _require(fed.rounds >= 1, f"fed.rounds must be at least 1, got {fed.rounds}.")
    _require(0 <= fed.clients_per_round <= fed.num_clients,
             f"fed.clients_per_round must be between 0 (all) and fed.num_clients={fed.num_clients}, "
             f"got {fed.clients_per_round}.")
    _require(0.0 <= fed.dropout < 1.0, f"fed.dropout must be a probability in [0, 1), got {fed.dropout}.")
    _require(config.checkpoint.every_rounds >= 0,
             f"checkpoint.every_rounds must be non-negative, got {config.checkpoint.every_rounds}.")
    _require(config.checkpoint.keep >= 1, f"checkpoint.keep must be at least 1, got {config.checkpoint.keep}.")
    _require(fed.local_epochs >= 1, f"fed.local_epochs must be at least 1, got {fed.local_epochs}.")
    _require(fed.batch_size >= 1, f"fed.batch_size must be at least 1, got {fed.batch_size}.")
    _require(fed.learning_rate > 0, f"fed.learning_rate must be positive, got {fed.learning_rate}.")
    _require(fed.optimizer in ("adamw", "adam", "sgd"),
             f"fed.optimizer must be 'adamw', 'adam' or 'sgd', got {fed.optimizer!r}.")
    _require(fed.weight_decay >= 0, f"fed.weight_decay must be non-negative, got {fed.weight_decay}.")
    _require(fed.mode in ("vmap", "sequential"), f"fed.mode must be 'vmap' or 'sequential', got {fed.mode!r}.")
    _require(fed.get("client_chunk", 0) >= 0,
             f"fed.client_chunk must be 0 (every client at once) or a positive count, got {fed.get('client_chunk')}.")
    _require(fed.get("fisher_examples", 0) >= 0,
             f"fed.fisher_examples must be 0 (every example) or a positive cap, got {fed.get('fisher_examples')}.")
    _require(0.0 <= fed.get("pack_padding", 0.1) < 1.0,
             f"fed.pack_padding must be a share in [0, 1), got {fed.get('pack_padding')}.")
    _require(fed.get("server_optimizer", "none") in ("none", *SERVER_OPTIMIZERS),
             f"fed.server_optimizer must be one of {['none', *sorted(SERVER_OPTIMIZERS)]}, "
             f"got {fed.get('server_optimizer')!r}.")
    _require(fed.get("server_learning_rate", 0.0) >= 0,
             f"fed.server_learning_rate must be positive, or 0 for the server optimizer's own default, "
             f"got {fed.get('server_learning_rate')}.")
    _require(0.0 <= fed.get("server_momentum", 0.9) < 1.0,
             f"fed.server_momentum must be in [0, 1), got {fed.get('server_momentum')}.")
    _require(fed.get("wire_noise", 0.0) >= 0, f"fed.wire_noise must be a non-negative std, got {fed.get('wire_noise')}.")
    _require(fed.prox_mu >= 0, f"fed.prox_mu must be non-negative, got {fed.prox_mu}.")
    _require(fed.dpa_local_epochs >= 1, f"fed.dpa_local_epochs must be at least 1, got {fed.dpa_local_epochs}.")
    _require(fed.dpa_instances >= 1, f"fed.dpa_instances must be at least 1, got {fed.dpa_instances}.")
    _require(0.0 <= fed.dpa_max_weight <= 1.0, f"fed.dpa_max_weight must lie in [0, 1], got {fed.dpa_max_weight}.")
    _require(data.dirichlet_alpha > 0, f"data.dirichlet_alpha must be positive, got {data.dirichlet_alpha}.")
    partition = Partition.of(data)
    _require(partition.kind in PARTITIONS, f"data.partition must be one of {list(PARTITIONS)}, got {partition.kind!r}.")
    _require(partition.min_client_size >= 1,
             f"data.min_client_size must be at least 1, got {partition.min_client_size}.")
    _require(partition.categories_per_client >= 1,
             f"data.categories_per_client must be at least 1, got {partition.categories_per_client}.")
    _require(partition.size_exponent >= 0, f"data.size_exponent must be non-negative, got {partition.size_exponent}.")
    _require(config.pretrain.steps >= 0, f"pretrain.steps must be non-negative, got {config.pretrain.steps}.")
    _require(config.model.get("remat", "none") in REMAT_POLICIES,
             f"model.remat must be one of {sorted(REMAT_POLICIES)}, got {config.model.get('remat')!r}.")
    _require(bool(config.model.get("path")) or not config.model.get("vocab_size"),
             f"model.vocab_size={config.model.get('vocab_size')} is a checkpoint's vocabulary but model.path is unset; "
             "set model.path to that checkpoint to run an experiment (memory_plan, benchmark and accounting need "
             "only the shapes).")
    _require(config.model.get("prompt", DEFAULT_TEMPLATE) in TEMPLATES,
             f"model.prompt must be one of {sorted(TEMPLATES)}, got {config.model.get('prompt')!r}.")
    family_of(config).check(config)  # model.family (or the one its keys describe) and that family's own checks
    methods = method_names(config)
    _require(len(methods) > 0, "fed.methods must name at least one method.")
    for name in methods:
        _require(name in known_methods, f"Unknown method {name!r} in fed.methods; expected one of {sorted(known_methods)}.")
    validate_client_ranks(config, known_methods, methods)
    validate_dp(config, known_methods, methods)
    validate_secure_aggregation(config, known_methods, methods)


def _without_sums(config: ConfigDict, known_methods: dict, methods: list[str], setting: str) -> None:
    """Methods whose clients send no contribution cannot run under an aggregator that protects contributions."""
    for name in methods:
        reason = known_methods[name].no_sums
        _require(reason is None, f"{setting} does not apply to {name}: {reason}; drop {name} from fed.methods.")


def validate_secure_aggregation(config: ConfigDict, known_methods: dict, methods: list[str]) -> None:
    fed = config.fed
    if not fed.get("secure_aggregation", False):
        return
    cohort = fed.clients_per_round or fed.num_clients
    _require(0 <= fed.get("secagg_threshold", 0) <= cohort,
             f"fed.secagg_threshold must be between 0 (a majority) and the cohort size {cohort}, "
             f"got {fed.get('secagg_threshold')}.")
    _without_sums(config, known_methods, methods, "fed.secure_aggregation")


def validate_dp(config: ConfigDict, known_methods: dict, methods: list[str]) -> None:
    """fed.dp: its values, and methods that have contributions for it to clip and noise."""
    dp_section = config.fed.get("dp")
    if dp_section is None or not dp_section.get("enabled", False):
        return
    _require(dp_section.get("accountant", "rdp") in ACCOUNTANTS,
             f"fed.dp.accountant must be one of {list(ACCOUNTANTS)}, got {dp_section.get('accountant')!r}.")
    _require(dp_section.get("noise", client_dp.AUTO) in client_dp.NOISE_PLACEMENTS,
             f"fed.dp.noise must be one of {list(client_dp.NOISE_PLACEMENTS)}, got {dp_section.get('noise')!r}.")
    _require(dp_section.get("target_epsilon", 0.0) >= 0,
             f"fed.dp.target_epsilon must be non-negative (0: use fed.dp.noise_multiplier), "
             f"got {dp_section.get('target_epsilon')}.")
    _require(0 < dp_section.get("target_quantile", 0.5) < 1,
             f"fed.dp.target_quantile must be in (0, 1), got {dp_section.get('target_quantile')}.")
    _require(0 < dp_section.get("fisher_noise_share", 0.1) < 1,
             f"fed.dp.fisher_noise_share must be in (0, 1), got {dp_section.get('fisher_noise_share')}.")
    _require(dp_section.get("fisher_mean_square", 16.0) >= 1,
             f"fed.dp.fisher_mean_square must be at least 1 (a mean-one Fisher's mean square), "
             f"got {dp_section.get('fisher_mean_square')}.")
    try:
        problem = client_dp.check(client_dp.settings(config.fed, [1], config.fed.get("secure_aggregation", False)))
    except (ValueError, RuntimeError) as error:  # dp-accounting could not solve for the target epsilon
        raise ConfigError(f"fed.dp.target_epsilon={dp_section.target_epsilon} has no noise multiplier that "
                          f"reaches it ({error}).") from None
    _require(problem is None, problem or "")
    _without_sums(config, known_methods, methods, "fed.dp")


def validate_client_ranks(config: ConfigDict, known_methods: dict, methods: list[str]) -> None:
    """model.adapter.client_ranks (each rank at most model.adapter.rank) and fed.rank_aggregation."""
    adapter = config.model.adapter
    try:
        client_ranks = ranks.parse_client_ranks(adapter.get("client_ranks", ()))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _require(all(1 <= r <= adapter.rank for r in client_ranks),
             f"model.adapter.client_ranks must be ranks between 1 and model.adapter.rank={adapter.rank}, "
             f"got {client_ranks}.")
    aggregation = config.fed.get("rank_aggregation", ranks.MASKED)
    _require(aggregation in ranks.AGGREGATIONS,
             f"fed.rank_aggregation must be one of {list(ranks.AGGREGATIONS)}, got {aggregation!r}.")
    for name in methods if client_ranks else ():
        reason = known_methods[name].no_ranks
        _require(reason is None, f"model.adapter.client_ranks does not apply to {name}: {reason}; drop {name} from "
                 "fed.methods or leave client_ranks empty.")


def method_names(config: ConfigDict) -> list[str]:
    """fed.methods as a list: a tuple in the file, or "a,b" on the command line."""
    methods = config.fed.methods
    names = [methods] if isinstance(methods, str) else list(methods)
    return [part.strip() for name in names for part in name.split(",") if part.strip()]


# Settings added after checkpoints were first written, with the value that means what their absence meant:
# at that value they stay out of the fingerprint, so older workdirs still resume.
LATER_DEFAULTS = {"fed": {"fisher_examples": 0, "server_optimizer": "none", "server_learning_rate": 0.0,
                          "server_momentum": 0.9, "fisher_example_weights": True, "rank_aggregation": "masked",
                          "dp": {"enabled": False, "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5,
                                 "target_epsilon": 0.0, "adaptive": False, "target_quantile": 0.5,
                                 "clip_learning_rate": 0.2, "count_stddev": 0.0, "accountant": "rdp",
                                 "noise": "auto", "fisher_noise_share": 0.1, "fisher_mean_square": 16.0},
                          "secure_aggregation": False, "secagg_threshold": 0, "labels_on_client": False,
                          "wire_noise": 0.0},
                  "adapter": {"client_ranks": ()},
                  "data": {"partition": "dirichlet", "min_client_size": 1, "categories_per_client": 2,
                           "size_exponent": 1.0, "natural_key": "subject"}}


def _fingerprinted(section: str, settings: dict, left_out: tuple[str, ...]) -> dict:
    later = LATER_DEFAULTS[section]
    return {k: v for k, v in settings.items() if k not in left_out and not (k in later and v == later[k])}


def resume_fingerprint(config: ConfigDict, backbone_key: str) -> dict:
    """The settings a run resumed from a round checkpoint must share with the run that wrote it.

    Left out: how long to run (fed.rounds), how to run it (fed.mode, fed.client_chunk, fed.pack_clients, fed.pack_padding,
    data.stream_images: same numbers), which
    methods (each has its own checkpoints), evaluation, checkpointing and paths.
    """
    fed = _fingerprinted("fed", config.fed.to_dict(),
                         ("rounds", "mode", "methods", "client_chunk", "pack_clients", "pack_padding"))
    if config.fed.get("server_optimizer", "none") != "none":  # the step it really takes (0: the optimizer's own)
        fed["server_learning_rate"] = server_learning_rate(config.fed)
    data = _fingerprinted("data", config.data.to_dict(), ("dir", "root", "stream_images"))
    model = without_derived_family(config.model.to_dict())  # naming a config's own family keeps its fingerprint
    model["adapter"] = _fingerprinted("adapter", {**model["adapter"], "client_ranks": ranks.parse_client_ranks(
        model["adapter"].get("client_ranks", ()))}, ())
    return {"seed": config.seed, "model": model, "data": data, "fed": fed, "backbone": backbone_key}


def load_config_file(path: str) -> ConfigDict:
    """get_config() of a config file, with a clear error for a missing file."""
    import runpy

    if not os.path.isfile(path):
        raise ConfigError(f"Config file {path!r} does not exist; pass --config=configs/<name>.py.")
    return runpy.run_path(path)["get_config"]()
