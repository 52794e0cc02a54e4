"""The library is a layer: prs_hook.py and utils/ take values and return records; the scripts own the command line.

Scanned with ``ast`` (so comments and docstrings do not count): every library module (prs_hook.py and utils/**,
except utils/cli.py, the scripts' helper, and the PCLens command modules in utils/scripts/) must not import
argparse, read an argparse namespace, print, touch sys.argv or exit, pick a matplotlib backend, or load a file as a
module. No script (top-level *.py, utils/scripts/*) may import another script.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in ROOT.glob("*.py") if p.name != "prs_hook.py")
COMMAND_MODULES = sorted(p for p in (ROOT / "utils" / "scripts").glob("*.py") if p.name != "__init__.py")
LIBRARY = [ROOT / "prs_hook.py"] + sorted(
    p for p in (ROOT / "utils").rglob("*.py") if p.name != "cli.py" and p.parent.name != "scripts")
NAMESPACE_NAMES = {"args", "opts", "namespace", "ns"}  # what a parsed command line is called in this code base


def breaches(path: Path) -> list[str]:
    """The rule's breaches in one library file: ``"<line>: <what>"``."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def say(node: ast.AST, what: str) -> None:
        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "argparse":
                    say(node, f"imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] == "argparse":
                say(node, f"imports from {node.module}")
        elif isinstance(node, ast.Name) and node.id in ("print", "exit", "quit", "Namespace"):
            say(node, f"uses {node.id}")
        elif isinstance(node, ast.Attribute):
            base = node.value
            if isinstance(base, ast.Name) and base.id == "sys" and node.attr in ("argv", "exit"):
                say(node, f"uses sys.{node.attr}")
            elif isinstance(base, ast.Name) and base.id in ("matplotlib", "mpl") and node.attr == "use":
                say(node, "calls matplotlib.use")
            elif node.attr == "Namespace":
                say(node, f"uses .{node.attr}")
            elif isinstance(base, ast.Name) and base.id in NAMESPACE_NAMES:
                say(node, f"reads {base.id}.{node.attr} (an argparse namespace?)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("vars", "getattr"):
            if node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in NAMESPACE_NAMES:
                say(node, f"{node.func.id}({node.args[0].id}, ...) (an argparse namespace?)")
    return found


def test_library_modules_found():
    """The scan covers the engine and every sub-package (a rename must not empty it silently)."""
    names = {p.relative_to(ROOT).as_posix() for p in LIBRARY}
    assert {"prs_hook.py", "utils/files/provenance.py", "utils/neurons/effects.py", "utils/splice.py"} <= names
    assert "utils/cli.py" not in names


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_library_is_a_layer(path):
    assert breaches(path) == []


def test_the_check_catches_breaches(tmp_path):
    """The scanner itself finds each kind of breach (so a passing scan means something)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import argparse\nimport sys\nimport matplotlib\n"
                   "def f(args):\n    print(args.x, sys.argv)\n    matplotlib.use('Agg')\n    sys.exit(1)\n"
                   "    return vars(args), argparse.Namespace()\n")
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        kinds = [b.split(": ", 1)[1] for b in breaches(bad)]
    finally:
        ROOT = root
    for what in ("imports argparse", "uses print", "reads args.x", "uses sys.argv", "calls matplotlib.use",
                 "uses sys.exit", "vars(args, ...)", "uses .Namespace"):
        assert any(what in k for k in kinds), (what, kinds)


SCRIPT_MODULES = {p.stem for p in SCRIPTS} | {f"utils.scripts.{p.stem}" for p in COMMAND_MODULES}


@pytest.mark.parametrize("path", SCRIPTS + COMMAND_MODULES + LIBRARY, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_script_imports_a_script(path):
    tree = ast.parse(path.read_text(), str(path))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported |= {f"{node.module}.{a.name}" for a in node.names}
    assert not (imported & SCRIPT_MODULES), f"{path.name} imports {sorted(imported & SCRIPT_MODULES)}"
    # nor loads one by its path
    loaders = {"runpy", "spec_from_file_location", "run_path", "SourceFileLoader"}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | imported
    assert not (used & loaders), f"{path.name} loads modules by path ({sorted(used & loaders)})"
