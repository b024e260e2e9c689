"""Refusals at the start of training: a cache and a student that do not fit together fail before step one.

Tokenizer rule: same-tokenizer losses need every cached id to mean the same token to the student
(`check_tokenizer`); a different chat template or special-tokens map is a warning.

Logits width rule: a model's logits may be wider than its tokenizer (Qwen2.5-7B: 152064 columns,
151665 tokens); the extra columns are padding that no token id maps to. Training compares
distributions over the token ids only: the student's logits are sliced to `vocab_size`, the number
of ids its tokenizer can produce (for a same-tokenizer cache, the cache's `tokenizer.vocab_size`),
and cached teacher entries at ids at or above it are folded into the tail mass (see
`alignment.fold_out_of_vocab`). A student narrower than its tokenizer is refused.
"""

import os

from logitcache.stages.train.loss_settings import LossPlan
from logitcache.stages.train.losses import registry
from logitcache.storage.errors import ConfigError
from logitcache.storage.redact import redact_text

__all__ = ["check_tokenizer", "check_cache_teacher", "check_loss_fits_cache", "student_vocab_size"]



def check_tokenizer(index: dict, tokenizer, *, needs_same_tokenizer: bool, student: str, cache: str, read_by: str,
                    advice: str = "", teacher_tokenizer=None, warn=None) -> bool:
    """Check the student tokenizer against the cache's. Returns True when the cached ids mean the same
    tokens to the student (train on them directly), False when they do not (ULD re-tokenizes).

    Same ids, same tokens: every id the cache can hold maps to the same token for the student
    (`storage.fingerprint.compare_tokenizers`). A different chat template, special-tokens map or added
    tokens beyond the cached ids are reported through `warn`, not refused: a base student trains from
    its instruct sibling's cache.

    Args:
        index: the cache's index.
        tokenizer: the student's tokenizer.
        needs_same_tokenizer: the reader takes the cached ids as student ids (a loss that needs the
            teacher's tokenizer, a mixture, teacher agreement), so other tokens are refused.
        student, cache: names for messages.
        read_by: what reads the ids, for the message ("--loss kl", "--eval-cache").
        advice: the message's last sentence: what to do instead.
        teacher_tokenizer: the teacher's tokenizer when it can be loaded (exact ids in errors).
        warn: called with each difference's message (default: print to stderr).

    Raises:
        ConfigError: `needs_same_tokenizer` and cached ids that mean other tokens to the student,
            naming the first differing ids.
    """
    from logitcache.storage.fingerprint import compare_tokenizers

    conflicts, differences = compare_tokenizers(index["tokenizer"], tokenizer, teacher_tokenizer=teacher_tokenizer)
    same = not conflicts
    if not same and needs_same_tokenizer:
        cached = index["tokenizer"]
        raise ConfigError(
            f"{read_by} reads the cache's teacher token ids as student token ids, so every cached id must mean "
            f"the same token to the student. Student {student} ({len(tokenizer)} tokens) vs cache {cache} (teacher "
            f"{index['teacher'].get('name_or_path')}, {cached['vocab_size']} tokens): {'; '.join(conflicts)}. "
            f"{advice}".rstrip())
    if same:
        for message in differences:
            (warn or _warn)(f"student tokenizer ({student}) vs cache {cache}: {message}")
    return same


def _warn(message: str) -> None:
    import sys

    print(f"train: warning: {redact_text(message)}", file=sys.stderr, flush=True)


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


_MODE_USE = {"topk": "the teacher's top-K ids in rank order",
             "sample": "ids drawn from the teacher, with draw counts"}


def check_loss_fits_cache(index: dict, plan: LossPlan, *, cache: str) -> None:
    """Refuse a loss the cache's sparsification cannot feed (`plan.top_k`: --top-k as given).

    Raises:
        ConfigError: a cache mode the loss's declaration does not list (rskd needs sample mode's
            draw counts; bild, dkd, nkd, normkd and topk_kl read the teacher's top-k in rank order);
            --top-k above the cache's K.
    """
    mode, k = index["sparsification"]["mode"], index["sparsification"]["k"]
    spec, loss, top_k = plan.loss, plan.name, plan.top_k
    if spec.rows is not None and mode not in spec.modes:
        wanted = " or ".join(f"a {m}-mode cache ({_MODE_USE[m]})" for m in _MODE_USE if m in spec.modes)
        others = [name for name, other in registry.LOSSES.items() if mode in other.modes]
        raise ConfigError(f"--loss {loss} needs {wanted}; {cache} is a {mode}-mode cache. Use a loss that reads "
                          f"it ({', '.join(others)}), or write a cache with `logitcache precompute --mode "
                          f"{sorted(spec.modes)[-1]}`")
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
