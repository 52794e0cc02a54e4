"""Running a plan: each step is one of the repository's scripts, run from the repository root as a subprocess.

Running the same plan again:
  - skips a step whose outputs exist, whose provenance records (``<file>.provenance.json``) hold the same command
    (flags that only change speed, ``RUN_ONLY_FLAGS``, are ignored), and which are newer than the outputs of the
    steps it reads (as make does);
  - continues a killed step where it stopped: the streaming steps get ``--resume``;
  - skips a step whose data was not given, and every step downstream of it, saying which flag is missing;
  - skips the steps downstream of a failed one.
A script that writes no record of its own gets one after its step succeeds (``"recorded_by": "reproduce.py"``).
Each step's output goes to ``{output_dir}/logs/{step}.log``. ``run_pipeline`` does all of it and writes the
report; the scripts are never imported (``launch`` runs them; tests may hand in another launcher).
"""
from __future__ import annotations

import datetime as dt
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from utils import LOG, REPO_ROOT
from utils.errors import InputError
from utils.files.atomic import make_output_dir
from utils.files.names import reproduce_paths
from utils.files.provenance import (git_state, make_record, pretrained_identity, provenance_path, read_provenance,
                                    run_key, write_provenance)
from utils.files.rows import StreamingArrays
from utils.reproduce.plan import Plan, Settings, Step, build, select_steps
from utils.reproduce.report import Section, build_section, load_published, render_markdown, write_report
from utils.reproduce.smoke import make_smoke_waterbirds

__all__ = ["RUN_ONLY_FLAGS", "Launcher", "identity", "up_to_date", "record_outputs", "run_subprocess",
           "static_statuses", "execute", "Outcome", "run_pipeline"]

# flags that change how a script runs, not what it computes (value-taking: 1, switch: 0)
RUN_ONLY_FLAGS = {"--device": 1, "--batch_size": 1, "--num_workers": 1, "--chunk": 1, "--chunk_gb": 1,
                  "--solver_batch_size": 1, "--resume": 0, "-device": 1, "-batch_size": 1}
# launch(argv, log) -> exit status: runs ``argv`` (``[python, script, *flags]``) from the repository root, its
# output kept in ``log``
Launcher = Callable[[Sequence[str], Path], int]


def identity(argv: Sequence[str]) -> list[str]:
    """The part of a script's command line that decides its outputs: the script's file name and its flags,
    without ``RUN_ONLY_FLAGS``."""
    out, skip = [Path(argv[0]).name], 0
    for tok in argv[1:]:
        if skip:
            skip -= 1
            continue
        flag = tok.split("=", 1)[0]
        if flag in RUN_ONLY_FLAGS:
            skip = 0 if "=" in tok else RUN_ONLY_FLAGS[flag]
            continue
        out.append(tok)
    return out


def up_to_date(step: Step, argv: Sequence[str], inputs: Sequence[Path], pretrained: Optional[str]) -> bool:
    """Every output exists (no ``.partial`` left), holds a record of the same command (and, for a local
    checkpoint, the same weights), was not rewritten after its record, and is newer than every input."""
    for path in step.outputs:
        if not path.is_file() or StreamingArrays.partial(path).exists():
            return False
        if not step.records:
            continue
        record = read_provenance(path) or {}
        command = record.get("command")  # None: written outside a script (a notebook), so not by this step
        if not command or identity(shlex.split(command)[1:]) != identity(argv):
            return False
        if provenance_path(path).stat().st_mtime < path.stat().st_mtime:
            return False
        if pretrained and Path(pretrained).is_file() and "pretrained" in record and \
                run_key({"pretrained": record["pretrained"]}) != run_key({"pretrained": pretrained_identity(pretrained)}):
            return False
    newest_input = max((q.stat().st_mtime for q in inputs if q.is_file()), default=0.0)
    return min(q.stat().st_mtime for q in step.outputs) >= newest_input


