"""Stage two's losses against plain full-vocabulary references (tests/support/loss_reference.py).

Run: .venv/bin/pytest tests/stages/train/test_losses.py
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from logitcache.stages.train import losses
from logitcache.stages.train.losses import LOSSES, get_loss
from logitcache.stages.train.losses.student_stats import student_stats
from logitcache.storage.errors import ConfigError, InvalidDataError, LogitCacheError

import loss_reference as ref  # tests/support/loss_reference.py (on the path: pyproject's pythonpath)

F64 = torch.float64
make_logits, top_k_cache = ref.make_logits, ref.top_k_cache


def flat_tail_teacher(n, v, k, *, seed):
    """Teacher logits whose ids outside their top-k all share one value (a truly flat tail)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.full((n, v), -1.0, dtype=F64)
    head = torch.rand(n, v, generator=g).argsort(-1)[:, :k]
    return t.scatter(1, head, torch.rand(n, k, generator=g, dtype=F64) * 4.0)


T = 2.0
# (case id, loss name, options, reference on full logits). Divergence cases run with both tails.
FULL_CASES = [
    *[(f"kl-{tail}", "kl", dict(temperature=T, tail=tail), lambda s, t: ref.kl(s, t, T))
      for tail in ("bucket", "renorm")],
    *[(f"rkl-{tail}", "rkl", dict(temperature=T, tail=tail), lambda s, t: ref.rkl(s, t, T))
      for tail in ("bucket", "renorm")],
    *[(f"jsd-{tail}", "jsd", dict(beta=0.3, temperature=T, tail=tail), lambda s, t: ref.jsd(s, t, 0.3, T))
      for tail in ("bucket", "renorm")],
    *[(f"skl-{tail}", "skl", dict(alpha=0.1, temperature=T, tail=tail), lambda s, t: ref.skl(s, t, 0.1, T))
      for tail in ("bucket", "renorm")],
    *[(f"srkl-{tail}", "srkl", dict(alpha=0.1, temperature=T, tail=tail), lambda s, t: ref.srkl(s, t, 0.1, T))
      for tail in ("bucket", "renorm")],
    ("topk_kl", "topk_kl", dict(temperature=T), lambda s, t: ref.kl(s, t, T)),
    ("dkd", "dkd", dict(alpha=1.0, beta=8.0, temperature=T), lambda s, t: ref.dkd(s, t, 1.0, 8.0, T)),
    ("nkd", "nkd", dict(gamma=1.5, temperature=T), lambda s, t: ref.nkd(s, t, 1.5, T)),
    ("normkd", "normkd", dict(t_norm=1.5), lambda s, t: ref.normkd(s, t, 1.5)),
    ("bild", "bild", dict(top_k=8, temperature=3.0), lambda s, t: ref.bild(s, t, 8, 3.0)),
    ("uld", "uld", {}, ref.uld),
]


def _loss_args(name, s, t, ids, lp, seed=0):
    """Extra keyword arguments that only some losses take, built from the full logits."""
    if name == "sft":
        return dict(labels=torch.randint(0, s.shape[1], (s.shape[0],), generator=torch.Generator().manual_seed(seed)))
    if name == "rskd":
        # Counts proportional to the teacher's probabilities: the exact proxy of a huge sample.
        return dict(counts=lp.exp())
    return {}


# ---------------------------------------------------------------- 1. full-vocabulary equivalence

@pytest.mark.parametrize("case", FULL_CASES, ids=[c[0] for c in FULL_CASES])
def test_full_vocabulary_cache_matches_reference_fp32(case):
    _, name, options, reference = case
    s, t = make_logits(6, 64, seed=1)
    ids, lp = top_k_cache(t, 64)
    metrics = {}
    got = get_loss(name)(s, ids, lp, metrics=metrics, **options)
    want = reference(s.double(), t.double())
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    if name == "bild":
        assert metrics["bild_coverage"].item() == 1.0


@pytest.mark.parametrize("case", FULL_CASES, ids=[c[0] for c in FULL_CASES])
def test_full_vocabulary_cache_matches_reference_gradient_fp64(case):
    _, name, options, reference = case
    s, t = make_logits(5, 40, seed=2, dtype=F64)
    ids, lp = top_k_cache(t, 40)
    ref.assert_same_value_and_gradient(lambda x: get_loss(name)(x, ids, lp, chunk_size=2, **options),
                                       lambda y: reference(y, t), s)


def test_sft_matches_cross_entropy():
    s, t = make_logits(7, 50, seed=3)
    labels = torch.randint(0, 50, (7,))
    metrics = {}
    ref.assert_same_value_and_gradient(lambda x: losses.sft(x, labels=labels, chunk_size=3, metrics=metrics),
                                       lambda y: F.cross_entropy(y, labels), s, atol=None)
    assert metrics["accuracy"].item() == (s.argmax(-1) == labels).float().mean().item()


