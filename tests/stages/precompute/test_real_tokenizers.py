"""The real user's path on Qwen's real vocabulary and chat templates: precompute (hf and vLLM) and train.

Teachers and students are tiny random models over the 151,665-token Qwen2.5 tokenizer (and Qwen3's
151,669), logits padded to 151,936 columns, tied and untied (conftest `qwen`). Slow: every model
load parses an 11 MB tokenizer.json.

    .venv/bin/python -m pytest tests/stages/precompute/test_real_tokenizers.py -q -m slow    # ~4-6 min on 2 cores
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from realtok import chat_rows

from logitcache.stages.precompute.run import EngineSpec, PrecomputeSettings, precompute
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
    return precompute(PrecomputeSettings(teacher=str(teacher), data=str(data), out=str(out), **kw))


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
    from precompute_util import vllm_engine

    engine = vllm_engine(qwen["instruct"], vllm_path="pooling", k=8)
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


# ---- --chat-template FILE and --chat-template-kwargs: recorded by stage one, honoured by stage two ---------

@pytest.fixture(scope="module")
def no_think_cache(qwen, chats, tmp_path_factory):
    """The chats under Qwen3's first (hybrid) template, given as a file, with enable_thinking=false."""
    from realtok import TEMPLATES

    out = tmp_path_factory.mktemp("no_think") / "cache"
    _precompute(qwen["thinking"], chats[0], out, chat_template=str(TEMPLATES / "qwen3.jinja"),
                chat_template_kwargs={"enable_thinking": False})
    return out


NO_THINK = "11.<|im_end|>\n十三 (13)。<|im_end|>\n"  # row 2's assistant turns, no empty <think> block before the last


def test_chat_options_are_recorded_and_a_rerun_with_others_is_refused(qwen, chats, no_think_cache):
    from realtok import TEMPLATES, chat_template

    cache = open_cache(str(no_think_cache))
    inputs = cache.index["inputs"]
    assert inputs["chat_template"] == chat_template("qwen3") and inputs["chat_template_kwargs"] == {
        "enable_thinking": False}
    seq = next(s for s in cache if s["row_index"] == 2)
    tok = qwen["tok_thinking"]
    assert tok.decode(np.asarray(seq["input_ids"])[seq["positions"] + 1]) == NO_THINK
    row = chats[1][2]["messages"]  # the tokens are the file's rendering, not the tokenizer's own template's
    assert tok.decode(seq["input_ids"]) == tok.apply_chat_template(row, tokenize=False,
                                                                  chat_template=chat_template("qwen3"))
    for kw in (dict(chat_template_kwargs={"enable_thinking": True}), {}):
        with pytest.raises(ConfigError, match="was started with other settings"):
            _precompute(qwen["thinking"], chats[0], no_think_cache, chat_template=str(TEMPLATES / "qwen3.jinja"), **kw)


def test_stage_two_renders_with_the_caches_template_variables(qwen, no_think_cache, tmp_path):
    """Another tokenizer re-renders the cached chats with the recorded enable_thinking=false (given values
    win); the teacher's tokenizer must not be given other values than its ids were rendered with."""
    from realtok import TEMPLATES

    from logitcache.stages.train.loss_settings import loss_settings
    from logitcache.stages.train.sources import Reader, open_training_data
    from logitcache.storage.inputs import ChatOptions

    def supervised(chat: ChatOptions, student: str = "tok_base") -> str:
        reader = Reader(student, qwen[student], 151_665, 1024, chat=chat)
        data = open_training_data([str(no_think_cache)], data=None, weights=None, plan=loss_settings("uld"),
                                  teacher=None, reader=reader, seed=0, window=2, epochs=1, rank=0, world_size=1)
        item = next(it for it in data.stream if it["row_index"] == 2)
        return qwen[student].decode(item["input_ids"][item["labels"] != -100])

    # A Qwen2.5 student lacks the cache's ids 151665..151668: ULD re-renders, with Qwen3's template given.
    qwen3 = str(TEMPLATES / "qwen3.jinja")
    assert supervised(ChatOptions.load(qwen3)) == NO_THINK
    assert supervised(ChatOptions.load(qwen3, {"enable_thinking": True})) == \
        "11.<|im_end|>\n<think>\n\n</think>\n\n十三 (13)。<|im_end|>\n"
    with pytest.raises(ConfigError, match=r"enable_thinking=True \(the cache: False\)"):
        train(TrainSettings(student=str(qwen["thinking"]), cache=str(no_think_cache), loss="kl",
                            output_dir=str(tmp_path / "kl"), max_steps=1, dataloader_num_workers=0,
                            chat_template=qwen3, chat_template_kwargs={"enable_thinking": True}))