def record_outputs(step: Step, argv: Sequence[str]) -> None:
    """Give each output its script did not record (no record, or one older than the file) a provenance record
    holding the step's command."""
    if not step.records:
        return
    for path in step.outputs:
        own = provenance_path(path)
        if not own.is_file() or own.stat().st_mtime < path.stat().st_mtime:
            record = make_record(recorded_by="reproduce.py")
            record.update(script=step.script, command=shlex.join(["python", *argv]))
            write_provenance(path, record)


def run_subprocess(argv: Sequence[str], log: Path, echo: Optional[Callable[[str], None]] = None) -> int:
    """Run ``argv`` from the repository root, its output (stdout and stderr) kept in ``log`` and, as it comes,
    handed to ``echo``; the exit status."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as f:
        proc = subprocess.Popen(list(argv), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
            f.write(chunk)
            if echo is not None:
                echo(chunk.decode("utf-8", errors="replace"))
        return proc.wait()


def static_statuses(steps: Sequence[Step], data: Mapping[str, Optional[str]],
                    selected: Optional[set[str]] = None) -> dict[str, str]:
    """The steps that cannot run, known before anything runs: ``not selected (--steps)``; ``skipped: no --X given``
    for a step whose data flag is missing; ``skipped: no --X given (needs a, b)`` for every step downstream of
    one (the missing flags carried along). Steps not listed may run."""
    status: dict[str, str] = {}
    missing: dict[str, list[str]] = {}
    for step in steps:
        if not step.chosen(selected):
            status[step.name] = "not selected (--steps)"
            continue
        own = [f for f in step.data if not data.get(f)]
        blocked = [n for n in step.needs if n in missing]
        flags = list(dict.fromkeys(own + [f for n in blocked for f in missing[n]]))
        if flags:
            missing[step.name] = flags
            status[step.name] = f"skipped: no {', '.join('--' + f for f in flags)} given" + \
                ("" if own else f" (needs {', '.join(blocked)})")
    return status


def execute(steps: Sequence[Step], out: Path, data: Mapping[str, Optional[str]], pretrained: Optional[str] = None,
            selected: Optional[set[str]] = None, dry_run: bool = False, fresh: bool = False,
            launch: Launcher = run_subprocess) -> list[dict]:
    """Run (or, with ``dry_run``, describe) the steps in order; one status dict per step (``name``, ``script``,
    ``command``, ``status``, ``seconds``, ``log``). Each step run is announced on the ``prsclip`` logger with its
    command; ``launch`` runs it."""
    by_name = {s.name: s for s in steps}
    static = static_statuses(steps, data, selected)
    status: dict[str, str] = {}
    results = []
    log_dir = reproduce_paths(out)["logs"]
    for step in steps:
        inputs = [q for n in step.needs if n in by_name for q in by_name[n].outputs]
        resume = step.streaming and not fresh and (
            not all(q.is_file() for q in step.outputs) or any(StreamingArrays.partial(q).exists()
                                                              for q in step.outputs))
        argv = step.argv(resume)
        command = shlex.join([sys.executable, *argv])
        entry = {"name": step.name, "script": step.script, "command": command, "seconds": None, "log": None}
        failed = [n for n in step.needs if status.get(n, "").startswith(("failed", "skipped: needs"))]
        if step.name in static:
            entry.update(status=static[step.name], command=None)
        elif failed:
            entry.update(status=f"skipped: needs {', '.join(failed)}", command=None)
        elif not fresh and not any(status.get(n, "").startswith(("ran", "would run")) for n in step.needs) \
                and up_to_date(step, argv, inputs, pretrained):
            entry.update(status="up to date (skipped)")
        elif dry_run:
            entry.update(status="would run" if (REPO_ROOT / step.script).is_file() else "would run: script missing")
        else:
            LOG.info(f"\n[{step.name}] {command}")
            log_dir.mkdir(parents=True, exist_ok=True)
            log = log_dir / f"{step.name}.log"
            start = time.time()
            code = launch([sys.executable, *argv], log)
            entry.update(seconds=round(time.time() - start, 1), log=os.path.relpath(log, out))
            absent = [q.name for q in step.outputs if not q.is_file()]
            if code == 0 and not absent:
                record_outputs(step, argv)
            entry["status"] = "ran" if code == 0 and not absent else f"failed (exit {code})" if code else \
                f"failed: exit 0 but {', '.join(absent)} not written"
        if not dry_run and entry["status"].startswith(("skipped", "up to date", "failed")):
            LOG.info(f"[{step.name}] {entry['status']}")
        status[step.name] = entry["status"]
        results.append(entry)
    return results


@dataclass
class Outcome:
    """What ``run_pipeline`` did: the ``plan``, one status dict per step (``steps``), the report (``None`` for a
    dry run), REPORT.md's text, the files written and the steps that failed."""
    plan: Plan
    steps: list[dict]
    report: Optional[dict] = None
    markdown: Optional[str] = None
    written: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def make_report(plan: Plan, steps: Sequence[Step], results: Sequence[dict], sections: Sequence[Section],
                command: str, preview: bool = False) -> dict:
    """The report (what report.json holds) of a run whose ``steps`` ended as ``results``: our numbers from the
    result files there are, beside the published ones, and the data the steps were given."""
    status = {r["name"]: r["status"] for r in results}
    used = {f for s in steps for f in s.data}
    table = load_published()
    title = f"{plan.pipeline}: {plan.model}" + (f" ({Path(plan.pretrained).name})" if plan.pretrained else "") + \
        (" [smoke test]" if plan.smoke else "") + (" [preview: nothing has run]" if preview else "")
    return {"title": title, "pipeline": plan.pipeline, "model": plan.model, "pretrained": plan.pretrained,
            "smoke": plan.smoke, "preview": preview, "command": command, "output_dir": str(plan.out),
            "data": {k: v for k, v in plan.data.items() if v and k in used}, "repository": str(REPO_ROOT),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": git_state()[0],
            "steps": list(results),
            "sections": [build_section(s, table, status.get(s.step, "was not run"), plan.out) for s in sections]}


