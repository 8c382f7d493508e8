"""One experiment, as a config describes it: data, pretrained backbone, every method, the report.

`run_experiment(config, workdir)` is what `python -m fednano_jax.main` runs and what the
study runner runs once per grid cell.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from flax import nnx

from fednano_jax import checkpoint, pretrain
from fednano_jax.backbone_from_checkpoint import checkpoint_backbone
from fednano_jax.checkpoint import CheckpointMismatch, RoundCheckpoints
from fednano_jax.data import datasets, pipeline
from fednano_jax.data.errors import DataError
from fednano_jax.data.tokenizer import IMAGE, load_tokenizer
from fednano_jax.eval.evaluate import Evaluator
from fednano_jax.eval.report import write_report
from fednano_jax.experiment_config import ConfigError, method_names, model_config, resume_fingerprint, validate
from fednano_jax.federated.client import device_dataset
from fednano_jax.federated.methods import METHODS, get_method
from fednano_jax.federated.simulation import run_federated
from fednano_jax.models.mllm import MultimodalModel, count_params, split_model
from fednano_jax.sharding import MeshError, is_main_process, make_mesh, mesh_config_of, mesh_description
from fednano_jax.weights.errors import WeightsError


def user_errors() -> dict:
    """Exceptions a user's input causes -> the label main prints before their one sentence."""
    return {ConfigError: "Config error", CheckpointMismatch: "Checkpoint error", DataError: "Data error",
            WeightsError: "Checkpoint error", MeshError: "Config error"}


def prepare_workdir(workdir: str) -> str:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--workdir {workdir!r} cannot be created ({error.strerror}); pass a writable directory.")
    if not os.access(workdir, os.W_OK):
        raise ConfigError(f"--workdir {workdir!r} is not writable; pass a writable directory.")
    return workdir


def pretrained_backbone(config, splits):
    """-> (graphdef, frozen, adapters, tokenizer, model config): from the cache, or pretrained and cached."""
    if config.model.get("path"):
        return checkpoint_backbone(config, splits)
    backbone_dir = pretrain.cache_dir(config)
    if checkpoint.backbone_is_cached(backbone_dir):
        tokenizer = load_tokenizer(os.path.join(backbone_dir, checkpoint.TOKENIZER))
        mcfg = model_config(config, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE))
        graphdef, frozen, adapters = split_model(MultimodalModel(mcfg, nnx.Rngs(config.pretrain.seed)))
        try:
            frozen = checkpoint.load_backbone(backbone_dir, frozen)
            print(f"Using the pretrained backbone cached in {backbone_dir}")
            return graphdef, frozen, adapters, tokenizer, mcfg
        except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt, never trusted
            print(f"Warning: the cached backbone in {backbone_dir} is unreadable ({type(error).__name__}); "
                  "pretraining it again.")
    tokenizer = pipeline.tokenizer_for(splits)
    mcfg = model_config(config, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE))
    graphdef, frozen, adapters = split_model(MultimodalModel(mcfg, nnx.Rngs(config.pretrain.seed)))
    tokens = pipeline.tokenize_pretraining(splits, tokenizer, mcfg.vision.num_image_tokens)
    print(f"Pretraining the backbone on {len(tokens)} held-aside examples (cached in {backbone_dir})")
    frozen = pretrain.pretrain_backbone(graphdef, frozen, adapters, tokens, splits.images, config)
    checkpoint.save_backbone(backbone_dir, frozen, tokenizer)
    return graphdef, frozen, adapters, tokenizer, mcfg


def with_remat(graphdef, mcfg, policy: str):
    """The model graph with decoder layers rematerialised by `policy` (parameters unchanged), whatever
    built the backbone (pretraining, a cache, a checkpoint)."""
    if mcfg.llm.remat == policy:
        return graphdef, mcfg
    mcfg = dataclasses.replace(mcfg, llm=dataclasses.replace(mcfg.llm, remat=policy))
    graphdef, _, _ = split_model(nnx.eval_shape(lambda: MultimodalModel(mcfg, nnx.Rngs(0))))
    return graphdef, mcfg


def run_experiment(config, workdir: str) -> None:
    """Everything one config describes; results land in `workdir` (results.json is written last)."""
    # -------------------------------------------------------------- Config
    validate(config, METHODS)
    prepare_workdir(workdir)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    started = time.perf_counter()
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")

    def log(record: dict) -> None:
        # Appended, tagged with this run's start time: rerunning into a workdir keeps earlier runs' metrics.
        if is_main_process():
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"run": run_id, **record}) + "\n")

    # ---------------------------------------------------------------- Mesh
    mesh = make_mesh(mesh_config_of(config))
    print(mesh_description(mesh))

    # ---------------------------------------------------------------- Data
    try:
        splits = datasets.load_splits(config)
    except DataError:
        raise
    except ValueError as error:  # a size the data cannot satisfy (data.pretrain_examples, ...)
        raise ConfigError(str(error)) from error

    # ------------------------------------------------- Pretrained backbone
    graphdef, frozen, adapters, tokenizer, mcfg = pretrained_backbone(config, splits)
    graphdef, mcfg = with_remat(graphdef, mcfg, config.model.get("remat", "none"))
    print(f"Backbone: {count_params(frozen):,} frozen parameters; NanoAdapters: {count_params(adapters):,} "
          f"trainable parameters per client")

    # ------------------------------------------------------ Federated data
    try:
        data = pipeline.federated_data(splits, tokenizer, mcfg.vision.num_image_tokens, config.fed.num_clients,
                                       config.data.dirichlet_alpha, config.seed)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    sizes = [len(r) for r in data.client_train]
    print(f"{config.fed.num_clients} clients, train examples {sizes}, test examples {[len(r) for r in data.client_test]}")
    device_data = device_dataset(data.train, data.images)
    evaluator = Evaluator(graphdef, frozen, data, tokenizer, config)

    # ------------------------------------------------------------- Methods
    rows = {"Untuned": evaluator.shared(adapters)}
    log({"method": "untuned", "round": 0, **rows["Untuned"]})
    fingerprint = resume_fingerprint(config, pretrain.cache_key(config))
    methods = method_names(config)
    seconds, histories = {}, {}
    for name in methods:
        method = get_method(name)
        checkpoints = None
        if config.checkpoint.every_rounds:
            checkpoints = RoundCheckpoints(os.path.join(workdir, "checkpoints", name), config.checkpoint.keep,
                                           fingerprint)
        method_start = time.perf_counter()
        try:
            result = run_federated(method, graphdef, frozen, adapters, device_data, data.client_train, config,
                                   evaluator, log, checkpoints, mesh)
        finally:
            if checkpoints:
                checkpoints.close()
        seconds[method.label] = time.perf_counter() - method_start
        histories[method.label] = result.history
        final = result.history[-1]
        rows[method.label] = {key: final[key] for key in ("accuracy", "average", "breakdown") if key in final}

    # -------------------------------------------------------------- Report
    if not is_main_process():
        return
    table = write_report(workdir, rows, {"config": config.to_dict(), "client_train_examples": sizes,
                                         "method_seconds": seconds, "history": histories,
                                         "total_seconds": time.perf_counter() - started})
    print(f"\nPer-client test accuracy (%), {config.fed.num_clients} clients, {config.fed.rounds} rounds:\n{table}")
    print(f"\nWritten to {workdir}/results.md, results.json and metrics.jsonl "
          f"({time.perf_counter() - started:.0f} s in all)")
