"""Every command, given bad input, fails with one line `logitcache <command>: error: ...` that names the input.

A table of bad invocations (run in-process through `cli.main`, so the sweep stays fast, plus a few
real subprocesses for what only a process shows: a progress bar on stderr, the console script,
`--debug`), and a hypothesis part that draws option values in and out of their ranges, as flags
and as `--config` YAML, against an oracle written from the `--help` texts.

    .venv/bin/python -m pytest tests/pipeline/test_bad_inputs.py -q     # ~1.5 min on 2 shared CPU cores
    .venv/bin/python -m pytest tests/pipeline/test_bad_inputs.py -q -m slow    # the real processes
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_errors import assert_contract
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from precompute_util import text_rows, write_jsonl

from logitcache.pipeline import cli
from logitcache.pipeline.options import check_options
from logitcache.stages.precompute.run import EngineSpec, PrecomputeSettings, precompute
from logitcache.storage.errors import ConfigError

@pytest.fixture(scope="module")
def world(tiny_teacher, tmp_path_factory):
    """Files and caches the bad invocations point at."""
    root = tmp_path_factory.mktemp("bad_inputs")
    teacher = str(tiny_teacher[0])
    good = write_jsonl(root / "good.jsonl", text_rows(6))
    common = dict(engine=EngineSpec("hf"), text_field="text", rows_per_shard=3, batch_size=6, progress=False)
    precompute(PrecomputeSettings(teacher=teacher, data=str(good), out=str(root / "topk"), top_k=4, backend="zarr",
                                  **common))
    precompute(PrecomputeSettings(teacher=teacher, data=str(good), out=str(root / "sample"), mode="sample", samples=4,
                                  **common))
    (root / "empty.jsonl").write_text("")
    (root / "blank.jsonl").write_text("\n\n")
    (root / "malformed.jsonl").write_text('{"text": "a b c"}\n{"text": oops\n')
    (root / "array.jsonl").write_text('{"text": "a b c"}\n[1, 2, 3]\n')
    (root / "number.jsonl").write_text('{"text": 5}\n{"text": 7}\n')
    (root / "huge_int.jsonl").write_text('{"text": "a"}\n{"text": 1000000000000000000000000000000}\n')
    (root / "garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    (root / "a_file").write_text("x")
    (root / "empty_dir").mkdir()
    (root / "bad_config_model").mkdir()
    (root / "bad_config_model" / "config.json").write_text("{not json")
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_text((Path(teacher) / "config.json").read_text())
    (root / "unfinished").mkdir()
    (root / "unfinished" / "job.json").write_text("{")
    (root / "broken_index").mkdir()
    (root / "broken_index" / "index.json").write_text("[1, 2")
    (root / "cfg_range.yaml").write_text("top_k: -1\n")
    (root / "cfg_type.yaml").write_text("lr: fast\nmax_steps: 1\n")
    (root / "cfg_list.yaml").write_text("- 1\n- 2\n")
    (root / "cfg_unknown.yaml").write_text("learning_rate: 0.1\n")
    (root / "cfg_bad.yaml").write_text("lr: [1,\n")
    (root / "cfg_float_steps.yaml").write_text("max_steps: 2.5\n")
    return {"root": root, "teacher": teacher}


def pre(w, data="good.jsonl", *extra):
    return ["precompute", "--teacher", w["teacher"], "--data", str(w["root"] / data), "--out",
            str(w["root"] / "out_pre"), "--engine", "hf", "--text-field", "text", "--top-k", "4", "--no-progress",
            *extra]


def tr(w, *extra, cache="topk", loss="kl"):
    return ["train", "--student", w["teacher"], "--cache", str(w["root"] / cache), "--loss", loss, "--out",
            str(w["root"] / "out_train"), "--max-steps", "1", "--batch-size", "2", *extra]


def sft(w, *extra, data="good.jsonl"):
    return ["train", "--student", w["teacher"], "--data", str(w["root"] / data), "--loss", "sft", "--out",
            str(w["root"] / "out_sft"), "--max-steps", "1", *extra]


# (id, argv from the world, strings the error line must name). The first seven are the issue's.
CASES = [
    ("precompute-empty-file", lambda w: pre(w, "empty.jsonl"), ("empty.jsonl", "empty")),
    ("precompute-malformed-line", lambda w: pre(w, "malformed.jsonl"), ("malformed.jsonl", "line 2", "JSON")),
    ("precompute-strict-number", lambda w: pre(w, "number.jsonl", "--strict"), ("row 0", "'text'", "string")),
    ("precompute-strict-number-bar-drawn", lambda w: _without_flag(pre(w, "number.jsonl", "--strict"), "--no-progress"),
     ("row 0",)),
    ("precompute-out-is-file", lambda w: pre(w) + ["--out", str(w["root"] / "a_file")], ("--out", "a_file")),
    ("train-out-is-file", lambda w: sft(w, "--out", str(w["root"] / "a_file")), ("--out", "a_file")),
    ("train-negative-lr", lambda w: sft(w, "--lr", "-1"), ("--lr", "-1")),
    ("train-student-missing", lambda w: sft(w, "--student", "./nope"), ("--student ./nope", "no such folder")),
    # precompute: data
    ("precompute-teacher-missing", lambda w: pre(w) + ["--teacher", "./nope"], ("--teacher ./nope",)),
    ("precompute-teacher-is-file", lambda w: pre(w) + ["--teacher", str(w["root"] / "a_file")], ("--teacher",)),
    ("precompute-teacher-empty-dir", lambda w: pre(w) + ["--teacher", str(w["root"] / "empty_dir")],
     ("--teacher", "empty_dir")),
    ("precompute-blank-lines", lambda w: pre(w, "blank.jsonl"), ("blank.jsonl",)),
    ("precompute-array-row", lambda w: pre(w, "array.jsonl"), ("array.jsonl", "line 2", "JSON object")),
    ("precompute-huge-int", lambda w: pre(w, "huge_int.jsonl"), ("huge_int.jsonl", "line 2", "64 bits")),
    ("precompute-garbage-parquet", lambda w: pre(w, "garbage.parquet"), ("garbage.parquet",)),
    ("precompute-data-missing", lambda w: pre(w, "missing.jsonl"), ("missing.jsonl", "no such file")),
    ("precompute-no-such-column", lambda w: pre(w) + ["--text-field", "body"], ("body", "not found")),
    ("precompute-no-input-kind", lambda w: [a for a in pre(w) if a not in ("--text-field", "text")], ()),
    # precompute: ranges, choices, combinations
    ("precompute-top-k-zero", lambda w: pre(w) + ["--top-k", "0"], ("--top-k 0", ">= 1")),
    ("precompute-top-k-above-vocab", lambda w: pre(w) + ["--top-k", "100000"], ("100000",)),
    ("precompute-samples-zero", lambda w: _without(pre(w), "--top-k") + ["--mode", "sample", "--samples", "0"],
     ("--samples 0",)),
    ("precompute-temperature-zero", lambda w: _without(pre(w), "--top-k") + ["--mode", "sample", "--temperature",
                                                                               "0"], ("--temperature 0.0", "> 0")),
    ("precompute-temperature-nan", lambda w: pre(w) + ["--temperature", "nan"], ("--temperature nan", "finite")),
    ("precompute-temperature-topk", lambda w: pre(w) + ["--temperature", "2"], ("--temperature",)),
    ("precompute-batch-size-zero", lambda w: pre(w) + ["--batch-size", "0"], ("--batch-size 0",)),
    ("precompute-max-length-one", lambda w: pre(w) + ["--max-length", "1"], ("--max-length 1",)),
    ("precompute-rows-per-shard-word", lambda w: pre(w) + ["--rows-per-shard", "many"], ("--rows-per-shard",)),
    ("precompute-seed-negative", lambda w: pre(w) + ["--seed", "-1"], ("--seed -1",)),
    ("precompute-mode-unknown", lambda w: pre(w) + ["--mode", "argmax"], ("--mode", "argmax")),
    ("precompute-engine-arg", lambda w: pre(w) + ["--engine-arg", "novalue"], ("--engine-arg", "KEY=VALUE")),
    ("precompute-config-range", lambda w: _without(pre(w), "--top-k") + ["--config", str(w["root"] / "cfg_range.yaml")],
     ("--top-k -1", "from --config")),
    ("precompute-config-missing", lambda w: pre(w) + ["--config", str(w["root"] / "nope.yaml")], ("nope.yaml",)),
    ("precompute-config-list", lambda w: pre(w) + ["--config", str(w["root"] / "cfg_list.yaml")],
     ("cfg_list.yaml", "mapping")),
    ("precompute-config-unknown-key", lambda w: pre(w) + ["--config", str(w["root"] / "cfg_unknown.yaml")],
     ("learning_rate",)),
    ("precompute-config-not-yaml", lambda w: pre(w) + ["--config", str(w["root"] / "cfg_bad.yaml")],
     ("cfg_bad.yaml", "YAML")),
    ("precompute-missing-required", lambda w: ["precompute", "--data", "x.jsonl"], ("--teacher", "--out")),
    # merge
    ("merge-missing", lambda w: ["merge", str(w["root"] / "nowhere")], ("nowhere",)),
    ("merge-file", lambda w: ["merge", str(w["root"] / "a_file")], ("a_file",)),
    ("merge-no-record", lambda w: ["merge", str(w["root"] / "empty_dir")], ("empty_dir", "job.json")),
    ("merge-broken-record", lambda w: ["merge", str(w["root"] / "unfinished")], ("unfinished",)),
    # train
    ("train-lr-nan", lambda w: sft(w, "--lr", "nan"), ("--lr nan", "finite")),
    ("train-lr-word", lambda w: sft(w, "--lr", "fast"), ("--lr", "fast")),
    ("train-max-steps-zero", lambda w: sft(w, "--max-steps", "0"), ("--max-steps 0",)),
    ("train-batch-size-negative", lambda w: sft(w, "--batch-size", "-4"), ("--batch-size -4",)),
    ("train-grad-accum-zero", lambda w: sft(w, "--grad-accum", "0"), ("--grad-accum 0",)),
    ("train-temperature-negative", lambda w: tr(w, "--temperature", "-2"), ("--temperature -2.0",)),
    ("train-top-k-zero", lambda w: tr(w, "--top-k", "0"), ("--top-k 0",)),
    ("train-top-k-above-cache", lambda w: tr(w, "--top-k", "5"), ("--top-k 5", "K = 4")),
    ("train-max-length-zero", lambda w: sft(w, "--max-length", "0"), ("--max-length 0",)),
    ("train-warmup-negative", lambda w: sft(w, "--warmup", "-0.1"), ("--warmup -0.1",)),
    ("train-steps-and-epochs", lambda w: sft(w, "--epochs", "1"), ("--max-steps", "--epochs")),
    ("train-student-is-file", lambda w: sft(w, "--student", str(w["root"] / "a_file")), ("--student", "a_file")),
    ("train-student-empty-dir", lambda w: sft(w, "--student", str(w["root"] / "empty_dir")),
     ("--student", "empty_dir")),
    ("train-student-bad-config", lambda w: sft(w, "--student", str(w["root"] / "bad_config_model")),
     ("--student", "bad_config_model")),
    ("train-student-no-weights", lambda w: sft(w, "--student", str(w["root"] / "no_weights")),
     ("--student", "no_weights")),
    ("train-cache-missing", lambda w: tr(w, cache="nowhere"), ("nowhere",)),
    ("train-cache-is-file", lambda w: tr(w, cache="a_file"), ("--cache", "a_file")),
    ("train-cache-unfinished", lambda w: tr(w, cache="unfinished"), ("unfinished",)),
    ("train-sft-data-missing", lambda w: sft(w, data="missing.jsonl"), ("missing.jsonl",)),
    ("train-sft-data-empty", lambda w: sft(w, data="empty.jsonl"), ("empty.jsonl",)),
    ("train-no-cache-no-data", lambda w: _without(sft(w), "--data"), ("--data",)),
    ("train-kd-without-cache", lambda w: _without(tr(w), "--cache"), ("--cache",)),
    ("train-config-type", lambda w: _without(sft(w), "--max-steps") + ["--config", str(w["root"] / "cfg_type.yaml")],
     ("--lr", "fast")),
    ("train-config-float-steps", lambda w: _without(sft(w), "--max-steps")
     + ["--config", str(w["root"] / "cfg_float_steps.yaml")], ("--max-steps 2.5", "whole number", "from --config")),
    ("train-loss-option-bad", lambda w: tr(w, "--loss-option", "beta"), ("--loss-option", "KEY=VALUE")),
    # a cache of the other mode, for each loss that cares
    ("train-rskd-on-topk", lambda w: tr(w, loss="rskd"), ("rskd", "topk", "topk")),
    *[(f"train-{loss}-on-sample", (lambda loss: lambda w: tr(w, loss=loss, cache="sample"))(loss), (loss, "sample"))
      for loss in ("bild", "dkd", "nkd", "normkd", "topk_kl")],
    ("train-top-k-on-sample", lambda w: tr(w, "--top-k", "2", cache="sample"), ("--top-k", "sample")),
    # eval
    ("eval-model-missing", lambda w: ["eval", "--model", "./nope", "--data", str(w["root"] / "good.jsonl")],
     ("--model ./nope",)),
    ("eval-nothing-to-eval", lambda w: ["eval", "--model", w["teacher"]], ("--data", "--cache")),
    ("eval-batch-size-zero", lambda w: ["eval", "--model", w["teacher"], "--data", str(w["root"] / "good.jsonl"),
                                        "--batch-size", "0"], ("--batch-size 0",)),
    ("eval-data-missing", lambda w: ["eval", "--model", w["teacher"], "--data", str(w["root"] / "missing.jsonl")],
     ("missing.jsonl",)),
    ("eval-data-malformed", lambda w: ["eval", "--model", w["teacher"], "--data", str(w["root"] / "malformed.jsonl")],
     ("malformed.jsonl",)),
    ("eval-cache-is-file", lambda w: ["eval", "--model", w["teacher"], "--cache", str(w["root"] / "a_file")],
     ("--cache", "a_file")),
    # validate, inspect, convert
    ("validate-missing", lambda w: ["validate", str(w["root"] / "nowhere")], ("nowhere",)),
    ("validate-file", lambda w: ["validate", str(w["root"] / "a_file")], ("a_file",)),
    ("validate-unfinished", lambda w: ["validate", str(w["root"] / "unfinished")], ("unfinished",)),
    ("validate-broken-index", lambda w: ["validate", str(w["root"] / "broken_index")], ("broken_index",)),
    ("validate-no-cache-given", lambda w: ["validate"], ("required", "cache")),
    ("inspect-missing", lambda w: ["inspect", str(w["root"] / "nowhere")], ("nowhere",)),
    ("inspect-max-shards-zero", lambda w: ["inspect", str(w["root"] / "topk"), "--max-shards", "0"],
     ("--max-shards 0",)),
    ("inspect-plot-into-missing-folder", lambda w: ["inspect", str(w["root"] / "topk"), "--plot",
                                                    str(w["root"] / "nowhere" / "p.png")], ("--plot", "nowhere")),
    ("inspect-plot-is-folder", lambda w: ["inspect", str(w["root"] / "topk"), "--plot", str(w["root"] / "empty_dir")],
     ("--plot", "empty_dir")),
    ("convert-format-unknown", lambda w: ["convert", str(w["root"] / "topk"), str(w["root"] / "c1"), "--backend",
                                          "csv"], ("--backend", "csv")),
    ("convert-src-missing", lambda w: ["convert", str(w["root"] / "nowhere"), str(w["root"] / "c2"), "--backend",
                                       "arrow"], ("nowhere",)),
    ("convert-src-unfinished", lambda w: ["convert", str(w["root"] / "unfinished"), str(w["root"] / "c3"),
                                          "--backend", "arrow"], ("unfinished",)),
    ("convert-dst-is-file", lambda w: ["convert", str(w["root"] / "topk"), str(w["root"] / "a_file"), "--backend",
                                       "arrow"], ("a_file",)),
    # push (each refused before any upload is tried: no network here)
    ("push-missing", lambda w: ["push", str(w["root"] / "nowhere"), "me/logits"], ("nowhere",)),
    ("push-file", lambda w: ["push", str(w["root"] / "a_file"), "me/logits"], ("a_file",)),
    ("push-unfinished", lambda w: ["push", str(w["root"] / "unfinished"), "me/logits"], ("unfinished",)),
    ("push-remote-cache", lambda w: ["push", "s3://bucket/cache", "me/logits"], ("s3://bucket/cache",)),
    ("push-zarr", lambda w: ["push", str(w["root"] / "topk"), "me/logits"],
     ("zarr cache", "logitcache convert", "--backend parquet")),
    ("push-mass-shards-negative", lambda w: ["push", str(w["root"] / "topk"), "me/logits", "--mass-shards", "-1"],
     ("--mass-shards -1",)),
    ("push-no-repo-id", lambda w: ["push", str(w["root"] / "topk")], ("required", "REPO_ID")),
    # the top level
    ("unknown-command", lambda w: ["distill"], ("distill",)),
    ("no-command", lambda w: [], ("<command>",)),
]


def _without_flag(argv: list[str], flag: str) -> list[str]:
    return [a for a in argv if a != flag]


def _without(argv: list[str], flag: str) -> list[str]:
    """argv less `flag` and its value."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_invocation(case, world, capsys, tmp_path):
    _, make_argv, named = case
    # Each case writes (if it gets that far) into its own folder.
    argv = [str(tmp_path / a.rsplit("/", 1)[1]) if a.endswith(("/out_pre", "/out_train", "/out_sft")) else a
            for a in make_argv(world)]
    rc = cli.main(argv)
    err = capsys.readouterr().err
    command = argv[0] if argv and argv[0] in cli.COMMANDS else None
    assert_contract(rc, err, command, named)
    if "bar-drawn" in case[0]:
        assert "pos" in err  # the bar was drawn, and the error still has its own line


