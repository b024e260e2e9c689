"""The Triton kernel of the fused head (`fused_topk_triton`) against the unfused path, on CPU.

CPU tensors run the kernel's own source under Triton's interpreter (a GPU compiles the same
function), in one child process for the module (`triton_interpreter`: the interpreter must be on
before triton is first imported). What is checked is the kernel's arithmetic: blocks, masks,
splits, the packed keys, the merges and the directly summed tail. Not checked: that it compiles
for a GPU, and its speed. The interpreter is slow, so grids are a few programs.

    .venv/bin/python -m pytest tests/stages/precompute/test_fused_topk_triton.py -q           # ~50 s on 2 busy cores
    .venv/bin/python -m pytest tests/stages/precompute/test_fused_topk_triton.py -q -m slow   # K = 32 over 8,229 ids
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from logitcache.stages.precompute.engines import build_engine  # noqa: E402
from logitcache.stages.precompute.engines.base import targets_from_hidden  # noqa: E402
from logitcache.stages.precompute.targets import Targets  # noqa: E402
from logitcache.stages.precompute.fused_topk import TRITON_MAX_K, fused_kernel_choice  # noqa: E402
from logitcache.stages.precompute.fused_topk_triton import triton_topk_targets  # noqa: E402
from logitcache.stages.precompute.sparsify import topk_targets  # noqa: E402
from logitcache.storage.errors import ConfigError, InvalidDataError  # noqa: E402
from logitcache.storage.head import LMHead  # noqa: E402
from triton_interpreter import interpreter_pool, triton_topk  # noqa: E402

# Small blocks keep the interpreter's grid to a few programs; tl.dot needs >= 16 per side.
SMALL = dict(block_rows=16, block_vocab=32, block_hidden=32)


@pytest.fixture(scope="module")
def interpreted():
    """`triton_topk_targets` with the kernel run by Triton's interpreter, in a child process."""
    with interpreter_pool() as pool:
        pool.submit(int).result()  # start the child (torch, triton) here, not in the first test
        yield lambda *args, **kwargs: pool.submit(triton_topk, *args, **kwargs).result()


