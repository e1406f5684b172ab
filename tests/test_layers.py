"""The package's layering, read from its source with `ast` (imports inside functions count too):

- the lower layers (`cache/`, `data/`, `models/`, `plan/`) never import `train/` or `run/`: data flows
  dataset -> stage -> cache -> loader -> next stage, and a run is built from those pieces, not under them;
- a stage's state is `cachetrain.run.StageState`, never a string compared in place;
- only `cachetrain.run.checkpoint` reads a checkpoint file or its keys;
- only the CLI spells a command (`cachetrain.cli`, `cachetrain.commands`); everything else names one with
  a `Fix`, and every Fix the package builds is a command line the parser accepts.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from cachetrain.commands import COMMANDS
from cachetrain.errors import Fix
from tests.test_imports import import_graph, modules

PACKAGE = Path(__file__).resolve().parent.parent / "cachetrain"
LOWER = ("cachetrain.cache", "cachetrain.data", "cachetrain.models", "cachetrain.plan")
UPPER = ("cachetrain.train", "cachetrain.run")
CLI = ("cachetrain.cli", "cachetrain.commands")


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def strings(file: Path) -> list[ast.Constant]:
    """Every string constant of a module except docstrings (which may describe commands and states)."""
    tree = ast.parse(file.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_lower_layers_never_import_train_or_run():
    bad = [f"{m} imports {t}" for m, targets in import_graph().items() if _in(m, LOWER)
           for t in targets if _in(t, UPPER)]
    assert not bad, bad


def test_the_layering_check_sees_an_import_inside_a_function():
    assert "cachetrain.plan.planner" in import_graph()["cachetrain.commands.planning"]  # imported inside plan()


def test_stage_states_are_the_enum_not_strings():
    states = {"untrained", "partial", "trained", "stale"}
    allowed = {"cachetrain.run.state", "cachetrain.cache.manifest"}  # the enum; CacheState has a "stale" too
    found = [f"{m}:{n.lineno} {n.value!r}" for m, f in modules().items() if m not in allowed
             for n in strings(f) if n.value in states]
    assert not found, found


def test_only_the_checkpoint_module_reads_checkpoint_files_or_keys():
    """No torch.load outside it, and no key read (`ck["k"]`, `ck.get("batch")`) from a name that holds a
    checkpoint: elsewhere a checkpoint is a typed record (`ck.k`)."""
    names = {"ck", "ckpt", "checkpoint", "resume"}
    found = []
    for m, f in modules().items():
        if m == "cachetrain.run.checkpoint":
            continue
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Name) \
                    and node.value.id == "torch":
                found.append(f"{m}:{node.lineno} torch.load")
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in names \
                    and isinstance(node.slice, ast.Constant):
                found.append(f"{m}:{node.lineno} {node.value.id}[{node.slice.value!r}]")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in names:
                found.append(f"{m}:{node.lineno} {node.func.value.id}.get(...)")
    assert not found, found


def test_only_the_cli_spells_commands():
    spelled = re.compile(r"\bcachetrain (" + "|".join(map(re.escape, COMMANDS)) + r")\b")
    found = [f"{m}:{n.lineno} {n.value!r}" for m, f in modules().items() if not _in(m, CLI)
             for n in strings(f) if spelled.search(n.value)]
    assert not found, found


def built_fixes() -> list[tuple[str, Fix]]:
    """Every `Fix.of(...)` in the package, with literal arguments as written and 0 for any other value."""
    out = []
    for m, f in modules().items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "of" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "Fix":
                command = node.args[0].value if isinstance(node.args[0], ast.Constant) else None
                options = {k.arg: k.value.value if isinstance(k.value, ast.Constant) else 0
                           for k in node.keywords if k.arg != "run"}
                run = Path("runs/x") if any(k.arg == "run" for k in node.keywords) else None
                out.append((f"{m}:{node.lineno}", Fix.of(command, run=run, **options)))
    return out


def test_every_suggested_command_parses_as_the_cli_spells_it():
    from cachetrain.cli import _parser, spell

    fixes = built_fixes()
    assert len(fixes) >= 10  # the walk found them
    for where, fix in fixes:
        assert fix.command in COMMANDS, where
        line = spell(fix, ["--config", "c.yaml"])
        args = _parser().parse_args(shlex.split(line)[1:])  # exits (SystemExit) if the parser refuses it
        assert args.command == fix.command, where


def test_a_suggestion_names_the_run_as_the_user_did():
    from cachetrain.cli import spell

    assert spell(Fix.of("cache", j=2, repair=True), ["--config c.yaml", "--set 'train.lr=0.1'"]) == \
        "cachetrain cache --config c.yaml --set 'train.lr=0.1' --j 2 --repair"
    assert spell(Fix.of("stage", run=Path("runs/a b")), ["--config c.yaml"]) == "cachetrain stage --run 'runs/a b'"
    with pytest.raises(ValueError, match="no command 'nonsense'"):
        spell(Fix.of("nonsense"), [])
