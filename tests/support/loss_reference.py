"""Plain full-vocabulary references for the cached losses, written from the papers' formulas.

Each takes full student logits `s` and full teacher logits `t`, both (N, V), and returns the mean
over positions. Nothing here is chunked, masked or clever; DKD, NKD, NormKD and BiLD follow the
authors' published code. Not a test module (pytest only collects test_*.py).

At the end: the inputs the loss tests share (random logits, a top-k cache) and their one
value-and-gradient comparison against a reference.
"""

import torch
import torch.nn.functional as F


def _kl(log_p, log_q):
    """KL(p || q) per row, from log-probs."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def sft(s, labels):
    return F.cross_entropy(s, labels)


def kl(s, t, temperature=1.0):
    return _kl(F.log_softmax(t / temperature, -1), F.log_softmax(s / temperature, -1)).mean()


def rkl(s, t, temperature=1.0):
    return _kl(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)).mean()


def jsd(s, t, beta=0.5, temperature=1.0):
    """GKD: beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q; P teacher."""
    p, q = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)
    m = beta * p + (1 - beta) * q
    return (beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)).mean()


def skl(s, t, alpha=0.1, temperature=1.0):
    """DistiLLM skew KL: KL(P || alpha P + (1 - alpha) Q)."""
    p, q = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)
    return (p * (p.log() - (alpha * p + (1 - alpha) * q).log())).sum(-1).mean()


def srkl(s, t, alpha=0.1, temperature=1.0):
    """DistiLLM skew reverse KL: KL(Q || (1 - alpha) P + alpha Q)."""
    p, q = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)
    return (q * (q.log() - ((1 - alpha) * p + alpha * q).log())).sum(-1).mean()


def dkd(s, t, alpha=1.0, beta=8.0, temperature=1.0):
    """Zhao et al. 2022, as in mdistiller's dkd_loss, with the teacher's argmax as the target."""
    target = t.argmax(-1, keepdim=True)
    gt_mask = torch.zeros_like(s).scatter_(1, target, 1).bool()
    other_mask = ~gt_mask
    pred_s = F.softmax(s / temperature, dim=1)
    pred_t = F.softmax(t / temperature, dim=1)
    bin_s = torch.cat([(pred_s * gt_mask).sum(1, keepdim=True), (pred_s * other_mask).sum(1, keepdim=True)], 1)
    bin_t = torch.cat([(pred_t * gt_mask).sum(1, keepdim=True), (pred_t * other_mask).sum(1, keepdim=True)], 1)
    tckd = F.kl_div(bin_s.log(), bin_t, reduction="none").sum(1).mean() * temperature**2
    part2_t = F.softmax(t / temperature - 1000.0 * gt_mask, dim=1)
    log_part2_s = F.log_softmax(s / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_part2_s, part2_t, reduction="none").sum(1).mean() * temperature**2
    return alpha * tckd + beta * nckd


def nkd(s, t, gamma=1.5, temperature=1.0):
    """Yang et al. 2023, as in the authors' NKDLoss, with the teacher's argmax as the target."""
    label = t.argmax(-1, keepdim=True)
    n, c = s.shape
    s_i = F.log_softmax(s, dim=1)
    t_i = F.softmax(t, dim=1)
    s_t = torch.gather(s_i, 1, label)
    t_t = torch.gather(t_i, 1, label)
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(s).scatter_(1, label, 0).bool()
    s_other = s[mask].reshape(n, -1)
    t_other = t[mask].reshape(n, -1)
    S_i = F.log_softmax(s_other / temperature, dim=1)
    T_i = F.softmax(t_other / temperature, dim=1)
    loss_non = (T_i * S_i).sum(dim=1).mean()
    return loss_t - gamma * temperature**2 * loss_non


def normkd(s, t, t_norm=1.5):
    """Chi et al. 2023, as in the NormKD code: per-sample T = t_norm * std(logits), times T_t^2."""
    t_t = t.std(-1, keepdim=True) * t_norm
    t_s = s.std(-1, keepdim=True) * t_norm
    loss = _kl(F.log_softmax(t / t_t, -1), F.log_softmax(s / t_s, -1))
    return (loss * t_t[:, 0] ** 2).mean()


def _bild_half(s, t, k, temperature, student_led):
    """One half of BiLD, as in the authors' bild_loss."""
    if student_led:
        sel_s, pos = torch.topk(s, k=k, dim=-1)
        sel_t = torch.gather(t, 1, pos)
    else:
        sel_t, pos = torch.topk(t, k=k, dim=-1)
        sel_s = torch.gather(s, 1, pos)
    i, j = torch.triu_indices(k, k, offset=1)
    diff_t = (sel_t / temperature)[:, i] - (sel_t / temperature)[:, j]
    diff_s = (sel_s / temperature)[:, i] - (sel_s / temperature)[:, j]
    return _kl(F.log_softmax(diff_t, -1), F.log_softmax(diff_s, -1)).mean()