def test_the_sweep_covers_every_command():
    covered = {name.split("-")[0] for name, _, _ in CASES}
    assert set(cli.COMMANDS) <= covered, set(cli.COMMANDS) - covered


def test_nothing_written_for_refused_options(world, capsys):
    """Options are checked before anything is created: a refused run leaves no --out behind."""
    out = world["root"] / "never_made"
    assert cli.main(pre(world) + ["--out", str(out), "--top-k", "0"]) == 2
    assert cli.main(sft(world, "--out", str(out), "--lr", "0")) == 2
    capsys.readouterr()
    assert not out.exists()


# --- real processes (slow: ~10 s each): a progress bar on a real stderr, --debug ---------------------------


def _run(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "logitcache.pipeline", *argv], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def test_error_is_not_glued_to_the_progress_bar(world):
    """The issue's `precompute: 0.00pos [00:00, ?pos/s]logitcache precompute: error: ...`: with the bar
    drawn, the error still starts its own line."""
    argv = [a for a in pre(world, "number.jsonl", "--strict") if a != "--no-progress"]
    argv[argv.index("--out") + 1] = str(world["root"] / "out_strict")
    proc = _run(argv)
    assert "pos" in proc.stderr  # the bar was drawn
    assert_contract(proc.returncode, proc.stderr, "precompute", ("row 0",))


