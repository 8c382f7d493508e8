"""Run a federated experiment: python -m fednano_jax.main --config=configs/easyvqa_tiny.py."""

from __future__ import annotations

import os

from absl import flags


def main() -> None:
    args = flags.FLAGS
    if args.distributed:
        from fednano_jax.parallel.mesh import initialize_distributed

        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    if args.dry_run:
        from fednano_jax.preflight import dry_run

        print(dry_run(args.config))
        return
    from fednano_jax.experiment import run_experiment

    run_experiment(args.config, args.workdir or os.path.join("runs", args.config.name))


def define_flags() -> None:
    from fednano_jax.commands import cli

    cli.define_config_flag()
    flags.DEFINE_string("workdir", None, "Where logs and results go (default: runs/<config.name>).")
    flags.DEFINE_bool("dry_run", False, "Make every check a run makes before training (config, mesh, data, "
                      "checkpoint metadata, partition), print what it would run, and stop: nothing is trained.")
    flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() first "
                      "(one process per host, e.g. under SLURM; see launch/).")
    flags.DEFINE_string("coordinator_address", None, "--distributed outside SLURM/MPI: host:port of process 0.")
    flags.DEFINE_integer("num_processes", None, "--distributed outside SLURM/MPI: process count.")
    flags.DEFINE_integer("process_id", None, "--distributed outside SLURM/MPI: this process's index.")


if __name__ == "__main__":
    from fednano_jax.commands import cli

    cli.run(main, define_flags)
