"""Refusals at the start of training: a cache and a student that do not fit together fail before step one.

Logits width rule: a model's logits may be wider than its tokenizer (Qwen2.5-7B: 152064 columns,
151665 tokens); the extra columns are padding that no token id maps to. Training compares
distributions over the token ids only: the student's logits are sliced to `vocab_size`, the number
of ids its tokenizer can produce (for a same-tokenizer cache, the cache's `tokenizer.vocab_size`),
and cached teacher entries at ids at or above it are folded into the tail mass (see
`alignment.fold_out_of_vocab`). A student narrower than its tokenizer is refused.
"""

import os

from logitcache.storage.errors import ConfigError

__all__ = ["SAME_TOKENIZER_LOSSES", "check_tokenizer", "check_cache_teacher", "check_loss_fits_cache", "student_vocab_size"]

# Every cached loss except ULD reads teacher ids as student ids.
SAME_TOKENIZER_LOSSES = frozenset({"kl", "rkl", "jsd", "skl", "srkl", "topk_kl", "dkd", "nkd", "normkd", "bild", "rskd"})


def check_tokenizer(index: dict, tokenizer, fingerprint: str, *, loss: str, student: str, cache: str) -> bool:
    """Check the student tokenizer against the cache's. Returns True when they are the same tokenizer.

    Args:
        index: the cache's index.
        tokenizer: the student's tokenizer; fingerprint: its `tokenizer_fingerprint`.
        loss: the loss name; student, cache: names for messages.

    Raises:
        ConfigError: a same-tokenizer loss with a different tokenizer, naming both fingerprints and
            both tokenizers; or the same fingerprint with a different vocabulary size.
    """
    cached = index["tokenizer"]
    same = fingerprint == cached["fingerprint"]
    if not same and loss in SAME_TOKENIZER_LOSSES:
        raise ConfigError(
            f"--loss {loss} reads the cache's teacher token ids as student token ids, so the student needs the "
            f"teacher's tokenizer. Student tokenizer ({student}, {len(tokenizer)} tokens): fingerprint "
            f"{fingerprint[:16]}...; cache tokenizer (teacher {index['teacher'].get('name_or_path')}, "
            f"{cached['vocab_size']} tokens, {cache}): fingerprint {cached['fingerprint'][:16]}.... "
            f"Use --loss uld for a student with another tokenizer.")
    if same and len(tokenizer) != cached["vocab_size"]:
        raise ConfigError(f"the student tokenizer ({student}) has {len(tokenizer)} tokens but the cache {cache} "
                          f"records {cached['vocab_size']} for the same tokenizer fingerprint")
    return same


def _normalize(name: str) -> str:
    if os.path.exists(name):
        return os.path.realpath(name)
    return name.rstrip("/")


def check_cache_teacher(index: dict, teacher: str | None, *, cache: str) -> None:
    """Refuse a cache made by another teacher than `teacher` (no check when None).

    A local path is compared by its real path, a hub id as written.

    Raises:
        ConfigError: naming both teachers.
    """
    if teacher is None:
        return
    made_by = index["teacher"].get("name_or_path")
    if made_by is None or _normalize(made_by) != _normalize(teacher):
        raise ConfigError(f"--teacher {teacher}: the cache {cache} was made by teacher {made_by!r} "
                          f"(revision {index['teacher'].get('revision')!r}); use the cache of {teacher} or "
                          f"drop --teacher")


def check_loss_fits_cache(index: dict, loss: str, *, top_k: int | None, cache: str) -> None:
    """Refuse a loss the cache's sparsification cannot feed.

    Raises:
        ConfigError: rskd without a sample-mode cache; a sample-mode cache for losses that read the
            teacher's top-k in order (bild, dkd, nkd, normkd, topk_kl); --top-k above the cache's K.
    """
    mode, k = index["sparsification"]["mode"], index["sparsification"]["k"]
    if loss == "rskd" and mode != "sample":
        raise ConfigError(f"--loss rskd needs a sample-mode cache (draw counts); {cache} is a {mode} cache. "
                          f"Write one with `logitcache precompute --mode sample`, or use --loss kl")
    if mode == "sample" and loss in ("bild", "dkd", "nkd", "normkd", "topk_kl"):
        raise ConfigError(f"--loss {loss} reads the teacher's top-k in rank order; {cache} holds sampled ids "
                          f"(sample mode). Use --loss rskd, kl or another divergence")
    if top_k is not None:
        if mode == "sample":
            raise ConfigError(f"--top-k applies to top-K caches; {cache} is a sample-mode cache")
        if not 1 <= top_k <= k:
            raise ConfigError(f"--top-k {top_k}: the cache {cache} holds K = {k} ids per position; use 1 <= k <= {k}")


def student_vocab_size(tokenizer, logits_width: int, *, student: str) -> int:
    """The columns of the student's logits that training uses: its tokenizer's ids (see module docstring).

    Raises:
        ConfigError: the model's logits are narrower than its tokenizer.
    """
    vocab = len(tokenizer)
    if logits_width < vocab:
        raise ConfigError(f"--student {student}: its logits have {logits_width} columns, fewer than its "
                          f"tokenizer's {vocab} tokens")
    return vocab
