"""LLM-like teacher logits over a real vocabulary size, students near them, and their top-K caches.

Run its self-check: .venv/bin/python -m pytest tests/stages/train/test_llm_tails.py -q

The cached losses are approximations wherever the cache does not hold the whole vocabulary, and
how good they are depends on the shape of the tail the cache leaves out. Toy teachers (a few
hundred ids, i.i.d. Gaussian logits) have flat tails, where the approximations are exact by
construction. These teachers have the shapes of a real LLM's next-token distributions over
V = 151,936 (Qwen's logits width):

- "zipf": log-prob linear in log-rank (exponent 1.0-1.4 per row) with a little noise: a long,
  heavy tail, top-32 mass around 0.3-0.7, as in a base model on open text.
- "peaked": one to four clear favourites over a Gaussian bulk (std 2 logits): top-32 mass
  0.9-0.999, as in a fine-tuned model. The tail is anything but flat: the ids just past rank K
  are thousands of times likelier than the tail's average.
- "flat": a shallow Zipf (exponent 0.3-0.6) plus Gaussian noise: high entropy (about 9-11
  nats), top-32 mass of a few percent.

Students are the teacher plus i.i.d. Gaussian logit noise at two levels (`NOISE`). Everything is
deterministic in (regime, rows, vocab, seed) and takes well under a second per 64 rows.
"""

import numpy as np
import torch

from logitcache.stages.precompute.sparsify import sample_targets, topk_targets
from logitcache.storage.encoding import TAIL_MASS_DTYPE, decode_logprobs, encode_logprobs

__all__ = ["VOCAB", "REGIMES", "NOISE", "teacher_logits", "student_logits", "topk_cache", "sample_cache",
           "full_logprobs", "topk_mass"]

VOCAB = 151_936
REGIMES = ("zipf", "peaked", "flat")
# Std of the Gaussian logit noise that makes a student from a teacher.
NOISE = {"low": 0.5, "high": 2.0}

_SEED_OFFSET = {"zipf": 11, "peaked": 23, "flat": 37}


