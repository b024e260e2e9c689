"""`logitcache.pipeline.api`: the commands from Python, with the CLI's option names and checks, returning
results instead of printing them.

    .venv/bin/pytest tests/pipeline/test_api.py
"""

import json

import pytest
from trainkit import world

from logitcache.pipeline import api
from logitcache.pipeline.cli import COMMANDS
from logitcache.storage.errors import ConfigError


def test_one_function_per_command():
    names = {"eval": "evaluate"}
    assert {names.get(c, c) for c in COMMANDS} | {"open_cache"} == set(api.__all__)


def test_storage_commands_return_results(tmp_path, capsys):
    w = world()
    checked = api.validate(cache=str(w.cache))
    assert checked["problems"] == [] and checked["sequences"] == len(api.open_cache(str(w.cache)))
    summary = api.inspect(cache=str(w.cache), max_shards=2)
    assert summary["sequences"] == checked["sequences"] and summary["top_k"] == 8
    index = api.convert(src=str(w.cache), dst=str(tmp_path / "parquet"), backend="parquet")
    assert index["backend"] == "arrow" and api.validate(cache=str(tmp_path / "parquet"))["problems"] == []
    assert capsys.readouterr().out == ""  # results are returned, not printed


def test_train_and_evaluate_take_the_cli_names(tmp_path):
    w = world()
    out = tmp_path / "student"
    # transformers' spellings and logitcache's own alike
    result = api.train(student=str(w.student), cache=str(w.cache), loss="kl", output_dir=str(out), max_steps=2,
                       per_device_train_batch_size=4, learning_rate=1e-3, num_workers=0, save_steps=1000)
    assert result["global_step"] == 2 and result == json.loads((out / "logitcache_train.json").read_text())
    metrics = api.evaluate(model=str(out), cache=str(w.cache), device="cpu")
    assert 0 <= metrics["cache"]["teacher_agreement"] <= 1


def test_the_same_checks_as_the_command_line():
    w = world()
    with pytest.raises(ConfigError, match="exactly one of --max-steps and --epochs"):
        api.train(student=str(w.student), cache=str(w.cache), out="/tmp/never")
    with pytest.raises(ConfigError, match=r"--top-k.* -1: must be >= 1"):
        api.precompute(teacher=str(w.teacher), data="d.jsonl", out="/tmp/never", top_k=-1)
    with pytest.raises(ConfigError, match="unknown option.*topk"):
        api.precompute(teacher=str(w.teacher), data="d.jsonl", out="/tmp/never", topk=8)
    with pytest.raises(ConfigError, match=r"validate\(\): cache required"):
        api.validate()