def _peaked_head(vocab: int, hidden: int = 48, rows: int = 16, seed: int = 0, dtype=torch.float32,
                 **transform) -> tuple[LMHead, torch.Tensor]:
    """A head with an LLM-like row shape: a Zipf-like per-id bias (ids shuffled) plus a random
    projection, so a few ids dominate and the tail past the top-K still holds a good part of the
    mass (the top-K merges and the tail sum both matter)."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, hidden, generator=g) * 0.35).to(dtype)
    bias = (-1.2 * torch.log1p(torch.randperm(vocab, generator=g).float())).to(dtype)
    return LMHead(weight=weight, bias=bias, **transform), torch.randn(rows, hidden, generator=g)


def _check(got: dict, head: LMHead, hidden: torch.Tensor, next_ids: torch.Tensor, k: int, *,
           atol: float = 2e-5, tail_rtol: float = 1e-4) -> dict:
    """`got` against `topk_targets(head(hidden))`: same log-probs, target, tail; every id carries
    its own log-prob, ids are distinct, and the kept sets differ only by ties at the K-th."""
    logits = head(hidden)
    ref = topk_targets(logits, next_ids, k)
    for name in ("topk_ids", "topk_logprobs", "target_logprob", "tail_mass"):
        assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape, name
    np.testing.assert_allclose(got["topk_logprobs"], ref["topk_logprobs"], rtol=0, atol=atol)
    np.testing.assert_allclose(got["target_logprob"], ref["target_logprob"], rtol=0, atol=atol)
    np.testing.assert_allclose(got["tail_mass"], ref["tail_mass"], rtol=tail_rtol, atol=1e-9)
    full = torch.log_softmax(logits.double(), dim=-1).cpu().numpy()
    picked = np.take_along_axis(full, got["topk_ids"].astype(np.int64), 1)
    np.testing.assert_allclose(picked, got["topk_logprobs"], rtol=0, atol=atol)
    assert all(len(set(row)) == len(row) for row in got["topk_ids"].tolist())
    for row, (a, b) in enumerate(zip(got["topk_ids"].tolist(), ref["topk_ids"].tolist())):
        for i in set(a) ^ set(b):
            assert abs(full[row, i] - ref["topk_logprobs"][row, -1]) <= atol, (row, i)
    return ref


@pytest.mark.parametrize("inserts", [0, 2, 64], ids=["always-sort", "mixed", "always-insert"])
def test_long_tail_ragged_vocab_and_a_split_shorter_than_k(inserts, interpreted):
    """V = 133 in 32-wide subtiles (the last is 5 wide), 3 splits of 64 ids: the last split holds
    5 < K = 8 ids, so its running top-8 keeps -inf fillers that the final merge must drop. 13
    rows in a 16-row block: 3 rows of padding. H = 48 in 32-wide steps: a masked last step.
    `inserts` = 0 merges every subtile by sorting, 64 (more than any count) every one by
    insertion, 2 each by whichever its candidate count picks. All must give the same answer."""
    head, hidden = _peaked_head(133, hidden=48, rows=13, seed=1)
    next_ids = torch.randint(0, 133, (13,), generator=torch.Generator().manual_seed(2))
    got = interpreted(hidden, head, next_ids, 8, splits=3, inserts=inserts, **SMALL)
    ref = _check(got, head, hidden, next_ids, 8)
    assert 0.05 < np.median(ref["tail_mass"]) < 0.9, "the tail must matter for this test to mean anything"
    assert (got["topk_ids"] >= 128).any(), "the short split must contribute to some row's top-K"


@pytest.mark.parametrize("k", [1, 5, 12])
def test_k_not_a_power_of_two(k, interpreted):
    """K = 5 and 12 run as 8 and 16 and are cut in the merge; K = 1 takes tl.topk's max path."""
    head, hidden = _peaked_head(100, hidden=32, rows=16, seed=3)
    next_ids = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(4))
    got = interpreted(hidden, head, next_ids, k, splits=2, **SMALL)
    _check(got, head, hidden, next_ids, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bias_softcap_and_scales(dtype, interpreted):
    """Bias, hidden_scale before the matmul, logit_scale and a tanh softcap after it, as
    `apply_head` computes them; in bf16 the kernel rounds where torch rounds, so even ties agree."""
    transform = dict(softcap=4.0, logit_scale=1.7, hidden_scale=0.6)
    head, hidden = _peaked_head(100, hidden=64, rows=16, seed=5, dtype=dtype, **transform)
    assert head(hidden).float().abs().max() > 3.0, "the cap must bend some logits"
    next_ids = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(6))
    got = interpreted(hidden, head, next_ids, 8, splits=2, **SMALL)
    _check(got, head, hidden, next_ids, 8)


def test_no_bias_fp16(interpreted):
    head, hidden = _peaked_head(96, hidden=32, rows=16, seed=7, dtype=torch.float16)
    head = LMHead(weight=head.weight)
    next_ids = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(8))
    got = interpreted(hidden, head, next_ids, 4, splits=1, **SMALL)
    _check(got, head, hidden, next_ids, 4)


def test_tiny_tail_keeps_its_relative_precision(interpreted):
    """One id carries all but ~3e-11 of the mass: 1 - sum(top-K) is 0 in fp32. The kernel sums
    the outside mass directly (across subtiles, skipped merges and splits), like `topk_targets`."""
    vocab, hidden_size = 300, 16
    bias = torch.full((vocab,), -30.0)
    bias[217] = 0.0
    bias[40] = -5.0  # a second id, kept in the top-2
    head = LMHead(weight=torch.zeros(vocab, hidden_size), bias=bias)
    hidden = torch.randn(3, hidden_size)
    next_ids = torch.tensor([217, 40, 5])
    got = interpreted(hidden, head, next_ids, 2, splits=2, **SMALL)
    exact = (vocab - 2) * np.exp(-30.0) / (1 + np.exp(-5.0) + (vocab - 2) * np.exp(-30.0))
    assert 1e-11 < exact < 1e-10
    np.testing.assert_allclose(got["tail_mass"], exact, rtol=1e-5)
    assert got["topk_ids"].tolist() == [[217, 40]] * 3
    _check(got, head, hidden, next_ids, 2, atol=1e-5, tail_rtol=1e-5)  # ulp(30) = 2e-6


