"""reproduce.py: each pipeline end to end on the tiny model (--smoke), the runner's rules (skip what is up to date,
resume, skip what has no data, stop what needs a failed step) on hand-built steps, and the report's numbers
against the scripts' own result files and hand-computed differences."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, run_inprocess, run_killed, run_script

import reproduce
from utils.files.provenance import read_provenance
from utils.reproduce.report import Row, Section, build_section, find_published, load_published, read_key_values, render_markdown


def missing(*scripts: str) -> list[str]:
    return [s for s in scripts if not (REPO / s).is_file()]


def plan_lines(out: str) -> dict[str, str]:
    """``--dry_run``'s table: step name -> the rest of its line (status and command)."""
    rows = [line.split(None, 1) for line in out.splitlines()[1:] if line.strip()]
    return {r[0]: r[1] for r in rows}


def check_report(out: Path, stdout: str, titles: list[str]) -> dict:
    """REPORT.md and report.json: every section, every step ran with its command printed first, every row of
    report.json in REPORT.md, every linked figure present. Returns report.json."""
    report = json.loads((out / "report.json").read_text())
    md = (out / "REPORT.md").read_text()
    assert [s["title"].split(" (")[0] for s in report["sections"]] == titles
    for step in report["steps"]:
        assert step["status"] == "ran", step
        assert f"[{step['name']}] {step['command']}" in stdout  # printed before it ran
        assert step["command"] in md and (out / step["log"]).is_file()
    for sec in report["sections"]:
        assert f"## {sec['title']}\n" in md
        for row in sec["rows"]:
            assert row["ours"] is not None, (sec["title"], row)
            assert f"| {row['quantity']} | {row['ours']:.{row['decimals']}f} |" in md
        for fig in sec["figures"]:
            assert (out / fig).is_file() and f"]({fig})" in md
    return report


def rows(report: dict, title_start: str) -> dict[str, float]:
    sec = next(s for s in report["sections"] if s["title"].startswith(title_start))
    return {r["quantity"]: r["ours"] for r in sec["rows"]}