@pytest.mark.slow
def test_debug_shows_the_traceback(world):
    argv = sft(world, "--lr", "-1")
    proc = _run(argv)
    assert_contract(proc.returncode, proc.stderr, "train", ("--lr",))
    with_flag = _run(argv + ["--debug"])
    with_env = _run(argv, env={"LOGITCACHE_DEBUG": "1"})
    for p in (with_flag, with_env):
        assert p.returncode != 0
        assert "Traceback" in p.stderr and "ConfigError: --learning-rate/--lr -1.0: must be > 0" in p.stderr


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """An exception that is not the library's is a bug: it is raised, never dressed as a user error."""
    from logitcache.pipeline.commands import validate

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(validate, "run", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["validate", "somewhere"])


def test_os_errors_become_one_line(monkeypatch, capsys):
    """An OSError that reaches the CLI (a disk full while writing) is the environment's: one line naming the path."""
    import errno

    from logitcache.pipeline.commands import validate

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/shards/00003.zarr")

    monkeypatch.setattr(validate, "run", full)
    rc = cli.main(["validate", "somewhere"])
    assert_contract(rc, capsys.readouterr().err, "validate", ("/cache/shards/00003.zarr", "No space left"))


# --- hypothesis: option values in and out of range, as flags and as YAML ------------------------------------

