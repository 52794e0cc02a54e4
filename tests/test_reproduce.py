"""reproduce.py: each pipeline end to end on the tiny model (--smoke), the runner's rules (skip what is up to date,
resume, skip what has no data and everything downstream, stop what needs a failed step) on hand-built steps, the
report's numbers against the scripts' own result files and hand-computed differences, and the published numbers
each pipeline shows for the papers' models (--preview).

The smoke pipelines run their steps in this process (``launch_inprocess``: the same command lines, without
Python and torch start-up per step); the subprocess launcher is run by the hand-built pipelines, the killed step
and the rerun of a printed command."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shlex
import subprocess
import sys
import traceback
from functools import partial
from pathlib import Path
from typing import Sequence

import pytest
from conftest import REPO, run_inprocess, run_killed

import reproduce
from utils.cli import run
from utils.errors import InputError
from utils.files.provenance import read_provenance
from utils.reproduce import plan as plan_module
from utils.reproduce.plan import Settings, Step
from utils.reproduce.report import (Row, Section, build_section, find_published, load_published, read_key_values,
                                    render_markdown)
from utils.reproduce.runner import identity, run_pipeline


def launch_inprocess(argv: Sequence[str], log: Path) -> int:
    """reproduce's launcher for the tests: the script of ``argv`` (``[python, script, *flags]``) run through its
    command line (``utils.cli.run``) in this process, from the repository root; its output kept in ``log`` and
    shown, as the subprocess launcher does. Returns the exit status."""
    script, flags = argv[1], [str(a) for a in argv[2:]]
    spec = importlib.util.spec_from_file_location(f"step_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    out, code = io.StringIO(), 0
    old_argv, old_cwd = sys.argv, os.getcwd()
    try:
        os.chdir(REPO)
        sys.argv = [script, *flags]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                spec.loader.exec_module(module)
                run(module.main, module.get_args_parser(), flags)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            except Exception:  # a bug in a step: its traceback in the log, as from a subprocess
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    Path(log).write_text(out.getvalue())
    sys.stdout.write(out.getvalue())
    return code


def reproduce_inprocess(*args: str) -> tuple[int, str, str]:
    """reproduce.py's command line in this process, its steps too (``launch_inprocess``): (code, out, err)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    old_argv = sys.argv
    sys.argv = ["reproduce.py", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run(partial(reproduce.main, launch=launch_inprocess), reproduce.get_args_parser(), list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old_argv
    return code, out.getvalue(), err.getvalue()


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
def smoke(pipeline: str, out: Path) -> tuple[Path, str]:
    """``reproduce.py {pipeline} --smoke`` into ``out`` (steps in this process): (out, stdout)."""
    code, stdout, err = reproduce_inprocess(pipeline, "--smoke", "--output_dir", str(out))
    assert code == 0, stdout + err
    return out, stdout


@pytest.fixture(scope="module")
def paper1(tmp_path_factory):
    return smoke("paper1", tmp_path_factory.mktemp("paper1"))


# the headings name the data the smoke test used, not the data sets they stand in for
PAPER1_SECTIONS = ["Zero-shot accuracy and mean-ablations on the bundled sample photos",
                   "TextSpan on the bundled sample photos: the last 4 layers' heads replaced by 5 texts each",
                   "Zero-shot segmentation on the 3-image test segmentation file",
                   "Worst-group accuracy on a Waterbirds-shaped folder of the sample photos"]


def test_paper1_smoke_writes_a_complete_report(paper1):
    out, stdout = paper1
    report = check_report(out, stdout, PAPER1_SECTIONS)
    # our numbers are the scripts' own results
    abl = json.loads((out / "sample_ablations_prsclip-tiny.json").read_text())["accuracy_percent"]
    assert rows(report, "Zero-shot accuracy")["zero-shot top-1, no ablation (%)"] == abl["baseline"]
    assert rows(report, "Zero-shot accuracy")["MLPs mean-ablated (%)"] == abl["mlps_mean_ablated"]
    seg = json.loads(next(out.glob("imagenet_seg_segmentation_*/segmentation.json")).read_text())["metrics"]
    assert rows(report, "Zero-shot segmentation")["mIoU (%)"] == pytest.approx(100 * seg["mIoU"])
    heads = json.loads((out / "binary_waterbirds_specific_heads_prsclip-tiny.json").read_text())
    wb = rows(report, "Worst-group")
    assert wb["worst group, base (%)"] == heads["baseline"]["worst_group"]
    assert wb["worst group, random heads mean-ablated (mean over sets, %)"] == heads["random"]["mean_worst_group"]
    # the tiny model has no published numbers: "—", never a guess
    assert all(r["published"] is None and r["difference"] is None for s in report["sections"] for r in s["rows"])
    assert "ImageNet" not in "".join(s["title"] for s in report["sections"])
    # a step's printed command reruns it alone, from the repository root
    cmd = next(s["command"] for s in report["steps"] if s["name"] == "ablations")
    before = (out / "sample_ablations_prsclip-tiny.json").read_text()
    subprocess.run(shlex.split(cmd), cwd=REPO, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert json.loads((out / "sample_ablations_prsclip-tiny.json").read_text())["accuracy_percent"] == \
        json.loads(before)["accuracy_percent"]


def test_paper1_rerun_skips_resumes_and_reruns_what_changed(paper1):
    out = paper1[0]
    smoke = ["paper1", "--smoke", "--output_dir", str(out)]

    def plan(*extra):
        code, stdout, err = reproduce_inprocess(*smoke, "--dry_run", *extra)
        assert code == 0, err
        return plan_lines(stdout)

    assert reproduce_inprocess(*smoke, "--steps", "ablations")[0] == 0  # after the hand rerun above: its record
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
    smoke = ["paper1", "--smoke", "--output_dir", str(tmp_path)]
    command = plan_lines(reproduce_inprocess(*smoke, "--dry_run")[1])["prs"].split(None, 2)[2]
    argv = shlex.split(command)  # python compute_prs.py ... --resume
    assert argv[1] == "compute_prs.py" and argv[-1] == "--resume"
    killed = run_killed("compute_prs.py", 4, *argv[2:])  # SIGKILL when image 4 (the second batch) is loaded
    assert killed.returncode == -9, killed.stderr
    assert plan_lines(reproduce_inprocess(*smoke, "--dry_run")[1])["prs"].endswith("--resume")
    code, out, err = reproduce_inprocess(*smoke, "--steps", "prs")
    assert code == 0, err
    assert "Resuming at image 4 of 8" in out
    name = "sample_attn_prsclip-tiny.npy"
    assert (tmp_path / name).read_bytes() == (paper1[0] / name).read_bytes()


# ----------------------------------------------------------------------------- paper 2 and SpLiCE, end to end
PAPER2_SCRIPTS = missing("compute_classifier_projection.py", "compute_segmentation.py")


@pytest.mark.skipif(bool(PAPER2_SCRIPTS), reason=f"paper2 pipeline needs {', '.join(PAPER2_SCRIPTS)} (issue 11), "
                                                 f"not in this checkout")
def test_paper2_smoke_writes_a_complete_report(tmp_path):
    out, stdout = smoke("paper2", tmp_path)
    report = check_report(out, stdout, [
        "Second-order ablations on the bundled sample photos, MLP layer 1",
        "Sparse text decomposition of the PCs on the bundled sample photos, MLP layer 1, 4 texts per neuron",
        "Zero-shot segmentation from neurons on the 3-image test segmentation file: the top 5 neurons of MLP layers 0-1",
        "Zero-shot segmentation on the 3-image test segmentation file by paper 1's decomposition of the same model"])
    # layer 0 only feeds segmentation: its PCs, no ablations or sparse decomposition
    assert {s["name"] for s in report["steps"]} >= {"neuron_prs_L0", "pcas_L0", "neuron_prs_L1", "pcas_L1",
                                                    "textspan_classifier", "textspan_segmentation"}
    assert not {"ablations_L0", "sparse_L0"} & {s["name"] for s in report["steps"]}
    abl = out / "sample_val_second_order_ablations_prsclip-tiny_prsclip-tiny_seed0_1_3.json"
    abl = json.loads(abl.read_text())["accuracy_percent"]
    assert rows(report, "Second-order")["each neuron projected on its first PC (%)"] == abl["projected_to_first_pc"]
    ev = json.loads(next(out.glob("*_decomposition_omp_*_evaluation.json")).read_text())
    assert rows(report, "Sparse")["cosine(reconstruction, PC), mean over neurons"] == \
        ev["cosine_reconstruction_pc_mean"]
    seg = json.loads(next(out.glob("imagenet_seg_neuron_segmentation_*_mlp_0_1_pca_3_top_5/segmentation.json"))
                     .read_text())["metrics"]
    assert rows(report, "Zero-shot segmentation from neurons")["mAP (%)"] == pytest.approx(100 * seg["mAP"])
    seg = json.loads(next(out.glob("imagenet_seg_segmentation_*/segmentation.json")).read_text())["metrics"]
    assert rows(report, "Zero-shot segmentation on")["mIoU (%)"] == pytest.approx(100 * seg["mIoU"])
    code, stdout, err = reproduce_inprocess("paper2", "--smoke", "--output_dir", str(out), "--dry_run")
    assert code == 0 and all(v.startswith("up to date") for v in plan_lines(stdout).values()), stdout + err


SPLICE_SCRIPTS = missing("decompose_data.py", "tests/golden/splice/image_mean.npy")


@pytest.mark.skipif(bool(SPLICE_SCRIPTS), reason=f"splice pipeline needs {', '.join(SPLICE_SCRIPTS)} (issue 12), "
                                                 f"not in this checkout")
def test_splice_smoke_writes_a_complete_report(tmp_path):
    out, stdout = smoke("splice", tmp_path)
    report = check_report(out, stdout, ["SpLiCE decomposition of the bundled sample photos, l1 penalty 0.35",
                                        "SpLiCE decomposition of the bundled sample photos, class 4 only, l1 penalty 0.35"])
    values = read_key_values(out / "sample_decomp.txt")
    assert rows(report, "SpLiCE decomposition of the bundled sample photos, l1")["average L0 (concepts per image)"] \
        == values["Average Decomposition L0 Norm"]
    # class 4 (one photo) read back from the per-image weights
    values = read_key_values(out / "sample_class_4_decomp.txt")
    assert rows(report, "SpLiCE decomposition of the bundled sample photos, class 4")[
        "average cosine(CLIP, SpLiCE)"] == values["Average CLIP, SpLiCE Cosine Sim"]
    assert read_provenance(out / "sample_class_4_decomp.txt")["num_images"] == 1


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
        steps = [Step("a", str(scripts["make"]), [o / "a.json"], [o / "a.json"]),
                 Step("b", str(scripts["copy"]), [o / "a.json", o / "b.json"], [o / "b.json"], needs=("a",)),
                 Step("c", str(scripts["fail" if fail else "copy"]), [o / "a.json", o / "c.json"], [o / "c.json"],
                      needs=("a",)),
                 Step("d", str(scripts["copy"]), [o / "c.json", o / "d.json"], [o / "d.json"], needs=("c",)),
                 Step("e", str(scripts["copy"]), [o / "a.json", o / "e.json"], [o / "e.json"], data="waterbirds"),
                 # downstream of a step without its data: skipped too, saying which flag is missing
                 Step("g", str(scripts["copy"]), [o / "e.json", o / "g.json"], [o / "g.json"], needs=("e",))]
        if fail:  # exits 0 without writing what it should
            steps.append(Step("f", str(scripts["make"]), [o / "elsewhere.json"], [o / "f.json"]))
        sections = [Section("ImageNet top-1", "b", o / "b.json", [Row("top-1 (%)", "acc.top1", "imagenet_zero_shot_top1")],
                            context={"model": "ViT-B-16", "pretrained": "laion2b_s34b_b88k", "dataset": "imagenet"}),
                    Section("Never made", "d", o / "d.json", [Row("top-1 (%)", "acc.top1")])]
        return steps, sections
    return pipeline, o


def run_fake(monkeypatch, tmp_path, fail: bool, *extra: str) -> tuple[int, dict]:
    """The hand-built pipeline through reproduce.py's main and the subprocess launcher."""
    pipeline, o = fake_pipeline(tmp_path, fail)
    monkeypatch.setitem(plan_module.PIPELINES, "paper1", pipeline)
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
        "g": "skipped: no --waterbirds given (needs e)", "f": "failed: exit 0 but f.json not written"}
    o, report = status["_out"], status["_report"]
    # the steps' output and every skip is said on the console, as they come
    console = capsys.readouterr().out
    assert "this step fails on purpose" in console and "copying" in console
    assert "[d] skipped: needs c\n" in console and "[e] skipped: no --waterbirds given\n" in console
    assert "[g] skipped: no --waterbirds given (needs e)\n" in console
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
    assert "Skipped: d (needs c); e (no --waterbirds given); g (no --waterbirds given (needs e))." in md


def test_runner_reruns_only_what_is_stale(monkeypatch, tmp_path, capsys):
    run_fake(monkeypatch, tmp_path, fail=True)
    code, status = run_fake(monkeypatch, tmp_path, fail=False)  # c fixed: c and d run, a and b are up to date
    assert code == 0
    assert [status[k] for k in "abcdeg"] == ["up to date (skipped)", "up to date (skipped)", "ran", "ran",
                                             "skipped: no --waterbirds given", "skipped: no --waterbirds given (needs e)"]
    o = status["_out"]
    (o / "a.json").write_text(json.dumps({"acc": {"top1": 71.0}}))  # rewritten behind reproduce.py's back
    code, status = run_fake(monkeypatch, tmp_path, fail=False)
    assert [status[k] for k in "abcd"] == ["ran", "ran", "ran", "ran"]
    code, status = run_fake(monkeypatch, tmp_path, False, "--waterbirds", str(tmp_path))
    assert [status[k] for k in "abcdeg"] == ["up to date (skipped)"] * 4 + ["ran", "ran"]


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
    assert {"neuron_prs_L8", "neuron_prs_L10", "sparse_L10"} <= set(p) and "sparse_L9" not in p
    assert p["representations"] == "skipped: no --imagenet given"
    # a skip is carried to every step downstream, with the flag that is missing
    assert p["pcas_L8"] == "skipped: no --imagenet given (needs neuron_prs_L8)"
    assert p["sparse_L10"] == "skipped: no --imagenet given"  # its own data, and pcas_L10's
    assert p["classifier"].startswith("would run") and p["text_embeddings"].startswith("would run")
    # segmentation reads layers 8-10 (Table 4): layer 9, not in --mlp_layers, gets its PCs only for segmentation
    assert p["neuron_prs_L9"] == "skipped: no --imagenet, --imagenet_seg given" and "ablations_L9" not in p
    assert p["segmentation"] == "skipped: no --imagenet_seg, --imagenet given"
    assert p["textspan_segmentation"] == "skipped: no --imagenet_seg given"
    code, out, err = run_inprocess("reproduce.py", "paper2", "--output_dir", str(tmp_path / "run"), "--dry_run",
                                   "--imagenet", str(tmp_path), "--imagenet_seg", str(tmp_path),
                                   "--segmentation_layers", "9")
    p = plan_lines(out)
    assert code == 0 and not any(k.endswith(("L8", "L10")) for k in p), out + err
    assert "--mlp_layers 9 --top_k_pca 100" in p["segmentation"] and "--top_neurons 200" in p["segmentation"]


def test_a_skip_is_carried_downstream_and_said(tmp_path):
    # paper1 without --imagenet: what reads prs is skipped, not planned as "would run"
    code, out, err = run_inprocess("reproduce.py", "paper1", "--output_dir", str(tmp_path / "run"), "--dry_run")
    assert code == 0, err
    p = plan_lines(out)
    assert p["prs"] == "skipped: no --imagenet given"
    assert p["ablations"] == p["textspan"] == "skipped: no --imagenet given (needs prs)"
    assert p["classifier"].startswith("would run") and p["text_embeddings"].startswith("would run")
    # nothing at all can run: each skip said on the console, one line on stderr, status 2, nothing written
    for args, said in [(["splice"], ["[decompose] skipped: no --cifar10 given",
                                      "[decompose_class] skipped: no --cifar10 given (needs decompose)"]),
                       (["paper1", "--steps", "prs,ablations"], ["[prs] skipped: no --imagenet given",
                                                                "[ablations] skipped: no --imagenet given (needs prs)"])]:
        for dry in ([], ["--dry_run"]):
            code, out, err = run_inprocess("reproduce.py", *args, "--output_dir", str(tmp_path / "none"), *dry)
            assert code == 2 and all(line in out.splitlines() for line in said), out
            assert err.strip().splitlines() == [f"reproduce.py: error: nothing to run in {args[0]}: every step needs "
                                                f"data; give --{'cifar10' if args[0] == 'splice' else 'imagenet'}"]
            assert not (tmp_path / "none").exists()


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
    monkeypatch.setitem(plan_module.PIPELINES, "paper1", lambda plan: (
        [Step("x", "compute_not_there.py", [], [tmp_path / "x"])], []))
    args = reproduce.get_args_parser().parse_args(["paper1", "--output_dir", str(tmp_path)])
    args.allow_tf32 = False
    with pytest.raises(InputError, match="needs compute_not_there.py, not in this checkout"):
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


def published_rows(report: dict) -> dict[tuple[str, str], float]:
    """(section title up to its first " (", row) -> the published number, for the rows that have one."""
    return {(s["title"].split(" (")[0], r["quantity"]): r["published"]
            for s in report["sections"] for r in s["rows"] if r["published"] is not None}


def test_preview_shows_the_published_numbers_beside_ours(tmp_path):
    """--preview: REPORT.md's tables for the papers' models, the published column filled, ours "—"; nothing runs
    and nothing is written."""
    code, md, err = run_inprocess("reproduce.py", "paper1", "--preview", "--output_dir", str(tmp_path / "b16"),
                                  "--imagenet", str(tmp_path))
    assert code == 0, err
    assert md.startswith("# paper1: ViT-B-16 (laion2b_s34b_b88k) [preview: nothing has run]\n")
    assert "| zero-shot top-1, no ablation (%) | — | 70.23 | — | [OpenCLIP results table" in md
    assert "| zero-shot top-1, no replacement (%) | — | 70.23 | — |" in md
    assert "| worst group, base (%) | — | 45.60 | — |" in md
    assert "| worst group, spurious heads mean-ablated (%) | — | 57.50 | — |" in md
    assert "| worst group, random heads mean-ablated (mean over sets, %) | — | 52.30 | — |" in md
    assert "| prs | would run |" in md and "| waterbirds_prs | skipped: no --waterbirds given |" in md
    code, md, err = run_inprocess("reproduce.py", "paper2", "--preview", "--output_dir", str(tmp_path / "b32"))
    assert code == 0, err
    assert md.startswith("# paper2: ViT-B-32 (openai) [preview: nothing has run]\n")
    assert "| zero-shot top-1, no ablation (%) | — | 63.32 | — | [OpenCLIP results table" in md
    assert "| every neuron mean-ablated (%) | — | 29.60 | — | [Interpreting the Second-Order Effects" in md
    neurons, textspan = md.split("## Zero-shot segmentation from neurons")[1].split("## Zero-shot segmentation on")
    assert "| pixel accuracy (%) | — | 78.10 |" in neurons and "| mIoU (%) | — | 59.00 |" in neurons
    assert "| mAP (%) | — | 84.90 |" in neurons and "MLP layers 8-10" in neurons
    assert "| pixel accuracy (%) | — | 76.50 |" in textspan and "| mAP (%) | — | 84.10 |" in textspan
    assert not (tmp_path / "b16").exists() and not (tmp_path / "b32").exists()
    # Table 1 is layer 9's, Table 4 layers 8-10 with 200 neurons: other settings are not compared
    other = run_pipeline(Settings("paper2", tmp_path, data={}, mlp_layers=[10], segmentation_layers=[9, 10]),
                         preview=True).report
    assert set(published_rows(other).values()) == {63.32, 76.5, 58.1, 84.1}


def test_every_published_number_a_step_computes_is_in_a_report(tmp_path):
    """Each entry of published_numbers.json appears beside a row of some pipeline run with the paper's settings
    and that entry's model, except the quantities no step of reproduce.py computes."""
    table = load_published()
    shown = []
    runs = [("paper1", m, p) for m, p in [("ViT-B-16", "laion2b_s34b_b88k"), ("ViT-L-14", "laion2b_s32b_b82k"),
                                          ("ViT-H-14", "laion2b_s32b_b79k"), ("ViT-B-32", "openai")]]
    runs += [("paper2", "ViT-B-32", "openai"), ("splice", "open_clip:ViT-B-32", None)]
    for pipeline, model, pretrained in runs:
        report = run_pipeline(Settings(pipeline, tmp_path, model=model, pretrained=pretrained), preview=True).report
        for sec in report["sections"]:
            shown += [(r["published_quantity"], model, r["published"]) for r in sec["rows"]
                      if r["published"] is not None]
    not_computed = {"adversarial_success_per_100", "splice_image_l0", "splice_image_cosine",
                    "indirect_effect_all_neurons_mean_ablated_accuracy", "indirect_effect_first_pc_variance_explained",
                    "second_order_first_pc_variance_explained"}
    expected = {(n["quantity"], n["model"], n["value"]) for n in table["numbers"] if n["quantity"] not in not_computed}
    assert expected <= set(shown), sorted(expected - set(shown))
    assert len(expected) == 27


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
    ident = identity
    a = ["compute_prs.py", "--model", "M", "--device", "cuda:0", "--batch_size=64", "--resume", "--dataset", "x"]
    assert ident(a) == ["compute_prs.py", "--model", "M", "--dataset", "x"]
    assert ident(["/abs/compute_prs.py", "--model", "M", "--dataset", "y"]) != ident(a)
    assert ident(["compute_prs.py", "--model", "M", "--dataset", "x", "--dtype", "float16"]) != ident(a)


def test_an_output_recorded_outside_a_script_is_not_up_to_date(tmp_path, monkeypatch):
    """A record written by library code (a notebook: no command line, ``"command": null``) means the step has not
    run: the check says so instead of reading a command from stdin."""
    from utils.files.provenance import write_provenance
    from utils.reproduce.plan import Step
    from utils.reproduce.runner import up_to_date

    out = tmp_path / "a.npy"
    out.write_bytes(b"x")
    write_provenance(out, {"command": None})
    monkeypatch.setattr(sys, "stdin", io.StringIO("compute_prs.py --model m\n"))
    step = Step("prs", "compute_prs.py", ["--model", "m"], [out])
    assert not up_to_date(step, ["compute_prs.py", "--model", "m"], [], None)
    assert sys.stdin.read() == "compute_prs.py --model m\n"  # untouched