# ----------------------------------------------------------------------------- paper 1, end to end
@pytest.fixture(scope="module")
def paper1(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper1")
    res = run_script("reproduce.py", "paper1", "--smoke", "--output_dir", str(out))
    return out, res.stdout


PAPER1_SECTIONS = ["ImageNet zero-shot accuracy and mean-ablations", "TextSpan: the last 4 layers' heads replaced by 5 "
                   "texts each", "Zero-shot segmentation on ImageNet-segmentation", "Waterbirds worst-group accuracy"]


def test_paper1_smoke_writes_a_complete_report(paper1):
    out, stdout = paper1
    report = check_report(out, stdout, PAPER1_SECTIONS)
    # our numbers are the scripts' own results
    abl = json.loads((out / "sample_ablations_prsclip-tiny.json").read_text())["accuracy_percent"]
    assert rows(report, "ImageNet")["zero-shot top-1, no ablation (%)"] == abl["baseline"]
    assert rows(report, "ImageNet")["MLPs mean-ablated (%)"] == abl["mlps_mean_ablated"]
    seg = json.loads(next(out.glob("imagenet_seg_segmentation_*/segmentation.json")).read_text())["metrics"]
    assert rows(report, "Zero-shot")["mIoU (%)"] == pytest.approx(100 * seg["mIoU"])
    heads = json.loads((out / "binary_waterbirds_specific_heads_prsclip-tiny.json").read_text())
    wb = rows(report, "Waterbirds")
    assert wb["worst group, base (%)"] == heads["baseline"]["worst_group"]
    assert wb["worst group, random heads mean-ablated (mean over sets, %)"] == heads["random"]["mean_worst_group"]
    # the tiny model has no published numbers: "—", never a guess
    assert all(r["published"] is None and r["difference"] is None for s in report["sections"] for r in s["rows"])
    # a step's printed command reruns it alone, from the repository root
    cmd = next(s["command"] for s in report["steps"] if s["name"] == "ablations")
    before = (out / "sample_ablations_prsclip-tiny.json").read_text()
    subprocess.run(shlex.split(cmd), cwd=REPO, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert json.loads((out / "sample_ablations_prsclip-tiny.json").read_text())["accuracy_percent"] == \
        json.loads(before)["accuracy_percent"]


def test_paper1_rerun_skips_resumes_and_reruns_what_changed(paper1):
    out = paper1[0]
    smoke = ["reproduce.py", "paper1", "--smoke", "--output_dir", str(out)]

    def plan(*extra):
        code, stdout, err = run_inprocess(*smoke, "--dry_run", *extra)
        assert code == 0, err
        return plan_lines(stdout)

    run_inprocess(*smoke, "--steps", "ablations")  # after the hand rerun above, brings its record up to date
    assert all(v.startswith("up to date") for v in plan().values())
    # flags that only change speed do not make a step stale
    assert all(v.startswith("up to date") for v in plan("--batch_size", "2", "--num_workers", "1").values())

    # a killed streaming step (its .partial left) continues with --resume; the steps reading it rerun
    attn = out / "sample_attn_prsclip-tiny.npy"
    partial = attn.with_name(attn.name + ".partial")
    partial.write_bytes(b"")
    try:
        p = plan()
    finally:
        partial.unlink()
    assert p["prs"].startswith("would run") and p["prs"].endswith("--resume")
    assert p["ablations"].startswith("would run") and p["textspan"].startswith("would run")
    assert p["classifier"].startswith("up to date") and p["waterbirds_prs"].startswith("up to date")

    # finished outputs of another command: rerun from scratch (no --resume, which would refuse them)
    record_file = attn.with_name(attn.name + ".provenance.json")
    text = record_file.read_text()
    record_file.write_text(text.replace("--dataset sample", "--dataset other"))
    os.utime(record_file, (attn.stat().st_mtime + 1,) * 2)
    try:
        p = plan()
    finally:
        record_file.write_text(text)
        os.utime(record_file, (attn.stat().st_mtime + 1,) * 2)
    assert p["prs"].startswith("would run") and not p["prs"].endswith("--resume")

    # --steps picks a subset; --fresh reruns everything, streaming steps without --resume
    p = plan("--steps", "ablations,waterbirds_heads")
    assert {k for k, v in p.items() if not v.startswith("not selected")} == {"ablations", "waterbirds_heads"}
    p = plan("--fresh")
    assert all(v.startswith("would run") and not v.endswith("--resume") for v in p.values())


def test_paper1_killed_step_continues_where_it_stopped(paper1, tmp_path):
    smoke = ["reproduce.py", "paper1", "--smoke", "--output_dir", str(tmp_path)]
    command = plan_lines(run_inprocess(*smoke, "--dry_run")[1])["prs"].split(None, 2)[2]
    argv = shlex.split(command)  # python compute_prs.py ... --resume
    assert argv[1] == "compute_prs.py" and argv[-1] == "--resume"
    killed = run_killed("compute_prs.py", 4, *argv[2:])  # SIGKILL when image 4 (the second batch) is loaded
    assert killed.returncode == -9, killed.stderr
    assert plan_lines(run_inprocess(*smoke, "--dry_run")[1])["prs"].endswith("--resume")
    code, out, err = run_inprocess(*smoke, "--steps", "prs")
    assert code == 0, err
    assert "Resuming at image 4 of 8" in out
    name = "sample_attn_prsclip-tiny.npy"
    assert (tmp_path / name).read_bytes() == (paper1[0] / name).read_bytes()


# ----------------------------------------------------------------------------- paper 2 and SpLiCE, end to end
PAPER2_SCRIPTS = missing("compute_classifier_projection.py", "compute_segmentation.py")


@pytest.mark.skipif(bool(PAPER2_SCRIPTS), reason=f"paper2 pipeline needs {', '.join(PAPER2_SCRIPTS)} (issue 11), "
                                                 f"not in this checkout")
def test_paper2_smoke_writes_a_complete_report(tmp_path):
    res = run_script("reproduce.py", "paper2", "--smoke", "--output_dir", str(tmp_path))
    report = check_report(tmp_path, res.stdout, ["Second-order ablations, MLP layer 1",
                                                 "Sparse text decomposition of the PCs, MLP layer 1, 4 texts per neuron",
                                                 "Zero-shot segmentation from neurons on ImageNet-segmentation"])
    abl = tmp_path / "sample_val_second_order_ablations_prsclip-tiny_prsclip-tiny_seed0_1_3.json"
    abl = json.loads(abl.read_text())["accuracy_percent"]
    assert rows(report, "Second-order")["each neuron projected on its first PC (%)"] == abl["projected_to_first_pc"]
    ev = json.loads(next(tmp_path.glob("*_decomposition_omp_*_evaluation.json")).read_text())
    assert rows(report, "Sparse")["cosine(reconstruction, PC), mean over neurons"] == \
        ev["cosine_reconstruction_pc_mean"]
    code, stdout, err = run_inprocess("reproduce.py", "paper2", "--smoke", "--output_dir", str(tmp_path), "--dry_run")
    assert code == 0 and all(v.startswith("up to date") for v in plan_lines(stdout).values()), stdout + err


SPLICE_SCRIPTS = missing("decompose_data.py", "tests/golden/splice/image_mean.npy")


@pytest.mark.skipif(bool(SPLICE_SCRIPTS), reason=f"splice pipeline needs {', '.join(SPLICE_SCRIPTS)} (issue 12), "
                                                 f"not in this checkout")
def test_splice_smoke_writes_a_complete_report(tmp_path):
    res = run_script("reproduce.py", "splice", "--smoke", "--output_dir", str(tmp_path))
    report = check_report(tmp_path, res.stdout, ["SpLiCE decomposition of CIFAR-10, l1 penalty 0.35"])
    values = read_key_values(tmp_path / "cifar10_decomp.txt")
    assert rows(report, "SpLiCE")["average L0 (concepts per image)"] == values["Average Decomposition L0 Norm"]


# ----------------------------------------------------------------------------- the runner, on hand-built steps
MAKE = "import json, sys; from pathlib import Path; Path(sys.argv[1]).write_text(json.dumps({'acc': {'top1': 70.0}}))"
COPY = "import shutil, sys; print('copying', sys.argv[1]); shutil.copy(sys.argv[1], sys.argv[2])"
FAIL = "import sys; print('this step fails on purpose'); sys.exit(3)"


def fake_pipeline(tmp_path: Path, fail: bool):
    scripts = {}
    for name, code in [("make", MAKE), ("copy", COPY), ("fail", FAIL)]:
        scripts[name] = tmp_path / f"{name}.py"
        scripts[name].write_text(code + "\n")
    o = tmp_path / "out"

    def pipeline(plan):
        steps = [reproduce.Step("a", str(scripts["make"]), [o / "a.json"], [o / "a.json"]),
                 reproduce.Step("b", str(scripts["copy"]), [o / "a.json", o / "b.json"], [o / "b.json"], needs=("a",)),
                 reproduce.Step("c", str(scripts["fail" if fail else "copy"]), [o / "a.json", o / "c.json"],
                                [o / "c.json"], needs=("a",)),
                 reproduce.Step("d", str(scripts["copy"]), [o / "c.json", o / "d.json"], [o / "d.json"], needs=("c",)),
                 reproduce.Step("e", str(scripts["copy"]), [o / "a.json", o / "e.json"], [o / "e.json"],
                                data="waterbirds")]
        if fail:  # exits 0 without writing what it should
            steps.append(reproduce.Step("f", str(scripts["make"]), [o / "elsewhere.json"], [o / "f.json"]))
        sections = [Section("ImageNet top-1", "b", o / "b.json", [Row("top-1 (%)", "acc.top1", "imagenet_zero_shot_top1")],
                            context={"model": "ViT-B-16", "pretrained": "laion2b_s34b_b88k", "dataset": "imagenet"}),
                    Section("Never made", "d", o / "d.json", [Row("top-1 (%)", "acc.top1")])]
        return steps, sections
    return pipeline, o


def run_fake(monkeypatch, tmp_path, fail: bool, *extra: str) -> tuple[int, dict]:
    pipeline, o = fake_pipeline(tmp_path, fail)
    monkeypatch.setitem(reproduce.PIPELINES, "paper1", pipeline)
    try:
        reproduce.run(reproduce.main, reproduce.get_args_parser(), ["paper1", "--output_dir", str(o), *extra])
        code = 0
    except SystemExit as e:
        code = e.code
    report = json.loads((o / "report.json").read_text()) if (o / "report.json").is_file() else {}
    return code, {s["name"]: s["status"] for s in report.get("steps", [])} | {"_report": report, "_out": o}


def test_runner_failed_step_stops_its_dependents_and_still_reports(monkeypatch, tmp_path, capsys):
    code, status = run_fake(monkeypatch, tmp_path, fail=True)
    assert code == 1
    assert {k: v for k, v in status.items() if not k.startswith("_")} == {
        "a": "ran", "b": "ran", "c": "failed (exit 3)", "d": "skipped: needs c", "e": "skipped: no --waterbirds given",
        "f": "failed: exit 0 but f.json not written"}
    o, report = status["_out"], status["_report"]
    assert "this step fails on purpose" in (o / "logs" / "c.log").read_text()
    # the scripts wrote no record: reproduce.py wrote one holding the step's command
    rec = read_provenance(o / "b.json")
    assert rec["recorded_by"] == "reproduce.py" and rec["command"].endswith(f"{o / 'a.json'} {o / 'b.json'}")
    # ours beside the published number (open_clip's 70.23 for these weights), difference by hand
    row = report["sections"][0]["rows"][0]
    assert (row["ours"], row["published"]) == (70.0, 70.23) and row["difference"] == pytest.approx(-0.23)
    md = (o / "REPORT.md").read_text()
    assert "| top-1 (%) | 70.00 | 70.23 | -0.23 | [OpenCLIP results table" in md
    assert "| c | failed (exit 3) |" in md
    assert "no result (d.json): step 'd' skipped: needs c" in md and "| top-1 (%) | — | — | — | — |" in md


def test_runner_reruns_only_what_is_stale(monkeypatch, tmp_path, capsys):
    run_fake(monkeypatch, tmp_path, fail=True)
    code, status = run_fake(monkeypatch, tmp_path, fail=False)  # c fixed: c and d run, a and b are up to date
    assert code == 0
    assert [status[k] for k in "abcde"] == ["up to date (skipped)", "up to date (skipped)", "ran", "ran",
                                            "skipped: no --waterbirds given"]
    o = status["_out"]
    (o / "a.json").write_text(json.dumps({"acc": {"top1": 71.0}}))  # rewritten behind reproduce.py's back
    code, status = run_fake(monkeypatch, tmp_path, fail=False)
    assert [status[k] for k in "abcd"] == ["ran", "ran", "ran", "ran"]
    code, status = run_fake(monkeypatch, tmp_path, False, "--waterbirds", str(tmp_path))
    assert [status[k] for k in "abcde"] == ["up to date (skipped)"] * 4 + ["ran"]


# ----------------------------------------------------------------------------- command line and data
def test_plan_reports_steps_without_data_as_skipped(tmp_path):
    code, out, err = run_inprocess("reproduce.py", "paper1", "--imagenet", str(tmp_path), "--output_dir",
                                   str(tmp_path / "run"), "--dry_run")
    assert code == 0, err
    p = plan_lines(out)
    assert p["prs"].startswith("would run") and f"--data_path {tmp_path}" in p["prs"]
    assert "--model ViT-B-16 --pretrained laion2b_s34b_b88k" in p["prs"]
    assert p["segmentation"] == "skipped: no --imagenet_seg given"
    assert p["waterbirds_heads"] == "skipped: no --waterbirds given"
    assert not (tmp_path / "run" / "REPORT.md").exists()  # a dry run writes nothing
    code, out, err = run_inprocess("reproduce.py", "paper2", "--output_dir", str(tmp_path / "run"), "--dry_run",
                                   "--mlp_layers", "8", "10")
    p = plan_lines(out)
    assert {"neuron_prs_L8", "neuron_prs_L10", "sparse_L10"} <= set(p)
    assert p["representations"] == "skipped: no --imagenet given" and p["pcas_L8"].startswith("would run")


@pytest.mark.parametrize("args, message", [
    (["--steps", "nope"], "--steps nope: no such step in paper1"),
    (["--model", "ViT-L-14"], "--pretrained is required with --model ViT-L-14"),
    (["--imagenet", "/no/such/folder"], "--imagenet /no/such/folder: no such file or folder"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    code, out, err = run_inprocess("reproduce.py", "paper1", "--output_dir", str(tmp_path), *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"reproduce.py: error: {message}"), err


def test_missing_script_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(reproduce.PIPELINES, "paper1", lambda plan: (
        [reproduce.Step("x", "compute_not_there.py", [], [tmp_path / "x"])], []))
    args = reproduce.get_args_parser().parse_args(["paper1", "--output_dir", str(tmp_path)])
    args.allow_tf32 = False
    with pytest.raises(reproduce.InputError, match="needs compute_not_there.py, not in this checkout"):
        reproduce.main(args)


# ----------------------------------------------------------------------------- the published numbers
def test_published_numbers_are_the_sourced_ones():
    table = load_published()
    got = {(n["quantity"], n["model"]): n["value"] for n in table["numbers"]}
    assert all(n["source"] in table["sources"] and n["where"] for n in table["numbers"])
    assert got[("segmentation_pixel_accuracy", "ViT-H-14")] == 75.21
    assert got[("segmentation_miou", "ViT-H-14")] == 54.50 and got[("segmentation_map", "ViT-H-14")] == 81.61
    waterbirds = {m: tuple(got[(f"waterbirds_worst_group_{k}", m)] for k in ("base", "heads_removed", "random_heads"))
                  for m in ("ViT-B-16", "ViT-L-14", "ViT-H-14")}
    assert waterbirds == {"ViT-B-16": (45.6, 57.5, 52.3), "ViT-L-14": (47.7, 72.9, 57.7), "ViT-H-14": (37.2, 43.3, 37.0)}
    assert [got[("imagenet_zero_shot_top1", m)] for m in ("ViT-B-16", "ViT-L-14", "ViT-H-14")] == [70.23, 75.25, 77.96]
    assert (got[("splice_average_l0", "open_clip:ViT-B-32")], got[("splice_average_cosine", "open_clip:ViT-B-32")]) \
        == (3.3622, 0.4345)
    # matched on weights and dataset, not on the architecture alone
    ctx = {"model": "ViT-B-16", "pretrained": "laion2b_s34b_b88k", "dataset": "imagenet"}
    assert find_published(table, "imagenet_zero_shot_top1", ctx)["value"] == 70.23
    assert find_published(table, "imagenet_zero_shot_top1", dict(ctx, pretrained="openai")) is None
    assert find_published(table, "imagenet_zero_shot_top1", dict(ctx, dataset="sample")) is None
    assert find_published(table, "segmentation_miou", ctx) is None
    splice = {"model": "open_clip:ViT-B-32", "dataset": "CIFAR10", "l1_penalty": 0.35}
    assert find_published(table, "splice_average_l0", splice)["value"] == 3.3622
    assert find_published(table, "splice_average_l0", dict(splice, l1_penalty=0.25)) is None


def test_report_reads_splice_text_and_renders_missing_numbers_as_dashes(tmp_path):
    (tmp_path / "decomp.txt").write_text("Concept Decomposition:\n\tfrog\t0.0042\n\tdeer\t0.004\n"
                                         "Average Decomposition L0 Norm: \t3.5\nAverage CLIP, SpLiCE Cosine Sim: \t0.42\n")
    values = read_key_values(tmp_path / "decomp.txt")
    assert values == {"Average Decomposition L0 Norm": 3.5, "Average CLIP, SpLiCE Cosine Sim": 0.42}
    sec = Section("SpLiCE", "decompose", tmp_path / "decomp.txt",
                  [Row("L0", "Average Decomposition L0 Norm", "splice_average_l0", 1, 4),
                   Row("cosine", "Average CLIP, SpLiCE Cosine Sim", "splice_average_cosine", 1, 4)],
                  context={"model": "open_clip:ViT-B-32", "dataset": "CIFAR10", "l1_penalty": 0.35}, read=read_key_values)
    entry = build_section(sec, load_published(), "ran", tmp_path)
    assert [r["difference"] for r in entry["rows"]] == [pytest.approx(3.5 - 3.3622), pytest.approx(0.42 - 0.4345)]
    md = render_markdown({"title": "t", "repository": str(REPO), "steps": [], "sections": [entry]})
    assert "| L0 | 3.5000 | 3.3622 | +0.1378 |" in md and "| cosine | 0.4200 | 0.4345 | -0.0145 |" in md


def test_identity_ignores_only_speed_flags():
    ident = reproduce.identity
    a = ["compute_prs.py", "--model", "M", "--device", "cuda:0", "--batch_size=64", "--resume", "--dataset", "x"]
    assert ident(a) == ["compute_prs.py", "--model", "M", "--dataset", "x"]
    assert ident(["/abs/compute_prs.py", "--model", "M", "--dataset", "y"]) != ident(a)
    assert ident(["compute_prs.py", "--model", "M", "--dataset", "x", "--dtype", "float16"]) != ident(a)
