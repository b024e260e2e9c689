"""Stage one's inputs without a model: loading DATA in its forms, fingerprints, and row encoding rules.

    .venv/bin/pytest tests/stages/precompute/test_precompute_data.py     # ~10 s
"""

from __future__ import annotations

import copy
import shutil

import datasets
import numpy as np
import pytest
from precompute_util import mixed_rows, write_jsonl

from logitcache.stages.precompute.data import Encoded, InputSpec, RowEncoder, Skipped, load_rows
from logitcache.stages.precompute.plan import owned_shards, sequence_seed, shard_rows
from logitcache.storage.errors import ConfigError, InvalidDataError

ROWS = [{"text": f"row {i} some words", "n": i} for i in range(10)]


def test_local_forms_load_the_same_rows(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "parts").mkdir()
    ds.select(range(5)).to_parquet(str(tmp_path / "parts" / "p0.parquet"))
    ds.select(range(5, 10)).to_parquet(str(tmp_path / "parts" / "p1.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    forms = {"jsonl": (str(tmp_path / "a.jsonl"), None), "parquet folder": (str(tmp_path / "parts"), None),
             "save_to_disk": (str(tmp_path / "saved"), None), "DatasetDict": (str(tmp_path / "dict"), "train")}
    for name, (path, split) in forms.items():
        loaded, info = load_rows(path, split=split)
        assert loaded["text"] == [r["text"] for r in ROWS], name
        assert info["num_rows"] == 10 and info["fingerprint"], name
    assert load_rows(str(tmp_path / "dict"), split="test")[1]["num_rows"] == 3
    assert load_rows(str(tmp_path / "a.jsonl"), split="train[:4]")[1]["num_rows"] == 4


def test_file_fingerprint_follows_content_not_path(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "copy").mkdir()
    b = shutil.copy(a, tmp_path / "copy" / "a.jsonl")
    assert load_rows(str(a))[1]["fingerprint"] == load_rows(str(b))[1]["fingerprint"]
    c = write_jsonl(tmp_path / "c.jsonl", ROWS[:-1])
    assert load_rows(str(c))[1]["fingerprint"] != load_rows(str(a))[1]["fingerprint"]


def test_bad_data_locations(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="no such file"):
        load_rows("./not/here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .* files found"):
        load_rows(str(tmp_path / "empty"))
    (tmp_path / "mixed").mkdir()
    write_jsonl(tmp_path / "mixed" / "a.jsonl", ROWS)
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "mixed" / "b.parquet"))
    with pytest.raises(ConfigError, match="mixes file kinds"):
        load_rows(str(tmp_path / "mixed"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ConfigError, match="split 'validation' not found"):
        load_rows(str(tmp_path / "dd"), split="validation")
    # HF_HUB_OFFLINE=1 (tests/conftest.py): a hub id fails as our error, naming it.
    with pytest.raises(ConfigError, match="nobody/no-such-dataset"):
        load_rows("nobody/no-such-dataset")


def test_input_spec_choices():
    assert InputSpec.build(text_field="t", max_length=8).stored_fields == ("text",)
    assert InputSpec.build(prompt_field="p", response_field="r", max_length=8).kind == "prompt_response"
    assert InputSpec.build(messages_field="m", max_length=8).describe()["supervision"] == "assistant"
    for bad in (dict(), dict(text_field="t", messages_field="m"), dict(response_field="r")):
        with pytest.raises(ConfigError):
            InputSpec.build(max_length=8, **bad)
    with pytest.raises(ConfigError, match="max-length"):
        InputSpec.build(text_field="t", max_length=1)


def test_skip_reasons_and_strict_errors(tiny_teacher):
    tok = tiny_teacher[1]
    encode = RowEncoder(tok, InputSpec.build(prompt_field="p", response_field="r", max_length=64))
    cases = {"missing": {"r": "x"}, "not_string": {"p": ["a"], "r": "x"}, "empty": {"p": "", "r": "x"}}
    for reason, row in cases.items():
        out = encode(row)
        assert isinstance(out, Skipped) and out.reason == reason and out.field == "p"
        with pytest.raises(InvalidDataError, match="DATA row 7: field 'p'"):
            raise out.error(7)
    # A prompt that fills max_length leaves nothing to supervise.
    short = RowEncoder(tok, InputSpec.build(prompt_field="p", response_field="r", max_length=4))
    assert short({"p": "teacher student logits model", "r": " tokens"}).reason == "no_supervised"
    text = RowEncoder(tok, InputSpec.build(text_field="t", max_length=64))
    assert text({"t": "a"}).reason == "too_short"


def test_prompt_response_truncation_cuts_stored_response(tiny_teacher):
    tok = tiny_teacher[1]
    row = {"p": "the teacher", "r": " logits " * 30}
    out = RowEncoder(tok, InputSpec.build(prompt_field="p", response_field="r", max_length=12))(row)
    assert isinstance(out, Encoded) and out.truncated and len(out.token_ids) == 12
    p = tok("the teacher")["input_ids"]
    np.testing.assert_array_equal(out.positions, np.arange(len(p) - 1, 11))
    assert row["r"].startswith(out.texts["response"]) and tok.decode(out.token_ids[len(p):]) == out.texts["response"]


def test_chat_spans(tiny_teacher):
    tok = tiny_teacher[1]
    encode = RowEncoder(tok, InputSpec.build(messages_field="m", max_length=256))
    msgs = mixed_rows()[0]["messages"]
    out = encode({"m": msgs})
    supervised = tok.decode(np.asarray(out.token_ids)[out.positions + 1])
    assert supervised == f"{msgs[2]['content']}<|eos|>\n{msgs[4]['content']}<|eos|>\n"
    # An assistant message that opens the conversation has no context and is not supervised.
    opening = encode({"m": [{"role": "assistant", "content": "hello"}, *msgs[1:]]})
    assert "hello" not in tok.decode(np.asarray(opening.token_ids)[opening.positions + 1])
    assert encode({"m": msgs[:2]}).reason == "no_assistant"
    assert encode({"m": [{"role": "user"}]}).reason == "not_string"
    assert encode({"m": []}).reason == "empty"


def test_chat_template_that_rewrites_history_keeps_the_conversation(tiny_teacher):
    """A template that drops earlier assistant content (as reasoning templates drop earlier thinking) is
    rendered once as a whole: its assistant spans are supervised as the model sees them, nothing skipped."""
    tok = copy.deepcopy(tiny_teacher[1])
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}"
        "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    encode = RowEncoder(tok, InputSpec.build(messages_field="m", max_length=256))
    msgs = mixed_rows()[0]["messages"]
    out = encode({"m": msgs})
    assert isinstance(out, Encoded)
    assert out.token_ids == tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    supervised = tok.decode(np.asarray(out.token_ids)[out.positions + 1])
    assert supervised == f"...<|eos|>\n{msgs[4]['content']}<|eos|>\n"


