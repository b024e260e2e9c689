"""Tiny models built from nothing: a byte-level BPE tokenizer and a random Llama.

Tests and the demo need a real Hugging Face model directory (config, safetensors weights,
tokenizer) that both transformers and vLLM can load, without a model hub. Everything here
is deterministic given its arguments, and small enough to build in a few seconds on a CPU.

    python -c "from logitcache.pipeline.scratch import *; \
tok = train_tokenizer(['hello world'] * 10, 300, '/tmp/tiny'); make_tiny_llama('/tmp/tiny', tok)"
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from logitcache.storage.errors import ConfigError

__all__ = ["BOS", "EOS", "PAD", "ROLE_TOKENS", "CHAT_TEMPLATE", "toy_corpus", "train_tokenizer", "make_tiny_llama"]

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# Role markers are single special tokens so that a data pipeline can find turn boundaries
# (e.g. to supervise only assistant tokens) by token id rather than by string matching.
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


_TOY_WORDS = (
    "the teacher reads every token once and keeps the few most likely next tokens so a student "
    "can learn from a cache of sparse logits instead of running the large model again and again "
    "while training small fast models on shared machines with little memory"
).split()


def toy_corpus(num_lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text (8-40 words a line from a small vocabulary) to train a tokenizer on."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_TOY_WORDS) for _ in range(rng.randint(8, 40))) for _ in range(num_lines)]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and save it as a Hugging Face tokenizer.

    Args:
        texts: Training text; any string can be encoded afterwards (byte-level fallback).
        vocab_size: Target vocabulary size including the 256 byte tokens and the special
            tokens; the result may be smaller if the text has too few merges to learn.
        out_dir: Directory to save `tokenizer.json` and `tokenizer_config.json` into.

    Returns:
        The saved tokenizer, with bos/eos/pad, the role tokens and `CHAT_TEMPLATE` set. It does
        not add BOS/EOS on `encode`; the chat template adds BOS.
    """
    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    if vocab_size < 256 + len(specials):
        raise ConfigError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {256 + len(specials)}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def make_tiny_llama(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 2048,
    head_std: float = 0.15,
    seed: int = 0,
    pad_vocab_to: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Save a randomly initialised Llama with `tokenizer` as a Hugging Face model directory.

    Args:
        out_dir: Directory to write `config.json`, `model.safetensors` and the tokenizer into.
        tokenizer: The model's tokenizer; its length is the vocabulary unless padded.
        hidden_size: Model width. `hidden_size // num_heads` must be a head size vLLM's CPU
            attention supports (64 with the defaults; 16 is rejected).
        num_layers: Decoder layers.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads (grouped-query attention); defaults to `num_heads`.
        intermediate_size: MLP width; defaults to `2 * hidden_size`.
        tie_word_embeddings: Share the input embedding and the LM head.
        max_position_embeddings: Longest sequence the config allows.
        head_std: Standard deviation of the output embedding. Larger than the usual 0.02 so
            the random model's next-token distribution is peaked (logit std about
            `head_std * sqrt(hidden_size)`), like a trained model's, rather than near-uniform.
            Near-uniform logits would make every top-K a pile of near-ties.
        seed: Seed for the weights; the same arguments give the same bytes.
        pad_vocab_to: Logits width larger than the tokenizer, as in Qwen's 152064 vs 151936.
            The extra rows are random like the rest; no tokenizer id maps to them.
        dtype: Storage dtype of the saved weights (bfloat16 like most released checkpoints).

    Returns:
        `out_dir` as a Path.
    """
    if hidden_size % num_heads:
        raise ConfigError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    vocab = len(tokenizer)
    if pad_vocab_to is not None and pad_vocab_to < vocab:
        raise ConfigError(f"pad_vocab_to={pad_vocab_to} is smaller than the tokenizer's {vocab} tokens")
    config = LlamaConfig(
        vocab_size=pad_vocab_to or vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, head_std)
    model.to(dtype).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    _check_saved_config(Path(out_dir), config.vocab_size)
    return Path(out_dir)


def _check_saved_config(out_dir: Path, vocab_size: int) -> None:
    # Both engines size their logits from config.json; a save that lost the padded width would
    # make the padded-vocabulary tests pass vacuously.
    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["vocab_size"] == vocab_size, (saved["vocab_size"], vocab_size)
