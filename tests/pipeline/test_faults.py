"""Faults injected into real runs: each ends in a clear one-line error (or a clean stop), and nothing
already written is lost: a rerun resumes to the result of an uninterrupted run.

- SIGTERM during `train` (a real signal to a real process): a checkpoint with the data position,
  exit 143; `--resume` ends with the weights of an uninterrupted run.
- A shard corrupted after `validate`, read while training: an error naming the shard; the
  checkpoints before it resume once the shard is restored.
- The disk filling up while `precompute` writes shards (a tmpfs of a few hundred KiB, mounted by the
  test; skipped where mounting is not allowed): an error naming the shard, no partial shard, and a
  rerun after the filesystem grows equals an uninterrupted cache.
- The object store going away mid-job (a TCP proxy in front of the moto S3 server is killed, so
  the server keeps its data, as a real store does when the network drops): `precompute --out s3://`
  stops with an error, resumes to an identical cache once the store is back; `train --cache s3://`
  stops with an error, never hangs and never skips.

A run that takes a signal or loses its store is a real process; the runs that only have to finish the
job (resumes, reruns, the uninterrupted reference) run in this process as one-thread processes would
(`precompute_util.run_here`), which saves a start-up (~10 s of CPU importing torch and transformers) each,
and the disk-full runs are in-process too (an ENOSPC takes the same path through the CLI either way).

    .venv/bin/python -m pytest tests/pipeline/test_faults.py -m slow -q     # ~1-2 min of CPU
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_errors import assert_contract
from precompute_util import REF_ROWS, REF_ROWS_PER_SHARD, assert_same_cache, reference_flags, run_here
from s3server import make_bucket, s3_options, tcp_proxy
from trainkit import world

from logitcache.pipeline import cli
from logitcache.storage import open_cache
from logitcache.storage.errors import CacheIndexError

pytestmark = pytest.mark.slow

# One thread everywhere: CPU GEMM kernels, and so the last float bit, depend on the thread count.
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start(argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "logitcache.pipeline", *argv], env={**os.environ, **ENV, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))


def wait_until(proc: subprocess.Popen, log: Path, ready, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{log.read_text()}"
        time.sleep(0.05)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running after {timeout} s (a hang):\n{log.read_text()}")
    return rc, log.read_text()


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# --- SIGTERM during train ---------------------------------------------------------------------------------


def train_argv(cache, out: Path, *extra: str, steps: int = 24) -> list[str]:
    w = world()
    return ["train", "--student", str(w.student), "--cache", str(cache), "--loss", "kl", "--out", str(out),
            "--max-steps", str(steps), "--batch-size", "2", "--lr", "1e-3", "--num-workers", "1",
            "--logging-steps", "1", "--save-steps", "1000", "--progress", *extra]  # the bar says the step


def test_sigterm_during_train_checkpoints_and_resume_continues_exactly(tmp_path, capsys):
    """The signal goes to a real `train` process; the resume and the uninterrupted reference run in this process
    as one-thread processes would (`run_here`), so the weights compared are a process's against this one's."""
    w = world()
    log, out = tmp_path / "run.log", tmp_path / "run"
    proc = start(train_argv(w.cache, out), log)
    # The Trainer's bar counts optimizer steps ("5/24"): signal once a few have run.
    step = re.compile(r"\b([3-9]|1\d)/24\b")
    wait_until(proc, log, lambda: step.search(log.read_text()), "step 3")
    proc.send_signal(signal.SIGTERM)
    rc, text = finish(proc, log)
    assert rc == 128 + signal.SIGTERM, text
    assert "Traceback" not in text and "stopped by SIGTERM" in text, text
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 1, checkpoints  # --save-steps 1000: only the signal saved
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 3 <= stopped_at < 24
    state = json.loads((checkpoints[0] / "logitcache_data_rank0.json").read_text())
    trainer_state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert trainer_state["global_step"] == stopped_at
    assert sum(state["consumed"]) == 2 * stopped_at  # data position and weights are of the same step
    assert not (out / "logitcache_train.json").exists()  # a stopped run does not pose as a finished one

    assert run_here(train_argv(w.cache, out, "--resume")) == 0, capsys.readouterr().err
    assert run_here(train_argv(w.cache, tmp_path / "ref")) == 0, capsys.readouterr().err
    result = json.loads((out / "logitcache_train.json").read_text())
    assert result["global_step"] == 24
    expected = json.loads((tmp_path / "ref" / "logitcache_train.json").read_text())
    assert result["sequences_per_rank"] == expected["sequences_per_rank"]
    a, b = weights(out), weights(tmp_path / "ref")
    for name in b:
        assert (a[name] == b[name]).all(), f"{name} differs after resuming at step {stopped_at}"


# --- a shard corrupted after validate --------------------------------------------------------------------


def test_corrupt_shard_read_while_training_names_it_and_checkpoints_resume(tmp_path, capsys):
    w = world()
    cache = tmp_path / "cache"
    shutil.copytree(w.cache, cache)
    assert cli.main(["validate", str(cache)]) == 0
    capsys.readouterr()
    # Corrupt the shard the stream reads last (the second window of 2 shards), so checkpoints exist before it.
    order = json.loads((cache / "index.json").read_text())["shards"]
    victim = _last_read_shard(cache)
    shard = cache / victim  # a Parquet file, or a Zarr folder (whose largest file is a data chunk)
    target = shard if shard.is_file() else max((p for p in shard.rglob("*") if p.is_file()),
                                               key=lambda p: p.stat().st_size)
    backup = target.read_bytes()
    damaged = bytearray(backup)
    damaged[len(damaged) // 2] ^= 0xFF
    target.write_bytes(bytes(damaged))

    out = tmp_path / "out"
    argv = train_argv(cache, out, steps=12)
    argv[argv.index("--save-steps") + 1] = "2"
    rc = cli.main(argv)
    err = capsys.readouterr().err
    # What was refused: the victim, for its checksum, before a byte of it was decoded.
    assert_contract(rc, err, "train", (victim, "checksum mismatch"))
    assert len(order) == 4
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, "the error came before any checkpoint; the corrupted shard was read first"
    assert not (out / "logitcache_train.json").exists()
    # What was trained on: the last checkpoint consumed one sequence per sample of its steps, all from the
    # first window (the two shards read before the victim's window), none from the victim.
    last = checkpoints[-1]
    consumed = sum(json.loads((last / "logitcache_data_rank0.json").read_text())["consumed"])
    step = json.loads((last / "trainer_state.json").read_text())["global_step"]
    first_window = [order[int(j)] for j in _read_order(cache)[:2]]
    assert victim not in [e["name"] for e in first_window]
    assert consumed == 2 * step <= sum(e["sequences"] for e in first_window)

    target.write_bytes(backup)
    assert cli.main(argv + ["--resume"]) == 0
    result = json.loads((out / "logitcache_train.json").read_text())
    assert result["global_step"] == 12
    # Once restored, every sequence of the cache was trained on exactly once: one whole epoch.
    final = json.loads((out / "logitcache_data_rank0.json").read_text())
    assert sum(final["consumed"]) == 24 == sum(e["sequences"] for e in order)


def _read_order(cache: Path) -> list[int]:
    """Shard ids in the order the stream reads them in epoch 0 (a function of the seed, 0 in `train_argv`)."""
    from logitcache.stages.train.data import CacheSource, ShardedStream

    stream = ShardedStream(CacheSource(str(cache), to_item=lambda item: item), seed=0, window=2)
    return [int(j) for j in stream.shard_order(0)]


def _last_read_shard(cache: Path) -> str:
    """The shard the stream reads last in epoch 0."""
    return json.loads((cache / "index.json").read_text())["shards"][_read_order(cache)[-1]]["name"]


# --- disk full ---------------------------------------------------------------------------------------------


PRE_ROWS, PRE_PER_SHARD = REF_ROWS, REF_ROWS_PER_SHARD
pre_argv = reference_flags  # the shared reference job's command, to another --out


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_disk_full_while_writing_shards_then_resume(reference_cache, tmp_path, capsys):
    """Both runs in this process (`run_here`): an ENOSPC takes the same path through the CLI as in a process."""
    teacher, data, reference = reference_cache
    # tmpfs counts whole pages: a Zarr shard is many small files.
    total = sum(-(-p.stat().st_size // 4096) * 4096 for p in reference.rglob("*") if p.is_file())
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, total // 2 // 4096 * 4096):
        if os.geteuid() == 0 and os.environ.get("CI"):
            pytest.fail("CI runs as root, where the disk-full case must run, but mounting a tmpfs failed")
        pytest.skip(f"cannot mount a tmpfs (mount -t tmpfs needs root and a kernel that allows it; euid "
                    f"{os.geteuid()}): the disk-full case is not simulated here")
    try:
        capsys.readouterr()
        rc = run_here(pre_argv(teacher, data, mnt / "cache"))
        assert_contract(rc, capsys.readouterr().err, "precompute", ("No space left on device", "shard-"))
        # Nothing partial is visible: every recorded shard is complete, and there is no index.
        from precompute_util import assert_entries_complete

        written = assert_entries_complete(str(mnt / "cache"))
        assert 1 <= written < PRE_ROWS // PRE_PER_SHARD
        with pytest.raises(CacheIndexError):
            open_cache(str(mnt / "cache"))
        # Space is back: the same command resumes and ends with the uninterrupted cache.
        subprocess.run(["mount", "-o", f"remount,size={4 * total + (1 << 20)}", str(mnt)], check=True)
        rc = run_here(pre_argv(teacher, data, mnt / "cache"))
        text = capsys.readouterr().err
        assert rc == 0, text
        assert f"{written} already written" in text
        assert_same_cache(reference, mnt / "cache")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# --- the object store goes away --------------------------------------------------------------------------


BUCKET = "lc-faults"


def test_s3_store_gone_mid_precompute_then_back_resumes_identically(reference_cache, s3, tmp_path, capsys):
    import boto3

    teacher, data, reference = reference_cache
    endpoint, _ = s3
    make_bucket(endpoint, BUCKET)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    url = f"s3://{BUCKET}/cache"
    with tcp_proxy(endpoint) as proxy:
        env = _s3_env(proxy.endpoint)
        log = tmp_path / "s3.log"
        proc = start(pre_argv(teacher, data, url), log, env)

        def entries() -> int:
            keys = client.list_objects_v2(Bucket=BUCKET, Prefix="cache/entries/").get("Contents", [])
            return len(keys)

        wait_until(proc, log, lambda: entries() >= 2, "two shards on S3")
        proxy.stop()  # the store is unreachable from here on
        rc, text = finish(proc, log)
        # The shard in flight and the cache are named (a listing or the job record may be what fails first).
        line = assert_contract(rc, text, "precompute", (url,))
        assert "shard-" in line or "job.json" in line, line
        written = entries()
        assert written < PRE_ROWS // PRE_PER_SHARD

        proxy.start()  # back, with its data
        capsys.readouterr()
        rc = run_here(pre_argv(teacher, data, url), env)  # in this process: the fault needed one, the resume does not
        text = capsys.readouterr().err
        assert rc == 0, text
        assert f"{written} already written" in text, text
    opts = s3_options(endpoint)
    assert open_cache(url, storage_options=opts).validate() == []
    assert_same_cache(reference, url, storage_options=opts)


def test_s3_store_gone_while_training_is_an_error_not_a_hang(reference_cache, s3, tmp_path):
    import boto3

    teacher, data, reference = reference_cache
    endpoint, _ = s3
    bucket = BUCKET + "-train"
    make_bucket(endpoint, bucket)
    fs = __import__("s3fs").S3FileSystem(**s3_options(endpoint))
    fs.put(str(reference), f"{bucket}/cache", recursive=True)
    del boto3
    url = f"s3://{bucket}/cache"
    with tcp_proxy(endpoint) as proxy:
        log = tmp_path / "train.log"
        argv = ["train", "--student", teacher, "--cache", url, "--loss", "kl", "--out", str(tmp_path / "out"),
                "--max-steps", "200", "--batch-size", "1", "--num-workers", "0", "--shuffle-window", "1",
                "--save-steps", "1000", "--progress"]  # the bar says the step
        proc = start(argv, log, _s3_env(proxy.endpoint))
        step = re.compile(r"\b([2-9]|\d\d)/200\b")
        wait_until(proc, log, lambda: step.search(log.read_text()), "step 2")
        proxy.stop()
        rc, text = finish(proc, log)
    assert_contract(rc, text, "train", (url, "shard-"))
    assert not (tmp_path / "out" / "logitcache_train.json").exists()  # never a silent skip to the end


def test_train_resumes_exactly_after_an_s3_outage_mid_training(s3, tmp_path, capsys):
    """The store goes away while a real `train` process reads it: it stops with the one-line error; once the
    store is back, `--resume` from the last checkpoint ends with the weights of a run that never saw the
    outage (both of those in this process, as one-thread processes would run them)."""
    w = world()
    endpoint, _ = s3
    bucket = BUCKET + "-outage"
    make_bucket(endpoint, bucket)
    __import__("s3fs").S3FileSystem(**s3_options(endpoint)).put(str(w.cache), f"{bucket}/cache", recursive=True)
    url = f"s3://{bucket}/cache"
    bounds = ["--storage-option", "connect_timeout=2", "--storage-option", "read_timeout=2",
              "--storage-option", "attempts=1"]

    def argv(out, *extra):  # many epochs of a small cache: shards are read again after the read-ahead
        return ["train", "--student", str(w.student), "--cache", url, "--loss", "kl", "--out", str(out),
                "--max-steps", "40", "--batch-size", "2", "--lr", "1e-3", "--num-workers", "0",
                "--shuffle-window", "1", "--save-steps", "4", "--logging-steps", "1", "--progress", *bounds, *extra]

    out = tmp_path / "run"
    with tcp_proxy(endpoint) as proxy:
        log = tmp_path / "train.log"
        proc = start(argv(out), log, _s3_env(proxy.endpoint))
        wait_until(proc, log, lambda: re.search(r"\b([5-9]|\d\d)/40\b", log.read_text()), "step 5")
        proxy.stop()
        rc, text = finish(proc, log)
        assert_contract(rc, text, "train", (url, "shard-"))
        checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
        assert checkpoints and checkpoints[-1] < 40, checkpoints
        proxy.start()  # back, with its data
        assert run_here(argv(out, "--resume"), _s3_env(proxy.endpoint)) == 0, capsys.readouterr().err
        assert run_here(argv(tmp_path / "ref"), _s3_env(proxy.endpoint)) == 0, capsys.readouterr().err
    result = json.loads((out / "logitcache_train.json").read_text())
    expected = json.loads((tmp_path / "ref" / "logitcache_train.json").read_text())
    assert result["global_step"] == 40 and result["sequences_per_rank"] == expected["sequences_per_rank"]
    a, b = weights(out), weights(tmp_path / "ref")
    for name in b:
        assert (a[name] == b[name]).all(), f"{name} differs after resuming at step {checkpoints[-1]}"


def _s3_env(endpoint: str) -> dict:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}