def test_next_token_at_every_edge_of_tiles_and_splits(interpreted):
    """The next token at a subtile's first and last id, at split edges (95 | 96), at 0 and V-1,
    and in the 2-wide last subtile: its logit is picked up in exactly one split."""
    vocab = 130  # subtiles [0, 32) ... [96, 128), [128, 130); splits [0, 96), [96, 130)
    head, hidden = _peaked_head(vocab, hidden=32, rows=16, seed=9)
    next_ids = torch.tensor([0, 31, 32, 63, 64, 95, 96, 97, 127, 128, 129, 1, 33, 100, 128, 129])
    got = interpreted(hidden, head, next_ids, 8, splits=2, **SMALL)
    _check(got, head, hidden, next_ids, 8)


@pytest.mark.slow
def test_k32_over_eight_thousand_ids_in_bf16(interpreted):
    """Closer to real work (30-50 s of interpreter): K = 32 over V = 8,229 (not a multiple of 64),
    bf16 with a softcap, 129 subtiles in one split, so the running top-32 is merged ~130 times,
    mostly by insertion once the split is under way."""
    head, hidden = _peaked_head(8229, hidden=64, rows=16, seed=13, dtype=torch.bfloat16, softcap=30.0)
    next_ids = torch.randint(0, 8229, (16,), generator=torch.Generator().manual_seed(14))
    next_ids[:3] = torch.tensor([0, 8228, 8192])
    got = interpreted(hidden, head, next_ids, 32, block_rows=16, block_vocab=64, block_hidden=32, splits=1)
    ref = _check(got, head, hidden, next_ids, 32)
    assert 0.05 < np.median(ref["tail_mass"]) < 0.9


def test_empty_input_and_bad_arguments():
    head, hidden = _peaked_head(64, hidden=16, rows=4)
    empty = triton_topk_targets(hidden[:0], head, torch.zeros(0, dtype=torch.long), 4)
    assert empty["topk_ids"].shape == (0, 4) and empty["topk_ids"].dtype == np.int32
    with pytest.raises(ConfigError, match="k=65"):
        triton_topk_targets(hidden, head, torch.zeros(4, dtype=torch.long), 65)
    with pytest.raises(InvalidDataError, match=r"\[0, 64\)"):
        triton_topk_targets(hidden, head, torch.full((4,), 64), 4)
    with pytest.raises(ConfigError, match="power of two"):
        triton_topk_targets(hidden, head, torch.zeros(4, dtype=torch.long), 4, block_rows=24)
    wide, _ = _peaked_head(600, hidden=16, rows=4)
    with pytest.raises(ConfigError, match=f"at most {TRITON_MAX_K}"):
        triton_topk_targets(hidden, wide, torch.zeros(4, dtype=torch.long), TRITON_MAX_K + 1)
    import triton

    if not triton.knobs.runtime.interpret:  # this process compiles: CPU tensors are refused, not crashed on
        with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
            triton_topk_targets(hidden, head, torch.zeros(4, dtype=torch.long), 4)


