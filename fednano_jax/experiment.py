"""One experiment, as a config describes it: data, pretrained backbone, every method, the report.

`run_experiment(config, workdir)` is what `python -m fednano_jax.main` runs and what the
study runner runs once per grid cell.
"""

from __future__ import annotations

import json
import os
import sys
import time

from fednano_jax.backbone import pretrain
from fednano_jax.backbone.build import experiment_backbone, with_client_layers, with_remat
from fednano_jax.backbone.family import family_of
from fednano_jax.config import read, resume_fingerprint
from fednano_jax.data import datasets, pipeline
from fednano_jax.data.batches import device_dataset
from fednano_jax.data.partition import Partition, sizes_text
from fednano_jax.errors import ConfigError
from fednano_jax.eval.evaluate import Evaluator
from fednano_jax.eval.report import write_report
from fednano_jax.federated.checkpoints import RoundCheckpoints
from fednano_jax.federated.methods import get_method
from fednano_jax.federated.rounds import run_method
from fednano_jax.metrics import MetricsLog, Phases
from fednano_jax.models.mllm import count_params
from fednano_jax.parallel.xla_stats import use_compilation_cache_of
from fednano_jax.serving.client_processes import ClientProcesses, LinkedDecoders, SplitLink
from fednano_jax.serving.step_server import CLIENT_LAYERS_NOT_SERVED
from fednano_jax.parallel.mesh import is_main_process, make_mesh, mesh_description, place_backbone


def prepare_workdir(workdir: str) -> str:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--workdir {workdir!r} cannot be created ({error.strerror}); pass a writable directory.")
    if not os.access(workdir, os.W_OK):
        raise ConfigError(f"--workdir {workdir!r} is not writable; pass a writable directory.")
    return workdir


def check_resumable(config, workdir: str, methods: list[str], fingerprint: dict) -> None:
    """A workdir's checkpoints written with other settings stop the run before any work, not after the data,
    backbone and untuned evaluation."""
    for name in config.fed.methods:
        directory = os.path.join(workdir, "checkpoints", name)
        if config.checkpoint.every_rounds and os.path.isdir(directory):
            checkpoints = RoundCheckpoints(directory, config.checkpoint.keep, fingerprint)
            try:
                checkpoints.check_settings()
            finally:
                checkpoints.close()


def check_split(config) -> None:
    """What a run with each client in its own process (`--split_server`) cannot do, one sentence each. (How the
    simulation lays clients out, fed.pack_clients, fed.mode and fed.client_chunk, does not change its numbers; with
    client processes there is nothing to lay out.)"""
    if "feddpa_f" in config.fed.methods:
        raise ConfigError("FedDPA-F's evaluation mixes its global and local adapters inside the decoder's pass, which "
                          "the split-step server does not serve; leave feddpa_f out of fed.methods with --split_server.")
    if config.model.client_layers:
        raise ConfigError(CLIENT_LAYERS_NOT_SERVED)


def start_client_processes(config, workdir: str, link: SplitLink) -> ClientProcesses:
    """A process per client, each told the experiment's settings (written to workdir/split/experiment.json), its id,
    the split server's address, its token and the server's certificate; their logs go to workdir/split/."""
    directory = os.path.join(workdir, "split")
    os.makedirs(directory, exist_ok=True)
    settings = os.path.join(directory, "experiment.json")
    with open(settings, "w") as file:
        json.dump(config.as_dict(), file, indent=1)
    certificate = link.root_certificates.decode() if link.root_certificates else ""
    tokens = link.tokens or {}
    print(f"Starting {config.fed.num_clients} client processes (NanoEdge alone; wires to {link.address}; "
          f"logs in {directory})", flush=True)
    return ClientProcesses(config.fed.num_clients, lambda k: [sys.executable, "-m", "fednano_jax.commands.split_client"],
                           directory, lambda k: {"experiment": settings, "client": str(k), "address": link.address,
                                                 "token": tokens.get(k, ""), "root_certificates": certificate})


