"""The demo as a user runs it, timed from scratch, and its held-out figures recorded in results.json.

    .venv/bin/python benchmarks/bench_demo.py              # `make demo`: the full preset, ~15 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_demo.py --quick      # `make demo QUICK=1`
    .venv/bin/python benchmarks/bench_demo.py --keep DIR   # and keep the demo's output (report.md) in DIR

Runs `python -m logitcache.pipeline.demo [--quick] --out DIR` in a fresh temporary folder (the demo
reuses finished steps, so a rerun in a used folder times nothing), takes the whole process tree's wall
and user CPU time, then reads the report.json the demo writes: every model's held-out figures and the
paired differences (`demo.full.models`, `demo.full.paired`; `--quick` records its wall time only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import record


def models_table(rows: list[dict]) -> dict:
    table = {}
    for r in rows:
        cells = {"ppl": r["perplexity"] and round(r["perplexity"], 2), "accuracy": r["accuracy"] and round(r["accuracy"], 3),
                 "± s.e.": r["accuracy_se"] and round(r["accuracy_se"], 3),
                 "agreement": r["agreement"] and round(r["agreement"], 3), "ECE": r["ece"] and round(r["ece"], 3)}
        table[f"{r['model']} ({r['params'] / 1e6:.2f}M)"] = {k: v for k, v in cells.items() if v is not None}
    return table


def paired_table(rows: list[dict]) -> dict:
    table = {}
    for r in rows:
        cells = {}
        for key, name, se in (("accuracy", "Δ accuracy", "s.e. acc"), ("nll", "Δ nll (nats)", "s.e. nll"),
                              ("agreement", "Δ agreement", "s.e. agr")):
            if key in r:
                cells[name], cells[se] = round(r[key], 4), round(r[key + "_se"], 4)
        table[f"{r['model']} − {r['baseline']}"] = cells
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick preset (make demo QUICK=1)")
    ap.add_argument("--keep", metavar="DIR", help="run in DIR, a new folder, and keep the demo's output there")
    a = ap.parse_args()
    preset = "quick" if a.quick else "full"
    if a.keep and Path(a.keep).exists():
        ap.error(f"--keep {a.keep}: exists; the demo reuses finished steps, so the time would count nothing")
    with (contextlib.nullcontext(a.keep) if a.keep else tempfile.TemporaryDirectory(prefix="bench-demo-")) as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "logitcache.pipeline.demo", *(["--quick"] if a.quick else []),
                        "--out", out], check=True)
        wall = time.perf_counter() - t0
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
        report = json.loads((Path(out) / preset / "report.json").read_text())
    limit = 180 if a.quick else 1200
    load = "load average {:.1f} {:.1f} {:.1f} at the end".format(*os.getloadavg())
    record(f"demo.{preset}.wall", values={"wall": round(wall), "user CPU": round(cpu)}, met=wall <= limit,
           what=f"`make demo{' QUICK=1' if a.quick else ''}`, from scratch", area="demo", unit="s",
           goal=f"≤ {limit // 60} min ({limit:,} s)", notes=f"Timed by bench_demo.py in a fresh folder; {load}.")
    if a.quick:
        return  # the headline tables are the full preset's
    mass = report["topk_mass"].get("cache_heldout") or {}
    record("demo.full.models", values=models_table(report["models"]),
           notes=f"The teacher's top-{mass.get('k')} holds a median {mass.get('p50', 0):.3f} of its probability on "
                 f"held-out positions (10th percentile {mass.get('p10', 0):.3f}). One seed.")
    record("demo.full.paired", values=paired_table(report["paired"]), notes="One seed.")


if __name__ == "__main__":
    main()
