"""Run a federated experiment: python -m fednano_jax.main --config=configs/easyvqa_tiny.py."""

from __future__ import annotations

import os

from absl import flags

from fednano_jax.errors import ConfigError


def main() -> None:
    args = flags.FLAGS
    if args.distributed:
        from fednano_jax.parallel.mesh import initialize_distributed

        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    split = split_link(args)
    if args.dry_run:
        if split is not None:
            raise ConfigError("--dry_run starts no client, so --split_server would have no effect; pass one of them.")
        from fednano_jax.preflight import dry_run

        print(dry_run(args.config))
        return
    from fednano_jax.experiment import run_experiment

    run_experiment(args.config, args.workdir or os.path.join("runs", args.config.name), split)


def split_link(args):
    """--split_server (with --split_tokens and --split_root_cert) as a SplitLink, or None."""
    if not args.split_server:
        for flag in ("split_tokens", "split_root_cert"):
            if getattr(args, flag):
                raise ConfigError(f"--{flag} has no effect without --split_server; pass --split_server=HOST:PORT.")
        return None
    from fednano_jax.commands.serve import read_tokens
    from fednano_jax.serving.client_processes import SplitLink

    host, _, port = args.split_server.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--split_server must be HOST:PORT of a running python -m fednano_jax.serve, got "
                          f"{args.split_server!r}.")
    certificate = None
    if args.split_root_cert:
        if not os.path.isfile(args.split_root_cert):
            raise ConfigError(f"--split_root_cert={args.split_root_cert!r} is not a file; expected the server's PEM "
                              "certificate.")
        with open(args.split_root_cert, "rb") as file:
            certificate = file.read()
    return SplitLink(args.split_server, read_tokens(args.split_tokens, args.config.fed.num_clients), certificate)


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
    flags.DEFINE_string("split_server", None, "HOST:PORT of a split-step server (python -m fednano_jax.serve): every "
                        "client runs as its own process holding NanoEdge alone, its wire going to that server.")
    flags.DEFINE_string("split_tokens", None, "With --split_server: the JSON file of client id -> token the server "
                        "was given (--tokens).")
    flags.DEFINE_string("split_root_cert", None, "With --split_server: the server's PEM certificate (TLS).")


if __name__ == "__main__":
    from fednano_jax.commands import cli

    cli.run(main, define_flags)
