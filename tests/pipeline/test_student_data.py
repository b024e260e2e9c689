"""`train --data` and `eval --data` take what `precompute --data` takes (`storage.rows.load_rows`): Parquet
and JSON lines on a real S3-compatible server (moto, loopback) with `--storage-option`, a local
datasets-style folder with its splits, read by the field flags; and the chat options' command line
(`--print-config` and `--config` round trip, the refusals).

The yardstick for "the rows were read as the field flags say": eval's count of supervised tokens equals
the count taken straight from the tokenizer (responses + EOS; text: every token but the first).

    .venv/bin/pytest tests/pipeline/test_student_data.py
"""

import json
import os
from pathlib import Path

import pytest
import yaml
from s3server import make_bucket, s3_options
from trainkit import text_rows, world

from logitcache.pipeline.cli import main

BUCKET = "lc-student-data"
TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"


def _qa(n: int, seed: int) -> list[dict]:
    return [{"id": i, "question": r["prompt"], "answer": r["response"]} for i, r in enumerate(text_rows(n, seed))]


def _response_tokens(tok, rows) -> int:
    """Supervised tokens of prompt/response rows in the plain format: the response's tokens and EOS."""
    return sum(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def remote(s3, tmp_path_factory):
    """(endpoint, parquet folder URL and its rows, jsonl URL and its rows) on the moto server."""
    import s3fs

    endpoint, _ = s3
    make_bucket(endpoint, BUCKET)
    fs = s3fs.S3FileSystem(**s3_options(endpoint))
    root = tmp_path_factory.mktemp("student_data")
    parquet_rows, jsonl_rows = _qa(12, seed=5), _qa(6, seed=6)
    _write_parquet(root / "qa" / "part-0.parquet", parquet_rows[:7])
    _write_parquet(root / "qa" / "part-1.parquet", parquet_rows[7:])
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in jsonl_rows))
    fs.put(str(root / "qa"), f"{BUCKET}/qa", recursive=True)
    fs.put(str(root / "heldout.jsonl"), f"{BUCKET}/heldout.jsonl")
    return endpoint, f"s3://{BUCKET}/qa/", parquet_rows, f"s3://{BUCKET}/heldout.jsonl", jsonl_rows


def _options(endpoint: str) -> list[str]:
    return ["--storage-option", f"endpoint_url={endpoint}", "--storage-option", "key=testing",
            "--storage-option", "secret=testing"]