def test_rskd_with_exact_proportions_is_cross_entropy_to_teacher():
    s, t = make_logits(6, 64, seed=4, dtype=F64)
    ids, lp = top_k_cache(t, 64)
    got = losses.rskd(s, ids, lp, counts=lp.exp(), temperature=1.5)
    torch.testing.assert_close(got, ref.teacher_cross_entropy(s, t, 1.5), atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------- partial caches: the tail choices

@pytest.mark.parametrize("bucket", [True, False], ids=["bucket", "renorm"])
@pytest.mark.parametrize("reverse", [False, True], ids=["kl", "rkl"])
def test_partial_cache_matches_grouped_reference(bucket, reverse):
    """K < V at T = 1: the K cached ids (+ one bucket for the rest) are exactly the grouped full KL."""
    s, t = make_logits(6, 80, seed=5, dtype=F64)
    ids, lp = top_k_cache(t, 10)
    fn = losses.rkl if reverse else losses.kl
    got = fn(s, ids, lp, tail="bucket" if bucket else "renorm")
    torch.testing.assert_close(got, ref.grouped_kl(s, t, ids, reverse=reverse, bucket=bucket), atol=1e-10, rtol=1e-10)


def test_stored_tail_mass_is_used():
    s, t = make_logits(4, 30, seed=6, dtype=F64)
    ids, lp = top_k_cache(t, 5)
    derived = 1 - lp.exp().sum(-1)
    torch.testing.assert_close(losses.kl(s, ids, lp, tail_mass=derived), losses.kl(s, ids, lp))
    assert not torch.isclose(losses.kl(s, ids, lp, tail_mass=derived * 0.5), losses.kl(s, ids, lp))


def teacher_as_cached(t, ids):
    """The teacher logits the cached losses see: every id outside the cache at the smallest cached logit.

    That is BiLD's estimate of an uncovered id (an upper bound on its true value).
    """
    valid = ids >= 0
    safe = torch.where(valid, ids, ids[:, :1])
    smallest = torch.where(valid, t.gather(1, safe), math.inf).amin(-1, keepdim=True)
    covered = torch.zeros_like(t, dtype=torch.bool).scatter(1, safe, valid)
    return torch.where(covered, t, smallest)


@pytest.mark.parametrize("reverse", [False, True], ids=["kl", "rkl"])
def test_bucket_at_temperature_is_exact_when_the_teacher_tail_has_the_student_shape(reverse):
    """At T != 1 the teacher's bucket takes the student's tail shape; exact when that is the truth."""
    s, t = make_logits(5, 60, seed=7, dtype=F64)
    ids, _ = top_k_cache(t, 8)
    # The teacher: its own head, and the student's tail shifted by a row constant.
    t = torch.where(torch.zeros_like(t, dtype=torch.bool).scatter(1, ids, True), t, s - 1.3)
    ids, lp = top_k_cache(t, 8)
    fn = losses.rkl if reverse else losses.kl
    got = fn(s, ids, lp, temperature=2.5, tail="bucket")
    torch.testing.assert_close(got, ref.grouped_kl(s, t, ids, 2.5, reverse=reverse), atol=1e-10, rtol=1e-10)


def test_bild_estimate_is_the_smallest_cached_logprob():
    """Student top-k ids outside the cache get the row's smallest cached log-prob: exact when they tie with it."""
    t = flat_tail_teacher(6, 50, 4, seed=8)  # 4 head ids over a flat tail; the cache's last 4 are tail ids
    s, _ = make_logits(6, 50, seed=8, dtype=F64)
    ids, lp = top_k_cache(t, 8)
    metrics = {}
    got = losses.bild(s, ids, lp, top_k=4, metrics=metrics, tail_mass=torch.full((6,), 0.999, dtype=F64))
    torch.testing.assert_close(got, ref.bild(s, t, 4, 3.0), atol=1e-10, rtol=1e-10)
    coverage = (s.topk(4, -1).indices[:, :, None] == ids[:, None, :]).any(-1).double().mean()
    assert metrics["bild_coverage"].item() == pytest.approx(coverage.item())
    assert coverage < 1.0  # the estimate was needed


def _bild_padded_cache(heads, v, width, *, seed):
    """Rows whose cache holds only the teacher's `h` head ids, -1 padding to `width` after them.

    Each row's teacher is flat outside its h head ids; what the trainer makes when it folds
    padded-vocabulary ids into the tail looks the same.
    Returns (student, teacher, ids, logprobs, tail_mass), with 123.0 in the padded log-prob slots.
    """
    teachers = torch.cat([flat_tail_teacher(1, v, h, seed=seed + i) for i, h in enumerate(heads)])
    s, _ = make_logits(len(heads), v, seed=seed, dtype=F64)
    ids = torch.full((len(heads), width), -1)
    lp = torch.full((len(heads), width), 123.0, dtype=F64)
    for row, h in enumerate(heads):
        ids[row, :h], lp[row, :h] = [x[0, :h] for x in top_k_cache(teachers[row:row + 1], h)]
    tail = 1 - torch.where(ids >= 0, lp.exp(), 0.0).sum(-1)
    return s, teachers, ids, lp, tail


def test_bild_with_padding_among_the_first_k_ids_uses_the_valid_ones():
    """A row with fewer than k valid cached ids: the teacher-led half compares the pairs of its valid
    ids only (none for a row with one), and the padding's placeholder values change nothing."""
    heads, k, temperature = [1, 2, 3, 5, 8], 4, 3.0
    s, t, ids, lp, tail = _bild_padded_cache(heads, 40, 8, seed=30)
    metrics = {}
    got = losses.bild(s, ids, lp, top_k=k, temperature=temperature, tail_mass=tail, metrics=metrics)
    want = []
    for row, h in enumerate(heads):
        s_row, t_row = s[row:row + 1], t[row:row + 1]
        teacher_led = ref._bild_half(s_row, t_row, min(h, k), temperature, False) if h >= 2 else 0.0
        t_seen = teacher_as_cached(t_row, ids[row:row + 1])
        want.append(teacher_led + ref._bild_half(s_row, t_seen, k, temperature, True))
    torch.testing.assert_close(got, torch.stack([torch.as_tensor(w, dtype=F64) for w in want]).mean(),
                               atol=1e-10, rtol=1e-10)
    other_placeholder = torch.where(ids >= 0, lp, -7.0)
    torch.testing.assert_close(losses.bild(s, ids, other_placeholder, top_k=k, temperature=temperature,
                                           tail_mass=tail), got, atol=1e-12, rtol=1e-12)
    assert 0.0 <= metrics["bild_coverage"].item() < 1.0


def test_bild_with_padding_gradcheck():
    s, _, ids, lp, tail = _bild_padded_cache([1, 2, 4], 9, 5, seed=31)
    assert torch.autograd.gradcheck(
        lambda x: losses.bild(x, ids, lp, top_k=3, tail_mass=tail, chunk_size=2), (s.requires_grad_(),))


def test_uld_compares_the_tail_as_one_mass():
    """Past rank K the teacher's tail mass meets the student's mass outside its top K: a lower bound
    of ULD on the full logits, within the tail mass of it."""
    s, t = make_logits(5, 70, seed=10, dtype=F64)
    ids, lp = top_k_cache(t, 12)
    tail = 1 - lp.exp().sum(-1)
    got = losses.uld(s, ids, lp)
    p_s = s.softmax(-1).sort(-1, descending=True).values
    want = ((lp.exp() - p_s[:, :12]).abs().sum(-1) + (tail - p_s[:, 12:].sum(-1)).abs()).mean()
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    full = ref.uld(s, t)
    assert got <= full + 1e-12 and full - got <= tail.mean() * 2


def test_uld_across_tokenizers():
    """Teacher and student vocabularies differ; teacher ids are never looked up in the student's.

    With K >= the student's V, the ranks past V hold only teacher mass and the loss is exact."""
    s, _ = make_logits(4, 30, seed=11, dtype=F64)
    _, t = make_logits(4, 90, seed=11, dtype=F64)
    for k in (10, 60):  # fewer, and more, cached entries than the student has logits
        ids, lp = top_k_cache(t, k)
        got, full = losses.uld(s, ids, lp), ref.uld_sorted(t.softmax(-1), s.softmax(-1))
        if k == 60:
            torch.testing.assert_close(got, full)
        else:
            assert got <= full + 1e-12


def test_sample_mode_padding_is_ignored():
    """-1 padding after the sampled ids changes nothing, whatever values sit in the padded slots."""
    s, t = make_logits(4, 40, seed=12, dtype=F64)
    ids, lp = top_k_cache(t, 6)
    counts = torch.randint(1, 9, (4, 6))
    pad_ids = torch.cat([ids, torch.full((4, 3), -1)], 1)
    pad_lp = torch.cat([lp, torch.full((4, 3), 123.0, dtype=F64)], 1)
    pad_counts = torch.cat([counts, torch.zeros(4, 3, dtype=counts.dtype)], 1)
    tail = 1 - lp.exp().sum(-1)
    for name in ("kl", "rkl", "jsd", "skl", "srkl", "topk_kl", "dkd", "nkd", "normkd", "uld"):
        fn = get_loss(name)
        torch.testing.assert_close(fn(s, pad_ids, pad_lp, tail_mass=tail), fn(s, ids, lp, tail_mass=tail), msg=name)
    torch.testing.assert_close(losses.rskd(s, pad_ids, pad_lp, counts=pad_counts),
                               losses.rskd(s, ids, lp, counts=counts))


# ---------------------------------------------------------------- 2. gradients

GRAD_CASES = [
    ("sft", {}), ("kl", dict(tail="bucket", temperature=1.7)), ("kl", dict(tail="renorm")),
    ("rkl", dict(tail="bucket", temperature=0.7)), ("rkl", dict(tail="renorm")),
    ("jsd", dict(tail="bucket")), ("jsd", dict(tail="renorm", beta=0.2)),
    ("skl", dict(tail="bucket")), ("srkl", dict(tail="bucket", temperature=1.5)), ("topk_kl", {}),
    ("dkd", dict(temperature=2.0)), ("nkd", dict(temperature=2.0)), ("normkd", {}),
    ("bild", dict(top_k=3)), ("uld", {}), ("rskd", dict(temperature=1.3)),
]


@pytest.mark.parametrize("name,options", GRAD_CASES,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in GRAD_CASES])
@pytest.mark.parametrize("k", [5, 9], ids=["partial", "full"])
def test_gradcheck(name, options, k):
    s, t = make_logits(3, 9, seed=13, dtype=F64)
    ids, lp = top_k_cache(t, k)
    extra = _loss_args(name, s, t, ids, lp)
    if name == "rskd":
        extra = dict(counts=torch.randint(1, 7, ids.shape))
    fn = get_loss(name)
    assert torch.autograd.gradcheck(lambda x: fn(x, ids, lp, chunk_size=2, **options, **extra),
                                    (s.requires_grad_(),))


