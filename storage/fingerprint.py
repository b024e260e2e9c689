"""Tokenizer fingerprint: both stages compare it, so it lives with the format that records it."""

import hashlib
import json

__all__ = ["tokenizer_fingerprint"]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over what decides token ids: vocab, merges, normalization and special tokens, chat template.

    Works with any Hugging Face tokenizer; a fast tokenizer's full `tokenizer.json` covers vocab,
    merges, pre-tokenizer and added tokens in one string.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # runtime settings, not identity
        spec.pop("padding", None)
        core = json.dumps(spec, sort_keys=True)
    else:
        core = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256((core + json.dumps(extra, sort_keys=True)).encode()).hexdigest()
