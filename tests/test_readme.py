"""The front page stays true: short, every path it names exists, links in the docs resolve, its example runs."""
import re
import subprocess
import sys

import pytest
from conftest import CONFIGS, GOLDEN_WEIGHTS, REPO

README = (REPO / "README.md").read_text()
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "bench" / "README.md", REPO / "README.md"]
# repository paths: a folder ending in "/", a script or notebook, or a path with a folder (a bare `REPORT.md` or
# `report.json` names an output, not a file of the repository)
PATH = re.compile(r"^(?:[\w.\-]+/[\w.\-/]*|[\w.\-]+\.(?:py|ipynb|yml|sh))$")


def test_readme_is_a_front_page():
    assert len(README.splitlines()) <= 200
    for heading in ("## Quick start", "## Reproduce a paper with one command", "## In Python", "## The scripts"):
        assert heading in README
    # .ci/run runs the line after this comment
    test_cmd = README.split("# 2. set up and run the tests\n", 1)[1].splitlines()[0]
    assert "pip install" in test_cmd and "pytest" in test_cmd


def test_every_path_in_the_readme_exists():
    tokens = set(re.findall(r"`([^`\s]+)`", README)) | set(re.findall(r"\]\(([^)\s#]+)\)", README))
    paths = [t for t in tokens if PATH.match(t) and not t.startswith(("http", "output_dir/"))]
    assert len(paths) > 25
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, missing


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    links = [l for l in re.findall(r"\]\(([^)\s#]+)", doc.read_text()) if not l.startswith(("http", "mailto:"))]
    missing = [l for l in links if not (doc.parent / l).exists()]
    assert not missing, missing


def test_the_python_example_runs(tmp_path):
    code = README.split("```python\n", 1)[1].split("```", 1)[0]
    tiny = code.replace('load_model("ViT-B-16", "laion2b_s34b_b88k", "cpu")',
                        f'load_model("prsclip-tiny", "{GOLDEN_WEIGHTS}", "cpu")')
    assert tiny != code  # the example still loads that model
    script = tmp_path / "example.py"
    script.write_text(f"import open_clip\nopen_clip.add_model_config({str(CONFIGS)!r})\n" + tiny)
    res = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    heads = eval(res.stdout.strip().splitlines()[-1])  # [(layer, head), ...] of the tiny model (4 x 4)
    assert len(heads) == 5 and all(0 <= l < 4 and 0 <= h < 4 for l, h in heads)


def test_the_no_download_command_runs(tmp_path):
    section = README.split("## Try it without downloads", 1)[1].split("\n## ", 1)[0]
    command = section.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    argv = command.split()
    assert argv[:2] == ["python", "compute_prs.py"]
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out")
    res = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    import numpy as np

    attn = np.load(tmp_path / "out" / "sample_attn_prsclip-tiny.npy")
    mlp = np.load(tmp_path / "out" / "sample_mlp_prsclip-tiny.npy")
    total = attn.sum((1, 2)) + mlp.sum(1)  # the parts sum to unit-norm embeddings
    assert attn.shape[0] == 8 and np.allclose(np.linalg.norm(total, axis=1), 1, atol=1e-5)
    # the Python spelling of the same model
    code = section.split("From Python: `", 1)[1].split("`", 1)[0]
    res = subprocess.run([sys.executable, "-c", f"from utils.models import load_model\nm, p, t = {code}\n"
                          "print(sum(x.numel() for x in m.parameters()))"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert res.returncode == 0 and int(res.stdout.split()[-1]) > 0, res.stderr