def run_pipeline(settings: Settings, steps: Optional[str] = None, *, dry_run: bool = False, fresh: bool = False,
                 preview: bool = False, launch: Launcher = run_subprocess, command: str = "") -> Outcome:
    """Plan ``settings``, run its steps (``steps``: ``--steps``' comma-separated names; ``dry_run``: only say what
    would run; ``preview``: that, and the report as it would be, not written; ``fresh``: rerun everything), and
    write REPORT.md and report.json (``command``: the command line they show).

    Raises ``InputError`` before anything runs when nothing can: every chosen step lacks its data (each such
    step is announced on the ``prsclip`` logger first); or, outside a dry run, a script is missing.
    """
    plan, all_steps, sections = build(settings)
    selected = select_steps(all_steps, steps, settings.pipeline)
    plan.check_data()
    static = static_statuses(all_steps, plan.data, selected)
    chosen = [s for s in all_steps if s.chosen(selected)]
    if not preview and all(s.name in static for s in chosen):
        for s in chosen:
            LOG.info(f"[{s.name}] {static[s.name]}")
        flags = sorted({f for s in chosen for f in s.data if not plan.data.get(f)})
        raise InputError(f"nothing to run in {settings.pipeline}: every step needs data; give "
                         f"{' or '.join('--' + f for f in flags)}")
    missing = sorted({s.script for s in chosen if s.name not in static and not (REPO_ROOT / s.script).is_file()})
    if missing and not (dry_run or preview):
        raise InputError(f"{settings.pipeline} needs {', '.join(missing)}, not in this checkout; leave its steps "
                         f"out with --steps")
    if not (dry_run or preview):
        make_output_dir(plan.out)
        if plan.smoke and plan.data.get("waterbirds") and any(s.chosen(selected) and "waterbirds" in s.data
                                                               for s in all_steps):
            make_smoke_waterbirds(plan.data["waterbirds"])
    results = execute(all_steps, plan.out, plan.data, plan.pretrained, selected, dry_run or preview, fresh, launch)
    if dry_run and not preview:
        return Outcome(plan, results)
    report = make_report(plan, all_steps, results, sections, command, preview)
    outcome = Outcome(plan, results, report, render_markdown(report),
                      failed=[r["name"] for r in results if r["status"].startswith("failed")])
    if not preview:
        outcome.written = list(write_report(plan.out, report))
    return outcome
