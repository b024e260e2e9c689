"""Stage one end to end in-process (hf engine on the tiny teacher): input kinds x backends, supervision,
counts, sample mode, job split + merge, bad input, and the vLLM engine. Ray: test_precompute_ray.py.

    .venv/bin/pytest tests/stages/precompute/test_precompute.py                       # hf engine, one process
    .venv/bin/pytest tests/stages/precompute/test_precompute.py -m "slow or not slow"  # with vLLM: ~1 min on 2 CPU cores
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from precompute_util import (EMPTY_ROWS, LONG_ROW, MAX_LENGTH, MISSING_ROWS, NOT_STRING_ROWS, NUM_ROWS, K,
                             assert_same_cache, mixed_rows, run, text_rows, write_jsonl)

from logitcache.pipeline.cli import main as cli_main
from logitcache.stages.precompute.engines import build_engine
from logitcache.stages.precompute.plan import finalize_cache, read_job_record, writer_from_record
from logitcache.storage import open_cache
from logitcache.storage.errors import CacheIndexError, ConfigError, InvalidDataError

# `teacher` and `hf_engine` (top-K) are conftest's fixtures; `run` is precompute_util's.
FIELDS = {"text": dict(text_field="text"), "prompt_response": dict(prompt_field="prompt", response_field="response"),
          "chat": dict(messages_field="messages")}


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "mixed.jsonl", mixed_rows())


def expected_chat_positions(tokenizer, messages, max_length):
    """Assistant-turn positions by a second method: token-level prefix rendering."""
    def ids(m, gen):
        return tokenizer.apply_chat_template(m, tokenize=True, add_generation_prompt=gen)["input_ids"]

    positions = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i > 0:
            lo, hi = len(ids(messages[:i], True)), len(ids(messages[: i + 1], False))
            positions += [j - 1 for j in range(lo, hi) if j < max_length]
    return np.array(positions)


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
@pytest.mark.parametrize("kind", ["text", "prompt_response", "chat"])
def test_input_kinds(kind, backend, tiny_teacher, teacher, hf_engine, mixed_data, tmp_path):
    tok = tiny_teacher[1]
    result = run(teacher, mixed_data, tmp_path / "cache", hf_engine, backend=backend, max_length=MAX_LENGTH, **FIELDS[kind])
    assert result.finished
    cache = open_cache(str(tmp_path / "cache"))
    assert cache.validate() == []
    assert cache.backend == backend and cache.k == K

    rows = mixed_rows()
    bad = set(MISSING_ROWS) | set(NOT_STRING_ROWS) | set(EMPTY_ROWS)
    good = [i for i in range(NUM_ROWS) if i not in bad]
    counts = cache.index["counts"]
    assert counts["rows"] == NUM_ROWS and counts["sequences"] == len(good)
    assert counts["skipped_missing"] == len(MISSING_ROWS)
    assert counts["skipped_not_string"] == len(NOT_STRING_ROWS)
    assert counts["skipped_empty"] == len(EMPTY_ROWS)
    assert counts["skipped"] == len(bad) and counts["truncated"] == 1
    assert [e["sequences"] for e in cache.shards] == [3, 3, 0, 2]  # shard 2: every row skipped
    assert cache.index["inputs"]["kind"] == kind and cache.index["text_fields"] == list(
        {"text": ["text"], "prompt_response": ["prompt", "response"], "chat": ["messages"]}[kind])

    for seq in cache:
        r, ids, pos = rows[seq["row_index"]], list(seq["input_ids"]), seq["positions"]
        assert len(ids) <= MAX_LENGTH
        if kind == "text":
            full = tok(r["text"])["input_ids"]
            assert ids == full[:MAX_LENGTH]
            np.testing.assert_array_equal(pos, np.arange(len(ids) - 1))
            assert tok.decode(ids) == seq["text"]  # stored text = what the kept tokens cover
        elif kind == "prompt_response":
            p = tok(r["prompt"])["input_ids"]
            assert ids[: len(p)] == p
            np.testing.assert_array_equal(pos, np.arange(len(p) - 1, len(ids) - 1))  # response-only
            assert seq["prompt"] == r["prompt"]
            assert tok.decode(ids[len(p):]).removesuffix(tok.eos_token) == seq["response"]
            if seq["row_index"] != LONG_ROW:
                assert ids[-1] == tok.eos_token_id and seq["response"] == r["response"]
        else:
            full = tok.apply_chat_template(r["messages"], tokenize=True)["input_ids"]
            assert ids == full[:MAX_LENGTH]
            np.testing.assert_array_equal(pos, expected_chat_positions(tok, r["messages"], MAX_LENGTH))
            assert json.loads(seq["messages"]) == r["messages"]
            # Only assistant text (and its end-of-turn) is supervised.
            supervised = tok.decode(np.asarray(ids)[pos + 1])
            assert r["messages"][2]["content"] in supervised and "be brief" not in supervised
        if seq["row_index"] == LONG_ROW:
            assert len(ids) == MAX_LENGTH


def test_sample_mode_independent_of_batching(teacher, mixed_data, tmp_path):
    engine = build_engine("hf", teacher, mode="sample", num_samples=16, temperature=0.7)
    try:
        common = dict(mode="sample", top_k=None, samples=16, temperature=0.7, seed=5, text_field="text",
                      max_length=MAX_LENGTH)
        run(teacher, mixed_data, tmp_path / "a", engine, batch_size=1, **common)
        run(teacher, mixed_data, tmp_path / "b", engine, batch_size=5, **common)
        run(teacher, mixed_data, tmp_path / "c", engine, batch_size=5, rows_per_shard=7, **common)
        run(teacher, mixed_data, tmp_path / "d", engine, batch_size=5, **{**common, "seed": 6})
    finally:
        engine.close()
    a, b, c, d = (open_cache(str(tmp_path / x)) for x in "abcd")
    assert a.validate() == [] and a.mode == "sample" and a.k == 16
    assert_same_cache(tmp_path / "a", tmp_path / "b")  # batching changes nothing
    # Another shard layout is another cache, but each sequence's draws are the same.
    assert c.fingerprint != a.fingerprint
    for x, y in zip(a, c):
        assert x["row_index"] == y["row_index"]
        np.testing.assert_array_equal(x["topk_ids"], y["topk_ids"])
        np.testing.assert_array_equal(x["sample_counts"], y["sample_counts"])
        assert np.all(x["sample_counts"].sum(axis=1) == 16)
        assert np.all((x["topk_ids"] == -1) == (x["sample_counts"] == 0))
    assert any(not np.array_equal(x["sample_counts"], y["sample_counts"]) for x, y in zip(a, d))  # the seed matters
    assert a.index["sparsification"]["sample_logz"] is True


def test_sample_mode_stores_each_draws_exact_probability(teacher, mixed_data, tmp_path):
    """sample_logz: the reader's sample_logprobs are log softmax(logits / tau) at the drawn ids, against a
    plain transformers forward of the teacher (the yardstick), so rskd's importance weights are exact."""
    import torch
    from transformers import AutoModelForCausalLM

    engine = build_engine("hf", teacher, mode="sample", num_samples=16, temperature=0.7)
    try:
        run(teacher, mixed_data, tmp_path / "a", engine, batch_size=5, mode="sample", top_k=None, samples=16,
            temperature=0.7, seed=5, text_field="text", max_length=MAX_LENGTH)
    finally:
        engine.close()
    cache = open_cache(str(tmp_path / "a"))
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    for seq in list(cache)[:3]:
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(seq["input_ids"][None], dtype=torch.long)).logits[0]
        want = torch.log_softmax(logits.double() / 0.7, -1)[torch.as_tensor(seq["positions"], dtype=torch.long)]
        ids = torch.as_tensor(seq["topk_ids"], dtype=torch.long)
        valid = ids >= 0
        got = torch.as_tensor(seq["sample_logprobs"], dtype=torch.float64)
        torch.testing.assert_close(got[valid], want.gather(1, ids.clamp(min=0))[valid], atol=2e-3, rtol=1e-4)
        assert (got[~valid] == 0).all()