@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("with_labels", [False, True], ids=["", "ce"])
@pytest.mark.parametrize("normalizers", [True, False])
@pytest.mark.parametrize("k", [3, 7], ids=["partial", "full"])
def test_student_stats_gradcheck(normalizers, k, with_labels, temperature):
    """The hand-written backward, for every output at once, with padding, a temperature and labels.

    The cross entropy shares the normalizer's pass at T = 1 and takes its own at T != 1, or
    without the normalizers: every branch of the backward is covered.
    """
    g = torch.Generator().manual_seed(14)
    s = torch.randn(4, 7, generator=g, dtype=F64, requires_grad=True)
    ids = torch.rand(4, 7, generator=g).argsort(-1)[:, :k]
    ids[0, -1] = -1  # one padded slot
    labels = torch.tensor([0, 6, 3, 3]) if with_labels else None
    weights = [torch.randn(4, k, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64),
               torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)]
    valid = ids >= 0

    def objective(x):
        st = student_stats(x, ids, temperature, normalizers=normalizers, labels=labels)
        out = (torch.where(valid, st.x_k, 0.0) * weights[0]).sum()
        if normalizers:
            out = out + (st.lse * weights[1]).sum()
            if k < 7:  # with the full vocabulary cached, the tail is -inf and not an input to anything
                out = out + (st.tail_lse * weights[2]).sum()
        if with_labels:
            out = out + (st.ce * weights[3]).sum()
        return out

    assert torch.autograd.gradcheck(objective, (s,))
    st = student_stats(s, ids, temperature, normalizers=normalizers, labels=labels)
    if normalizers:
        torch.testing.assert_close(st.lse, torch.logsumexp(s / temperature, -1))
        if k == 7:
            assert torch.isneginf(st.tail_lse[1:]).all()
    if with_labels:
        torch.testing.assert_close(st.ce, F.cross_entropy(s, labels, reduction="none"))
    if normalizers or with_labels:
        assert torch.equal(st.row_max, s.detach().amax(-1)) and not st.row_max.requires_grad
    else:
        assert st.row_max is None and st.ce is None


