"""The one source of current figures: benchmarks/results.json, and `record()`, which a benchmark calls to
write its figure there.

    from results import record
    record("storage.read_k32", area="storage", what="cache read, K = 32, one thread, checksums on",
           values={"zarr": 1.53, "arrow": 1.42}, unit="M positions/s", goal="≥ 1", met=True)

An entry is one figure (several values when one run measures variants of it side by side):
    id       stable name; the renderer and the docs refer to it
    area     storage | stage one | stage two | losses | demo | tests
    what     what was measured, and against which yardstick
    values   {label: number}, or {row: {column: number}} for a table; null where it was not measured
    unit     the values' unit (a ratio says of what)
    goal     the goal as written in the issue, or null
    met      true, false, or null (no goal, or not measured)
    command  the exact command that reruns it, or null where it is not known (notes say why)
    machine  where it ran;  date: the UTC day it was measured (or recorded)
    notes    what disappoints, and what to keep in mind when reading it
    readme   true: the README's performance table shows it
record() replaces the fields it is given and keeps the others (what, goal, readme, older notes unless new
ones are given). `make results` then renders RESULTS.md's "Current figures" and the README's table
(benchmarks/render_results.py); review the diff of results.json before committing it. LOGITCACHE_RESULTS=PATH
sends a trial run's figures to another file.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

PATH = Path(os.environ.get("LOGITCACHE_RESULTS", Path(__file__).with_name("results.json")))
FIELDS = ("id", "area", "what", "values", "unit", "goal", "met", "command", "machine", "date", "notes", "readme")


def load(path: Path | None = None) -> list[dict]:
    return json.loads(Path(path or PATH).read_text())["figures"]


def save(figures: list[dict], path: Path | None = None) -> None:
    path = Path(path or PATH)
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc["figures"] = [{k: f.get(k) for k in FIELDS} for f in figures]
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def machine() -> str:
    """This machine in a few words: CPU, cores, memory, GPU, torch."""
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB"
    except (ValueError, OSError):
        mem = ""
    try:
        import torch
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        versions = f"torch {torch.__version__}"
    except ImportError:
        gpu, versions = "GPU unknown", "no torch"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores{mem}, {gpu}, Python {platform.python_version()}, {versions}"


def this_command() -> str:
    """The command line that ran this process, as a user types it from the checkout's root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        pass
    return shlex.join([".venv/bin/python", str(script), *sys.argv[1:]])


def record(id: str, *, values, **fields) -> dict:
    """Write figure `id` into the results file: `values` and any FIELDS given; command, machine and date
    default to this run's. Returns the entry."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise TypeError(f"record(): unknown fields {sorted(unknown)}")
    figures = load() if PATH.exists() else []
    entry = next((f for f in figures if f["id"] == id), None)
    if entry is None:
        if not {"what", "area"} <= set(fields):
            raise TypeError(f"record(): {id} is a new figure: give its `what` and `area` too")
        entry = {"id": id}
        figures.append(entry)
    entry.update(values=values, command=this_command(), machine=machine(),
                 date=datetime.datetime.now(datetime.timezone.utc).date().isoformat())
    entry.update(fields)
    save(figures)
    print(f"recorded {id} in {PATH}: {values}", flush=True)
    return entry