def test_job_split_and_merge(teacher, hf_engine, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", text_rows(20))
    single = tmp_path / "single"
    run(teacher, data, single, hf_engine, text_field="text", rows_per_shard=3, backend="arrow")
    split = tmp_path / "split"
    first = run(teacher, data, split, hf_engine, text_field="text", rows_per_shard=3, backend="arrow",
                num_jobs=2, job_index=1)
    assert first.owned == [1, 3, 5] and not first.finished and not (split / "index.json").exists()

    assert cli_main(["merge", str(split)]) == 2  # job 0 has not run: the error names its shards
    record = read_job_record(str(split))
    with pytest.raises(CacheIndexError, match=r"4 of 7 shard\(s\) not written yet: 0, 2, 4, 6"):
        finalize_cache(writer_from_record(str(split), record), record)

    second = run(teacher, data, split, hf_engine, text_field="text", rows_per_shard=3, backend="arrow",
                 num_jobs=2, job_index=0)
    assert second.finished  # the last job to finish finalizes by itself
    (split / "index.json").unlink()
    assert cli_main(["merge", str(split)]) == 0
    assert_same_cache(single, split)
    again = run(teacher, data, split, hf_engine, text_field="text", rows_per_shard=3, backend="arrow")
    assert again.finished and again.written == []  # a finished cache is left alone

    # A job with other settings is refused, naming what differs.
    with pytest.raises(ConfigError, match="sparsification"):
        run(teacher, data, split, hf_engine, text_field="text", rows_per_shard=3, backend="arrow", top_k=4)


def test_index_records_the_head_check_only_when_every_shard_engine_ran_it(teacher, hf_engine, tmp_path):
    """`engine.head_check_max_diff`: the largest over the shards' engines; null if one of them did not check
    (a job split across engines, one started with verify_head=false). The real check: test_engines."""
    import copy

    data = write_jsonl(tmp_path / "rows.jsonl", text_rows(8))
    checked = {}
    for diff in (0.02, 0.05):
        checked[diff] = copy.copy(hf_engine)
        checked[diff].head_check_max_diff = diff
    for name, (first, second), want in (("both", (checked[0.05], checked[0.02]), 0.05),
                                        ("one", (checked[0.02], hf_engine), None)):
        for job, engine in enumerate((first, second)):
            result = run(teacher, data, tmp_path / name, engine, text_field="text", num_jobs=2, job_index=job)
        assert result.finished and result.index["engine"]["head_check_max_diff"] == want, name
    assert run(teacher, data, tmp_path / "hf", hf_engine, text_field="text").index["engine"]["head_check_max_diff"] is None


def test_bad_input(teacher, hf_engine, mixed_data, tmp_path):
    with pytest.raises(InvalidDataError, match=r"row 3: field 'text'.*missing"):
        run(teacher, mixed_data, tmp_path / "a", hf_engine, text_field="text", strict=True, max_length=MAX_LENGTH)
    with pytest.raises(InvalidDataError, match=r"row 5: field 'prompt'.*expected a string, got int"):
        run(teacher, mixed_data, tmp_path / "b", hf_engine, prompt_field="prompt", response_field="response",
            strict=True, max_length=MAX_LENGTH, rows_per_shard=4, num_jobs=2, job_index=1)
    with pytest.raises(ConfigError, match="no such file"):
        run(teacher, tmp_path / "nope.jsonl", tmp_path / "c", hf_engine, text_field="text")
    with pytest.raises(ConfigError, match=r"column\(s\) \['body'\] not found"):
        run(teacher, mixed_data, tmp_path / "d", hf_engine, text_field="body")
    with pytest.raises(ConfigError, match="choose one input kind"):
        run(teacher, mixed_data, tmp_path / "e", hf_engine, text_field="text", messages_field="messages")
    with pytest.raises(ConfigError, match="go together"):
        run(teacher, mixed_data, tmp_path / "f", hf_engine, prompt_field="prompt")
    with pytest.raises(ConfigError, match="--samples and --temperature belong to --mode sample"):
        run(teacher, mixed_data, tmp_path / "g", hf_engine, text_field="text", temperature=0.5)
    with pytest.raises(ConfigError, match="engine returns 8 ids per position"):
        run(teacher, mixed_data, tmp_path / "h", hf_engine, text_field="text", top_k=4)
    # trust_remote_code stays off unless asked for, and the index says so.
    result = run(teacher, mixed_data, tmp_path / "ok", hf_engine, text_field="text", max_length=MAX_LENGTH)
    assert result.index["teacher"]["trust_remote_code"] is False


@pytest.mark.slow
def test_vllm_engine_writes_valid_cache(teacher, hf_engine, mixed_data, tmp_path, vllm_pooling_engine):
    """The session's vLLM engine (top-8, pooling path) through the whole job: a valid cache whose tokens and
    positions equal the hf engine's, and whose top-1 mostly agrees (bf16 vs fp32)."""
    common = dict(messages_field="messages", max_length=MAX_LENGTH)
    result = run(teacher, mixed_data, tmp_path / "vllm", vllm_pooling_engine, **common)
    run(teacher, mixed_data, tmp_path / "hf", hf_engine, **common)
    v, h = open_cache(str(tmp_path / "vllm")), open_cache(str(tmp_path / "hf"))
    assert result.finished and v.validate() == []
    assert v.index["engine"]["name"] == "vllm" and v.fingerprint != h.fingerprint
    # The pooling engine checked its head at start-up, and the index says so (the hf engine has no check).
    assert 0 <= v.index["engine"]["head_check_max_diff"] == vllm_pooling_engine.head_check_max_diff < 0.05
    assert h.index["engine"]["head_check_max_diff"] is None
    top1 = []
    for x, y in zip(v, h):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        np.testing.assert_array_equal(x["positions"], y["positions"])
        top1.append(x["topk_ids"][:, 0] == y["topk_ids"][:, 0])
    assert np.concatenate(top1).mean() > 0.9