def test_bf16_logits_give_fp32_loss_and_bf16_gradient():
    s, t = make_logits(6, 64, seed=15)
    ids, lp = top_k_cache(t, 16)
    for name in ("kl", "bild", "uld", "dkd"):
        s16 = s.bfloat16().requires_grad_()
        loss = get_loss(name)(s16, ids, lp)
        loss.backward()
        assert loss.dtype == torch.float32 and s16.grad.dtype == torch.bfloat16
        want = get_loss(name)(s16.detach().float(), ids, lp)
        torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)


def test_gradient_is_scaled_by_the_outer_weight():
    s, t = make_logits(5, 30, seed=16)
    ids, lp = top_k_cache(t, 6)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    losses.kl(a, ids, lp).backward()
    (0.25 * losses.kl(b, ids, lp)).backward()
    torch.testing.assert_close(b.grad, 0.25 * a.grad)


# ---------------------------------------------------------------- 3. properties

DIVERGENCES = ["kl", "rkl", "jsd", "skl", "srkl", "topk_kl"]


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_divergences_are_nonnegative_and_zero_at_the_teacher(name, tail):
    options = {} if name == "topk_kl" else dict(tail=tail)
    s, t = make_logits(8, 50, seed=17)
    fn = get_loss(name)
    for k in (7, 50):
        ids, lp = top_k_cache(t, k)
        assert fn(s, ids, lp, temperature=1.5, **options) > 0
        # The student equals the teacher up to a per-row constant; with K < V at T = 1 the bucket
        # holds the same mass on both sides too.
        same = t + torch.randn(8, 1)
        assert fn(same, ids, lp, **options).abs() < 1e-6
        if k == 50:
            assert fn(same, ids, lp, temperature=3.0, **options).abs() < 1e-6


