"""Sparse teacher targets from a chunk of logits: top-K, or random samples (RS-KD).

Both engines hand rows of logits to these functions, so the two engines store exactly the same
math. Work is done in fp32 (fp64 for the sampling CDF) a few rows at a time, so a full
(tokens x vocab) fp32 log-softmax never exists, whatever dtype the logits arrive in.

Sampling follows Anshumann et al. 2025, "Sparse Logit Sampling": N draws with replacement from
softmax(logits / temperature), stored as unique ids with counts. Its random numbers come from
a counter-based hash of (row seed, draw index), not from a stateful generator, so a row's draws
depend only on its own logits and seed: not on the batch it was computed in, the chunking, or
the order of rows.
"""

from __future__ import annotations

import numpy as np
import torch

from logitcache.storage.errors import ConfigError, InvalidDataError

__all__ = ["topk_targets", "sample_targets", "position_seeds", "tail_mass", "TOPK_FIELDS", "SAMPLE_FIELDS"]

# Both modes fill the cache's slot arrays, under the names the cache stores them by (docs/FORMAT.md):
# `topk_ids` / `topk_logprobs` are the K most likely ids, or in sample mode the distinct drawn ids.
TOPK_FIELDS = ("topk_ids", "topk_logprobs", "target_logprob", "tail_mass")
SAMPLE_FIELDS = ("topk_ids", "sample_counts", "topk_logprobs", "target_logprob", "tail_mass", "sample_logz")

# fp32 elements per working chunk (128 MiB, two such buffers live at once); sampling's fp64 CDF
# takes half as many rows.
_CHUNK_ELEMENTS = 1 << 25
_U64 = np.uint64
_MASK64 = (1 << 64) - 1