def bild(s, t, top_k=8, temperature=3.0):
    return _bild_half(s, t, top_k, temperature, False) + _bild_half(s, t, top_k, temperature, True)


def uld_sorted(p_teacher, p_student):
    """ULD from probability vectors of any lengths: sort descending, zero-pad, L1 per row, mean."""
    p_teacher = p_teacher.sort(-1, descending=True).values
    p_student = p_student.sort(-1, descending=True).values
    width = max(p_teacher.shape[1], p_student.shape[1])
    p_teacher = F.pad(p_teacher, (0, width - p_teacher.shape[1]))
    p_student = F.pad(p_student, (0, width - p_student.shape[1]))
    return (p_teacher - p_student).abs().sum(-1).mean()


def uld(s, t):
    return uld_sorted(F.softmax(t, -1), F.softmax(s, -1))


def teacher_cross_entropy(s, t, temperature=1.0):
    """-sum softmax(t / T) log softmax(s / T): what RS-KD at temperature T estimates."""
    return -(F.softmax(t / temperature, -1) * F.log_softmax(s / temperature, -1)).sum(-1).mean()


def grouped_kl(s, t, ids, temperature=1.0, *, reverse=False, bucket=True):
    """KL over the classes {cached ids} (+ {everything else}), from the full tempered distributions."""
    p, q = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)
    p_k, q_k = p.gather(1, ids), q.gather(1, ids)
    if bucket:
        p_k = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], 1)
        q_k = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], 1)
    p_k, q_k = p_k / p_k.sum(-1, keepdim=True), q_k / q_k.sum(-1, keepdim=True)
    if reverse:
        p_k, q_k = q_k, p_k
    return (p_k * (p_k.log() - q_k.log())).sum(-1).mean()


def rskd(s, t, temperature=1.0):
    """RS-KD's expectation over the draws: the cross entropy to the teacher at T."""
    return teacher_cross_entropy(s, t, temperature)


# The plain full-vocabulary reference of every declared loss, called with the loss's options
# (those its signature names). A new loss adds its reference here; the battery in
# test_loss_battery.py fails for a declared loss that has none.
REFERENCES = {
    "sft": None,  # no teacher: tested against F.cross_entropy in test_losses.py
    "kl": kl, "rkl": rkl, "jsd": jsd, "skl": skl, "srkl": srkl, "topk_kl": kl,
    "dkd": dkd, "nkd": nkd, "normkd": normkd, "bild": bild, "uld": uld, "rskd": rskd,
}


# ---- shared by the loss tests ---------------------------------------------------------------------

F64 = torch.float64


def make_logits(n, v, *, seed, dtype=torch.float32, teacher_scale=3.0, student_scale=2.0):
    """Random (student, teacher) full logits, both (n, v) `dtype`: a peaked teacher, a flatter student."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, v, generator=g, dtype=F64) * teacher_scale
    s = torch.randn(n, v, generator=g, dtype=F64) * student_scale
    return s.to(dtype), t.to(dtype)


def top_k_cache(t, k):
    """What stage one stores: the top-k ids (n, k) int64 by teacher log-prob, descending, and those log-probs."""
    values, ids = t.log_softmax(-1).sort(-1, descending=True)
    return ids[:, :k], values[:, :k]


def assert_same_value_and_gradient(loss, reference, s, *, atol=1e-10, rtol=1e-10, grad_rtol=1e-8):
    """`loss` and `reference`, each called on its own leaf copy of `s`, agree in value and in gradient.

    Args:
        loss, reference: callables of student logits (N, V) that return a scalar.
        s: the student logits (N, V).
        atol, rtol: the value's tolerances (atol is the gradient's too); None: torch's defaults for the dtype.
        grad_rtol: the gradient's rtol.

    Returns:
        (got, want): the two values.
    """
    x, y = s.clone().requires_grad_(), s.clone().requires_grad_()
    got, want = loss(x), reference(y)
    got.backward()
    want.backward()
    if atol is None:
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(x.grad, y.grad)
    else:
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
        torch.testing.assert_close(x.grad, y.grad, atol=atol, rtol=grad_rtol)
    return got, want
