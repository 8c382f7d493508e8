"""The one place a command's boilerplate lives: absl flags defined only when run, `--config` overrides
checked for mistyped keys and for settings the run would ignore, quiet libraries, and a user's error said in one
sentence instead of a traceback.

    if __name__ == "__main__":
        from fednano_jax.commands import cli, study
        cli.run(study.main, study.define_flags)
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import os
import sys
from typing import Callable

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" banner: we never need it

from absl import app, flags, logging  # noqa: E402
from ml_collections import ConfigDict, config_flags  # noqa: E402

from fednano_jax.config import load_config_file, read  # noqa: E402
from fednano_jax.errors import LABELS, ConfigError, label_of  # noqa: E402
from fednano_jax.settings import NO_SERVER_OPTIMIZER  # noqa: E402


def define_config_flag(lock: bool = True) -> None:
    config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).", lock_config=lock)
    flags.mark_flag_as_required("config")


def check_overrides(config: ConfigDict, argv: list[str]) -> None:
    """Every `--config.a.b=value` must name an existing key (suggesting the closest one)."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0]
        node = config
        for depth, key in enumerate(path.split(".")):
            if not isinstance(node, ConfigDict) or key not in node:
                siblings = list(node.keys()) if isinstance(node, ConfigDict) else []
                close = difflib.get_close_matches(key, siblings, n=1)
                hint = f"; did you mean {'.'.join(path.split('.')[:depth] + close)!r}?" if close else "."
                raise ConfigError(f"Unknown config key {path!r}{hint}")
            node = node[key]


# Keys that only matter when a condition holds: (key patterns, the keys the condition reads, the condition on the
# config's records, what it needs in words, how to meet it). A key the condition reads is never inactive itself
# (fed.dp.enabled). A method's own hyperparameters matter only when fed.methods names it (method_rows).
ACTIVE_ONLY_WHEN = (
    (("fed.dp.*",), ("fed.dp.enabled",), lambda e: e.fed.dp.enabled,
     "fed.dp.enabled=True", "add --config.fed.dp.enabled=True"),
    (("fed.secagg_threshold",), ("fed.secure_aggregation",), lambda e: e.fed.secure_aggregation,
     "fed.secure_aggregation=True", "add --config.fed.secure_aggregation=True"),
    (("fed.server_momentum",), ("fed.server_optimizer",), lambda e: e.fed.server_optimizer == "avgm",
     "fed.server_optimizer=avgm", "add --config.fed.server_optimizer=avgm"),
    (("fed.server_learning_rate",), ("fed.server_optimizer",), lambda e: e.fed.server_optimizer != NO_SERVER_OPTIMIZER,
     "fed.server_optimizer is avgm, adagrad, adam or yogi", "add e.g. --config.fed.server_optimizer=adam"),
    (("fed.rank_aggregation",), ("model.adapter.client_ranks",), lambda e: bool(e.model.adapter.client_ranks),
     "model.adapter.client_ranks is set", "add e.g. --config.model.adapter.client_ranks=16,8,4"),
)


def method_rows() -> tuple:
    """ACTIVE_ONLY_WHEN's rows for the methods' hyperparameters: each key active when fed.methods names a method
    that declares it (`Method.Hyperparameters`)."""
    from fednano_jax.federated.methods import METHODS

    holders: dict[str, list[str]] = {}
    for name, method in METHODS.items():
        for field in dataclasses.fields(method.Hyperparameters):
            holders.setdefault(field.name, []).append(name)
    return tuple(((f"fed.{key}",), ("fed.methods",), lambda e, names=tuple(names): bool(set(names) & set(e.fed.methods)),
                  f"fed.methods includes {' or '.join(names)}", f"add {names[0]} to --config.fed.methods")
                 for key, names in holders.items())
# Keys a command sets itself whatever the command line says (study's cells, memory_plan's --methods, the privacy
# audit's FedNano): a condition that reads one cannot be judged from the command line, so it is not checked there.
SET_BY_COMMAND = {
    "fednano_jax.commands.study": ("fed.methods", "fed.server_optimizer", "model.adapter.client_ranks"),
    "fednano_jax.commands.memory_plan": ("fed.methods",),
    "fednano_jax.commands.privacy_audit": ("fed.methods",),
}


def check_inactive(config: ConfigDict, argv: list[str], command: str = "") -> None:
    """A `--config.a.b=value` the run would ignore (ACTIVE_ONLY_WHEN; `config`: with the overrides applied) stops
    the command: `--config.fed.dp.noise_multiplier=0.5` alone would train without DP. A config file may set such
    keys freely; only the command line's are checked."""
    set_by_command = SET_BY_COMMAND.get(command, ())
    overrides = [arg[len("--config."):].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]
    if not overrides:
        return
    experiment, rows = read(config, run=False), ACTIVE_ONLY_WHEN + method_rows()
    for path in overrides:
        for patterns, reads, active, needs, remedy in rows:
            if (any(fnmatch.fnmatchcase(path, p) for p in patterns) and path not in reads
                    and not set(reads) & set(set_by_command) and not active(experiment)):
                raise ConfigError(f"--config.{path} has no effect unless {needs}; {remedy} or drop it.")


def parse_flags(argv: list[str], command: str = "") -> list[str]:
    """absl flag parsing, preceded by a check of config overrides that names a mistyped key and followed by one
    that names an override the run would ignore. `command`: the module of the command's main()."""
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    if paths:
        try:
            check_overrides(load_config_file(paths[-1]), argv[1:])
        except ConfigError as error:
            sys.exit(f"Config error: {error}")
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as error:  # an unknown or malformed flag: one sentence, not absl's traceback
        sys.exit(f"Config error: {error}; run with --help for this command's flags.")
    if paths and "config" in flags.FLAGS:
        try:
            check_inactive(flags.FLAGS.config, argv[1:], command)
        except ConfigError as error:
            sys.exit(f"Config error: {error}")
    return remaining


def run(main: Callable[[], None], define_flags: Callable[[], None], argv: list[str] | None = None) -> None:
    """Define the command's flags, parse them (`argv`, default sys.argv) and run `main()`; a user's error exits
    with its one sentence."""
    define_flags()

    def entry(argv) -> None:
        del argv
        logging.set_verbosity(logging.WARNING)  # tfds logs every file it reads or writes at INFO
        try:
            if "config" in flags.FLAGS and flags.FLAGS.config is not None:  # before the command's JAX starts
                from fednano_jax.parallel.mesh import use_cpu_devices
                from fednano_jax.settings import Mesh

                use_cpu_devices(Mesh.read(flags.FLAGS.config.get("mesh"), "mesh").cpu_devices)
            main()
        except tuple(LABELS) as error:
            sys.exit(f"{label_of(error)}: {error}")

    app.run(entry, argv=argv, flags_parser=functools.partial(parse_flags, command=main.__module__))