# The oracle, written from the --help texts: (command, flag) -> (int or float, is the value allowed).
ORACLE = {
    ("train", "--lr"): (float, lambda v: v > 0),
    ("train", "--weight-decay"): (float, lambda v: v >= 0),
    ("train", "--warmup"): (float, lambda v: v >= 0),
    ("train", "--temperature"): (float, lambda v: v > 0),
    ("train", "--ce-weight"): (float, lambda v: v >= 0),
    ("train", "--max-steps"): (int, lambda v: v >= 1),
    ("train", "--batch-size"): (int, lambda v: v >= 1),
    ("train", "--grad-accum"): (int, lambda v: v >= 1),
    ("train", "--top-k"): (int, lambda v: v >= 1),
    ("train", "--max-length"): (int, lambda v: v >= 2),
    ("train", "--num-workers"): (int, lambda v: v >= 0),
    ("train", "--seed"): (int, lambda v: 0 <= v < 2**32),
    ("precompute", "--top-k"): (int, lambda v: v >= 1),
    ("precompute", "--samples"): (int, lambda v: v >= 1),
    ("precompute", "--temperature"): (float, lambda v: v > 0),
    ("precompute", "--batch-size"): (int, lambda v: v >= 1),
    ("precompute", "--rows-per-shard"): (int, lambda v: v >= 1),
    ("precompute", "--max-length"): (int, lambda v: v >= 2),
    ("precompute", "--max-batch-tokens"): (int, lambda v: v >= 1),
    ("eval", "--batch-size"): (int, lambda v: v >= 1),
    ("eval", "--max-sequences"): (int, lambda v: v >= 1),
    ("inspect", "--max-shards"): (int, lambda v: v >= 1),
}
EDGES = [0, 1, 2, -1, 2**32 - 1, 2**32, 10**30]


