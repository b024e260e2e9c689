"""The real user's path on Qwen's real vocabulary and chat templates: precompute (hf and vLLM) and train.

Teachers and students are tiny random models over the 151,665-token Qwen2.5 tokenizer (and Qwen3's
151,669), logits padded to 151,936 columns, tied and untied (conftest `qwen`). Slow: every model
load parses an 11 MB tokenizer.json.

    .venv/bin/python -m pytest tests/stages/test_real_tokenizers.py -q -m slow    # ~4-6 min on 2 cores
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from realtok import chat_rows

from logitcache.stages.precompute.run import EngineSpec, precompute
from logitcache.stages.train.run import TrainSettings, train
from logitcache.storage import open_cache
from logitcache.storage.errors import ConfigError
from logitcache.storage.fingerprint import compare_tokenizers, tokenizer_identity
from logitcache.storage.inputs import decode_chat

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """12 chats (system prompts, a tool call with a `tools` column, reasoning_content), as JSON lines."""
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    rows = [r for _ in range(4) for r in chat_rows()]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path, rows


def _precompute(teacher, data, out, **kw):
    kw = {"engine": EngineSpec("hf"), "top_k": 8, "rows_per_shard": 6, "progress": False, "max_length": 1024,
          "strict": True, "messages_field": "messages", "tools_field": "tools", **kw}
    return precompute(teacher=str(teacher), data=str(data), out=str(out), **kw)


@pytest.fixture(scope="module")
def instruct_cache(qwen, chats, tmp_path_factory):
    out = tmp_path_factory.mktemp("instruct_cache") / "cache"
    _precompute(qwen["instruct"], chats[0], out)
    return out


def test_chat_cache_from_the_instruct_teacher(qwen, chats, instruct_cache):
    tok, rows = qwen["tok_instruct"], chats[1]
    cache = open_cache(str(instruct_cache))
    assert cache.validate() == [] and cache.index["counts"]["sequences"] == len(rows)
    assert cache.index["counts"]["skipped"] == 0 and cache.index["tokenizer"]["vocab_size"] == 151_665
    assert cache.index["tokenizer"]["logits_width"] == 151_936
    for seq in cache:
        row = rows[seq["row_index"]]
        messages, tools = decode_chat(seq["messages"])
        assert messages == row["messages"] and tools == row.get("tools")
        rendered = tok.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)
        assert tok.decode(seq["input_ids"]) == rendered
        supervised = tok.decode(np.asarray(seq["input_ids"])[seq["positions"] + 1])
        assert supervised.count("<|im_end|>") == sum(m["role"] == "assistant" for m in row["messages"])
        assert (seq["topk_ids"] < 151_936).all()


def test_reasoning_teacher_keeps_every_conversation_under_strict(qwen, chats, tmp_path):
    """Qwen3's template renders earlier turns without their thinking: every conversation is kept, --strict on."""
    result = _precompute(qwen["thinking"], chats[0], tmp_path / "cache")
    cache = open_cache(str(tmp_path / "cache"))
    assert result.finished and cache.index["counts"]["sequences"] == len(chats[1])
    seq = next(s for s in cache if s["row_index"] == 0)
    supervised = qwen["tok_thinking"].decode(np.asarray(seq["input_ids"])[seq["positions"] + 1])
    assert supervised == "17 * 3 = 51.<|im_end|>\n51 + 9 = 60.\n</think>\n\n51 + 9 = 60.<|im_end|>\n"


def test_base_student_trains_from_the_instruct_cache(qwen, instruct_cache, tmp_path, capfd):
    """Same vocabulary, other chat template and eos: trains, with the differences named as warnings."""
    result = train(TrainSettings(student=str(qwen["base"]), cache=str(instruct_cache), output_dir=str(tmp_path / "out"),
                                 loss="kl", max_steps=2, per_device_train_batch_size=2, dataloader_num_workers=0, logging_steps=1, learning_rate=1e-3))
    err = capfd.readouterr().err
    assert result["global_step"] == 2 and result["cache"]["same_tokenizer"] is True
    assert "chat template differs" in err and "eos_token: cache [151645, '<|im_end|>']" in err
    assert np.isfinite([h["loss"] for h in result["log_history"] if "loss" in h]).all()