def test_sft_from_s3_parquet_then_eval_an_s3_jsonl_by_field_flags(remote, tmp_path, monkeypatch, capsys):
    endpoint, parquet, parquet_rows, jsonl, jsonl_rows = remote
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)  # the options alone carry the endpoint and the credentials
    w = world()
    fields = ["--prompt-field", "question", "--response-field", "answer"]
    out = tmp_path / "sft"
    # One DataLoader worker: the loaded rows travel to another process.
    rc = main(["train", "--student", str(w.student), "--data", parquet, *fields, *_options(endpoint), "--loss", "sft",
               "--out", str(out), "--epochs", "1", "--batch-size", "4", "--num-workers", "1", "--save-steps", "1000"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "logitcache_train.json").read_text())
    assert result["global_step"] == 3 and result["sequences_per_rank"] == len(parquet_rows)  # 12 rows, batches of 4
    assert result["settings"]["prompt_field"] == "question" and result["data"] == parquet
    capsys.readouterr()
    rc = main(["eval", "--model", str(out), "--data", jsonl, *fields, *_options(endpoint), "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads(captured.out)["data"]
    assert data["sequences"] == len(jsonl_rows) and data["positions"] == _response_tokens(w.tokenizer, jsonl_rows)
    # --split slices a URL's rows as precompute's loader does.
    rc = main(["eval", "--model", str(out), "--data", parquet, *fields, *_options(endpoint), "--split", "train[2:5]",
               "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out)["data"]["positions"] == _response_tokens(w.tokenizer, parquet_rows[2:5])


def test_a_local_datasets_folder_with_splits_and_a_text_field(tmp_path, capsys):
    w = world()
    rows = [{"body": f"{r['prompt']} {r['response']}", "n": i} for i, r in enumerate(text_rows(10, seed=7))]
    folder = tmp_path / "corpus"
    _write_parquet(folder / "data" / "train-00000-of-00001.parquet", rows[:6])
    _write_parquet(folder / "data" / "test-00000-of-00001.parquet", rows[6:])
    rc = main(["eval", "--model", str(w.student), "--data", str(folder), "--split", "test", "--text-field", "body",
               "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads(captured.out)["data"]
    expected = sum(len(w.tokenizer(r["body"])["input_ids"]) - 1 for r in rows[6:])  # text: all tokens but the first
    assert data["sequences"] == 4 and data["positions"] == expected
    out = tmp_path / "sft"
    rc = main(["train", "--student", str(w.student), "--data", str(folder), "--text-field", "body", "--loss", "sft",
               "--eval-data", str(folder), "--eval-split", "test", "--out", str(out), "--max-steps", "2", "--batch-size", "2",
               "--num-workers", "0", "--save-steps", "1000"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "logitcache_train.json").read_text())
    # --eval-data is read with --data's field flags, at --eval-split.
    assert result["global_step"] == 2 and result["eval"]["sequences"] == 4
    assert result["eval"]["positions"] == expected
    capsys.readouterr()
    rc = main(["train", "--student", str(w.student), "--data", str(folder), "--text-field", "text", "--loss", "sft",
               "--out", str(tmp_path / "o"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "column(s) ['text'] not found; it has ['body', 'n']" in err


def test_chat_options_round_trip_through_print_config_and_config(tmp_path, capsys):
    template = str(TEMPLATES / "qwen3.jinja")
    line = ["train", "--student", "Qwen/Qwen3-0.6B", "--data", "s3://bucket/chats/", "--messages-field", "conversation",
            "--split", "train[:100]", "--chat-template", template, "--chat-template-kwargs", "enable_thinking=false",
            "--chat-template-kwargs", "effort={level: low}", "--loss", "sft", "--out", str(tmp_path / "o"),
            "--max-steps", "10", "--print-config"]
    assert main(line) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["chat_template"] == template and printed["split"] == "train[:100]"
    assert printed["chat_template_kwargs"] == {"enable_thinking": False, "effort": {"level": "low"}}
    assert printed["messages_field"] == "conversation"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(printed))
    assert main(["train", "--config", str(config), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == printed
    for command in (["precompute", "--teacher", "Qwen/Qwen3-8B", "--data", "chats.jsonl", "--messages-field", "m",
                     "--out", str(tmp_path / "c")],
                    ["eval", "--model", "Qwen/Qwen3-0.6B", "--data", "s3://bucket/chats/", "--split", "test",
                     "--messages-field", "m"]):
        assert main([*command, "--chat-template", template, "--chat-template-kwargs", "enable_thinking=false",
                     "--print-config"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["chat_template_kwargs"] == {"enable_thinking": False} and printed["chat_template"] == template
        config.write_text(yaml.safe_dump(printed))
        assert main([command[0], "--config", str(config), "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out) == printed


def test_a_chat_template_file_behind_a_url(remote):
    """--chat-template takes a URL as --data does, with the same storage options."""
    import s3fs

    from logitcache.storage.inputs import ChatOptions

    endpoint = remote[0]
    s3fs.S3FileSystem(**s3_options(endpoint)).put(str(TEMPLATES / "qwen3.jinja"), f"{BUCKET}/templates/qwen3.jinja")
    chat = ChatOptions.load(f"s3://{BUCKET}/templates/qwen3.jinja", {"enable_thinking": False},
                            storage_options=s3_options(endpoint))
    assert chat.template == (TEMPLATES / "qwen3.jinja").read_text() and chat.kwargs == {"enable_thinking": False}


@pytest.mark.parametrize("argv, message", [
    (["train", "--student", "Qwen/Qwen3-0.6B", "--cache", "/c", "--split", "test", "--out", "/tmp/o", "--max-steps", "1"],
     "--split describe how --data (and --eval-data) are read; give --data"),
    (["eval", "--model", "Qwen/Qwen3-0.6B", "--cache", "/c", "--text-field", "t"],
     "--text-field describe how --data is read; give --data"),
    (["precompute", "--teacher", "Qwen/Qwen3-8B", "--data", "d.jsonl", "--text-field", "t", "--out", "/tmp/c",
      "--chat-template-kwargs", "enable_thinking=false"], "go with --messages-field or --prompt-format chat"),
    (["train", "--student", "Qwen/Qwen3-0.6B", "--data", "d.jsonl", "--loss", "sft", "--out", "/tmp/o",
      "--max-steps", "1", "--messages-field", "m", "--chat-template-kwargs", "tools=[]"],
     "'tools' is a parameter of apply_chat_template"),
    (["eval", "--model", "Qwen/Qwen3-0.6B", "--data", "d.jsonl", "--chat-template-kwargs", "enable_thinking"],
     "expected KEY=VALUE"),
    (["eval", "--model", "Qwen/Qwen3-0.6B", "--data", "d.jsonl", "--chat-template", str(TEMPLATES)],
     "is a folder; expected a file"),
])
def test_refusals_at_print_config(argv, message, capsys):
    assert main([*argv, "--print-config"]) == 2
    assert message in capsys.readouterr().err