def test_bild_is_zero_for_a_shifted_teacher_and_shift_invariant():
    s, t = make_logits(8, 100, seed=18)
    ids, lp = top_k_cache(t, 16)
    metrics = {}
    same = t + torch.randn(8, 1) * 5
    assert losses.bild(same, ids, lp, metrics=metrics).abs() < 1e-6
    assert metrics["bild_coverage"].item() == 1.0
    assert metrics["top1_agreement"].item() == 1.0
    shifted = s + torch.randn(8, 1) * 5
    torch.testing.assert_close(losses.bild(shifted, ids, lp), losses.bild(s, ids, lp), atol=1e-6, rtol=1e-5)
    assert losses.bild(s, ids, lp) > 0


def test_rskd_with_counts_from_a_huge_sample_approaches_teacher_cross_entropy():
    s, t = make_logits(6, 64, seed=19, dtype=F64)
    ids, lp = top_k_cache(t, 64)
    counts = torch.round(lp.exp() * 1e9).long()  # N * p for N = 1e9 draws
    want = ref.teacher_cross_entropy(s, t)
    assert losses.rskd(s, ids, lp, counts=counts).item() == pytest.approx(want.item(), abs=1e-6)


def test_rskd_is_unbiased_over_real_samples():
    """Averaged over sample-mode caches (unique sampled ids, -1 padding, counts), the loss is the CE."""
    rows, draws, repeats = 4, 12, 500
    s, t = make_logits(rows, 30, seed=20, dtype=F64)
    g = torch.Generator().manual_seed(20)
    # Every repeat is one more batch of rows with the same student and teacher.
    s, t = s.repeat(repeats, 1), t.repeat(repeats, 1)
    sampled = torch.multinomial(t.softmax(-1), draws, replacement=True, generator=g)
    ids = torch.full(sampled.shape, -1)
    counts = torch.zeros(sampled.shape, dtype=torch.long)
    for row in range(sampled.shape[0]):
        unique, count = sampled[row].unique(return_counts=True)
        ids[row, :len(unique)], counts[row, :len(unique)] = unique, count
    lp = torch.where(ids >= 0, t.log_softmax(-1).gather(1, ids.clamp_min(0)), 0.0)
    got = losses.rskd(s, ids, lp, counts=counts)
    # Standard error of the mean here is about 0.02.
    assert got.item() == pytest.approx(ref.teacher_cross_entropy(s, t).item(), abs=0.06)


def test_top1_agreement_metric():
    s, t = make_logits(10, 40, seed=21)
    ids, lp = top_k_cache(t, 5)
    metrics = {}
    losses.kl(s, ids, lp, metrics=metrics)
    want = (s.argmax(-1) == ids[:, 0]).float().mean()
    assert metrics["top1_agreement"].item() == pytest.approx(want.item())
    assert not metrics["top1_agreement"].requires_grad


# ---------------------------------------------------------------- 4. chunking and memory

