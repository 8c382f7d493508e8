"""Every command users type, on every shipped config: it does its job on tiny settings, or stops with one
`Config error:` / `Data error:` / `Checkpoint error:` sentence naming what is missing on this machine.

The pairs run in this one process through the commands' own entry point (`cli.run`, absl flags and
all), so a pair costs its work, not a Python start-up. Where a full run is heavy the pair runs
`--dry_run` (main, study: the real runs are the default-run fixture's and test_study's) or one
step of a shrunk model (the 7B configs' benchmark and memory plan: the same command path, tiny
widths). The README's default command itself is the default_run fixture's (test_default_run.py). No pair may end in a traceback: an unexpected exception fails its test as it is.
"""

import contextlib
import glob
import importlib
import io
import os
import sys

import pytest
from absl import flags

from conftest import ROOT
from fednano_jax.commands import cli

COMMANDS = {  # what users type after `python -m` -> the module whose main()/define_flags() it runs
    "fednano_jax.main": "fednano_jax.main",
    "fednano_jax.study": "fednano_jax.commands.study",
    "fednano_jax.benchmark": "fednano_jax.commands.benchmark",
    "fednano_jax.memory_plan": "fednano_jax.commands.memory_plan",
    "fednano_jax.accounting": "fednano_jax.commands.accounting",
    "fednano_jax.data.partition_stats": "fednano_jax.commands.partition_stats",
    "fednano_jax.privacy_audit": "fednano_jax.commands.privacy_audit",
}
CONFIGS = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(ROOT, "configs", "*.py")))
PAPER_7B = ("scienceqa_llava15_7b", "iconqa_llava15_7b", "memory_llava15_7b", "scienceqa_minigpt4_7b",
            "iconqa_minigpt4_7b")
SHRUNK_7B = ("--config.model.vocab_size=128", "--config.model.llm.hidden_size=64",
             "--config.model.llm.intermediate_size=128", "--config.model.llm.num_layers=1",
             "--config.model.llm.num_heads=2", "--config.model.llm.num_kv_heads=2",
             "--config.model.vision.image_size=28", "--config.model.vision.hidden_size=32",
             "--config.model.vision.intermediate_size=64", "--config.model.vision.num_layers=2",
             "--config.model.vision.num_heads=2", "--config.model.adapter.rank=4")
SHRUNK_QFORMER = ("--config.model.qformer.hidden_size=32", "--config.model.qformer.num_layers=2",
                  "--config.model.qformer.num_heads=2", "--config.model.qformer.intermediate_size=64",
                  "--config.model.qformer.num_query_tokens=4")
TINY_FLAGS = {
    "fednano_jax.main": ("--dry_run",),
    "fednano_jax.study": ("--dry_run", "--study=ranks"),
    "fednano_jax.benchmark": ("--mode=loop", "--clients=1", "--steps=1", "--batch=1", "--text_tokens=4",
                              "--repeats=1"),
    "fednano_jax.memory_plan": ("--methods=fedavg", "--clients=1", "--batch=1", "--text_tokens=4", "--remat=full"),
    "fednano_jax.accounting": (),
    "fednano_jax.data.partition_stats": (),
    "fednano_jax.privacy_audit": ("--dry_run",),  # the real audit: test_privacy_audit.py
}
EASY_VQA = ("easyvqa_tiny", "easyvqa_smollm2", "easyvqa_minigpt4_tiny")
NO_ROOT = ("Config error:", "data.root must name the directory")  # ScienceQA and IconQA are not on this machine
NO_CHECKPOINT = ("Config error:", "model.path is unset")
# (command, config) -> what it prints on success, or (label, the sentence's gist) where it must stop.
EXPECTED = {
    **{("fednano_jax.main", c): "every check a run makes before training passed"
       for c in EASY_VQA},
    **{("fednano_jax.study", c): "the first in full" for c in EASY_VQA},
    **{("fednano_jax.privacy_audit", c): "every check a run makes before training passed" for c in EASY_VQA},
    **{(cmd, c): NO_ROOT for cmd in ("fednano_jax.main", "fednano_jax.study", "fednano_jax.data.partition_stats",
                                     "fednano_jax.privacy_audit")
       for c in ("scienceqa_tiny", "iconqa_tiny", "scienceqa_llava15_7b", "iconqa_llava15_7b",
                 "scienceqa_minigpt4_7b", "iconqa_minigpt4_7b")},
    **{(cmd, "memory_llava15_7b"): NO_CHECKPOINT for cmd in ("fednano_jax.main", "fednano_jax.study",
                                                             "fednano_jax.privacy_audit")},
    **{("fednano_jax.benchmark", c): "client-steps/s" for c in CONFIGS},
    **{("fednano_jax.memory_plan", c): "GiB per device" for c in CONFIGS},
    **{("fednano_jax.accounting", c): "Trained and uploaded (NanoAdapters)" for c in CONFIGS},
    **{("fednano_jax.accounting", c): ("Data error:", "--vocab_size=N") for c in ("scienceqa_tiny", "iconqa_tiny")},
    **{("fednano_jax.data.partition_stats", c): "Training examples per category and client"
       for c in (*EASY_VQA, "memory_llava15_7b")},
}
LABELS = ("Config error:", "Data error:", "Checkpoint error:")


