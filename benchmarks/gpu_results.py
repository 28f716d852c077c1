"""report.json of the GPU check -> markdown: the report's own report.md, and the GPU section of
benchmarks/RESULTS.md (written from the JSON by this script, never by hand).

    python benchmarks/gpu_results.py DIR/report.json                 # replace RESULTS.md's GPU section
    python benchmarks/gpu_results.py FIRST/report.json RERUN/report.json   # a rerun's parts replace the first's
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402  (the one table renderer; it imports torch only where it measures)

BEGIN = "<!-- gpu-check:begin (written by benchmarks/gpu_results.py from report.json; do not edit) -->"
END = "<!-- gpu-check:end -->"
COMMAND = "bash benchmarks/gpu_check.sh --out $OUT/gpu"
# part fields shown as "name: value" lines, in this order (rows become a table, text a code block)
FIELDS = ("claim", "reason", "device", "selection", "counts", "failed", "skip_reasons", "default_memory_budget",
          "ratios", "crossover", "note", "file")


def table(rows) -> str:
    """The part's rows as one table: every plain field any row has, in order of appearance."""
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
    return harness.table(rows, [(c, lambda r, c=c: _cell(r.get(c, ""))) for c in cols]) + "\n"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.4g}"
    return str(v)


def render_part(name: str, part: dict, level: str = "##") -> str:
    md = [f"{level} {name}: {part.get('status')} ({part.get('seconds', '?')} s)\n"]
    for key in FIELDS:
        value = part.get(key)
        if value not in (None, "", [], {}):
            md.append(f"- {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if part.get("text"):
        md.append(f"\n```\n{part['text'].rstrip()}\n```")
    if part.get("rows"):
        md.append("\n" + table(part["rows"]))
    for key in ("tail", "traceback"):
        if part.get(key):
            md.append(f"\n```\n{part[key][-1500:].rstrip()}\n```")
    return "\n".join(md) + "\n"


def header(report: dict) -> str:
    mode = " (smoke: tiny sizes on the CPU)" if report.get("smoke") else ""
    return (f"Device: {report.get('device', 'unknown')}; torch {report.get('torch', '?')}; {report.get('date')}{mode}; "
            f"deadline {report.get('deadline_s')} s for the parts, {report.get('elapsed_s', '?')} s used.\n")


def render(report: dict) -> str:
    """report.md: every part with its status, figures and tables."""
    md = ["# prg_fast GPU report\n", header(report), render_part("build", report.get("build", {}))]
    md += [render_part(name, part) for name, part in report.get("parts", {}).items()]
    return "\n".join(md)


def results_section(report: dict) -> str:
    """The GPU section of RESULTS.md (between the markers)."""
    statuses = ", ".join(f"{n}: {p.get('status')}" for n, p in report.get("parts", {}).items())
    md = [BEGIN, "## GPU check (benchmarks/gpu_check.sh)\n", f"Command: `{COMMAND}`. " + header(report),
          f"Build: {report.get('build', {}).get('status')}; parts: {statuses}.\n"]
    md += [render_part(name, part, "###") for name, part in report.get("parts", {}).items() if name != "info"]
    md.append(END)
    return "\n".join(md) + "\n"


def replace_section(text: str, section: str) -> str:
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + section.rstrip("\n") + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + section


def merge(reports) -> dict:
    """One report from a run and its reruns (`--only PART...`): each later report's parts replace
    the earlier ones of the same name; the header says which runs it comes from."""
    merged = dict(reports[0], parts=dict(reports[0].get("parts", {})))
    for later in reports[1:]:
        merged["parts"].update(later.get("parts", {}))
        merged["date"] = f"{merged.get('date')}, rerun {later.get('date')} ({', '.join(later.get('parts', {}))})"
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+", help="report.json of benchmarks/gpu_check.sh (then of its reruns)")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = ap.parse_args(argv)
    reports = []
    for path in args.reports:
        with open(path) as f:
            reports.append(json.load(f))
    section = results_section(merge(reports))
    with open(args.results) as f:
        text = f.read()
    with open(args.results, "w") as f:
        f.write(replace_section(text, section))
    print(f"wrote the GPU section of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