def topk_targets(
    logits: torch.Tensor, next_ids: torch.Tensor, k: int, *, chunk_rows: int | None = None
) -> dict[str, np.ndarray]:
    """Top-K log-probs at temperature 1, the actual next token's log-prob, and the tail mass.

    Args:
        logits: (n, V) any float dtype, on any device.
        next_ids: (n,) int64, the token that follows each row; in [0, V).
        k: Entries kept per row, 1 <= k <= V.
        chunk_rows: Rows converted to fp32 at a time; defaults to 32M logits a chunk.

    Returns:
        `topk_ids`: (n, k) int32, sorted by log-prob descending (ties in arbitrary order).
        `topk_logprobs`: (n, k) float32, logit - logsumexp(logits).
        `target_logprob`: (n,) float32, the log-prob of `next_ids`.
        `tail_mass`: (n,) float32, 1 - sum of the top-k probabilities, >= 0.
    """
    n, vocab = _check(logits, next_ids)
    if not 1 <= k <= vocab:
        raise ConfigError(f"k={k} must be between 1 and the logits width {vocab}")
    out = {name: [] for name in TOPK_FIELDS}
    for lo, hi in _chunks(n, chunk_rows or max(1, _CHUNK_ELEMENTS // vocab)):
        x = logits[lo:hi].float()
        values, ids = torch.topk(x, k, dim=-1, sorted=True)
        lse, tail = _normalizer_and_mass_outside(x, ids)
        target = x.gather(1, next_ids[lo:hi, None].to(x.device)) - lse
        out["topk_ids"].append(ids.to(torch.int32))
        out["topk_logprobs"].append(values - lse)
        out["target_logprob"].append(target[:, 0])
        out["tail_mass"].append(tail)
    return _to_numpy(out, n, k)


def sample_targets(
    logits: torch.Tensor,
    next_ids: torch.Tensor,
    *,
    num_samples: int,
    temperature: float = 1.0,
    seeds: np.ndarray,
    chunk_rows: int | None = None,
) -> dict[str, np.ndarray]:
    """RS-KD targets: `num_samples` draws with replacement from softmax(logits / temperature).

    Args:
        logits: (n, V) any float dtype, on any device.
        next_ids: (n,) int64, the token that follows each row; in [0, V).
        num_samples: N draws per row, 1 <= N <= 65535 (counts are uint16).
        temperature: Proposal temperature tau > 0. Only the draws use it; the stored
            log-probs are at temperature 1.
        seeds: (n,) uint64, one seed per row (see `position_seeds`). A row's draws are a
            function of its logits and its seed alone.
        chunk_rows: Rows worked on at a time; defaults to 16M logits a chunk.

    Returns:
        `topk_ids`: (n, N) int32, the distinct drawn ids, by log-prob descending (ties by
            id ascending), then -1 padding.
        `sample_counts`: (n, N) uint16, how often each id was drawn; sums to N; 0 at padding.
        `topk_logprobs`: (n, N) float32, temperature-1 log-prob of each id; 0.0 at padding.
        `target_logprob`: (n,) float32, the log-prob of `next_ids`.
        `tail_mass`: (n,) float32, 1 - sum of the probabilities of the distinct drawn ids.
        `sample_logz`: (n,) float32, log sum_j p_j^(1/tau) over the logits' width, p at temperature
            1: the draw distribution's normaliser. Id i was drawn with probability
            exp(topk_logprobs_i / tau - sample_logz), so a plain importance-sampling estimate of
            any expectation under the teacher needs no self-normalisation (0 at tau = 1).
    """
    n, vocab = _check(logits, next_ids)
    if not 1 <= num_samples <= np.iinfo(np.uint16).max:
        raise ConfigError(f"num_samples={num_samples} must be between 1 and 65535 (counts are stored as uint16)")
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature} must be > 0")
    seeds = np.asarray(seeds)
    if seeds.shape != (n,):
        raise InvalidDataError(f"seeds has shape {seeds.shape}; expected one per row, ({n},)")
    uniforms = torch.from_numpy(_uniforms(seeds.astype(_U64), num_samples))
    out = {name: [] for name in SAMPLE_FIELDS}
    for lo, hi in _chunks(n, chunk_rows or max(1, _CHUNK_ELEMENTS // (2 * vocab))):
        x = logits[lo:hi].float()
        draws, log_total = _inverse_cdf(x, temperature, uniforms[lo:hi].to(x.device))
        ids, counts = _unique_counts(draws)
        lse, tail = _normalizer_and_mass_outside(x, ids)
        # log sum exp((x - lse) / tau) = logsumexp(x / tau) - lse / tau; the CDF's total gave logsumexp(x / tau).
        out["sample_logz"].append((log_total - lse[:, 0].double() / temperature).float())
        padding = counts == 0
        lp = (x.gather(1, ids.clamp(min=0)) - lse).masked_fill(padding, 0.0)
        # Distinct ids by log-prob descending; padding last. Ids arrive ascending and the sort
        # is stable, so equal log-probs stay in id order and the result is deterministic.
        order = torch.sort(lp.masked_fill(padding, -torch.inf), dim=-1, descending=True, stable=True).indices
        ids, counts, lp = ids.gather(1, order), counts.gather(1, order), lp.gather(1, order)
        out["topk_ids"].append(ids.to(torch.int32))
        out["sample_counts"].append(counts.to(torch.int32))
        out["topk_logprobs"].append(lp)
        out["target_logprob"].append((x.gather(1, next_ids[lo:hi, None].to(x.device)) - lse)[:, 0])
        out["tail_mass"].append(tail)
    result = _to_numpy(out, n, num_samples)
    result["sample_counts"] = result["sample_counts"].astype(np.uint16)
    return result


def position_seeds(seed: int, positions: np.ndarray) -> np.ndarray:
    """Per-row seeds for one sequence: a hash of the sequence's seed and each position.

    Keying on the position t (not the row's index among the supervised positions) keeps the
    draws at t the same when the set of supervised positions changes.

    Args:
        seed: The sequence's seed, any Python int (reduced mod 2**64).
        positions: (P,) integer positions t.

    Returns:
        (P,) uint64 seeds.
    """
    base = _splitmix64(np.array([seed & _MASK64], dtype=_U64))
    return _splitmix64(base ^ np.asarray(positions).astype(_U64))


def tail_mass(logprobs: torch.Tensor) -> torch.Tensor:
    """1 - sum(exp(logprobs)) per row, (n, m) -> (n,), >= 0, when only the kept log-probs are known.

    -expm1 avoids cancelling 1 against the sum, but the answer is only as good as the log-probs:
    a tail below ~1e-7 of fp32 log-probs' normalizer is lost in them. With the logits at hand,
    `topk_targets` and `sample_targets` sum the tail itself instead. The clamp absorbs the
    last-ulp overshoot when the kept ids are the whole vocabulary.
    """
    return (-torch.expm1(torch.logsumexp(logprobs, dim=-1))).clamp(min=0.0)


def _check(logits: torch.Tensor, next_ids: torch.Tensor) -> tuple[int, int]:
    if logits.ndim != 2 or not logits.is_floating_point():
        raise InvalidDataError(
            f"logits must be a 2-D float tensor (rows, vocab); got {logits.dtype} {tuple(logits.shape)}"
        )
    n, vocab = logits.shape
    if tuple(next_ids.shape) != (n,):
        raise InvalidDataError(f"next_ids has shape {tuple(next_ids.shape)}; expected ({n},) to match the logits rows")
    if n and (int(next_ids.min()) < 0 or int(next_ids.max()) >= vocab):
        raise InvalidDataError(
            f"next_ids must lie in [0, {vocab}) (the logits width); got [{int(next_ids.min())}, {int(next_ids.max())}]"
        )
    return n, vocab


def _normalizer_and_mass_outside(x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp (rows, 1) of fp32 logits x (rows, V), and the probability outside `ids` (rows,).

    `ids` is (rows, m) int64, -1 = padding, its first column always real. The outside mass is
    summed over the excluded ids directly, so a tiny tail keeps its relative precision (students
    take its log); 1 - sum(kept) would round it to 0 below fp32's epsilon. One exp pass serves
    both results.
    """
    m = x.max(dim=-1, keepdim=True).values
    e = (x - m).exp_()
    total = e.sum(dim=-1, keepdim=True)
    kept = torch.where(ids >= 0, ids, ids[:, :1])  # padding re-zeroes the first id
    outside = e.scatter_(1, kept, 0.0).sum(dim=-1, keepdim=True)
    return m + total.log(), (outside / total)[:, 0]


def _chunks(n: int, size: int):
    return ((lo, min(lo + size, n)) for lo in range(0, n, size))


def _to_numpy(parts: dict[str, list[torch.Tensor]], n: int, width: int) -> dict[str, np.ndarray]:
    out = {}
    for name, chunks in parts.items():
        if chunks:
            out[name] = torch.cat(chunks).cpu().numpy()
        else:
            shape = (0,) if name in ("target_logprob", "tail_mass") else (0, width)
            dtype = np.int32 if name.endswith(("_ids", "_counts")) else np.float32
            out[name] = np.zeros(shape, dtype=dtype)
    assert all(len(v) == n for v in out.values())
    return out


def _inverse_cdf(x: torch.Tensor, temperature: float, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, V) fp32 logits and (rows, N) fp64 uniforms in [0, 1) -> (rows, N) int64 draws, and
    (rows,) fp64 logsumexp(x / temperature) (the CDF's total, in log space)."""
    # In place: this (rows, V) fp64 buffer is the largest thing sampling allocates.
    cdf = x.double().div_(temperature)
    top = cdf.max(dim=-1, keepdim=True).values
    cdf = cdf.sub_(top).exp_().cumsum_(dim=-1)
    # Scaling u by the row total instead of normalizing the CDF saves a (rows, V) pass.
    draws = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)
    # u * total can round up to the total itself; that draw belongs to the last id.
    return draws.clamp_(max=x.shape[1] - 1), top[:, 0] + cdf[:, -1].log()


def _unique_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, N) ids -> distinct ids ascending and their counts, both (rows, N), padded -1 / 0."""
    rows, num = draws.shape
    s = torch.sort(draws, dim=-1).values
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = first.long().cumsum(dim=-1) - 1  # which distinct id each draw belongs to
    counts = torch.zeros_like(s).scatter_add_(1, slot, torch.ones_like(s))
    ids = torch.full_like(s, -1).scatter_(1, slot, s)
    return ids, counts


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # Vigna's splitmix64 finaliser: a bijective mix of a 64-bit counter (uint64 arithmetic
    # wraps, which is what the constants assume).
    with np.errstate(over="ignore"):
        x = x + _U64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _uniforms(seeds: np.ndarray, num: int) -> np.ndarray:
    """(n,) uint64 seeds -> (n, num) float64 uniforms in [0, 1), draw j a hash of (seed, j)."""
    with np.errstate(over="ignore"):
        counters = seeds[:, None] * _U64(0xD1342543DE82EF95) + np.arange(num, dtype=_U64)[None, :]
        bits = _splitmix64(_splitmix64(counters))
    return (bits >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))