def run_experiment(config, workdir: str, split: SplitLink | None = None, clients=start_client_processes) -> None:
    """Everything one config (a ConfigDict, or the Experiment `config.read` made of one) describes; results land
    in `workdir` (results.json is written last). `split`: each client in its own process, its wire going to that
    split-step server (`serving/client_processes.py`); None: the clients are this program's. `clients(config,
    workdir, split)`: with `split`, what runs the clients' rounds (a process per client; Flower's SuperNodes under
    the ServerApp, `serving/flower_server_app.py`)."""
    # -------------------------------------------------------------- Config
    phases = Phases()
    config = read(config)
    use_compilation_cache_of(config)
    if split is not None:
        check_split(config)
    prepare_workdir(workdir)
    log = MetricsLog(workdir, time.strftime("%Y-%m-%dT%H:%M:%S"), is_main_process())  # each record flushed

    fingerprint = resume_fingerprint(config, pretrain.cache_key(config))
    methods = config.fed.methods
    check_resumable(config, workdir, methods, fingerprint)

    # ---------------------------------------------------------------- Mesh
    mesh = make_mesh(config.mesh)
    print(mesh_description(mesh))

    phases.mark("start-up")

    # ---------------------------------------------------------------- Data
    splits = datasets.load_splits(config)
    phases.mark("data")

    # ------------------------------------------------- Pretrained backbone
    if split is None:
        graphdef, frozen, adapters, tokenizer, mcfg = experiment_backbone(config, splits)
        graphdef, mcfg = with_remat(graphdef, mcfg, config.model.remat, config.model.scan_unroll)
        graphdef, mcfg = with_client_layers(graphdef, mcfg, config.model.client_layers)
    else:  # the decoder stays on the split-step server: NanoEdge alone here, for evaluation over the link
        graphdef, frozen, adapters, tokenizer, mcfg = family_of(config).edge(config)
    # Placed once: training and the evaluator share this one copy of the backbone.
    frozen = place_backbone(frozen, mesh, config.mesh)
    print(f"{'NanoEdge' if split else 'Backbone'}: {count_params(frozen):,} frozen parameters; NanoAdapters: "
          f"{count_params(adapters):,} trainable parameters per client")
    phases.mark("backbone")

    # ------------------------------------------------------ Federated data
    try:
        data = pipeline.federated_data(splits, tokenizer, mcfg.vision.num_image_tokens, config.fed.num_clients,
                                       Partition.of(config.data), config.seed)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    sizes = [len(r) for r in data.client_train]
    print(f"{config.fed.num_clients} clients, train examples {sizes_text(sizes)}, test examples "
          f"{sizes_text([len(r) for r in data.client_test])}")
    device_data = device_dataset(data.train, data.images, config.data.stream_images)
    phases.mark("data")
    links = LinkedDecoders(split) if split is not None else None
    evaluator = Evaluator(graphdef, frozen, data, tokenizer, config, links)
    remote = clients(config, workdir, split) if split is not None else None
    try:
        rows, seconds, histories = run_methods(config, workdir, fingerprint, graphdef, frozen, adapters, device_data,
                                               data, evaluator, log, mesh, remote, phases)
    finally:
        for opened in (remote, links):
            if opened is not None:
                opened.close()
    log.close()
    phases.mark("writing")

    # -------------------------------------------------------------- Report
    if not is_main_process():
        return
    extras = {"client_processes": remote.ready} if remote is not None else {}
    figures = phases.report()
    table = write_report(workdir, rows, {"config": config.as_dict(), "client_train_examples": sizes,
                                         "method_seconds": seconds, "history": histories,
                                         "total_seconds": figures["total"], "phase_seconds": figures, **extras},
                         evaluator.ranks.tolist() if evaluator.ranks is not None else None)
    print(f"\nPer-client test accuracy (%), {config.fed.num_clients} clients, {config.fed.rounds} rounds:\n{table}")
    print(f"\nWritten to {workdir}/results.md, results.json, metrics.jsonl and tensorboard/")
    print(phases.line())


def run_methods(config, workdir, fingerprint, graphdef, frozen, adapters, device_data, data, evaluator, log, mesh,
                remote, phases: Phases):
    """The untuned row, then every method's rounds -> (report rows, seconds per method, histories); `phases` gets
    their evaluation and rounds."""
    rows = {"Untuned": evaluator.shared(adapters)}
    log({"method": "untuned", "round": 0, **rows["Untuned"]})
    phases.mark("evaluation")
    seconds, histories = {}, {}
    for name in config.fed.methods:
        method = get_method(name, config.fed, config.seed)
        checkpoints = None
        if config.checkpoint.every_rounds:
            checkpoints = RoundCheckpoints(os.path.join(workdir, "checkpoints", name), config.checkpoint.keep,
                                           fingerprint)
        method_start = time.perf_counter()
        try:
            result = run_method(method, graphdef, frozen, adapters, device_data, data.client_train, config,
                                evaluator, log, checkpoints, mesh, remote)
        finally:
            if checkpoints:
                checkpoints.close()
        seconds[method.label] = time.perf_counter() - method_start
        phases.mark("rounds")
        phases.move(sum(record.get("eval_seconds", 0.0) for record in result.history), "rounds", "evaluation")
        histories[method.label] = result.history
        final = result.history[-1]
        rows[method.label] = {key: final[key] for key in ("accuracy", "average", "breakdown", "rank_average")
                              if key in final}
    return rows, seconds, histories
