"""bench/gpu_check.sh and its summary table (bench/gpu_summary.py), without a GPU: the table from hand-made
results, the shell script's syntax and its refusal to run on a machine without a GPU."""
import json
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_summary  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="2" tests="10"></testsuite></testsuites>"""


def test_summary_table(tmp_path):
    (tmp_path / "pytest.xml").write_text(JUNIT)
    status = [("tests", "failed (exit 1)", "40", "pytest tests/test_cuda.py"),
              ("prs-ViT-B-16", "ok", "300", "bench/bench_prs.py --model ViT-B-16"),
              ("second_order", "ok", "20", "bench/bench_second_order.py"),
              ("omp", "failed (exit 1)", "5", "bench/bench_omp.py"),
              ("splice", "skipped: not in this checkout", "0", "bench/bench_splice.py"),
              ("newbench", "ok", "3", "bench/bench_newbench.py --device cuda")]
    (tmp_path / "status.tsv").write_text("".join("\t".join(s) + "\n" for s in status))
    (tmp_path / "prs-ViT-B-16.json").write_text(json.dumps({"args": {}, "results": {
        "plain": {"images_per_s": 1000.0, "ratio_vs_plain": 1.0, "peak_gib": 1.5},
        "prs": {"images_per_s": 900.0, "ratio_vs_plain": 0.9, "peak_gib": 2.25}}}))
    (tmp_path / "second_order.json").write_text(json.dumps({"args": {}, "images_per_s": {"batched": 50.0,
                                                           "original_style": 0.5}, "speedup": 100.0,
                                                           "max_abs_diff": 3e-8, "max_abs_value": 0.1}))
    (tmp_path / "omp.json").write_text("{}")  # a failed run's leftovers are not read
    (tmp_path / "newbench.json").write_text(json.dumps({"args": {"x": 1}, "speed": 2.5, "name": "a|b"}))
    table = gpu_summary.summary(tmp_path).splitlines()
    assert table[0] == "| step | figure | value | target | status |"
    assert all(line.count("|") == 6 for line in table)  # five columns everywhere (no stray '|')
    body = "\n".join(table)
    assert "| `pytest tests/test_cuda.py` | CUDA tests | 7 passed, 1 failed, 0 errors, 2 skipped | all pass | " \
           "failed (exit 1) (40 s) |" in body
    assert "| `bench/bench_prs.py --model ViT-B-16` | plain | 1000.0 images/s (1.00× plain), peak 1.50 GiB |" in body
    assert "| prs | 900.0 images/s (0.90× plain), peak 2.25 GiB | ≥ 0.8× plain |" in body
    assert "| vs the original's per-(layer, head) loop | 100.0× | ≥ 50× |" in body
    assert "| `bench/bench_omp.py` |  | see omp.log |  | failed (exit 1) (5 s) |" in body
    assert "| `bench/bench_splice.py` |  |  |  | skipped: not in this checkout |" in body
    assert "| speed | 2.5 |" in body and "| name | a/b |" in body and "| x |" not in body


def test_script_syntax_and_options(tmp_path):
    script = str(REPO / "bench" / "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    res = subprocess.run(["bash", script, "--frobnicate"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown option --frobnicate" in res.stderr
    res = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--quick" in res.stdout and "Exit status" in res.stdout


def test_no_gpu_is_an_error(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run for real")
    res = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--python", sys.executable, "--out",
                          str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 1
    assert "torch sees no CUDA GPU" in res.stdout
    assert "torch sees no CUDA GPU" in (tmp_path / "gpu_check.log").read_text()
