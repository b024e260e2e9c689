"""Render the docs' figures from benchmarks/results.json, or check that they agree with it.

    .venv/bin/python benchmarks/render_results.py           # rewrite the marked blocks (`make results`)
    .venv/bin/python benchmarks/render_results.py --check   # exit 1, naming the file, where a block differs

A block sits between `<!-- results:NAME begin -->` and `<!-- results:NAME end -->` in README.md or
benchmarks/RESULTS.md. NAME is `current-figures` (every figure, its rerun command and notes),
`readme-performance` (the figures marked `readme`), or `table:ID` (figure ID's {row: {column: value}} as a
table; RESULTS.md has one for every such figure). Text outside the blocks is the docs' own; a figure is changed in results.json, never in a doc.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "benchmarks/RESULTS.md")
BLOCK = re.compile(r"(<!-- results:(\S+) begin -->\n)(.*?)(<!-- results:\2 end -->)", re.S)
STATUS = {True: "met", False: "**missed**", None: "–"}


def number(v) -> str:
    return "not measured" if v is None else format(v, ",.6g") if isinstance(v, (int, float)) else str(v)


def is_table(values) -> bool:
    return isinstance(values, dict) and any(isinstance(v, dict) for v in values.values())


def measured(f: dict) -> str:
    """The values and unit in one cell: `0.95 × bare`, `zarr: 1.06; arrow: 0.96 B/entry`."""
    values = f["values"]
    if values is None:
        return "not measured"
    if is_table(values):
        return f"a table of {len(values)} rows, in its section below"
    text = "; ".join(number(v) if len(values) == 1 else f"{k}: {number(v)}" for k, v in values.items())
    return f"{text} {f['unit']}".strip()


def table(values: dict) -> list[str]:
    columns = list(dict.fromkeys(c for row in values.values() for c in row))
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(number(row.get(c)) if c in row else "–" for c in columns) + " |"
              for name, row in values.items()]
    return lines


def current_figures(figures: list[dict]) -> list[str]:
    lines = ["| figure | what | measured | goal | status | date |", "|---|---|---|---|---|---|"]
    lines += [f"| `{f['id']}` | {f['what']} | {measured(f)} | {f['goal'] or '–'} | "
              f"{STATUS[f['met']] if f['values'] is not None else 'not measured'} | {f['date'] or '–'} |"
              for f in figures]
    lines += ["", "Each figure's rerun command, machine and notes:", ""]
    for f in figures:
        rerun = f"rerun: `{f['command']}`" if f["command"] else "rerun: the exact command is not known"
        lines.append(f"- **`{f['id']}`**, {rerun}; machine: {f['machine'] or 'not recorded'}. {f['notes'] or ''}".rstrip())
    return lines


def readme_performance(figures: list[dict]) -> list[str]:
    lines = ["| what | measured | goal |", "|---|---|---|"]
    for f in (f for f in figures if f["readme"]):
        goal = f["goal"] or "–"
        if f["values"] is None:
            goal += ": not measured"
        elif f["met"] is not None:
            goal += ": met" if f["met"] else ": **missed**"
        lines.append(f"| {f['what']} | {measured(f)} | {goal} |")
    return lines


def render_block(name: str, figures: list[dict]) -> str:
    by_id = {f["id"]: f for f in figures}
    if name == "current-figures":
        lines = current_figures(figures)
    elif name == "readme-performance":
        lines = readme_performance(figures)
    elif name.startswith("table:") and is_table(by_id.get(name[6:], {}).get("values")):
        lines = table(by_id[name[6:]]["values"])
    else:
        raise SystemExit(f"render_results: unknown block {name!r} (no figure with a table of that id?)")
    return "\n".join(lines) + "\n"


def render(text: str, figures: list[dict]) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render_block(m.group(2), figures) + m.group(4), text)


def check_figures(figures: list[dict]) -> None:
    ids = [f["id"] for f in figures]
    if len(ids) != len(set(ids)):
        raise SystemExit(f"render_results: duplicate ids in results.json: {sorted({i for i in ids if ids.count(i) > 1})}")
    for f in figures:
        if not (f.get("what") and f.get("area")) or f.get("met") not in (True, False, None) \
                or not isinstance(f.get("values"), (dict, type(None))):
            raise SystemExit(f"render_results: figure {f.get('id')}: needs `what` and `area`, met true/false/null, "
                             "values a dict or null")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 where a doc disagrees")
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose docs and results.json to use")
    args = ap.parse_args(argv)
    figures = json.loads((args.root / "benchmarks" / "results.json").read_text())["figures"]
    check_figures(figures)
    tables = {f"table:{f['id']}" for f in figures if is_table(f["values"])}
    missing = tables - {m.group(2) for m in BLOCK.finditer((args.root / DOCS[1]).read_text())}
    if missing:
        raise SystemExit(f"render_results: {DOCS[1]} has no block for {sorted(missing)}")
    stale = []
    for doc in DOCS:
        path = args.root / doc
        text = path.read_text()
        if not BLOCK.search(text):
            raise SystemExit(f"render_results: {doc} has no <!-- results:NAME begin --> block")
        new = render(text, figures)
        if new != text:
            stale.append(doc)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"render_results: {', '.join(stale)} disagree with benchmarks/results.json; run `make results`",
              file=sys.stderr)
        return 1
    if stale:
        print(f"render_results: rewrote {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
