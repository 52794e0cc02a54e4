"""One markdown table from a ``bench/gpu_check.sh`` run folder: the CUDA tests' counts and each benchmark's figures.

Reads ``status.tsv`` (one line per step: name, status, seconds, command), ``pytest.xml`` (JUnit) and the
``<name>.json`` each benchmark wrote with ``--json``. A benchmark without a JSON file (or one this script does
not know) still gets a row with its status and, for unknown JSON, its top-level numbers.

    python bench/gpu_summary.py gpu_check/20250101-120000
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TARGETS = {"prs": "≥ 0.8× plain", "spatial": "≥ 0.5× plain", "segmentation (sum mode)": "≥ 0.5× plain",
           "second_order": "≥ 50×", "omp": "≥ 10×", "textspan": "≥ 10×", "splice": "≥ 20×"}


def _x(v: float) -> str:
    return f"{v:.2f}×" if v < 10 else f"{v:.1f}×"


def rows_prs(res: dict) -> list[tuple[str, str, str]]:
    out = []
    for mode, r in res["results"].items():
        value = f"{r['images_per_s']:.1f} images/s"
        if "ratio_vs_plain" in r:
            value += f" ({_x(r['ratio_vs_plain'])} plain)"
        if "peak_gib" in r:
            value += f", peak {r['peak_gib']:.2f} GiB"
        out.append((mode, value, TARGETS.get(mode, "")))
    return out


def rows_omp(res: dict) -> list[tuple[str, str, str]]:
    out = [(f"ours, {res['args']['atoms']:,} atoms", f"{res['ours_full_s']:.1f} s", "")]
    if "ratio_full" in res:
        out.append(("vs scikit-learn (measured)", _x(res["ratio_full"]), TARGETS["omp"]))
    else:
        out.append((f"vs scikit-learn at {res['ratio_measured_atoms']:,} atoms (measured)",
                    _x(res["ratio_measured"]), ""))
        out.append((f"vs scikit-learn at {res['args']['atoms']:,} atoms (extrapolated)",
                    _x(res["ratio_full_estimate"]), TARGETS["omp"]))
    checks = [r["check"]["same_support_fraction"] for r in res.get("sklearn", {}).values()]
    if checks:
        out.append(("same supports as scikit-learn", f"{100 * min(checks):.0f} %", "100 %"))
    return out


def rows_second_order(res: dict) -> list[tuple[str, str, str]]:
    ips = res["images_per_s"]
    return [("batched", f"{ips['batched']:.1f} images/s", ""),
            ("vs the original's per-(layer, head) loop", _x(res["speedup"]), TARGETS["second_order"]),
            ("max abs difference", f"{res['max_abs_diff']:.1e} (values up to {res['max_abs_value']:.2f})", "")]


def rows_segmentation(res: dict) -> list[tuple[str, str, str]]:
    return [(name, f"{v:.1f} images/s ({_x(res['ratio_vs_plain'][name])} plain)", TARGETS.get(name, ""))
            for name, v in res["images_per_s"].items()]


def rows_textspan(res: dict) -> list[tuple[str, str, str]]:
    scaled = f" (NumPy side scaled from {' and '.join(res['numpy_scaled_from'])})" if res["numpy_scaled_from"] else ""
    return [("batched, all heads", f"{res['batched_s']['total']:.1f} s", ""),
            ("vs a NumPy port" + scaled, _x(res["ratio"]), TARGETS["textspan"]),
            ("same texts as the port", str(res["texts_agree"]), "True")]


def rows_splice(res: dict) -> list[tuple[str, str, str]]:
    p, n = res["problem"], res["problem"]["images"]
    out = [(f"skl (CPU, {p['threads']} thread(s)), {n} images", f"{res['seconds']['skl']['median']:.2f} s", "")]
    for name, ratio in res["speedup_vs_skl"].items():
        c = res["checks_vs_skl"][name]
        out.append((f"{name} ({p['device']}) vs skl", f"{_x(ratio)}, same supports {c['same_support_images']}/{n}, "
                    f"KKT {c['kkt_max']:.1e}", TARGETS["splice"] if name == "active_set" else ""))
    return out


def rows_generic(res: dict) -> list[tuple[str, str, str]]:
    return [(k, f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/"), "") for k, v in res.items()
            if isinstance(v, (int, float, bool, str)) and k != "args"]


READERS = {"prs": rows_prs, "omp": rows_omp, "second_order": rows_second_order, "segmentation": rows_segmentation,
           "textspan": rows_textspan, "splice": rows_splice}


def test_counts(xml: Path) -> str:
    if not xml.exists():
        return "no results (pytest.xml missing)"
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"


def summary(run_dir: Path) -> str:
    lines = ["| step | figure | value | target | status |", "|---|---|---|---|---|"]
    for entry in (run_dir / "status.tsv").read_text().splitlines():
        name, status, seconds, command = entry.split("\t", 3)
        state = status if status.startswith("skipped") else f"{status} ({float(seconds):.0f} s)"
        if name == "tests":
            lines.append(f"| `{command}` | CUDA tests | {test_counts(run_dir / 'pytest.xml')} | all pass | {state} |")
            continue
        path = run_dir / f"{name}.json"
        kind = name.split("-", 1)[0]
        rows = []
        if status == "ok" and path.exists():
            res = json.loads(path.read_text())
            try:
                rows = READERS.get(kind, rows_generic)(res)
            except (KeyError, TypeError):  # a benchmark whose JSON changed: show what it has
                rows = rows_generic(res)
        if not rows:
            rows = [("", "" if status.startswith("skipped") else f"see {name}.log", "")]
        for i, (figure, value, target) in enumerate(rows):
            step = f"`{command}`" if i == 0 else ""
            lines.append(f"| {step} | {figure} | {value} | {target} | {state if i == 0 else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(summary(Path(sys.argv[1])), end="")
