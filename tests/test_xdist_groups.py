"""`make test`'s two workers keep each group on one worker (`pytest -n 2 --dist loadgroup`).

    .venv/bin/python -m pytest tests/test_xdist_groups.py -m slow     # ~40 s: two workers collect test_engines.py

tests/conftest.py marks the tests of a costly session fixture (the vLLM engines, ...) with an
`xdist_group`, and xdist sends a group to one worker. Both halves failed silently before: the
marks were added after xdist had read them (conftest's hook now runs first), and pytest 9.2's
structured node ids drop the group that pytest-xdist 3.8 appends (pyproject pins pytest < 9.2).
Either way each worker built both vLLM engines (~110 s of set-up each), and torchrun and Ray
tests could run at once. This runs the real suite's vLLM tests dry (a plugin skips every test
before its fixtures are set up, so no engine starts) and asserts where each ran.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRY_RUN = '''
import os
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    pytest.skip(f"dry run on {os.environ['PYTEST_XDIST_WORKER']}: {item.nodeid}")
'''


@pytest.mark.slow
def test_the_vllm_tests_run_on_one_worker(tmp_path):
    (tmp_path / "dry_run.py").write_text(DRY_RUN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    # The tests of the session vLLM engines (not the one that starts an engine of its own).
    select = "(vllm_pooling or vllm_logprobs) and not refuses"
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "dry_run", "-n", "2", "--dist", "loadgroup", "-rs",
                          "-p", "no:cacheprovider", "-m", "slow", "-k", select, "tests/stages/precompute/test_engines.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    ran = re.findall(r"dry run on (gw\d+): (\S+)", res.stdout)
    assert len(ran) >= 4, res.stdout[-3000:] + res.stderr[-3000:]
    assert all(nodeid.endswith("@vllm") for _, nodeid in ran), ran
    assert len({worker for worker, _ in ran}) == 1, ran
