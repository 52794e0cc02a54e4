"""REPORT.md and report.json: our numbers beside the published ones, one table per experiment.

A report is a plain dict (what ``report.json`` holds); ``render_markdown`` turns it into REPORT.md, so the two
always say the same thing. An experiment is a ``Section``: the result file a script writes, and ``Row`` s that
pick a number out of it (a dotted key into its JSON) and name the published quantity it is compared with.
Published numbers live in ``utils/data/published_numbers.json``, each with its source; a quantity with no
entry for the model (and dataset, setting) is shown as "—", never guessed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from utils import DATA_DIR
from utils.files.atomic import atomic_write_json, atomic_write_text
from utils.files.names import reproduce_paths

__all__ = ["PUBLISHED_NUMBERS", "Row", "Section", "load_published", "find_published", "build_section",
           "render_markdown", "write_report", "read_key_values"]

PUBLISHED_NUMBERS = DATA_DIR / "published_numbers.json"
DASH = "—"


@dataclass
class Row:
    """One line of a table: ``label``, the dotted ``key`` of our number in the result, the published ``quantity``
    it is compared with (``None``: nothing published), ``scale`` (e.g. 100 for a fraction shown in %), and
    the ``decimals`` shown."""
    label: str
    key: str
    quantity: Optional[str] = None
    scale: float = 1.0
    decimals: int = 2


@dataclass
class Section:
    """One experiment: the ``result`` file of ``step``, read by ``read`` (JSON by default), its ``rows``, the
    ``figures`` (images, shown) and ``files`` (linked) the scripts write, and the ``context`` the published numbers
    are matched on (``model``, ``pretrained``, ``dataset``, settings)."""
    title: str
    step: str
    result: Path
    rows: Sequence[Row]
    figures: Sequence[Path] = ()
    files: Sequence[Path] = ()
    context: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""
    read: Callable[[Path], Any] = lambda p: json.loads(Path(p).read_text())


def load_published(path: str | Path = PUBLISHED_NUMBERS) -> dict:
    """The published numbers: ``{"sources": {...}, "numbers": [{quantity, model, ..., value, source, where}]}``."""
    return json.loads(Path(path).read_text())


MATCH_FIELDS = ("quantity", "value", "unit", "source", "where")


def find_published(table: Mapping, quantity: Optional[str], context: Mapping[str, Any]) -> Optional[dict]:
    """The entry for ``quantity`` whose identifying fields (every field but ``MATCH_FIELDS``) all equal
    ``context``'s; ``None`` when there is none."""
    if quantity is None:
        return None
    for entry in table["numbers"]:
        if entry["quantity"] != quantity:
            continue
        if all(context.get(k) == v for k, v in entry.items() if k not in MATCH_FIELDS):
            return entry
    return None


def _dig(data: Any, key: str) -> Optional[float]:
    for part in key.split("."):
        if not isinstance(data, Mapping) or data.get(part) is None:
            return None
        data = data[part]
    return float(data) if isinstance(data, (int, float)) else None


def read_key_values(path: str | Path) -> dict[str, float]:
    """``{label: number}`` from the lines ``Label: <tab> number`` of a text result (SpLiCE's format)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        label, sep, value = line.rpartition(":")
        try:
            out[label.strip()] = float(value)
        except ValueError:
            continue
    return out


def build_section(section: Section, table: Mapping, step_status: str, report_dir: str | Path) -> dict:
    """The report entry of one experiment: rows of (quantity, ours, published, difference, source), and the
    figures and files that exist, as paths relative to ``report_dir``. ``step_status`` says why there is no
    result when the file is missing."""
    data = section.read(section.result) if Path(section.result).is_file() else None
    rows = []
    for row in section.rows:
        ours = _dig(data, row.key) if data is not None else None
        ours = None if ours is None else ours * row.scale
        pub = find_published(table, row.quantity, section.context)
        published = None if pub is None else pub["value"]
        rows.append({"quantity": row.label, "published_quantity": row.quantity, "ours": ours, "published": published,
                     "difference": None if ours is None or published is None else ours - published,
                     "decimals": row.decimals,
                     "source": None if pub is None else f"{table['sources'][pub['source']]['title']}: {pub['where']}",
                     "source_url": None if pub is None else table["sources"][pub["source"]].get("url")})
    rel = lambda p: os.path.relpath(p, report_dir)  # noqa: E731
    note = section.note if data is not None else f"no result ({Path(section.result).name}): step " \
                                                 f"'{section.step}' {step_status}"
    return {"title": section.title, "step": section.step, "result": rel(section.result) if data is not None else None,
            "note": note, "rows": rows,
            "figures": [rel(p) for p in section.figures if Path(p).is_file()],
            "files": [rel(p) for p in section.files if Path(p).exists()]}


def _number(value: Optional[float], decimals: int, signed: bool = False) -> str:
    if value is None:
        return DASH
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def render_markdown(report: Mapping) -> str:
    """REPORT.md from the report dict (the content of report.json)."""
    lines = [f"# {report['title']}", ""]
    lines += [f"- {k}: `{report[k]}`" for k in ("command", "output_dir", "created", "git_commit") if report.get(k)]
    if report.get("data"):
        lines.append("- data: " + ", ".join(f"`--{k} {v}`" for k, v in report["data"].items()))
    skipped = [s for s in report["steps"] if s["status"].startswith("skipped")]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{s['name']} ({s['status'].removeprefix('skipped: ')})" for s in skipped) + "."]
    lines += ["", "## Steps", "", "| step | status | seconds | log |", "| --- | --- | --- | --- |"]
    for s in report["steps"]:
        seconds = DASH if s.get("seconds") is None else f"{s['seconds']:.1f}"
        log = f"[log]({s['log']})" if s.get("log") else DASH
        lines.append(f"| {s['name']} | {s['status']} | {seconds} | {log} |")
    lines += ["", f"Commands, run from the repository root (`{report['repository']}`):", "", "```"]
    lines += [s["command"] for s in report["steps"] if s.get("command")]
    lines += ["```", ""]
    for sec in report["sections"]:
        lines += [f"## {sec['title']}", ""]
        if sec["note"]:
            lines += [sec["note"], ""]
        lines += ["| quantity | ours | published | difference | source |", "| --- | --- | --- | --- | --- |"]
        for r in sec["rows"]:
            source = DASH if r["source"] is None else (f"[{r['source']}]({r['source_url']})" if r["source_url"]
                                                         else r["source"])
            lines.append(f"| {r['quantity']} | {_number(r['ours'], r['decimals'])} | "
                         f"{_number(r['published'], r['decimals'])} | {_number(r['difference'], r['decimals'], True)} "
                         f"| {source} |")
        lines.append("")
        if sec["result"]:
            lines += [f"Result: [{sec['result']}]({sec['result']})", ""]
        lines += [f"- [{f}]({f})" for f in sec["files"]] + ([""] if sec["files"] else [])
        lines += [f"![{sec['title']}]({f})" for f in sec["figures"]] + ([""] if sec["figures"] else [])
    return "\n".join(lines).rstrip() + "\n"


def write_report(output_dir: str | Path, report: Mapping) -> tuple[Path, Path]:
    """Write ``REPORT.md`` and ``report.json`` (the same content) into ``output_dir``, atomically."""
    paths = reproduce_paths(output_dir)
    atomic_write_json(paths["report_json"], report)
    atomic_write_text(paths["report"], render_markdown(report))
    return paths["report"], paths["report_json"]
