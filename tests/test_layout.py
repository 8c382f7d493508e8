"""Imports run one way: every import in fednano_jax/ (at the top of a module or inside a function) names a module
of its own layer or of a layer below, in the order docs/design.md gives (LAYERS, the one table of it)."""

import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "fednano_jax")

# Bottom to top. A module belongs to the longest name here that it is or lies under ("" is the package's
# __init__ alone, the public `load_pretrained` / `load_minigpt4`); a module under none fails the first test. The entry points at the top keep their
# `python -m fednano_jax.NAME` names; each only calls its command.
LAYERS = (
    ("errors", "streams", "settings"),  # settings: the config's records, read at the edge (config.py)
    ("models", "weights"),
    ("data",),
    ("eval",),
    ("backbone", "parallel"),
    ("privacy",),
    ("federated", "serving"),  # serving: the split-step server and client over gRPC
    ("config",),  # the edge: validates fed, DP and secure aggregation, so it may import federated and privacy
    ("experiment", "preflight", "metrics", "flower"),  # flower: the ServerApp and ClientApp
    ("commands", "main", "accounting", "benchmark", "convert_pth", "deploy", "memory_plan", "privacy_audit", "serve", "study",
     "data.partition_stats", ""),
)


def layer_of(module: str) -> int | None:
    """The layer of `fednano_jax.a.b` (given as "a.b"; the package itself as "")."""
    best, found = -1, None
    for index, units in enumerate(LAYERS):
        for unit in units:
            if (module == unit or (unit and module.startswith(unit + "."))) and len(unit) > best:
                best, found = len(unit), index
    return found


def modules() -> dict[str, str]:
    """"a.b" -> path of every module under fednano_jax/ ("" for fednano_jax/__init__.py)."""
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                parts = os.path.relpath(os.path.join(directory, name), PACKAGE)[:-3].split(os.sep)
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(directory, name)
    return found


def imported(path: str, module: str, known) -> set[str]:
    """The fednano_jax modules `path` imports anywhere in its code, as "a.b"."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importing module's package
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1]
                source = ".".join(["fednano_jax", *base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            # `from a import b` imports the module a.b when there is one, else names from a
            names.update(f"{source}.{alias.name}" if f"{source}.{alias.name}"[len("fednano_jax."):] in known
                         else source for alias in node.names)
    return {name[len("fednano_jax."):] if name != "fednano_jax" else "" for name in names
            if name == "fednano_jax" or name.startswith("fednano_jax.")}


def qualified(module: str) -> str:
    return f"fednano_jax.{module}" if module else "fednano_jax"


def label(index: int) -> str:
    return ", ".join(unit or "fednano_jax" for unit in LAYERS[index])


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer_of(m) is None] == []


def test_imports_run_down_the_layers():
    known = modules()
    violations = []
    for module, path in sorted(known.items()):
        for target in sorted(imported(path, module, known)):
            below, above = layer_of(module), layer_of(target)
            if above is not None and above > below:
                violations.append(f"{qualified(module)} -> {qualified(target)} ({label(above)} above {label(below)})")
    assert not violations, "Upward imports:\n" + "\n".join(violations)


def test_docs_design_gives_the_same_order():
    """docs/design.md's table of layers is this one, row for row."""
    with open(os.path.join(ROOT, "docs", "design.md")) as f:
        design = f.read()
    for index, units in enumerate(LAYERS):
        row = f"| {index} | " + ", ".join(f"`{unit or 'fednano_jax'}`" for unit in units) + " |"
        assert row in design, row


def test_the_round_driver_and_the_memory_planner_name_no_method():
    """What a method does enters through its hooks: the round loop and memory_plan import no method module and
    spell no method's name, so adding a method touches neither."""
    from fednano_jax.federated.methods import METHODS

    for relative in ("federated/rounds.py", "commands/memory_plan.py"):
        with open(os.path.join(PACKAGE, relative)) as f:
            source = f.read()
        imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
        assert not {m for m in imported if m and m.startswith("fednano_jax.federated.methods.")}, relative
        strings = [node.value.lower() for node in ast.walk(ast.parse(source))
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)]
        for name in METHODS:
            assert not any(name in text.replace("fednano_jax", "") for text in strings), (relative, name)