def test_which_kernel_runs():
    """auto: Triton on CUDA, the torch fold on CPU; 'triton' is refused where it cannot run."""
    assert fused_kernel_choice("auto", "cpu", 32) == "torch"
    assert fused_kernel_choice("torch", "cuda", 32) == "torch"
    assert fused_kernel_choice("auto", "cuda", 32) == "triton"  # triton is importable here
    assert fused_kernel_choice("auto", "cuda", TRITON_MAX_K + 1) == "torch"
    assert fused_kernel_choice("triton", "cuda", 32) == "triton"
    with pytest.raises(ConfigError, match="CUDA"):
        fused_kernel_choice("triton", "cpu", 32)
    with pytest.raises(ConfigError, match=f"K = {TRITON_MAX_K}"):
        fused_kernel_choice("triton", "cuda", TRITON_MAX_K + 1)
    with pytest.raises(ConfigError, match="expected one of"):
        fused_kernel_choice("cuda", "cuda", 32)
    head, hidden = _peaked_head(500, hidden=16, rows=8)
    next_ids = torch.arange(8)
    spec = Targets("topk", 4)
    auto = targets_from_hidden(hidden, head, next_ids, spec)  # CPU: the torch fold
    forced = targets_from_hidden(hidden, head, next_ids, spec, fused_kernel="torch")
    for name in auto:
        np.testing.assert_array_equal(auto[name], forced[name])
    with pytest.raises(ConfigError, match="CUDA"):
        targets_from_hidden(hidden, head, next_ids, spec, fused_kernel="triton")


def test_auto_falls_back_to_the_torch_fold_when_the_kernel_fails(monkeypatch):
    """A kernel that does not compile on some GPU must not end a long job under "auto": a warning,
    the torch fold for this call and the next ("torch" is handed back). An explicit "triton", or
    an error that is not Triton's, is raised. CPU stands in for CUDA here: the choice and the
    kernel are replaced (a compile failure needs a GPU)."""
    import triton.runtime.errors

    import logitcache.stages.precompute.engines.base as base
    import logitcache.stages.precompute.fused_topk_triton as fused_topk_triton

    head, hidden = _peaked_head(500, hidden=16, rows=8)
    next_ids, spec = torch.arange(8), Targets("topk", 4)
    want = targets_from_hidden(hidden, head, next_ids, spec, fused_kernel="torch")

    def fails(*args, **kwargs):
        raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(base, "fused_kernel_choice", lambda kernel, device, k: "torch" if kernel == "torch" else "triton")
    monkeypatch.setattr(fused_topk_triton, "triton_topk_targets", fails)
    with pytest.warns(RuntimeWarning, match="OutOfResources.*torch tile fold"):
        got, kernel = base.targets_or_fallback(hidden, head, next_ids, spec, fused_kernel="auto")
    assert kernel == "torch"
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    with pytest.raises(triton.runtime.errors.OutOfResources):
        base.targets_or_fallback(hidden, head, next_ids, spec, fused_kernel="triton")
    monkeypatch.setattr(fused_topk_triton, "triton_topk_targets", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        base.targets_or_fallback(hidden, head, next_ids, spec, fused_kernel="auto")


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_engines_refuse_a_bad_fused_kernel_before_loading_anything(engine, tmp_path):
    """The option is checked before any model loads or engine starts (the model path is empty)."""
    with pytest.raises(ConfigError, match="fused_kernel='gpu'"):
        build_engine(engine, str(tmp_path), fused_kernel="gpu")
    with pytest.raises(ConfigError, match="CUDA"):
        build_engine(engine, str(tmp_path), device="cpu", fused_kernel="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernel_at_qwen_width_on_cuda():
    """On a GPU (not run where none is lent): the compiled kernel at V = 151,936, a Qwen2-1.5B
    head in bf16, 4096 rows, default blocks, K = 32 and a K that is not a power of two. bf16
    logits summed in another order round differently now and then: one bf16 step of tolerance."""
    head, hidden = _peaked_head(151_936, hidden=1536, rows=4096, seed=11, dtype=torch.bfloat16)
    head = LMHead(weight=head.weight.cuda(), bias=head.bias.cuda())
    hidden = hidden.cuda()
    next_ids = torch.randint(0, 151_936, (4096,), generator=torch.Generator().manual_seed(12)).cuda()
    for k in (32, 50):
        got = triton_topk_targets(hidden, head, next_ids, k)
        _check(got, head, hidden, next_ids.cpu(), k, atol=5e-2, tail_rtol=1e-2)
