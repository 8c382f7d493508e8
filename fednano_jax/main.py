"""Run a federated experiment: python -m fednano_jax.main --config=configs/easyvqa_tiny.py."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" banner: we never need it

from absl import app, flags, logging

from fednano_jax.experiment_config import parse_flags
from ml_collections import config_flags


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # tfds logs every file it writes at INFO
    args = flags.FLAGS
    if args.distributed:
        from fednano_jax.sharding import initialize_distributed

        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    from fednano_jax.experiment import run_experiment, user_errors

    labels = user_errors()
    try:
        run_experiment(args.config, args.workdir or os.path.join("runs", args.config.name))
    except tuple(labels) as error:
        sys.exit(f"{labels[type(error)]}: {error}")


def define_flags() -> None:
    """Command-line flags, defined only when run as a command (importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where logs and results go (default: runs/<config.name>).")
    flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() first "
                      "(one process per host, e.g. under SLURM; see launch/).")
    flags.DEFINE_string("coordinator_address", None, "--distributed outside SLURM/MPI: host:port of process 0.")
    flags.DEFINE_integer("num_processes", None, "--distributed outside SLURM/MPI: process count.")
    flags.DEFINE_integer("process_id", None, "--distributed outside SLURM/MPI: this process's index.")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