@pytest.mark.parametrize("name", sorted(LOSSES))
def test_chunk_size_does_not_change_value_or_gradient(name):
    s, t = make_logits(10, 48, seed=22)
    ids, lp = top_k_cache(t, 12)
    extra = _loss_args(name, s, t, ids, lp, seed=22)
    fn = get_loss(name)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    small = fn(a, ids, lp, chunk_size=3, **extra)
    large = fn(b, ids, lp, chunk_size=10_000, **extra)
    small.backward()
    large.backward()
    torch.testing.assert_close(small, large)
    torch.testing.assert_close(a.grad, b.grad)
    with torch.no_grad():
        torch.testing.assert_close(fn(s, ids, lp, chunk_size=4, **extra), large.detach())


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, re
    import torch
    import torch.nn.functional as F
    from logitcache.stages.train.losses import bild, kd_with_ce, kl, sft

    def peak():
        return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

    n, v, k = 512, 50_000, 64
    g = torch.Generator().manual_seed(0)
    ids = (torch.randperm(v, generator=g)[:k][None, :] + 131 * torch.arange(n)[:, None]) % v  # unique per row
    lp = ((torch.randn(n, k, generator=g) * 2).log_softmax(-1) - 1.0).sort(-1, descending=True).values
    labels = torch.randint(0, v, (n,), generator=g)
    runs = {"ce": lambda x, rows: F.cross_entropy(x, labels[:rows]),
            "kl": lambda x, rows: kl(x, ids[:rows], lp[:rows], temperature=2.0, chunk_size=64),
            "bild": lambda x, rows: bild(x, ids[:rows], lp[:rows], chunk_size=64),
            "sft": lambda x, rows: sft(x, labels=labels[:rows], chunk_size=64),
            "sft+kl": lambda x, rows: (sft(x, labels=labels[:rows], chunk_size=64)
                                       + kl(x, ids[:rows], lp[:rows], temperature=2.0, chunk_size=64)),
            "kl+ce": lambda x, rows: kd_with_ce("kl", x, ids[:rows], lp[:rows], labels[:rows], temperature=2.0,
                                                chunk_size=64)[0],
            "bild+ce": lambda x, rows: kd_with_ce("bild", x, ids[:rows], lp[:rows], labels[:rows], chunk_size=64)[0]}
    out = {}
    for dtype in ("float32", "bfloat16"):
        for method, run in runs.items():
            s = torch.randn(n, v, generator=g).to(getattr(torch, dtype)).requires_grad_()
            run(s[:8].detach().requires_grad_(), 8).backward()  # load kernels outside the measurement
            open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
            before = peak()
            run(s, n).backward()
            out[f"{method}-{dtype}"] = (peak() - before) / (n * v * s.element_size())
            del s
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def peak_memory():
    """Peak RSS growth of forward + backward, in units of one (N, V) tensor of the logits' dtype.

    Measured in a fresh process whose glibc mmaps every allocation of 64 KiB or more (a fixed
    MALLOC_MMAP_THRESHOLD_ turns off glibc's adaptive threshold), so freed tensors leave RSS at
    once and RSS follows torch's CPU allocations; the kernel's high-water mark, reset through
    /proc/self/clear_refs before each run, catches the peak. Results agree to 0.01 across runs
    and orders.
    """
    if sys.platform != "linux" or not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's resettable peak RSS")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a subprocess measures peak memory: ~25 s of CPU on 2 cores
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_memory_stays_well_below_cross_entropy(peak_memory, dtype):
    """kl (bucket, T = 2) and bild forward + backward on 512 x 50k logits, in chunks of 64 rows.

    Plain cross-entropy keeps its log-softmax output and then builds two gradients: 3.0 units. The
    chunked losses keep one gradient buffer plus one chunk's fp32 temporaries: measured 1.12
    (fp32) and 1.37 (bf16). The bound, 0.6 x cross-entropy, fails on any extra (N, V) tensor, an
    fp32 copy of bf16 logits included.
    """
    ce = peak_memory[f"ce-{dtype}"]
    assert 2.5 < ce < 3.5  # the yardstick is what we think it is
    for method in ("kl", "bild"):
        assert peak_memory[f"{method}-{dtype}"] < 0.6 * ce, (method, peak_memory)


@pytest.mark.slow  # the same subprocess as above
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_memory_of_kd_with_ce_stays_at_cross_entropy_alone(peak_memory, dtype):
    """CE fused into kl (T = 2: the CE takes its own exp pass) and into bild, in chunks of 64 rows.

    sft then kl, summed by autograd, hold two (N, V) gradients: measured 2.12 (fp32) / 2.37 (bf16)
    units. Fused, the peak is the chunked CE's own (1.12 / 1.37): bild+ce equal to it, kl+ce at
    T != 1 up to two 64-row fp32 temporaries above it (measured 1.37 / 1.75; 0.125 / 0.25 units
    each): the CE's own pass, and the tail bucket's student-shaped teacher tail at T != 1
    (`tails.kd_classes`), which reads the student's tail at T = 1.
    """
    sft, separate = peak_memory[f"sft-{dtype}"], peak_memory[f"sft+kl-{dtype}"]
    assert separate > sft + 0.8  # the yardstick: a second gradient
    for method in ("kl+ce", "bild+ce"):
        assert peak_memory[f"{method}-{dtype}"] < sft + 0.45, (method, peak_memory)
        assert peak_memory[f"{method}-{dtype}"] < 0.6 * peak_memory[f"ce-{dtype}"], (method, peak_memory)


# ---------------------------------------------------------------- 5. cross entropy fused into the KD pass

# Every KD loss; T = 1 (the CE shares the KD normalizer), T != 1 and the gather-only losses (the CE
# takes its own pass).
FUSED_CASES = [(name, options) for name, options in GRAD_CASES if name != "sft"] + [
    ("kl", dict(tail="bucket")), ("uld", {}), ("rskd", {}), ("bild", dict(top_k=4, temperature=2.0))]


def _separate(name, s, ids, lp, labels, kd_select, *, ce_weight, kd_weight, **kw):
    """ce_weight * sft + kd_weight * the KD loss on the selected rows, and both losses' metrics."""
    metrics = {}
    ce = losses.sft(s, labels=labels, metrics=metrics)
    s_kd = s if kd_select is None else s.index_select(0, kd_select)
    kd = get_loss(name)(s_kd, ids, lp, metrics=metrics, **kw)
    return ce_weight * ce + kd_weight * kd, {"ce": ce.detach(), "kd": kd.detach()}, metrics


