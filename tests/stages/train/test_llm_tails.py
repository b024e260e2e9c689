"""The LLM-like teachers of tests/support/llm_tails.py have the shapes their docstring promises.

Run: .venv/bin/python -m pytest tests/stages/train/test_llm_tails.py -q
"""

import pytest
import torch

import llm_tails


@pytest.fixture(scope="module", params=llm_tails.REGIMES)
def regime(request):
    return request.param, llm_tails.teacher_logits(request.param, 16)


def test_deterministic_and_seeded():
    a = llm_tails.teacher_logits("peaked", 4, vocab=5000, seed=3)
    assert torch.equal(a, llm_tails.teacher_logits("peaked", 4, vocab=5000, seed=3))
    assert not torch.equal(a, llm_tails.teacher_logits("peaked", 4, vocab=5000, seed=4))
    assert torch.equal(llm_tails.student_logits(a, "low"), llm_tails.student_logits(a, "low"))


def test_regime_shapes(regime):
    name, logits = regime
    assert logits.shape == (16, llm_tails.VOCAB) and logits.dtype == torch.float32
    mass = llm_tails.topk_mass(logits, 32).median().item()
    lp = llm_tails.full_logprobs(logits)
    entropy = -(lp.exp() * lp).sum(-1).median().item()
    low, high = {"zipf": (0.3, 0.85), "peaked": (0.85, 1.0), "flat": (0.0, 0.1)}[name]
    assert low < mass < high, (name, mass)
    if name == "flat":
        assert entropy > 9.0
    # Not a flat tail: the id just past rank 32 is far likelier than the tail's average id.
    past_k = lp.topk(33, dim=-1).values[:, 32]
    tail = -torch.expm1(lp.topk(32, dim=-1).values.exp().sum(-1).log())
    average = (tail / (llm_tails.VOCAB - 32)).log()
    assert (past_k - average).median() > 3.0


def test_topk_cache_is_stage_one_rows(regime):
    _, logits = regime
    cache = llm_tails.topk_cache(logits, 32)
    lp = llm_tails.full_logprobs(logits)
    want = lp.topk(32, dim=-1)
    assert cache["ids"].dtype == torch.int32 and cache["logprobs"].dtype == torch.float32
    torch.testing.assert_close(cache["logprobs"].double(), want.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["tail_mass"].double(), 1 - want.values.exp().sum(-1), atol=1e-6, rtol=1e-4)


def test_sample_cache_counts():
    logits = llm_tails.teacher_logits("zipf", 4, vocab=3000)
    cache = llm_tails.sample_cache(logits, 64, temperature=2.0)
    assert (cache["counts"].sum(-1) == 64).all()
    assert ((cache["ids"] >= 0) == (cache["counts"] > 0)).all()
