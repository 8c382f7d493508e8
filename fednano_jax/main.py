"""Run a federated experiment: python -m fednano_jax.main --config=configs/easyvqa_tiny.py."""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" banner: we never need it

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where logs and results go (default: runs/<config.name>).")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # tfds logs every file it writes at INFO
    from fednano_jax.checkpoint import CheckpointMismatch
    from fednano_jax.data.easy_vqa_builder import DataError
    from fednano_jax.experiment_config import ConfigError

    labels = {ConfigError: "Config error", CheckpointMismatch: "Checkpoint error", DataError: "Data error"}
    try:
        run_experiment(_CONFIG.value, _WORKDIR.value or os.path.join("runs", _CONFIG.value.name))
    except tuple(labels) as error:
        sys.exit(f"{labels[type(error)]}: {error}")


def prepare_workdir(workdir: str) -> str:
    from fednano_jax.experiment_config import ConfigError

    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--workdir {workdir!r} cannot be created ({error.strerror}); pass a writable directory.")
    if not os.access(workdir, os.W_OK):
        raise ConfigError(f"--workdir {workdir!r} is not writable; pass a writable directory.")
    return workdir


def pretrained_backbone(config, splits):
    """-> (graphdef, frozen, adapters, tokenizer, model config): from the cache, or pretrained and cached."""
    from flax import nnx

    from fednano_jax import checkpoint, pretrain
    from fednano_jax.data import pipeline
    from fednano_jax.data.tokenizer import IMAGE, load_tokenizer
    from fednano_jax.experiment_config import model_config
    from fednano_jax.models.mllm import MultimodalModel, split_model

    backbone_dir = pretrain.cache_dir(config)
    if checkpoint.backbone_is_cached(backbone_dir):
        tokenizer = load_tokenizer(os.path.join(backbone_dir, checkpoint.TOKENIZER))
        mcfg = model_config(config, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE))
        graphdef, frozen, adapters = split_model(MultimodalModel(mcfg, nnx.Rngs(config.seed)))
        try:
            frozen = checkpoint.load_backbone(backbone_dir, frozen)
            print(f"Using the pretrained backbone cached in {backbone_dir}")
            return graphdef, frozen, adapters, tokenizer, mcfg
        except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt, never trusted
            print(f"Warning: the cached backbone in {backbone_dir} is unreadable ({type(error).__name__}); "
                  "pretraining it again.")
    tokenizer = pipeline.tokenizer_for(splits)
    mcfg = model_config(config, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE))
    graphdef, frozen, adapters = split_model(MultimodalModel(mcfg, nnx.Rngs(config.seed)))
    tokens = pipeline.tokenize_pretraining(splits, tokenizer, mcfg.vision.num_patches)
    print(f"Pretraining the backbone on {len(tokens)} held-aside examples (cached in {backbone_dir})")
    frozen = pretrain.pretrain_backbone(graphdef, frozen, adapters, tokens, splits.images, config)
    checkpoint.save_backbone(backbone_dir, frozen, tokenizer)
    return graphdef, frozen, adapters, tokenizer, mcfg


def run_experiment(config, workdir: str) -> None:
    from fednano_jax import pretrain
    from fednano_jax.checkpoint import RoundCheckpoints
    from fednano_jax.data import pipeline
    from fednano_jax.eval.evaluate import make_evaluator
    from fednano_jax.eval.report import write_report
    from fednano_jax.experiment_config import ConfigError, resume_fingerprint, validate
    from fednano_jax.federated.methods import METHODS, get_method
    from fednano_jax.federated.simulation import run_federated
    from fednano_jax.models.mllm import count_params

    # -------------------------------------------------------------- Config
    validate(config, METHODS)
    prepare_workdir(workdir)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    started = time.perf_counter()
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")

    def log(record: dict) -> None:
        # Appended, tagged with this run's start time: rerunning into a workdir keeps earlier runs' metrics.
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"run": run_id, **record}) + "\n")

    # ---------------------------------------------------------------- Data
    splits = pipeline.load_splits(os.path.expanduser(config.data.dir), config.data.pretrain_images,
                                  config.data.train_examples, config.data.test_examples, config.seed,
                                  config.pretrain.caption_repeats, config.pretrain.questions_per_image,
                                  config.model.vision.image_size)

    # ------------------------------------------------- Pretrained backbone
    graphdef, frozen, adapters, tokenizer, mcfg = pretrained_backbone(config, splits)
    print(f"Backbone: {count_params(frozen):,} frozen parameters; NanoAdapters: {count_params(adapters):,} "
          f"trainable parameters per client")

    # ------------------------------------------------------ Federated data
    try:
        data = pipeline.federated_data(splits, tokenizer, mcfg.vision.num_patches, config.fed.num_clients,
                                       config.data.dirichlet_alpha, config.seed)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    sizes = [len(r) for r in data.client_train]
    print(f"{config.fed.num_clients} clients, train examples {sizes}, test examples {[len(r) for r in data.client_test]}")
    device_data = pretrain.device_dataset(data.train, data.images)
    evaluate = make_evaluator(graphdef, frozen, data, tokenizer, config.eval.batch_size, config.eval.max_new_tokens)

    # ------------------------------------------------------------- Methods
    rows = {"Untuned": evaluate(adapters)}
    log({"method": "untuned", "round": 0, **rows["Untuned"]})
    fingerprint = resume_fingerprint(config, pretrain.cache_key(config))
    methods = [config.fed.methods] if isinstance(config.fed.methods, str) else list(config.fed.methods)
    seconds = {}
    for name in methods:
        method = get_method(name)
        checkpoints = None
        if config.checkpoint.every_rounds:
            checkpoints = RoundCheckpoints(os.path.join(workdir, "checkpoints", name), config.checkpoint.keep,
                                           fingerprint)
        method_start = time.perf_counter()
        try:
            result = run_federated(method, graphdef, frozen, adapters, device_data, data.client_train, config,
                                   evaluate, log, checkpoints)
        finally:
            if checkpoints:
                checkpoints.close()
        seconds[method.label] = time.perf_counter() - method_start
        final = result.history[-1]
        rows[method.label] = {"accuracy": final["accuracy"], "average": final["average"]}

    # -------------------------------------------------------------- Report
    table = write_report(workdir, rows, {"config": config.to_dict(), "client_train_examples": sizes,
                                         "method_seconds": seconds,
                                         "total_seconds": time.perf_counter() - started})
    print(f"\nPer-client test accuracy (%), {config.fed.num_clients} clients, {config.fed.rounds} rounds:\n{table}")
    print(f"\nWritten to {workdir}/results.md, results.json and metrics.jsonl "
          f"({time.perf_counter() - started:.0f} s in all)")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, preceded by a check of config overrides that names a mistyped key."""
    from fednano_jax.experiment_config import ConfigError, check_overrides, load_config_file

    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    if paths:
        try:
            check_overrides(load_config_file(paths[-1]), argv[1:])
        except ConfigError as error:
            sys.exit(f"Config error: {error}")
    return flags.FLAGS(argv)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_flags)