def test_compatibility_is_about_ids_not_fingerprints(qwen, tiny_teacher):
    instruct = tokenizer_identity(qwen["tok_instruct"])
    assert instruct["fingerprint"] != tokenizer_identity(qwen["tok_base"])["fingerprint"]  # provenance differs
    conflicts, differences = compare_tokenizers(instruct, qwen["tok_base"])
    assert conflicts == [] and any("chat template" in d for d in differences)
    # A Qwen3 student reads a Qwen2.5 cache: its 4 added tokens lie beyond the cached ids.
    conflicts, differences = compare_tokenizers(instruct, qwen["tok_thinking"])
    assert conflicts == [] and any("4 token(s) beyond" in d and "<tool_response>" in d for d in differences)
    # ...but not the other way round: a Qwen2.5 student lacks ids a Qwen3 cache can hold.
    conflicts, _ = compare_tokenizers(tokenizer_identity(qwen["tok_thinking"]), qwen["tok_instruct"])
    assert conflicts and "151665..151668" in conflicts[0]
    # Another vocabulary: the first differing block (and, with the teacher's tokenizer, the exact ids).
    toy = tiny_teacher[1]
    conflicts, _ = compare_tokenizers(instruct, toy)
    assert any("cached ids 0..1023" in c for c in conflicts)
    conflicts, _ = compare_tokenizers(instruct, toy, teacher_tokenizer=qwen["tok_instruct"])
    assert "id 0: cache '!' vs student" in conflicts[-1]


def test_other_vocabulary_is_refused_then_trains_with_uld(qwen, instruct_cache, tiny_teacher, tmp_path):
    student = str(tiny_teacher[0])  # byte-level toy vocabulary with its own chat template
    common = dict(student=student, cache=str(instruct_cache), max_steps=2, per_device_train_batch_size=2, dataloader_num_workers=0,
                  logging_steps=1)
    with pytest.raises(ConfigError) as e:
        train(TrainSettings(output_dir=str(tmp_path / "kl"), loss="kl", **common))
    assert "id 0: cache '!'" in str(e.value) and "--loss uld" in str(e.value)
    # ULD re-renders each cached chat with the student's template and pairs the assistant tokens.
    result = train(TrainSettings(output_dir=str(tmp_path / "uld"), loss="uld", **common))
    assert result["global_step"] == 2 and result["cache"]["same_tokenizer"] is False


def test_prompt_response_in_the_chat_format_on_a_tied_teacher(qwen, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {i} + {i}?", "a": str(2 * i)}) + "\n" for i in range(5)))
    _precompute(qwen["base"], data, tmp_path / "cache", messages_field=None, tools_field=None, prompt_field="q",
                response_field="a", prompt_format="chat")
    cache = open_cache(str(tmp_path / "cache"))
    assert cache.index["inputs"]["prompt_format"] == "chat" and cache.index["counts"]["sequences"] == 5
    seq = cache[0]
    tok = qwen["tok_base"]
    assert tok.decode(seq["input_ids"]).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert tok.decode(np.asarray(seq["input_ids"])[seq["positions"] + 1]) == "0<|im_end|>\n"


def test_vllm_engine_matches_hf_on_the_real_vocabulary(qwen, chats, instruct_cache, tmp_path):
    """vLLM on CPU over the untied 151,936-wide teacher: same tokens and positions as hf, top-1 agrees."""
    pytest.importorskip("vllm")
    from conftest import _vllm_engine

    engine = _vllm_engine(qwen["instruct"], vllm_path="pooling", k=8)
    try:
        _precompute(qwen["instruct"], chats[0], tmp_path / "vllm", engine=EngineSpec.of(engine))
    finally:
        engine.close()
    v, h = open_cache(str(tmp_path / "vllm")), open_cache(str(instruct_cache))
    assert v.validate() == [] and v.index["engine"]["name"] == "vllm"
    # The pooling path's start-up head check ran at the real width, against vLLM's own logits, and passed
    # (within ATOL + RTOL x |log-prob| per entry; a head off by a scale is off by nats).
    assert 0 <= v.index["engine"]["head_check_max_diff"] < 0.5
    top1 = []
    for x, y in zip(v, h):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        np.testing.assert_array_equal(x["positions"], y["positions"])
        top1.append(x["topk_ids"][:, 0] == y["topk_ids"][:, 0])
    assert np.concatenate(top1).mean() > 0.9
