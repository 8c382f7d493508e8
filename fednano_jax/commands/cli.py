"""The one place a command's boilerplate lives: absl flags defined only when run, `--config` overrides
checked for mistyped keys, quiet libraries, and a user's error said in one sentence instead of a traceback.

    if __name__ == "__main__":
        from fednano_jax.commands import cli, study
        cli.run(study.main, study.define_flags)
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Callable

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" banner: we never need it

from absl import app, flags, logging  # noqa: E402
from ml_collections import ConfigDict, config_flags  # noqa: E402

from fednano_jax.config import load_config_file  # noqa: E402
from fednano_jax.errors import LABELS, ConfigError, label_of  # noqa: E402


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


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, preceded by a check of config overrides that names a mistyped key."""
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    if paths:
        try:
            check_overrides(load_config_file(paths[-1]), argv[1:])
        except ConfigError as error:
            sys.exit(f"Config error: {error}")
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:  # an unknown or malformed flag: one sentence, not absl's traceback
        sys.exit(f"Config error: {error}; run with --help for this command's flags.")


def run(main: Callable[[], None], define_flags: Callable[[], None], argv: list[str] | None = None) -> None:
    """Define the command's flags, parse them (`argv`, default sys.argv) and run `main()`; a user's error exits
    with its one sentence."""
    define_flags()

    def entry(argv) -> None:
        del argv
        logging.set_verbosity(logging.WARNING)  # tfds logs every file it reads or writes at INFO
        try:
            main()
        except tuple(LABELS) as error:
            sys.exit(f"{label_of(error)}: {error}")

    app.run(entry, argv=argv, flags_parser=parse_flags)
