"""Top-K and RS-KD sampling targets against a plain full-vocabulary reference.

    .venv/bin/pytest tests/stages/precompute/test_sparsify.py        # ~5 s
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitcache.stages.precompute.sparsify import position_seeds, sample_targets, tail_mass, topk_targets
from logitcache.storage.errors import ConfigError, InvalidDataError


def _logits(n=37, vocab=301, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * scale, torch.randint(0, vocab, (n,), generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_matches_full_log_softmax(dtype):
    logits, next_ids = _logits()
    logits = logits.to(dtype)
    out = topk_targets(logits, next_ids, 10)
    ref = torch.log_softmax(logits.float(), dim=-1)
    values, ids = ref.topk(10)
    assert out["topk_ids"].dtype == np.int32 and out["topk_logprobs"].dtype == np.float32
    assert out["target_logprob"].dtype == np.float32 and out["tail_mass"].dtype == np.float32
    np.testing.assert_allclose(out["topk_logprobs"], values.numpy(), rtol=0, atol=1e-5)
    picked = np.take_along_axis(ref.numpy(), out["topk_ids"].astype(np.int64), 1)  # ids match their log-probs
    np.testing.assert_allclose(picked, out["topk_logprobs"], rtol=0, atol=1e-5)
    assert (np.diff(out["topk_logprobs"], axis=1) <= 0).all()
    np.testing.assert_allclose(out["target_logprob"], ref[torch.arange(len(next_ids)), next_ids].numpy(), atol=1e-5)
    np.testing.assert_allclose(out["tail_mass"], 1 - values.double().exp().sum(-1).numpy(), atol=1e-6)


def test_topk_chunking_invariant():
    logits, next_ids = _logits(n=50)
    whole = topk_targets(logits, next_ids, 7)
    for rows in (1, 3, 16, 1000):
        chunked = topk_targets(logits, next_ids, 7, chunk_rows=rows)
        for name in whole:
            np.testing.assert_allclose(chunked[name], whole[name], rtol=0, atol=1e-6, err_msg=name)


def test_tail_mass_is_stable_and_non_negative():
    vocab = 1000
    logits = torch.full((2, vocab), -30.0)
    logits[:, 0] = 0.0  # one id holds all but ~1000 * e^-30 of the mass
    out = topk_targets(logits, torch.zeros(2, dtype=torch.long), 1)
    exact = (vocab - 1) * np.exp(-30.0) / (1 + (vocab - 1) * np.exp(-30.0))
    np.testing.assert_allclose(out["tail_mass"], exact, rtol=1e-3)  # 1 - sum(p) in fp32 would give 0
    full = topk_targets(_logits(vocab=50)[0], torch.zeros(37, dtype=torch.long), 50)
    assert (full["tail_mass"] >= 0).all() and (full["tail_mass"] < 1e-6).all()
    assert tail_mass(torch.tensor([[-torch.inf, -torch.inf]])).item() == 1.0


def test_bad_inputs():
    logits, next_ids = _logits()
    with pytest.raises(ConfigError, match="k=400"):
        topk_targets(logits, next_ids, 400)
    with pytest.raises(InvalidDataError, match="next_ids must lie"):
        topk_targets(logits, next_ids + 1000, 4)
    with pytest.raises(InvalidDataError, match="shape"):
        topk_targets(logits, next_ids[:3], 4)
    seeds = position_seeds(0, np.arange(len(next_ids)))
    with pytest.raises(ConfigError, match="num_samples"):
        sample_targets(logits, next_ids, num_samples=70000, seeds=seeds)
    with pytest.raises(ConfigError, match="temperature"):
        sample_targets(logits, next_ids, num_samples=8, temperature=0.0, seeds=seeds)
    with pytest.raises(InvalidDataError, match="seeds"):
        sample_targets(logits, next_ids, num_samples=8, seeds=seeds[:2])


def test_sample_fields_and_padding():
    logits, next_ids = _logits()
    n_draws = 24
    out = sample_targets(logits, next_ids, num_samples=n_draws, temperature=1.3, seeds=position_seeds(7, np.arange(37)))
    ids, counts, lps = out["topk_ids"], out["sample_counts"], out["topk_logprobs"]
    assert ids.shape == counts.shape == lps.shape == (37, n_draws)
    assert ids.dtype == np.int32 and counts.dtype == np.uint16 and lps.dtype == np.float32
    assert (counts.sum(axis=1) == n_draws).all()
    ref = torch.log_softmax(logits, dim=-1).numpy()
    for row in range(37):
        real = counts[row] > 0
        k = real.sum()
        assert real[:k].all() and not real[k:].any(), "padding only at the end"
        assert (ids[row, k:] == -1).all() and (lps[row, k:] == 0.0).all()
        assert len(set(ids[row, :k].tolist())) == k, "ids are distinct"
        np.testing.assert_allclose(lps[row, :k], ref[row, ids[row, :k]], atol=1e-5)  # temperature-1 log-probs
        assert (np.diff(lps[row, :k]) <= 0).all(), "ordered by log-prob"
        kept = np.exp(ref[row, ids[row, :k]].astype(np.float64)).sum()
        np.testing.assert_allclose(out["tail_mass"][row], 1 - kept, atol=1e-5)
    np.testing.assert_allclose(out["target_logprob"], ref[np.arange(37), next_ids.numpy()], atol=1e-5)


def test_sample_deterministic_and_independent_of_batching():
    logits, next_ids = _logits(n=40)
    seeds = position_seeds(123, np.arange(40))
    kw = dict(num_samples=16, temperature=0.8)
    whole = sample_targets(logits, next_ids, seeds=seeds, **kw)
    again = sample_targets(logits, next_ids, seeds=seeds, **kw)
    perm = np.random.default_rng(0).permutation(40)[:25]
    subset = sample_targets(logits[perm], next_ids[perm], seeds=seeds[perm], chunk_rows=4, **kw)
    bf16_batch = sample_targets(logits.bfloat16(), next_ids, seeds=seeds, **kw)  # other rows' dtype: irrelevant
    for name in whole:
        np.testing.assert_array_equal(whole[name], again[name])
        np.testing.assert_array_equal(whole[name][perm], subset[name])
    assert bf16_batch["topk_ids"].shape == whole["topk_ids"].shape
    reseeded = sample_targets(logits, next_ids, seeds=position_seeds(124, np.arange(40)), **kw)
    assert not np.array_equal(reseeded["topk_ids"], whole["topk_ids"])


def test_position_seeds():
    a = position_seeds(5, np.array([0, 1, 2, 3]))
    assert a.dtype == np.uint64 and len(set(a.tolist())) == 4
    np.testing.assert_array_equal(position_seeds(5, np.array([2, 3])), a[2:])  # keyed on t, not the row index
    assert not np.array_equal(position_seeds(6, np.array([0, 1, 2, 3])), a)
    assert position_seeds(2**70 + 5, np.array([0])).dtype == np.uint64  # any Python int


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_sampling_is_unbiased(temperature):
    # One distribution, many seeds: the mean of counts/N estimates softmax(logits / tau).
    vocab, rows, n_draws = 12, 4000, 16
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 2
    out = sample_targets(
        logits.expand(rows, vocab),
        torch.zeros(rows, dtype=torch.long),
        num_samples=n_draws,
        temperature=temperature,
        seeds=position_seeds(99, np.arange(rows)),
    )
    freq = np.zeros(vocab)
    for ids, counts in zip(out["topk_ids"], out["sample_counts"]):
        np.add.at(freq, ids[counts > 0], counts[counts > 0])
    freq /= rows * n_draws
    p = torch.softmax(logits.double() / temperature, dim=-1).numpy()
    sigma = np.sqrt(p * (1 - p) / (rows * n_draws))
    assert (np.abs(freq - p) <= 5 * sigma + 1e-4).all(), (freq, p)
