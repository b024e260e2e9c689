"""The fused head + online logsumexp + top-K against the unfused path (full logits, then top-K).

    .venv/bin/python -m pytest tests/stages/precompute/test_fused_topk.py -q        # ~20 s on 2 cores
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from logitcache.stages.precompute.engines.base import targets_from_hidden
from logitcache.stages.precompute.targets import Targets
from logitcache.stages.precompute.fused_topk import fused_topk_targets
from logitcache.storage.head import LMHead
from logitcache.stages.precompute.sparsify import topk_targets
from logitcache.storage.errors import ConfigError, InvalidDataError

QWEN_WIDTH = 151_936


def _llm_like_head(vocab: int, hidden: int = 64, seed: int = 0, **transform) -> tuple[LMHead, torch.Tensor]:
    """A head whose rows have an LLM-like shape: a few strong logits over a long tail.

    A Zipf-like per-id bias (frequent ids score higher) plus a random projection gives a peaked
    head and a tail of ~150k ids that still carries a few percent of the mass, so both the top-K
    merge across tiles and the tail sum matter.
    """
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g) * 0.35
    bias = -1.2 * torch.log1p(torch.randperm(vocab, generator=g).float())
    hidden_states = torch.randn(48, hidden, generator=g)
    return LMHead(weight=weight, bias=bias, **transform), hidden_states


def _assert_same_targets(fused: dict, ref: dict, logits: torch.Tensor, *, atol: float, tail_rtol: float) -> None:
    """Same log-probs, target and tail; every fused id carries its own log-prob (so ties between
    equal logits, common in bf16, may be ordered either way)."""
    np.testing.assert_allclose(fused["topk_logprobs"], ref["topk_logprobs"], rtol=0, atol=atol)
    np.testing.assert_allclose(fused["target_logprob"], ref["target_logprob"], rtol=0, atol=atol)
    np.testing.assert_allclose(fused["tail_mass"], ref["tail_mass"], rtol=tail_rtol, atol=1e-9)
    full = torch.log_softmax(logits.double(), dim=-1).numpy()  # fp32 over 152k ids drifts by 5e-5
    picked = np.take_along_axis(full, fused["topk_ids"].astype(np.int64), 1)
    np.testing.assert_allclose(picked, fused["topk_logprobs"], rtol=0, atol=atol)
    assert all(len(set(row)) == len(row) for row in fused["topk_ids"].tolist())
    for row, (a, b) in enumerate(zip(fused["topk_ids"].tolist(), ref["topk_ids"].tolist())):
        # The kept sets differ only by ids tied with the K-th at the cut.
        for i in set(a) ^ set(b):
            assert abs(full[row, i] - ref["topk_logprobs"][row, -1]) <= atol, (row, i)
    for name in ("topk_ids", "topk_logprobs", "target_logprob", "tail_mass"):
        assert fused[name].dtype == ref[name].dtype and fused[name].shape == ref[name].shape, name


@pytest.mark.parametrize("tiles", [(7, 5000), (48, 151_936), (16, 65_536)])
def test_fused_matches_unfused_at_qwen_width(tiles):
    """V = 151,936 with tiles that do not divide it (a short last tile), one tile, and few tiles."""
    head, hidden = _llm_like_head(QWEN_WIDTH)
    next_ids = torch.randint(0, QWEN_WIDTH, (hidden.shape[0],), generator=torch.Generator().manual_seed(1))
    next_ids[:4] = torch.topk(head(hidden[:4]), 1).indices[:, 0]  # some next tokens inside the top-K
    logits = head(hidden)
    ref = topk_targets(logits, next_ids, 32)
    assert 1e-3 < np.median(ref["tail_mass"]) < 0.5, "the tail must matter for this test to mean anything"
    fused = fused_topk_targets(hidden, head, next_ids, 32, chunk_rows=tiles[0], vocab_tile=tiles[1])
    _assert_same_targets(fused, ref, logits, atol=2e-5, tail_rtol=1e-4)


@pytest.mark.parametrize(
    "transform", [{"softcap": 30.0, "logit_scale": 0.8}, {"hidden_scale": 0.5}, {}], ids=["capped", "hidden", "plain"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab_tile", [2048, 3000], ids=["grouped", "plain"])
def test_fused_matches_unfused_with_transforms_and_dtypes(transform, dtype, vocab_tile):
    """Tiles of 2048 ids (a multiple of 32) take the grouped candidate search on CPU after the
    first tile; 3000 the plain per-tile top-K. bf16 logits tie often, at the K-th too."""
    head, hidden = _llm_like_head(20_011, seed=2, **transform)
    head = LMHead(weight=head.weight.to(dtype), bias=head.bias.to(dtype), **transform)
    next_ids = torch.randint(0, 20_011, (hidden.shape[0],), generator=torch.Generator().manual_seed(3))
    logits = head(hidden)
    ref = topk_targets(logits, next_ids, 50)
    fused = fused_topk_targets(hidden, head, next_ids, 50, chunk_rows=10, vocab_tile=vocab_tile)
    _assert_same_targets(fused, ref, logits, atol=3e-5, tail_rtol=1e-4)


def test_tiny_tail_keeps_its_relative_precision():
    """One id carries all but ~1e-10 of the mass: 1 - sum(top-K) would give 0 in fp32; the fused
    path sums the outside mass directly, across tiles and merges, like `topk_targets`."""
    vocab, hidden_size = 9000, 8
    weight = torch.zeros(vocab, hidden_size)
    bias = torch.full((vocab,), -30.0)
    bias[4321] = 0.0
    bias[17] = -5.0  # a second id, kept in the top-2
    head = LMHead(weight=weight, bias=bias)
    hidden = torch.randn(3, hidden_size)
    next_ids = torch.tensor([4321, 17, 5])
    # 1024-id tiles: past the first, no entry clears the running top-2, so tiles add only mass.
    fused = fused_topk_targets(hidden, head, next_ids, 2, chunk_rows=2, vocab_tile=1024)
    ref = topk_targets(head(hidden), next_ids, 2)
    exact = (vocab - 2) * np.exp(-30.0) / (1 + np.exp(-5.0) + (vocab - 2) * np.exp(-30.0))
    np.testing.assert_allclose(fused["tail_mass"], exact, rtol=1e-4)
    np.testing.assert_allclose(fused["tail_mass"], ref["tail_mass"], rtol=1e-4)
    assert fused["topk_ids"].tolist() == [[4321, 17]] * 3
    np.testing.assert_allclose(fused["target_logprob"], ref["target_logprob"], atol=1e-6)


def test_k_wider_than_a_tile_and_the_whole_vocabulary():
    head, hidden = _llm_like_head(1000, seed=4)
    next_ids = torch.arange(hidden.shape[0])
    for k in (300, 1000):  # k > tile: the tile is widened to k; k = V: the tail is empty
        fused = fused_topk_targets(hidden, head, next_ids, k, chunk_rows=16, vocab_tile=128)
        ref = topk_targets(head(hidden), next_ids, k)
        np.testing.assert_allclose(fused["topk_logprobs"], ref["topk_logprobs"], atol=2e-5)
        np.testing.assert_allclose(fused["tail_mass"], ref["tail_mass"], atol=1e-6)
    assert (fused["tail_mass"] < 1e-6).all()
    assert sorted(fused["topk_ids"][0].tolist()) == list(range(1000))


def test_empty_input_and_bad_arguments():
    head, hidden = _llm_like_head(500)
    empty = fused_topk_targets(hidden[:0], head, torch.zeros(0, dtype=torch.long), 4)
    assert empty["topk_ids"].shape == (0, 4) and empty["topk_ids"].dtype == np.int32
    assert empty["tail_mass"].shape == (0,) and empty["tail_mass"].dtype == np.float32
    with pytest.raises(ConfigError, match="k=501"):
        fused_topk_targets(hidden, head, torch.zeros(48, dtype=torch.long), 501)
    with pytest.raises(InvalidDataError, match=r"\[0, 500\)"):
        fused_topk_targets(hidden, head, torch.full((48,), 500), 4)
    with pytest.raises(InvalidDataError, match="shape"):
        fused_topk_targets(hidden, head, torch.zeros(3, dtype=torch.long), 4)


def test_workers_give_the_same_bits_as_one_thread_and_leave_torch_threads_as_they_were():
    """Chunks folded on worker threads (one torch thread each) equal the same chunks folded one
    after another on one thread, bit for bit: the split changes where a chunk runs, not its
    arithmetic. 45 rows over 2 and 3 workers: chunks shrink so every worker gets rows, and the
    last is short. The head's weight requires grad, as a model's does."""
    head, hidden = _llm_like_head(QWEN_WIDTH, seed=7)
    head = LMHead(weight=head.weight.requires_grad_(), bias=head.bias)
    hidden, next_ids = hidden[:45], torch.randint(0, QWEN_WIDTH, (45,), generator=torch.Generator().manual_seed(8))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = fused_topk_targets(hidden, head, next_ids, 32, chunk_rows=8, workers=1)
        # (workers, chunk_rows asked, rows per chunk used): 64 > 45 rows is cut to ceil(45 / workers).
        for workers, asked, used in [(2, 8, 8), (3, 8, 8), (2, 64, 23), (3, 64, 15)]:
            ref = fused_topk_targets(hidden, head, next_ids, 32, chunk_rows=used, workers=1)
            got = fused_topk_targets(hidden, head, next_ids, 32, chunk_rows=asked, workers=workers)
            for name in ref:
                np.testing.assert_array_equal(got[name], ref[name], err_msg=f"{name}, {workers} workers x {asked}")
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    torch.set_num_threads(2)
    try:
        fused_topk_targets(hidden, head, next_ids, 32, chunk_rows=8)  # default: 2 workers
        assert torch.get_num_threads() == 2, "the caller's torch threads must be put back"
        seen = []
        worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        worker.start()
        worker.join()
        assert seen == [2], "threads started later must get the caller's setting, not the workers' 1"
    finally:
        torch.set_num_threads(before)
    _assert_same_targets(serial, topk_targets(head(hidden), next_ids, 32), head(hidden), atol=2e-5, tail_rtol=1e-4)


def test_engines_take_the_fused_path_in_topk_mode_only():
    head, hidden = _llm_like_head(3000, seed=5)
    next_ids = torch.randint(0, 3000, (48,), generator=torch.Generator().manual_seed(6))
    topk = Targets("topk", 16)
    fused = targets_from_hidden(hidden, head, next_ids, topk)
    plain = targets_from_hidden(hidden, head, next_ids, topk, fused=False)
    _assert_same_targets(fused, plain, head(hidden), atol=2e-5, tail_rtol=1e-4)
    sample = Targets("sample", 8)
    seeds = np.arange(48, dtype=np.uint64)
    a = targets_from_hidden(hidden, head, next_ids, sample, seeds=seeds)
    b = targets_from_hidden(hidden, head, next_ids, sample, seeds=seeds, fused=False)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_pooling_gpu_memory_budget_arithmetic():
    """A 7B teacher (V = 152,064, H = 3,584, bf16 head) on a 24 GiB card: the head (1.02 GiB) and
    the fused top-K's tiles (4096 x 16384 in bf16 + fp32 + fp32 exp = 0.625 GiB, hidden rows
    0.08 GiB) come out of vLLM's 0.9."""
    from logitcache.stages.precompute.engines.vllm_pooling import pooling_gpu_memory_utilization

    gib = 1 << 30
    share = pooling_gpu_memory_utilization(24 * gib, vocab=152_064, hidden=3_584)
    head = 152_064 * 3_584 * 2
    work = 4096 * 16384 * 6 + 4096 * 3584 * 6
    assert share == pytest.approx(0.9 - (head + work) / (24 * gib))
    assert 0.83 < share < 0.84
    # Together with the head, nothing exceeds vLLM's own default of 0.9 of the card.
    assert share * 24 * gib + head + work == pytest.approx(0.9 * 24 * gib)
    # A bigger card gives vLLM a larger share; a small vocabulary uses a narrower tile.
    assert pooling_gpu_memory_utilization(80 * gib, vocab=152_064, hidden=3_584) > share
    small = pooling_gpu_memory_utilization(24 * gib, vocab=4096, hidden=256)
    assert small == pytest.approx(0.9 - (4096 * 256 * 2 + 4096 * 4096 * 6 + 4096 * 256 * 6) / (24 * gib))
    with pytest.raises(ConfigError, match="logprobs"):
        pooling_gpu_memory_utilization(2 * gib, vocab=152_064, hidden=8_192)