@pytest.mark.parametrize("name,options", FUSED_CASES,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in FUSED_CASES])
@pytest.mark.parametrize("chunk_size", [None, 3], ids=["unchunked", "chunked"])
@pytest.mark.parametrize("select", ["all", "subset"])
def test_kd_with_ce_equals_separate_ce_plus_kd(name, options, chunk_size, select):
    """Total, gradient, parts and metrics of the fused pass equal sft + the KD loss (float64).

    "subset": only some rows have teacher targets, in an order of their own (`kd_select`); the
    cross entropy is still over every row.
    """
    s, t = make_logits(10, 24, seed=40, dtype=F64)
    ids, lp = top_k_cache(t, 6)
    tail = 1 - lp.exp().sum(-1)
    labels = torch.randint(0, 24, (10,), generator=torch.Generator().manual_seed(40))
    kd_select = None if select == "all" else torch.tensor([7, 0, 2, 3, 9])
    if kd_select is not None:
        ids, lp, tail = ids[kd_select], lp[kd_select], tail[kd_select]
    kw = dict(tail_mass=tail, **options)
    if name == "rskd":
        kw["counts"] = torch.randint(1, 7, ids.shape, generator=torch.Generator().manual_seed(41))
    fused_s, separate_s = s.clone().requires_grad_(), s.clone().requires_grad_()
    metrics = {}
    total, parts = losses.kd_with_ce(name, fused_s, ids, lp, labels, ce_weight=0.7, kd_weight=1.3,
                                     kd_select=kd_select, chunk_size=chunk_size, metrics=metrics, **kw)
    want, want_parts, want_metrics = _separate(name, separate_s, ids, lp, labels, kd_select, ce_weight=0.7,
                                               kd_weight=1.3, **kw)
    total.backward()
    want.backward()
    torch.testing.assert_close(total, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fused_s.grad, separate_s.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(parts, want_parts, atol=1e-10, rtol=1e-10)
    assert not any(p.requires_grad for p in parts.values())
    assert set(metrics) == set(want_metrics) and "accuracy" in metrics
    torch.testing.assert_close(metrics, want_metrics)


@pytest.mark.parametrize("name,options", [("kl", dict(temperature=2.0)), ("kl", {}), ("dkd", {}),
                                          ("bild", dict(top_k=3))], ids=["kl-T2", "kl", "dkd", "bild"])
def test_kd_with_ce_gradcheck(name, options):
    s, t = make_logits(5, 9, seed=42, dtype=F64)
    ids, lp = top_k_cache(t, 5)
    labels = torch.tensor([0, 8, 3, 3, 5])
    kd_select = torch.tensor([4, 1, 2])
    fn = lambda x: losses.kd_with_ce(name, x, ids[kd_select], lp[kd_select], labels, ce_weight=0.6,  # noqa: E731
                                     kd_weight=1.4, kd_select=kd_select, chunk_size=2, **options)[0]
    assert torch.autograd.gradcheck(fn, (s.requires_grad_(),))


def test_kd_with_ce_without_one_of_the_terms():
    """ce_weight 0: KD alone, zero gradient on rows without a teacher. No teacher rows: CE alone."""
    s, t = make_logits(6, 20, seed=43, dtype=F64)
    ids, lp = top_k_cache(t, 5)
    labels = torch.randint(0, 20, (6,), generator=torch.Generator().manual_seed(43))
    kd_select = torch.tensor([1, 4])
    x, y = s.clone().requires_grad_(), s.clone().requires_grad_()
    total, parts = losses.kd_with_ce("kl", x, ids[kd_select], lp[kd_select], labels, ce_weight=0.0,
                                     kd_select=kd_select, chunk_size=4)
    want = losses.kl(y[kd_select], ids[kd_select], lp[kd_select])
    total.backward()
    want.backward()
    assert set(parts) == {"kd"}
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(x.grad, y.grad)
    assert (x.grad[[0, 2, 3, 5]] == 0).all()

    x, y = s.clone().requires_grad_(), s.clone().requires_grad_()
    none = torch.zeros(0, dtype=torch.long)
    total, parts = losses.kd_with_ce("bild", x, ids[none], lp[none], labels, ce_weight=0.5, kd_select=none, top_k=2)
    want = 0.5 * losses.sft(y, labels=labels)
    total.backward()
    want.backward()
    assert set(parts) == {"ce"}
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(x.grad, y.grad)


def test_kd_with_ce_bf16_logits_give_fp32_loss_and_bf16_gradient():
    s, t = make_logits(6, 64, seed=44)
    ids, lp = top_k_cache(t, 16)
    labels = torch.randint(0, 64, (6,), generator=torch.Generator().manual_seed(44))
    for name, options in (("kl", {}), ("kl", dict(temperature=2.0)), ("bild", {})):
        s16 = s.bfloat16().requires_grad_()
        total, _ = losses.kd_with_ce(name, s16, ids, lp, labels, **options)
        total.backward()
        assert total.dtype == torch.float32 and s16.grad.dtype == torch.bfloat16
        s32 = s16.detach().float().requires_grad_()
        want, _, _ = _separate(name, s32, ids, lp, labels, None, ce_weight=1.0, kd_weight=1.0, **options)
        want.backward()
        torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s16.grad, s32.grad.bfloat16())