def teacher_logits(regime: str, rows: int = 64, *, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """LLM-like teacher logits, one row per position; ids are a random permutation of the ranks.

    Args:
        regime: one of `REGIMES` (see module docstring).
        rows: positions.
        vocab: V.
        seed: any int; the result depends only on (regime, rows, vocab, seed).

    Returns:
        (rows, vocab) float32 logits (not normalized).
    """
    if regime not in REGIMES:
        raise ValueError(f"regime {regime!r} is not one of {REGIMES}")
    gen = torch.Generator().manual_seed(seed * 1000 + _SEED_OFFSET[regime])
    log_rank = torch.arange(1, vocab + 1, dtype=torch.float32).log()[None, :]
    if regime == "zipf":
        exponent = 1.0 + 0.4 * torch.rand(rows, 1, generator=gen)
        by_rank = -exponent * log_rank + 0.3 * torch.randn(rows, vocab, generator=gen)
    elif regime == "flat":
        exponent = 0.3 + 0.3 * torch.rand(rows, 1, generator=gen)
        by_rank = -exponent * log_rank + torch.randn(rows, vocab, generator=gen)
    else:
        by_rank = 2.0 * torch.randn(rows, vocab, generator=gen)
        # Favourites above the bulk's logsumexp (log V + sigma^2 / 2) by 1-6 nats, so they hold
        # most of the mass; each next one a little lower.
        bulk_lse = float(np.log(vocab)) + 2.0
        favourites = torch.randint(1, 5, (rows,), generator=gen)
        lead = bulk_lse + 1.0 + 5.0 * torch.rand(rows, 1, generator=gen)
        steps = torch.arange(4, dtype=torch.float32)[None, :] * (0.5 + 1.5 * torch.rand(rows, 1, generator=gen))
        top = torch.where(torch.arange(4)[None, :] < favourites[:, None], lead - steps, by_rank[:, :4])
        by_rank[:, :4] = top
    # Ranks to ids: one random permutation, rotated by a random offset per row (a permutation
    # per row costs seconds at this V).
    offsets = torch.randint(0, vocab, (rows, 1), generator=gen)
    perm = torch.randperm(vocab, generator=gen)[(torch.arange(vocab)[None, :] + offsets) % vocab]
    return torch.empty_like(by_rank).scatter_(1, perm, by_rank)


def student_logits(teacher: torch.Tensor, level: str, *, seed: int = 0) -> torch.Tensor:
    """The teacher's logits plus i.i.d. Gaussian noise of std `NOISE[level]`; (rows, V) float32."""
    gen = torch.Generator().manual_seed(seed * 1000 + 7)
    return teacher + NOISE[level] * torch.randn(teacher.shape, generator=gen)


def full_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the vocabulary in float64; (rows, V)."""
    return torch.log_softmax(logits.double(), dim=-1)


def topk_mass(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(rows,) float64 probability held by each row's top-k ids."""
    return full_logprobs(logits).topk(k, dim=-1).values.exp().sum(-1)


def topk_cache(logits: torch.Tensor, k: int, *, encoding: str = "lossless") -> dict[str, torch.Tensor]:
    """The top-K cache rows stage one stores for these logits, read back as stage two reads them.

    The values come from stage one's own `topk_targets`, then pass through the storage
    `encoding`'s round trip (float16 and compact lose precision there).

    Args:
        logits: (rows, V) float teacher logits.
        k: K.
        encoding: a storage encoding ("lossless", "float16", "compact").

    Returns:
        ids: (rows, K) int32 sorted by teacher log-prob descending; logprobs: (rows, K) float32;
        tail_mass: (rows,) float32, as decoded from the storage dtype.
    """
    targets = topk_targets(logits, torch.zeros(logits.shape[0], dtype=torch.long), k)
    return _stored(targets["topk_ids"], targets["topk_logprobs"], targets["tail_mass"], encoding)


def sample_cache(logits: torch.Tensor, num_samples: int, *, temperature: float = 1.0, seed: int = 0,
                 encoding: str = "lossless") -> dict[str, torch.Tensor]:
    """The sample-mode cache rows stage one stores: `num_samples` draws at `temperature`.

    Returns:
        ids: (rows, N) int32, -1 padding; logprobs: (rows, N) float32 at temperature 1, 0 at
        padding; counts: (rows, N) int32; tail_mass: (rows,) float32; draw_logprobs: (rows, N)
        float32, each id's draw log-prob as the cache reader gives it (logprobs / temperature -
        sample_logz), 0 at padding.
    """
    rows = logits.shape[0]
    seeds = (np.arange(rows, dtype=np.uint64) + np.uint64(seed) * np.uint64(1_000_003)).astype(np.uint64)
    targets = sample_targets(logits, torch.zeros(rows, dtype=torch.long), num_samples=num_samples,
                             temperature=temperature, seeds=seeds)
    out = _stored(targets["topk_ids"], targets["topk_logprobs"], targets["tail_mass"], encoding)
    out["counts"] = torch.from_numpy(targets["sample_counts"].astype(np.int32))
    logz = torch.from_numpy(targets["sample_logz"])[:, None]
    out["draw_logprobs"] = torch.where(out["ids"] >= 0, out["logprobs"] / temperature - logz, 0.0)
    return out


def _stored(ids, logprobs, tail_mass, encoding) -> dict[str, torch.Tensor]:
    lp = decode_logprobs(encode_logprobs(logprobs, encoding), encoding)
    tail = np.asarray(tail_mass).astype(TAIL_MASS_DTYPE).astype(np.float32)
    return {"ids": torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int32)), "logprobs": torch.from_numpy(lp),
            "tail_mass": torch.from_numpy(tail)}
