"""A pytest plugin that reports CPU seconds (user + sys, this process and its reaped children) per test file.

Wall-clock durations mean little on a shared machine; CPU time does not grow when other jobs load it.

    .venv/bin/python -m pytest -p cpu_time tests/stages/precompute/test_precompute.py     # a table at the end

Children's time counts once they have exited and been waited for (CLI subprocesses, torchrun,
a vLLM engine process at close); Ray's worker processes are reaped by Ray's own daemons, so a
Ray test's actors are not counted. `CPU_TIME_JSON=path` also writes every test's
{"nodeid": [cpu s, wall s]} there, to pick the `slow` marks from (see the Makefile's test budget).
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import defaultdict

_totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # file -> [cpu s, wall s, tests]
_slowest: list[tuple[float, float, str]] = []


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def pytest_runtest_protocol(item, nextitem):
    item._cpu_start = (_cpu(), time.monotonic())


def pytest_runtest_makereport(item, call):
    if call.when != "teardown" or not hasattr(item, "_cpu_start"):
        return
    cpu0, wall0 = item._cpu_start
    cpu, wall = _cpu() - cpu0, time.monotonic() - wall0
    entry = _totals[item.nodeid.split("::")[0]]
    entry[0] += cpu
    entry[1] += wall
    entry[2] += 1
    _slowest.append((cpu, wall, item.nodeid))


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if not _totals:
        return
    tr.section("CPU seconds per file (user+sys, incl. reaped children; fixtures count in the first test using them)")
    for path, (cpu, wall, n) in sorted(_totals.items(), key=lambda kv: -kv[1][0]):
        tr.write_line(f"{cpu:8.1f} cpu {wall:8.1f} wall {n:4d} tests  {path}")
    tr.write_line(f"{sum(v[0] for v in _totals.values()):8.1f} cpu {sum(v[1] for v in _totals.values()):8.1f} "
                  f"wall  total (pid {os.getpid()})")
    tr.section("slowest tests by CPU")
    for cpu, wall, nodeid in sorted(_slowest, reverse=True)[:25]:
        tr.write_line(f"{cpu:8.1f} cpu {wall:8.1f} wall  {nodeid}")
    if os.environ.get("CPU_TIME_JSON"):
        with open(os.environ["CPU_TIME_JSON"], "w") as f:
            json.dump({nodeid: [cpu, wall] for cpu, wall, nodeid in _slowest}, f, indent=0)