def test_kd_with_ce_bad_input():
    s, t = make_logits(4, 20, seed=45)
    ids, lp = top_k_cache(t, 5)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ConfigError, match="sft"):
        losses.kd_with_ce("sft", s, ids, lp, labels)
    with pytest.raises(ConfigError, match=r"no option 'top_k'.*tail, temperature"):
        losses.kd_with_ce("kl", s, ids, lp, labels, top_k=3)
    with pytest.raises(ConfigError, match="kd_weight"):
        losses.kd_with_ce("kl", s, ids, lp, labels, kd_weight=0.0)
    with pytest.raises(ConfigError, match="ce_weight"):
        losses.kd_with_ce("kl", s, ids, lp, labels, ce_weight=-1.0)
    with pytest.raises(ConfigError, match="counts"):
        losses.kd_with_ce("rskd", s, ids, lp, labels)
    with pytest.raises(InvalidDataError, match="labels"):
        losses.kd_with_ce("kl", s, ids, lp, labels[:3])
    with pytest.raises(InvalidDataError, match="kd_select"):
        losses.kd_with_ce("kl", s, ids, lp, labels, kd_select=torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(InvalidDataError, match="teacher_ids: expected \\(2, K\\) to match kd_select's 2 rows"):
        losses.kd_with_ce("kl", s, ids, lp, labels, kd_select=torch.tensor([0, 3]))


# ---------------------------------------------------------------- 6. bad input

def test_unknown_loss_name():
    with pytest.raises(ConfigError, match=r"unknown loss 'klx'.*bild.*kl.*uld"):
        get_loss("klx")
    assert issubclass(ConfigError, LogitCacheError)


def test_bild_needs_top_k_cached_ids():
    s, t = make_logits(3, 20, seed=23)
    ids, lp = top_k_cache(t, 4)
    with pytest.raises(ConfigError, match=r"K = 4 ids per position, fewer than top_k = 8"):
        losses.bild(s, ids, lp)
    with pytest.raises(ConfigError, match="top_k"):
        losses.bild(s, ids, lp, top_k=1)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_mismatched_shapes(name):
    s, t = make_logits(4, 20, seed=24)
    ids, lp = top_k_cache(t, 5)
    extra = _loss_args(name, s, t, ids, lp)
    fn = get_loss(name)
    with pytest.raises(InvalidDataError, match="student_logits"):
        fn(s[0], ids, lp, **extra)
    if name == "sft":
        with pytest.raises(InvalidDataError, match="labels"):
            fn(s, labels=extra["labels"][:3])
        return
    with pytest.raises(InvalidDataError, match="teacher_ids"):
        fn(s, ids[:3], lp, **extra)
    with pytest.raises(InvalidDataError, match="teacher_logprobs"):
        fn(s, ids, lp[:, :4], **extra)
    with pytest.raises(InvalidDataError, match="teacher_ids"):
        fn(s, ids.float(), lp, **extra)
    with pytest.raises(InvalidDataError, match="tail_mass"):
        fn(s, ids, lp, tail_mass=torch.zeros(3), **extra)
    if name == "rskd":
        with pytest.raises(InvalidDataError, match="counts"):
            fn(s, ids, lp, counts=extra["counts"][:, :2])


def test_bad_options():
    s, t = make_logits(3, 20, seed=25)
    ids, lp = top_k_cache(t, 5)
    with pytest.raises(ConfigError, match="tail='full'"):
        losses.kl(s, ids, lp, tail="full")
    with pytest.raises(ConfigError, match="temperature=0"):
        losses.rkl(s, ids, lp, temperature=0)
    with pytest.raises(ConfigError, match="beta=1.0"):
        losses.jsd(s, ids, lp, beta=1.0)
    with pytest.raises(ConfigError, match="alpha=1"):
        losses.skl(s, ids, lp, alpha=1)
    with pytest.raises(ConfigError, match="chunk_size=0"):
        losses.kl(s, ids, lp, chunk_size=0)
    with pytest.raises(ConfigError, match="counts"):
        losses.rskd(s, ids, lp, counts=None)
    with pytest.raises(ConfigError, match="K >= 2"):
        losses.dkd(s, ids[:, :1], lp[:, :1])
    with pytest.raises(InvalidDataError, match="exceed the student vocabulary"):
        losses.kl(s[:, :4], ids, lp)
