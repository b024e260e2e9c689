"""The write lease (storage/lease.py) on a local disk and on an S3 server (moto) on loopback: one
holder at a time, the refusal names the holder, a heartbeat keeps it live, a stale lease or one of a
dead process on this host is taken over with a warning.

    .venv/bin/python -m pytest tests/storage/test_lease.py -q
"""

import json
import socket
import subprocess
import sys
import time

import pytest
from s3server import make_bucket, s3_options

from logitcache.storage import CacheBusyError, layout
from logitcache.storage.lease import STALE_ENV, hold_lease, live_leases
from logitcache.storage.paths import resolve

NAME = layout.lease_name(1, 0)


@pytest.fixture(params=["local", "s3"])
def cache(request, tmp_path):
    """(fs, root, url) of an empty cache location."""
    if request.param == "local":
        url, opts = str(tmp_path / "cache"), None
    else:
        endpoint, _ = request.getfixturevalue("s3")
        make_bucket(endpoint, "lc-lease")
        url, opts = f"s3://lc-lease/{tmp_path.name}", s3_options(endpoint)
    fs, root = resolve(url, opts)
    return fs, root, url


def plant(fs, root, **lease) -> None:
    now = time.time()
    lease = {"host": "elsewhere", "pid": 1, "started": now - 60, "heartbeat": now, "token": "theirs", **lease}
    fs.makedirs(f"{root}/{layout.LEASES_DIR}", exist_ok=True)
    fs.pipe_file(f"{root}/{layout.LEASES_DIR}/{NAME}", json.dumps(lease).encode())


def test_one_holder_and_the_refusal_names_it(cache):
    fs, root, url = cache
    with hold_lease(fs, root, url, name=NAME):
        with pytest.raises(CacheBusyError) as refused:
            with hold_lease(fs, root, url, name=NAME):
                pytest.fail("a second holder")
        message = str(refused.value)
        assert "\n" not in message and f"host {socket.gethostname()}" in message
        assert f"pid {__import__('os').getpid()}" in message and "started 20" in message
        with hold_lease(fs, root, url, name=layout.lease_name(2, 1)):  # another job's lease is another lease
            assert [n for n, _ in live_leases(fs, root)] == ["job-0-of-1.json", "job-1-of-2.json"]
    assert live_leases(fs, root) == [] and not fs.exists(f"{root}/{layout.LEASES_DIR}/{NAME}")


def test_heartbeat_keeps_a_lease_live(cache, monkeypatch):
    fs, root, url = cache
    monkeypatch.setenv(STALE_ENV, "2")  # heartbeat every 0.2 s
    path = f"{root}/{layout.LEASES_DIR}/{NAME}"
    with hold_lease(fs, root, url, name=NAME):
        first = json.loads(fs.cat_file(path))["heartbeat"]
        deadline = time.monotonic() + 30  # generous: a loaded machine delays the thread, not the outcome
        while json.loads(fs.cat_file(path))["heartbeat"] == first:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)


def test_a_fresh_lease_of_another_host_is_refused_a_stale_one_taken_over(cache, monkeypatch, capsys):
    fs, root, url = cache
    plant(fs, root)
    with pytest.raises(CacheBusyError, match="host elsewhere, pid 1, started"):
        with hold_lease(fs, root, url, name=NAME):
            pass
    monkeypatch.setenv(STALE_ENV, "30")
    plant(fs, root, heartbeat=time.time() - 31)
    with hold_lease(fs, root, url, name=NAME):
        assert "taking over a stale lease (host elsewhere, pid 1" in capsys.readouterr().err


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(cache, capsys):
    fs, root, url = cache
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant(fs, root, host=socket.gethostname(), pid=dead.pid)
    with hold_lease(fs, root, url, name=NAME):
        assert f"pid {dead.pid}" in capsys.readouterr().err


def test_stale_setting_is_checked(cache, monkeypatch):
    fs, root, url = cache
    monkeypatch.setenv(STALE_ENV, "-3")
    with pytest.raises(CacheBusyError, match=STALE_ENV):
        with hold_lease(fs, root, url, name=NAME):
            pass