def test_chat_template_that_rewrites_earlier_user_turns_is_skipped(tiny_teacher):
    """A template that renders a user turn differently once the conversation goes on: skipped, counted."""
    tok = copy.deepcopy(tiny_teacher[1])
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}\n"
        "{% if m['role'] == 'user' and not loop.last %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}"
        "{% endif %}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    encode = RowEncoder(tok, InputSpec.build(messages_field="m", max_length=256))
    out = encode({"m": mixed_rows()[0]["messages"]})
    assert isinstance(out, Skipped) and out.reason == "template_mismatch" and "differently" in out.detail


def test_shard_plan():
    assert shard_rows(2, 4, 14) == (8, 12) and shard_rows(3, 4, 14) == (12, 14)
    assert owned_shards(7, 3, 1) == [1, 4]
    with pytest.raises(ConfigError, match="--job-index 2"):
        owned_shards(7, 2, 2)
    assert sequence_seed(0, 5) == sequence_seed(0, 5) != sequence_seed(0, 6) != sequence_seed(1, 5)


def test_folder_splits_follow_file_names(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    (tmp_path / "repo" / "data").mkdir(parents=True)
    ds.select(range(7)).to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    ds.select(range(7, 10)).to_parquet(str(tmp_path / "repo" / "data" / "test-00000-of-00001.parquet"))
    train, train_info = load_rows(str(tmp_path / "repo"))
    test, test_info = load_rows(str(tmp_path / "repo"), split="test")
    assert train["n"] == list(range(7)) and test["n"] == [7, 8, 9]
    assert train_info["fingerprint"] != test_info["fingerprint"]
    with pytest.raises(ConfigError, match="split 'validation' not found"):
        load_rows(str(tmp_path / "repo"), split="validation")
