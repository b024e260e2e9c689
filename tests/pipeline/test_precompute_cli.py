"""`logitcache precompute` as a real process: SIGTERM, then kill -9 at a random moment of the rerun, then
a rerun from YAML that ends with the uninterrupted cache; the YAML form of the options; the help text.

    .venv/bin/pytest tests/pipeline/test_precompute_cli.py                   # the fast ones
    .venv/bin/pytest tests/pipeline/test_precompute_cli.py -m "slow or not slow"   # all: ~1 min on 2 CPU cores (2 processes)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from precompute_util import (ONE_THREAD, REF_ROWS, REF_ROWS_PER_SHARD, assert_entries_complete, assert_same_cache,
                             run_here)
from precompute_util import reference_flags as flags

from logitcache.pipeline.cli import _apply_config, build_parser
from logitcache.storage import open_cache
from logitcache.storage.errors import CacheIndexError

ROWS, ROWS_PER_SHARD = REF_ROWS, REF_ROWS_PER_SHARD  # 12 shards, so a signal lands mid-run


def start(argv: list[str], log: Path) -> subprocess.Popen:
    # The reference's thread settings: CPU GEMM kernels, and so the last float bit, depend on them.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **ONE_THREAD}
    return subprocess.Popen([sys.executable, "-m", "logitcache.pipeline.cli", *argv], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for_shards(proc: subprocess.Popen, out: Path, at_least: int, log: Path) -> None:
    """Poll until `at_least` shards are written; meanwhile no reader may see a cache or a partial shard."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"exited early ({proc.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, log.read_text()
        assert not (out / "index.json").exists()
        if (out / "entries").exists() and assert_entries_complete(out) >= at_least:
            return
        time.sleep(0.02)


def assert_no_temporaries(out: Path) -> None:
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


@pytest.mark.slow
def test_sigterm_then_kill_9_then_rerun_equals_uninterrupted(reference_cache, tmp_path, capsys):
    """One job stopped twice: SIGTERM (a clean stop), then kill -9 at a random moment of the resumed run; each
    stop is a real process. The rerun that finishes it runs in this process as a one-thread process would."""
    teacher, data, reference = reference_cache
    out, log = tmp_path / "cache", tmp_path / "log"
    total = ROWS // ROWS_PER_SHARD

    # SIGTERM after two shards: exit 143 with a message, the shard in flight discarded or finished.
    proc = start(flags(teacher, data, out), log)
    wait_for_shards(proc, out, 2, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()
    assert "stopped by SIGTERM" in log.read_text() and "Rerun the same command" in log.read_text()
    assert not (out / "index.json").exists()
    assert_no_temporaries(out)
    stopped = assert_entries_complete(out)
    assert 2 <= stopped < total

    # The same command resumes; kill -9 it anywhere after one more shard.
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    proc = start(flags(teacher, data, out), log)
    wait_for_shards(proc, out, rng.randint(stopped + 1, max(stopped + 1, total - 4)), log)
    time.sleep(rng.uniform(0, 0.1))  # anywhere inside the next shard
    assert proc.poll() is None, f"finished before the kill (seed {seed})"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    written = assert_entries_complete(out)
    assert stopped < written < total, f"seed {seed}"
    with pytest.raises(CacheIndexError, match="unfinished"):
        open_cache(str(out))

    # Rerun with the same settings from YAML: it resumes (same fingerprint) and finishes.
    config = tmp_path / "precompute.yaml"
    config.write_text(yaml.safe_dump({"teacher": teacher, "data": str(data), "out": str(out), "engine": "hf",
                                      "text_field": "text", "top_k": 8, "rows_per_shard": ROWS_PER_SHARD,
                                      "batch_size": 1, "backend": "zarr", "progress": False}))
    capsys.readouterr()
    rc = run_here(["precompute", "--config", str(config)])  # in this process: only the stops needed one
    text = capsys.readouterr().err
    assert rc == 0, text
    assert f"{written} already written" in text
    assert open_cache(str(out)).validate() == []
    assert_same_cache(reference, out)
    assert_no_temporaries(out)


def test_yaml_config_equals_flags(tmp_path):
    argv = ["precompute", "--teacher", "t", "--data", "d.jsonl", "--out", "c", "--prompt-field", "q",
            "--response-field", "a", "--mode", "sample", "--samples", "16", "--temperature", "0.7", "--seed", "3",
            "--backend", "arrow", "--encoding", "compact", "--max-length", "512", "--rows-per-shard", "50",
            "--num-jobs", "4", "--job-index", "2", "--engine-arg", "vllm_path=logprobs", "--strict",
            "--no-progress"]
    config = {"teacher": "t", "data": "d.jsonl", "out": "c", "prompt_field": "q", "response-field": "a",
              "mode": "sample", "samples": 16, "temperature": 0.7, "seed": 3, "backend": "arrow",
              "encoding": "compact", "max_length": 512, "rows_per_shard": 50, "num_jobs": 4, "job_index": 2,
              "engine_args": ["vllm_path=logprobs"], "strict": True, "progress": False}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    from_flags = vars(_apply_config(build_parser(), argv))
    from_yaml = vars(_apply_config(build_parser(), ["precompute", "--config", str(path)]))
    from_flags.pop("config"), from_yaml.pop("config")
    assert {k: v for k, v in from_flags.items() if k != "_run"} == {k: v for k, v in from_yaml.items() if k != "_run"}
    # Flags override the file.
    overridden = vars(_apply_config(build_parser(), ["precompute", "--config", str(path), "--seed", "9"]))
    assert overridden["seed"] == 9


def test_old_flag_names_still_work_and_say_what_to_type(tmp_path, capsys):
    base = ["precompute", "--teacher", "t", "--data", "d", "--out", "o", "--text-field", "x"]
    new = vars(_apply_config(build_parser(), [*base, "--num-jobs", "4", "--job-index", "2", "--backend", "arrow"]))
    assert capsys.readouterr().err == ""
    old = vars(_apply_config(build_parser(), [*base, "--num-shards", "4", "--shard-index", "2", "--format", "arrow"]))
    err = capsys.readouterr().err
    for was, now in (("--num-shards", "--num-jobs"), ("--shard-index", "--job-index"), ("--format", "--backend")):
        assert f"{was} is deprecated; use {now}" in err
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"num_shards": 4, "shard_index": 2, "format": "arrow"}))
    from_yaml = vars(_apply_config(build_parser(), [*base, "--config", str(path)]))
    assert "'num_shards' is deprecated; use 'num_jobs'" in capsys.readouterr().err
    for ns in (old, from_yaml):
        assert (ns["num_jobs"], ns["job_index"], ns["backend"]) == (4, 2, "arrow")
        assert not {"num_shards", "shard_index", "format"} & set(ns)
    assert {k: v for k, v in old.items() if k != "_run"} == {k: v for k, v in new.items() if k != "_run"}


def test_help_and_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["precompute", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("independent jobs that fill this cache", "--rows-per-shard", "logitcache merge", "examples:",
                   "--messages-field", "--strict", "--num-jobs", "--job-index", "--backend",
                   # flags that mean something else in `train` say which meaning applies here
                   "`train --top-k` is another thing", "`train --temperature` is the loss's",
                   "`train --batch-size` is the student's"):
        assert needle in text
    for hidden in ("--num-shards", "--shard-index", "--format"):
        assert hidden not in text
    args = build_parser().parse_args(["precompute", "--teacher", "t", "--data", "d", "--out", "o", "--text-field", "x"])
    assert args.trust_remote_code is False and args.backend == "parquet" and args.encoding == "lossless"
    assert args.top_k is None and args.mode == "topk" and args.num_jobs == 1 and args.job_index == 0
