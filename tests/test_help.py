"""Every script's ``--help`` says what the script is and does what the docs say.

- the usage line names the script itself (so argparse's errors read ``compute_prs.py: error: ...``);
- every flag has a help text, and every default shown in ``--help`` is the flag's real default;
- every flag that a command line in README.md or docs/*.md passes to a script exists in that script's parser.
Scripts added later are picked up by the globs.
"""
from __future__ import annotations

import argparse
import re
import shlex

import pytest
from conftest import REPO, run_inprocess, script_module

from utils.cli import HelpFormatter, add_tf32_arg

SCRIPTS = sorted(p.relative_to(REPO).as_posix() for p in [
    *REPO.glob("compute_*.py"), *REPO.glob("decompose_*.py"), REPO / "concept_distribution.py",
    REPO / "generate_adversarial_images.py", REPO / "reproduce.py", *(REPO / "utils" / "scripts").glob("[!_]*.py")])
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def parser_of(script: str) -> argparse.ArgumentParser:
    parser = script_module(script, f"_help_{script.replace('/', '_')[:-3]}").get_args_parser()
    add_tf32_arg(parser)
    return parser


def test_scripts_found():
    assert {"compute_prs.py", "decompose_data.py", "utils/scripts/compute_activation_values.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_usage_names_the_script(script):
    code, out, err = run_inprocess(script, "--help")
    assert code == 0, err
    assert out.startswith(f"usage: {script.rsplit('/', 1)[-1]} "), out.splitlines()[0]
    assert "--allow_tf32" in out  # every script goes through utils.cli.run


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_and_its_true_default(script):
    parser = parser_of(script)
    formatter = HelpFormatter(script)
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{script} {action.option_strings[-1]}: no help text"
        shown = formatter._get_help_string(action) % {**vars(action), "prog": script}
        default = action.default
        if default in (None, argparse.SUPPRESS) or isinstance(default, bool):
            continue
        value = str(default).rstrip("/") if not isinstance(default, (list, tuple)) else str(default[0])
        assert value in shown, f"{script} {action.option_strings[-1]}: default {default!r} not in help {shown!r}"


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """``(doc, script, flags)`` for every command line in the docs that runs one of the scripts."""
    found = []
    names = {s.rsplit("/", 1)[-1]: s for s in SCRIPTS}
    modules = {f"utils.scripts.{s.rsplit('/', 1)[-1][:-3]}": s for s in SCRIPTS if s.startswith("utils/scripts/")}
    for doc in DOCS:
        text = re.sub(r"\\\n\s*", " ", doc.read_text())  # join continued lines
        for line in text.splitlines():
            line = line.strip().lstrip("$# ").split("  # ")[0]
            if "python" not in line and "torchrun" not in line:
                continue
            try:
                words = shlex.split(line.replace("[", " ").replace("]", " ").replace("`", " "))
            except ValueError:
                continue
            for i, word in enumerate(words):
                script = names.get(word.rsplit("/", 1)[-1]) if word.endswith(".py") else None
                if word == "-m" and i + 1 < len(words):
                    script = modules.get(words[i + 1])
                    i += 1
                if script:
                    flags = []
                    for w in words[i + 1:]:
                        if w in ("|", "&&", ";", "python", "python3"):
                            break
                        if re.fullmatch(r"--?[a-zA-Z][\w-]*", w.split("=")[0]):
                            flags.append(w.split("=")[0])
                    found.append((doc.name, script, flags))
                    break
    return found


def test_docs_have_commands():
    scripts = {s for _, s, _ in doc_commands()}
    assert {"compute_prs.py", "reproduce.py", "decompose_data.py"} <= scripts


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_in_the_docs_exists(script):
    parser = parser_of(script)
    known = {o for a in parser._actions for o in a.option_strings}
    missing = [(doc, flag) for doc, s, flags in doc_commands() if s == script for flag in flags if flag not in known]
    assert not missing, f"{script}: flags in the docs that --help does not know: {missing}"