def _base(command: str, root: Path, teacher: str) -> list[str]:
    return {"train": ["train", "--student", teacher, "--out", str(root / "hyp_out"), "--max-steps", "1"],
            "precompute": ["precompute", "--teacher", teacher, "--data", "rows.jsonl", "--out", str(root / "hyp")],
            "eval": ["eval", "--model", teacher],
            "inspect": ["inspect", str(root / "hyp_cache")]}[command]


def _outcome(argv: list[str]):
    """(error message or None) of parsing and checking argv, without running the command."""
    try:
        parser = cli.build_parser()
        args, from_config = cli._parse_with_config(parser, argv)
        check_options(argv[0], parser._subparsers._group_actions[0].choices[argv[0]], args, from_config)
    except ConfigError as e:
        return str(e)
    return None


values = st.one_of(st.sampled_from(EDGES), st.integers(-(10**12), 10**12),
                   st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1e-8, -0.0, 2.5]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(ORACLE)), value=values)
def test_option_ranges_flags_and_yaml_alike(key, value, tiny_teacher, tmp_path_factory):
    command, flag = key
    kind, allowed = ORACLE[key]
    root = tmp_path_factory.getbasetemp()
    base = _base(command, root, str(tiny_teacher[0]))
    if flag in base:
        base = _without(base, flag)
    expected_ok = (isinstance(value, int) or kind is float) and math.isfinite(value) and allowed(value)
    if kind is int and isinstance(value, float):
        expected_ok = False  # a whole number was asked for

    from_flag = _outcome(base + [f"{flag}={value!r}"])
    config = root / f"hyp_{command}.yaml"
    config.write_text(yaml.safe_dump({flag[2:].replace("-", "_"): value}))
    has_config = any(a.dest == "config" for a in cli.build_parser()._subparsers._group_actions[0].choices[command]._actions)
    from_yaml = _outcome(base + ["--config", str(config)]) if has_config else from_flag

    for outcome in (from_flag, from_yaml):
        assert (outcome is None) == expected_ok, (flag, value, outcome)
        if outcome is not None:
            assert flag in outcome, outcome


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(ORACLE)), value=st.one_of(st.integers(-(10**6), 0), st.just(float("nan"))))
def test_out_of_range_values_take_the_error_path(key, value, tiny_teacher, tmp_path_factory, capsys):
    """The whole contract through cli.main for values every oracle refuses (nothing is loaded: the checks come first)."""
    command, flag = key
    kind, allowed = ORACLE[key]
    if isinstance(value, int) and allowed(value):
        return  # 0 is allowed for some options (e.g. --weight-decay)
    base = _base(command, tmp_path_factory.getbasetemp(), str(tiny_teacher[0]))
    if flag in base:
        base = _without(base, flag)
    rc = cli.main(base + [f"{flag}={value!r}"])
    assert_contract(rc, capsys.readouterr().err, command, (flag,))


def test_help_mentions_debug():
    out = subprocess.run([sys.executable, "-m", "logitcache.pipeline", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--debug" in out.stdout and "LOGITCACHE_DEBUG" in out.stdout