def invoke(module_name: str, argv: list[str]) -> tuple[int | str | None, str, str]:
    """-> (exit code or message, stdout, stderr) of `python -m <command> argv...`, in this process."""
    module = importlib.import_module(module_name)
    defined = []  # the command's own flags (and its --config.* overrides); libraries' flags stay defined

    def define_flags():
        before = set(flags.FLAGS)
        module.define_flags()
        defined.extend(set(flags.FLAGS) - before)

    out, err = io.StringIO(), io.StringIO()
    code, saved_argv = 0, sys.argv
    sys.argv = [module_name, *argv]  # ml_collections' config flag finds its --config.* overrides there
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.run(module.main, define_flags, argv=sys.argv)
    except SystemExit as stopped:
        code = stopped.code
    finally:
        sys.argv = saved_argv
        overrides = [name for name in flags.FLAGS if name.startswith("config.")]  # defined while parsing
        for name in set(defined + overrides):  # the next command defines its own
            delattr(flags.FLAGS, name)
    return code, out.getvalue(), err.getvalue()


def test_every_pair_is_named_and_every_config_is_covered():
    assert set(EXPECTED) == {(cmd, c) for cmd in COMMANDS for c in CONFIGS}


@pytest.mark.parametrize("command,config", sorted(EXPECTED))
def test_command_on_config(command, config, easy_vqa_dir, tmp_path):
    argv = [f"--config={os.path.join(ROOT, 'configs', config + '.py')}", f"--config.data.dir={easy_vqa_dir}",
            *TINY_FLAGS[command]]
    if command in ("fednano_jax.benchmark", "fednano_jax.memory_plan") and config in PAPER_7B:
        argv += SHRUNK_7B + (SHRUNK_QFORMER if "minigpt4" in config else ())
    if command == "fednano_jax.data.partition_stats" and config in PAPER_7B:
        argv.append("--config.model.vision.image_size=28")  # easy-VQA's images would be resized to 336 px
    if command in ("fednano_jax.benchmark", "fednano_jax.memory_plan", "fednano_jax.accounting"):
        argv.append(f"--out={tmp_path / 'figures.json'}")
    if command == "fednano_jax.study":
        argv.append(f"--workdir={tmp_path / 'study'}")
    code, stdout, stderr = invoke(COMMANDS[command], argv)
    assert "Traceback" not in stdout + stderr
    expected = EXPECTED[(command, config)]
    if isinstance(expected, str):
        assert code in (0, None), f"{command} on {config} stopped: {code}\n{stderr[-2000:]}"
        assert expected in stdout, stdout[-2000:]
    else:
        label, gist = expected
        assert isinstance(code, str) and code.startswith(label) and gist in code, code
        assert code.count("\n") == 0 and code.rstrip().endswith((".", ")")), code  # one sentence
