"""Progress bars of the commands that read a whole cache (validate, inspect, eval, merge, convert):
forced on they count to the total on stderr; left unset they show only on a terminal, so piped and
scripted runs print their result alone.

    .venv/bin/python -m pytest tests/pipeline/test_progress.py -q
"""

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from logitcache.pipeline.cli import main
from logitcache.storage.testing import write_synthetic_cache

SHARDS = 3


@pytest.fixture
def cache_dir(tmp_path):
    root = str(tmp_path / "cache")
    write_synthetic_cache(root, "zarr", encoding="compact", shards=SHARDS, per_shard=2)
    return root


def final_count(err: str, label: str) -> tuple[int, int]:
    """(n, total) of the last state tqdm drew for the bar `label` ("label: 100%|...| 3/3 [...]")."""
    found = re.findall(rf"{re.escape(label)}: +\d+%\|[^|]*\| *(\d+)/(\d+)", err)
    assert found, f"no {label!r} bar in stderr: {err!r}"
    return tuple(map(int, found[-1]))


def test_validate_inspect_convert_count_their_shards(cache_dir, tmp_path, capsys):
    assert main(["validate", cache_dir, "--progress"]) == 0
    out, err = capsys.readouterr()
    assert final_count(err, "validate") == (SHARDS, SHARDS) and out.startswith("OK")
    assert main(["inspect", cache_dir, "--json", "--progress"]) == 0
    out, err = capsys.readouterr()
    assert final_count(err, "inspect") == (SHARDS, SHARDS)
    assert json.loads(out)["shards"] == SHARDS  # the bar never reaches stdout
    assert main(["inspect", cache_dir, "--max-shards", "2", "--progress"]) == 0
    assert final_count(capsys.readouterr().err, "inspect") == (2, 2)
    assert main(["convert", cache_dir, str(tmp_path / "arrow"), "--backend", "arrow", "--progress"]) == 0
    assert final_count(capsys.readouterr().err, "convert") == (SHARDS, SHARDS)


def test_without_a_terminal_there_is_no_bar_unless_asked(cache_dir, tmp_path, capsys):
    # capsys' stderr is not a terminal: what a script or a pipe gets
    for argv in (["validate", cache_dir], ["inspect", cache_dir, "--json"],
                 ["convert", cache_dir, str(tmp_path / "arrow"), "--backend", "arrow"]):
        assert main(argv) == 0
        assert capsys.readouterr().err == "", argv
    assert main(["validate", cache_dir, "--progress", "--no-progress"]) == 0  # the last flag wins
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_the_bar_and_a_pipe_does_not(cache_dir):
    """A real pipe and a real pseudo-terminal as the command's stderr, nothing forced."""
    cmd = [sys.executable, "-m", "logitcache.pipeline", "validate", cache_dir]
    piped = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stderr == "" and piped.stdout.startswith("OK"), piped.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=follower, timeout=120)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    assert proc.returncode == 0 and proc.stdout.startswith(b"OK")
    assert final_count(b"".join(chunks).decode(errors="replace"), "validate") == (SHARDS, SHARDS)


def test_merge_counts_the_shard_entries_it_reads(tmp_path, capsys):
    from trainkit import world

    w = world()
    out = tmp_path / "cache"
    # A precompute job's cache with its index removed: what `merge` finds after jobs that did not finalize.
    assert main(["precompute", "--teacher", str(w.teacher), "--data", str(w.train), "--prompt-field", "prompt",
                 "--response-field", "response", "--engine", "hf", "--top-k", "4", "--rows-per-shard", "6",
                 "--out", str(out), "--no-progress"]) == 0
    (out / "index.json").unlink()
    capsys.readouterr()
    assert main(["merge", str(out), "--progress"]) == 0
    out_text, err = capsys.readouterr()
    shards = -(-len(w.rows) // 6)
    assert final_count(err, "read shard entries") == (shards, shards)
    assert f"{shards} shard(s)" in out_text
    (out / "index.json").unlink()
    assert main(["merge", str(out)]) == 0 and capsys.readouterr().err == ""


def test_eval_counts_sequences_of_each_source(tmp_path, capsys):
    from trainkit import world

    w = world()
    assert main(["eval", "--model", str(w.student), "--data", str(w.heldout), "--cache", str(w.cache), "--json",
                 "--batch-size", "3", "--progress"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert final_count(err, "eval --data") == (report["data"]["sequences"],) * 2 == (8, 8)
    assert final_count(err, "eval --cache") == (report["cache"]["sequences"],) * 2 == (len(w.rows),) * 2
    assert main(["eval", "--model", str(w.student), "--cache", str(w.cache), "--max-sequences", "5",
                 "--batch-size", "2", "--progress"]) == 0
    assert final_count(capsys.readouterr().err, "eval --cache") == (5, 5)
    # and from a script: nothing on stderr
    assert main(["eval", "--model", str(w.student), "--data", str(w.heldout), "--json"]) == 0
    assert capsys.readouterr().err == ""


def test_train_bar_counts_its_steps_and_a_pipe_gets_the_log_lines_alone(tmp_path, capsys):
    """train's bar is transformers Trainer's own: --progress is TrainingArguments.disable_tqdm turned over."""
    from trainkit import world

    w = world()
    argv = ["train", "--student", str(w.student), "--cache", str(w.cache), "--loss", "kl", "--max-steps", "3",
            "--batch-size", "2", "--num-workers", "0", "--logging-steps", "1", "--save-steps", "100"]
    bar = re.compile(r"\d+%\|[^|]*\| *(\d+)/(\d+) \[")  # any tqdm bar's state: (n, total)
    assert main([*argv, "--out", str(tmp_path / "on"), "--progress"]) == 0
    out, err = capsys.readouterr()
    drawn = re.split(r"[\r\n]", err)
    steps = [bar.search(s).groups() for s in drawn if bar.search(s) and ":" not in s[:bar.search(s).start()]]
    assert ("3", "3") in steps and out.count("'loss'") == 3  # the Trainer's bar (no label) reached the end
    assert any("Writing model shards" in s for s in drawn)  # transformers' own bars show too
    assert main([*argv, "--out", str(tmp_path / "off")]) == 0  # capsys' stderr is not a terminal
    out, err = capsys.readouterr()
    assert not bar.search(err) and out.count("'loss'") == 3, err
    settings = [json.loads((tmp_path / run / "logitcache_train.json").read_text())["settings"] for run in ("on", "off")]
    assert [s["progress"] for s in settings] == [True, False]
