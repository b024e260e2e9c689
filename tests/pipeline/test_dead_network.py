"""A dead network ends in an error, not a hang: an S3 endpoint that accepts connections and never answers
(a listener on loopback, tests/support/s3server.py's `black_hole`) ends `precompute --data`, `precompute --out`,
`train --cache` and `push` with a one-line error naming the s3:// URL. With short bounds given through
`--storage-option` each ends in seconds; one slow test holds the DEFAULT bound (under 2 minutes; before,
botocore's and s3fs's retries of 60 s reads took more than 5).

`push s3://...` reads the cache's index first, so the same bound ends it before any upload.

    .venv/bin/python -m pytest tests/pipeline/test_dead_network.py -q          # ~20 s
    .venv/bin/python -m pytest tests/pipeline/test_dead_network.py -m slow -q  # the default bound, ~50 s
"""

from __future__ import annotations

import time

import pytest
from cli_errors import assert_contract
from precompute_util import reference_flags, run_here, text_rows, write_jsonl
from s3server import black_hole

from logitcache.storage.paths import NETWORK_DEFAULTS

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
SHORT = ["--storage-option", "connect_timeout=1", "--storage-option", "read_timeout=1",
         "--storage-option", "attempts=1"]


def command(kind: str, teacher: str, data, tmp_path, url: str) -> tuple[list[str], str]:
    if kind == "precompute --data":
        return reference_flags(teacher, url, tmp_path / "cache"), "precompute"
    if kind == "precompute --out":
        return reference_flags(teacher, data, url), "precompute"
    if kind == "push":
        return ["push", url, "me/logits"], "push"
    return ["train", "--student", teacher, "--cache", url, "--loss", "kl", "--out", str(tmp_path / "student"),
            "--max-steps", "2"], "train"


def end_within(argv: list[str], name: str, url: str, endpoint: str, capsys, bound: float) -> float:
    capsys.readouterr()
    started = time.monotonic()
    rc = run_here([*argv, "--storage-option", f"endpoint_url={endpoint}"], env=CREDENTIALS)
    took = time.monotonic() - started
    assert rc == 2
    assert_contract(rc, capsys.readouterr().err, name, (url,))
    assert took < bound, f"{took:.1f} s"
    return took


@pytest.mark.parametrize("kind", ["precompute --data", "precompute --out", "train --cache", "push"])
def test_a_black_holed_store_ends_in_an_error_naming_the_url(kind, tiny_teacher, tmp_path, capsys):
    teacher = str(tiny_teacher[0])
    data = write_jsonl(tmp_path / "rows.jsonl", text_rows(4))
    url = "s3://dead/rows.jsonl" if kind == "precompute --data" else "s3://dead/cache"
    argv, name = command(kind, teacher, data, tmp_path, url)
    with black_hole() as endpoint:
        # One attempt of 1 s, plus the start-up before the first request (a student loads for train).
        end_within([*argv, *SHORT], name, url, endpoint, capsys, bound=30)


@pytest.mark.slow
def test_the_default_bound_ends_a_black_holed_run_within_two_minutes(tiny_teacher, tmp_path, capsys):
    teacher = str(tiny_teacher[0])
    data = write_jsonl(tmp_path / "rows.jsonl", text_rows(4))
    argv, name = command("precompute --out", teacher, data, tmp_path, "s3://dead/cache")
    with black_hole() as endpoint:
        took = end_within(argv, name, "s3://dead/cache", endpoint, capsys, bound=120)
    # It did wait for the store: every attempt ran to its read timeout.
    assert took >= NETWORK_DEFAULTS["attempts"] * NETWORK_DEFAULTS["read_timeout"] * 0.9, f"{took:.1f} s"
