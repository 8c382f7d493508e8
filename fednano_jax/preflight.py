"""What a run of a config would do, checked on this machine without training: `main --dry_run`, `study --dry_run`.

The checks a run makes before its first step, in the same order and with the same errors: the
config, the mesh against the devices, the dataset on disk, the checkpoint (its metadata only)
or the stored backbone, and the partition. Then a summary of the work: clients, examples,
steps and the backbone's source. No weight is read, nothing is trained or written.
"""

from __future__ import annotations

import math

from fednano_jax.backbone import pretrain
from fednano_jax.backbone.shapes import checkpoint_metadata, model_shapes
from fednano_jax.backbone.stored import stored_backbones
from fednano_jax.backbone.synthetic import abstract_model
from fednano_jax.config import read
from fednano_jax.data import datasets, pipeline
from fednano_jax.data.partition import Partition, sizes_text
from fednano_jax.errors import ConfigError
from fednano_jax.federated.schedule import steps_per_epoch
from fednano_jax.models.mllm import count_params
from fednano_jax.parallel.mesh import make_mesh, mesh_description


def backbone_source(config, checkpoint_has_vision: bool) -> str:
    """Where the run's backbone would come from (`checkpoint_has_vision`: a LLaVA checkpoint, used as loaded)."""
    path = config.model.path
    if path and checkpoint_has_vision:
        return f"the checkpoint at {path}"
    stored = stored_backbones(config)
    what = "the vision side aligned to the checkpoint at " + path if path else "the backbone"
    if stored:
        return f"{what}, {stored[0][1]} {stored[0][0]}"
    return f"{what}, pretrained for {config.pretrain.steps} steps first (then cached in {pretrain.cache_dir(config)})"


def _client_train_rows(config, splits) -> list:
    try:
        rows = pipeline.client_partition(splits, config.fed.num_clients, Partition.of(config.data), config.seed)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    return rows["train"]


def dry_run(config) -> str:
    """The checks a run makes before training, then what it would run; raises the run's own errors."""
    config = read(config)
    mesh = make_mesh(config.mesh)
    splits = datasets.load_splits(config, with_images=False)
    path = config.model.path
    checkpoint = checkpoint_metadata(config) if path else None  # its metadata only: a missing checkpoint stops here
    vocab = None if path or config.model.vocab_size else len(pipeline.tokenizer_for(splits))
    mcfg = model_shapes(config, vocab_size=vocab)
    sizes = [len(r) for r in _client_train_rows(config, splits)]
    fed = config.fed
    steps = steps_per_epoch([range(n) for n in sizes], fed.batch_size)
    cohort = fed.cohort_size  # the round program's client slots (a Poisson cohort's capacity)
    _, frozen, adapters = abstract_model(mcfg)
    return "\n".join([
        f"Dry run of {config.name}: every check a run makes before training passed; nothing was trained or written.",
        mesh_description(mesh),
        f"Data: {datasets.dataset_name(config)}, {sum(sizes):,} training examples over {fed.num_clients} clients "
        f"{sizes_text(sizes)}",
        f"Backbone: {backbone_source(config, checkpoint is not None and checkpoint.vision is not None)}",
        f"Model: {mcfg.llm.num_layers} decoder layers of width {mcfg.llm.hidden_size}, vocabulary "
        f"{mcfg.llm.vocab_size:,}, {mcfg.vision.num_image_tokens if mcfg.vision else 0} image tokens: "
        f"{count_params(frozen):,} frozen parameters; NanoAdapters: {count_params(adapters):,} per client",
        f"Methods: {', '.join(config.fed.methods)}; {fed.rounds} rounds of {cohort} clients, {fed.local_epochs} "
        f"local epoch(s) of {steps} steps of batch {fed.batch_size} (the largest client's "
        f"{max(sizes):,} examples; {math.ceil(sum(sizes) / fed.batch_size):,} batches hold data)",
    ])


def study_dry_run(cells: dict[str, tuple[dict, object]]) -> str:
    """{cell name: (its overrides, its config)}: every cell's config validated, the first dry-run in full (the
    cells share their data and backbone settings)."""
    lines = []
    for index, (name, (overrides, config)) in enumerate(cells.items()):
        read(config)
        lines.append(f"{name}: {overrides}")
        if index == 0:
            lines.append(dry_run(config) + "\n")
    return "\n".join(lines)

