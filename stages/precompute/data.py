"""Stage one's inputs: load DATA; rows become teacher tokens by the format's rule (`storage.inputs`).

    rows, info = load_rows("data/train.jsonl")              # datasets.Dataset, {"fingerprint": ..., ...}
    spec = InputSpec.build(prompt_field="q", response_field="a", max_length=2048)
    encode = RowEncoder(tokenizer, spec)
    item = encode(rows[0])                                   # Encoded | Skipped

Loading DATA (`load_rows`, re-exported here) and how a row becomes tokens and supervised positions
(text, prompt/response, chat; truncation; the skip reasons) are defined once, in `logitcache.storage`
(`rows`, `inputs`), because stage two reads the same DATA and re-tokenizes cached text by the same rule.
"""

from __future__ import annotations

from logitcache.storage.errors import ConfigError
from logitcache.storage.inputs import KINDS, SKIP_REASONS, Encoded, InputSpec, Skipped, TextEncoder
from logitcache.storage.rows import load_rows

__all__ = ["InputSpec", "RowEncoder", "Encoded", "Skipped", "SKIP_REASONS", "load_rows", "KINDS"]


class RowEncoder(TextEncoder):
    """The teacher's `TextEncoder`: stage one needs token offsets (a fast tokenizer) for every kind.

    Raises:
        ConfigError: the tokenizer is not a fast one, or chat input without a chat template.
    """

    def __init__(self, tokenizer, spec: InputSpec):
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"the teacher tokenizer {type(tokenizer).__name__} is not a fast tokenizer; "
                              "logitcache needs token offsets (a tokenizer.json)")
        super().__init__(tokenizer, spec)
