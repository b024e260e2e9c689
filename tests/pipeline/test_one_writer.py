"""One writer per cache: a `precompute` paused after its first shard (SIGSTOP) holds the cache's lease,
so a second run on the same --out is refused at once (exit 2, one line naming the holder's host, pid
and start time) and so is `merge`; resumed (SIGCONT), the first run finishes a cache that validates
and equals the shared reference. Before the lease, the second run's start-up cleanup deleted the
first run's shard in flight.

    .venv/bin/python -m pytest tests/pipeline/test_one_writer.py -q     # ~30 s (one process start)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_errors import assert_contract
from precompute_util import assert_same_cache, reference_flags, run_here

from logitcache.storage import layout

ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def entries(cache: Path) -> int:
    return len(list((cache / layout.ENTRIES_DIR).glob("shard-*.json"))) if (cache / layout.ENTRIES_DIR).exists() else 0


@pytest.mark.slow
def test_a_second_run_on_a_paused_runs_cache_is_refused_and_the_first_finishes(reference_cache, tmp_path, capsys):
    teacher, data, reference = reference_cache
    out, log = tmp_path / "cache", tmp_path / "first.log"
    first = subprocess.Popen([sys.executable, "-m", "logitcache.pipeline", *reference_flags(teacher, data, out)],
                             env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        deadline = time.monotonic() + 300
        while entries(out) < 1:
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)
        written = entries(out)
        assert written < 12, "finished before it could be paused"

        capsys.readouterr()
        started = time.monotonic()
        rc = run_here(reference_flags(teacher, data, out))
        line = assert_contract(rc, capsys.readouterr().err, "precompute",
                               (str(out), f"host {socket.gethostname()}", f"pid {first.pid}", "started 20"))
        assert rc == 2 and time.monotonic() - started < 30, line  # at once: before the teacher loads
        rc = run_here(["merge", str(out)])
        assert_contract(rc, capsys.readouterr().err, "merge", ("job-0-of-1", f"pid {first.pid}"))
        assert entries(out) == written  # nothing of the first run's was touched
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, log.read_text()
    assert run_here(["validate", str(out)]) == 0
    assert_same_cache(reference, out)
    assert not (out / layout.LEASES_DIR).exists()


def test_merge_refuses_while_a_job_holds_its_lease(tmp_path, capsys):
    out = tmp_path / "cache"
    (out / layout.LEASES_DIR).mkdir(parents=True)
    (out / "job.json").write_text(json.dumps({k: None for k in ("fingerprint", "fingerprint_parts", "backend",
                                                                "encoding", "logits_width", "text_fields",
                                                                "num_shards", "rows_per_shard", "metadata")}))
    now = time.time()
    (out / layout.LEASES_DIR / layout.lease_name(4, 2)).write_text(json.dumps(
        {"host": "node7", "pid": 4242, "started": now - 5, "heartbeat": now, "token": "x"}))
    rc = run_here(["merge", str(out)])
    assert rc == 2
    assert_contract(rc, capsys.readouterr().err, "merge", ("job-2-of-4", "host node7", "pid 4242"))
