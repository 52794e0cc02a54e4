"""Every script's --help: one smoke test per script (exit status 0, a usage line). Scripts added later are
picked up by the glob."""
import pytest

from conftest import REPO, run_inprocess

SCRIPTS = sorted(p.relative_to(REPO).as_posix() for p in [*REPO.glob("compute_*.py"),
                                                          *(REPO / "utils" / "scripts").glob("[!_]*.py")])


def test_scripts_found():
    assert "compute_prs.py" in SCRIPTS and len(SCRIPTS) >= 11


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    code, out, err = run_inprocess(script, "--help")
    assert code == 0, err
    assert out.startswith("usage:") and "--allow_tf32" in out  # every script goes through utils.cli.run
