"""A student and a cache at Qwen2.5's vocabulary width (151,936 tokens), for memory tests and benchmarks.

The tokenizer is a word-level one whose first words are the toy corpus's and whose other ids are
filler words, so that `len(tokenizer)` (the logits columns training uses) is the real width.
Sequences are 128 tokens: 8 of prompt, 120 of response.
"""

import json
from pathlib import Path

import torch

VOCAB = 151_936


def big_tokenizer(out_dir: Path, vocab: int = VOCAB):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from logitcache.pipeline.scratch import toy_corpus

    words = ["<unk>", "<pad>", "<s>", "</s>"]
    seen = set(words)
    for line in toy_corpus():
        for word in line.split():
            if word not in seen:
                seen.add(word)
                words.append(word)
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(str(out_dir))
    assert len(fast) == vocab
    return fast


def big_rows(n: int, seed: int) -> list[dict]:
    """Prompt/response rows of 8 + 120 toy words."""
    from logitcache.pipeline.scratch import toy_corpus

    words = " ".join(toy_corpus(num_lines=20 * n, seed=seed)).split()
    return [{"prompt": " ".join(words[i * 128:i * 128 + 8]), "response": " ".join(words[i * 128 + 8:(i + 1) * 128])}
            for i in range(n)]


def big_world(root: str, *, rows: int = 16) -> dict:
    """{student, teacher, cache, tokens (per batch of 8), vocab}; built once per `root`."""
    from trainkit import build_cache

    from logitcache.pipeline.scratch import make_tiny_llama

    root = Path(root)
    done = root / "world.json"
    if done.exists():
        return json.loads(done.read_text())
    root.mkdir(parents=True, exist_ok=True)
    tok = big_tokenizer(root / "tok")
    small = dict(hidden_size=64, num_heads=1, num_layers=1, dtype=torch.float32, max_position_embeddings=512,
                 tie_word_embeddings=True)
    teacher = make_tiny_llama(root / "teacher", tok, seed=0, **small)
    student = make_tiny_llama(root / "student", tok, seed=1, **small)
    data = big_rows(rows, seed=3)
    cache = build_cache(root / "cache", teacher, tok, data, k=8, per_shard=8)
    world = {"student": str(student), "teacher": str(teacher), "cache": str(cache), "vocab": len(tok),
             "tokens": 8 * max(len(tok(r["prompt"] + " " + r["response"])["input_ids"]) for r in data)}
    done.write_text(json.dumps(world))
    return world
