"""Stage two's losses: train a student against a cache of teacher log-probs.

Every loss has the same shape of call::

    loss = kl(student_logits, teacher_ids, teacher_logprobs, temperature=2.0, metrics=m)

- student_logits: (N, V) bf16/fp16/fp32, the student's logits at the N supervised positions only
  (the caller gathers and aligns them). The only input that gets a gradient.
- teacher_ids: (N, K) integer (int64 or the cache's int32), cached teacher ids sorted by teacher
  log-prob descending; in sample mode unique sampled ids, -1 padding after them.
- teacher_logprobs: (N, K) float32, the teacher's normalized full-vocabulary log-probs at those ids
  (log-softmax at temperature 1). The tail mass is 1 - sum(exp(teacher_logprobs)); pass the cache's
  stored `tail_mass` (N,) to use it instead.

It returns a 0-dim float32 tensor (float64 for float64 logits): the mean over the N positions.
Divergences are returned as they are, without Hinton's T^2 factor (fold it into `kd_weight`),
except where the published loss includes it: dkd (both terms), nkd (its non-target term, times
lambda^2) and normkd (times the teacher's per-row T^2). `metrics`, when given a dict, receives
detached 0-dim tensors: "top1_agreement" for every loss that reads teacher ids, plus
"bild_coverage" (bild) and "accuracy" (sft, kd_with_ce). The argmax metrics count a tie for the
largest logit as a hit (see `rowmath.is_row_max`).

Memory: positions are processed `chunk_size` rows at a time (default: about 128 MiB of fp32 per
chunk, see `chunking.CHUNK_ELEMENTS`), and the gradient is formed chunk by chunk into a buffer of
the logits' dtype; no (N, V) fp32 copy of the logits is ever made.

Combining with the label cross entropy: ``total, parts = kd_with_ce("kl", s, ids, lp, y, ...)``
computes ce_weight * CE + kd_weight * KD in one pass over the vocabulary per row (the CE comes
from the KD loss's own normalizer pass) into one gradient buffer, at about the cost of the KD
loss alone; ``ce_weight * sft(s, labels=y) + kd_weight * kl(s, ids, lp)`` gives the same value and
gradient at the price of a second pass and a second (N, V) gradient. The fused LM head (`batch_loss.fused_head_loss`) calls
`kd_with_ce` on one chunk of supervised rows at a time.

Where things are:
- `registry`: ONE declaration per loss (row function, options with defaults and ranges, cache
  modes, whether it needs the teacher's tokenizer, default CE/KD weights, help). The CLI, the
  refusals, the trainer and the functions below all read it. docs/LOSSES.md: adding a loss.
- The losses' row functions: `divergences` (kl, rkl, jsd, skl, srkl, topk_kl), `bild_loss`,
  `decoupled` (dkd, nkd, normkd), `uld_loss`, `rskd_loss`.
- The shared machinery: `functions` (the public callables, `kd_with_ce`), `fused` (a loss per
  chunk, alone or with the label CE), `chunking` (memory-bounded passes), `student_stats` (the
  student's statistics with a hand-written backward), `tails` (the tail bucket), `rowmath`,
  `inputs` (argument checks).

This package imports torch only when a loss is first used (`registry` alone stays light).
"""

import importlib

from logitcache.stages.train.losses import registry

_API = ("LOSSES", "get_loss", "kd_with_ce")
# Every declared loss is `losses.<name>`: read from the registry, not listed here.
__all__ = [*_API, *registry.names()]


def __getattr__(name: str):
    # Lazy, so that `registry` (read by `logitcache --help`) does not import torch. The registry is
    # read at each lookup: a loss declared after import is an attribute too.
    if name in _API or name in registry.LOSSES:
        functions = importlib.import_module(f"{__name__}.functions")
        return getattr(functions, name) if name in _API else functions.LOSSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
