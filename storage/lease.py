"""One writer per cache (or per job of a cache): a lease file with a heartbeat.

    with hold_lease(fs, root, url, name=layout.lease_name(num_jobs, job_index)):
        ...  # write shards; a second writer of this name is refused at once

A lease is a small JSON file, ``leases/job-<I>-of-<N>.json``: the holder's host, pid, start time
and a heartbeat time the holder rewrites every `stale_after / 10` seconds. It is created with an
exclusive create (``O_EXCL`` on a local disk, ``If-None-Match: *`` on S3), so of two writers
starting at once exactly one gets it. A lease is *live* while its heartbeat is younger than
`stale_after` (default 10 minutes; `LOGITCACHE_LEASE_STALE_S` changes it) and, when the holder is
on this host, while its pid runs: a run killed on this machine does not block its rerun, a paused
one (SIGSTOP) does. A lease that is not live is taken over with a warning. Taking over a stale
lease re-reads it just before replacing it; two runs taking over the same stale lease in the same
instant may both get it (the window is one round trip).
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

from logitcache.storage import layout
from logitcache.storage.errors import CacheBusyError, LogitCacheError, io_failure
from logitcache.storage.paths import atomic_write_bytes, deadline, is_local, safe_join

__all__ = ["STALE_ENV", "DEFAULT_STALE_S", "hold_lease", "live_leases", "describe", "stale_after"]

STALE_ENV = "LOGITCACHE_LEASE_STALE_S"
DEFAULT_STALE_S = 600.0


def stale_after() -> float:
    """Seconds without a heartbeat after which a lease is stale (`LOGITCACHE_LEASE_STALE_S`, default 600)."""
    value = os.environ.get(STALE_ENV)
    try:
        seconds = float(value) if value else DEFAULT_STALE_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise CacheBusyError(f"{STALE_ENV}={value!r}: must be a number of seconds > 0")
    return seconds


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    try:  # a zombie (killed, not yet reaped by its parent) runs no more
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_live(lease: dict, stale_s: float) -> bool:
    if _now() - float(lease.get("heartbeat", 0)) >= stale_s:
        return False
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
        return _pid_runs(lease["pid"])
    return True


def describe(lease: dict) -> str:
    """The holder in a few words: host, pid, start time and the heartbeat's age."""
    age = max(0.0, _now() - float(lease.get("heartbeat", 0)))
    return (f"host {lease.get('host')}, pid {lease.get('pid')}, started {_iso(float(lease.get('started', 0)))}, "
            f"last heartbeat {age:.0f} s ago")


def _read(fs, path: str) -> dict | None:
    try:
        lease = json.loads(fs.cat_file(path, **deadline(fs)))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # torn or foreign: no heartbeat, so stale
    return lease if isinstance(lease, dict) else {}


def _create(fs, path: str, data: bytes) -> bool:
    """Write `path` only if it does not exist (atomically). Returns False if it exists."""
    if is_local(fs):  # (on S3, makedirs probes and may even create the bucket: three round trips)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    try:
        fs.pipe_file(path, data, mode="create", **deadline(fs))
    except FileExistsError:
        return False
    return True


class _Lease:
    def __init__(self, fs, path: str, url: str, stale_s: float):
        self.fs, self.path, self.url, self.stale_s = fs, path, url, stale_s
        started = _now()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "heartbeat": started,
                       "token": uuid.uuid4().hex}
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _bytes(self) -> bytes:
        return json.dumps(self.record, sort_keys=True).encode()

    def acquire(self) -> None:
        for _ in range(3):  # a lease released between our create and our read: try again
            if _create(self.fs, self.path, self._bytes()):
                return
            held = _read(self.fs, self.path)
            if held is None:
                continue
            if is_live(held, self.stale_s):
                raise CacheBusyError(
                    f"{self.url} is being written by another run ({describe(held)}; lease "
                    f"{layout.LEASES_DIR}/{posixpath.basename(self.path)}). Wait for it to finish; a lease without a "
                    f"heartbeat for {self.stale_s / 60:g} min ({STALE_ENV}) is taken over")
            again = _read(self.fs, self.path)
            if again is not None and again.get("token") != held.get("token"):
                continue  # someone else just took it over: look again
            print(f"logitcache: warning: {self.url}: taking over a stale lease ({describe(held)})", file=sys.stderr,
                  flush=True)
            atomic_write_bytes(self.fs, self.path, self._bytes())
            if (_read(self.fs, self.path) or {}).get("token") == self.record["token"]:
                return
        raise CacheBusyError(f"{self.url}: could not take the lease {self.path}; another run is starting")

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_s / 10):
            try:
                if (_read(self.fs, self.path) or {}).get("token") != self.record["token"]:
                    self.lost = True
                    print(f"logitcache: warning: {self.url}: another run took over this run's lease "
                          f"(no heartbeat for {self.stale_s:g} s?); this run stops before finalizing",
                          file=sys.stderr, flush=True)
                    return
                self.record["heartbeat"] = _now()
                atomic_write_bytes(self.fs, self.path, self._bytes())
            except Exception:  # noqa: BLE001 - a store down for a moment; the next beat tries again
                pass

    def check(self) -> None:
        """Raise if another run took the lease over while this one was paused."""
        if self.lost:
            raise CacheBusyError(f"{self.url}: another run took over this run's lease while it was stopped; "
                                 f"its shards are kept, the other run finishes the cache")

    def release(self, *, tidy: bool = True) -> None:
        self._stop.set()
        if not tidy:
            return
        if self._thread is not None:
            self._thread.join()
        try:
            if (_read(self.fs, self.path) or {}).get("token") == self.record["token"]:
                self.fs.rm(self.path, **deadline(self.fs))
            if is_local(self.fs):
                os.rmdir(posixpath.dirname(self.path))  # only when no other job's lease is in it
        except OSError:
            pass


@contextmanager
def hold_lease(fs, root: str, url: str, *, name: str):
    """Hold the lease `name` (`layout.lease_name`) on the cache at `root` for the enclosed block.

    Yields an object whose `check()` raises `CacheBusyError` if the lease was lost meanwhile.

    Raises:
        CacheBusyError: a live run holds it (the message names its host, pid and start time).
    """
    lease = _Lease(fs, safe_join(root, f"{layout.LEASES_DIR}/{name}"), url, stale_after())
    try:
        lease.acquire()
    except LogitCacheError:
        raise
    except Exception as e:  # the store does not answer: say which cache, not a client traceback
        bound = deadline(fs).get("timeout")
        failure = io_failure(e, f"{url}: taking the write lease{f' (no answer within {bound:g} s)' if bound else ''}")
        if failure is None:
            raise
        raise failure from e
    lease.start_heartbeat()
    try:
        yield lease
    except BaseException as e:
        # After a failure of an object store, do not wait for it again to tidy up: the lease is left to
        # go stale (at once for a rerun on this host, whose pid check finds this process gone).
        lease.release(tidy=is_local(fs) or io_failure(e) is None)
        raise
    lease.release()


def live_leases(fs, root: str) -> list[tuple[str, dict]]:
    """(lease file name, lease) of every live lease on the cache at `root`."""
    folder = safe_join(root, layout.LEASES_DIR)
    stale_s = stale_after()
    try:
        names = sorted(posixpath.basename(p) for p in fs.ls(folder, detail=False))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        lease = _read(fs, posixpath.join(folder, name))
        if lease and is_live(lease, stale_s):
            found.append((name, lease))
    return found
