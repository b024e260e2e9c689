"""LM head -> online logsumexp -> top-K as one Triton kernel: the fused head of `fused_topk` for CUDA.

`fused_topk.fused_topk_targets` folds vocabulary tiles with torch ops. On a GPU each (4096 x 16384)
tile of fp32 logits is then written to HBM and read back by a dozen kernels. Here the logits live
only in registers: a split-V kernel, in the manner of flash-decoding.

- Grid: (row blocks of `BM` rows, vocabulary splits). A program walks its split in `BN`-wide
  subtiles. Each subtile's logits are `tl.dot` over H in `BK` chunks (fp32 accumulation), then
  get the head's bias, rounding, `logit_scale` and tanh softcap, exactly as `apply_head` computes
  them (`hidden_scale` is applied to the hidden states before the launch, as `apply_head` does).
- Per row it keeps a running max `m`, a running top-`KP` as packed int64 keys, the next token's
  logit, and the mass outside the running top-KP, summed directly: an entry adds exp(x - m) when
  it arrives below the running KP-th key or when a merge evicts it, and the sum is rescaled when
  `m` grows. So a 1e-10 tail keeps its relative precision, as `sparsify.topk_targets` promises.
  The total mass needs no accumulator of its own: it is the outside mass plus the kept entries'.
- A key is an fp32 logit made sortable as an int32 (sign-magnitude to two's complement order)
  in the high 32 bits and the vocabulary id in the low 32. One int64 sort then carries value and
  id together, every key in a row is distinct, and "below the K-th key" means "not kept".
- Merge, three ways, chosen per subtile by its candidates (entries above their row's running
  KP-th key), counted for the busiest row of the block: none, and the whole subtile is outside
  mass; up to `INSERTS` (the usual case once a split is under way), and each row's best remaining
  candidate replaces its running minimum, that many rounds of a max and two selects; more (a split's
  first subtiles), and `tl.topk` of the subtile is joined with the running top-KP and `tl.topk`
  taken again: two bitonic sorting networks over int64 keys, the kernel's most expensive step.
- Each program writes its rows' m, outside mass, target logit and KP keys for its split; a small
  torch step (`_merge_splits`) takes the max over splits, rescales, picks the final top-K and adds
  what that last merge evicts, again summed directly.

`tl.topk` needs a power of two: K is padded to KP, the next one, and cut in the merge (each
split's top-KP holds all of its entries that are in the global top-K). No (rows x V) block of
logits exists in any dtype.

CPU tensors run the same kernel under Triton's interpreter, in a process where TRITON_INTERPRET=1
was set before triton was first imported (triton decorates its own `tl.zeros`, `tl.topk`, ...
then, not only this kernel). That is how the tests check it, in a child process
(tests/support/triton_interpreter.py), slowly. The interpreter cannot tell whether the kernel compiles
for a GPU, how many registers `tl.topk` over an int64 (BM x BN) block takes there, or how fast it
is: the block defaults (`default_blocks`) are sensible for an H100/H200 but untuned.
"""

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl

from logitcache.stages.precompute.fused_topk import TRITON_MAX_K, check_fused_inputs, empty_targets
from logitcache.stages.precompute.sparsify import TOPK_FIELDS
from logitcache.storage.errors import ConfigError
from logitcache.storage.head import LMHead

__all__ = ["triton_topk_targets", "default_blocks"]

# (n, S, KP) int64 partial keys and three (n, S) fp32 arrays per launch; rows beyond this are
# launched in turn so the partials stay small (131,072 rows x 8 splits x 32 keys = 256 MiB).
_MAX_ROWS_PER_LAUNCH = 131_072


@triton.jit
def _fused_topk_kernel(
    h_ptr, w_ptr, b_ptr, next_ptr,  # (n, H) in the weight's dtype, (V, H), (V,) or unused, (n,) int64
    m_ptr, out_ptr, tgt_ptr, key_ptr,  # (n, S) fp32 x 3, (n, S, KP) int64
    n_rows, vocab, split_size,
    logit_scale, softcap,
    H: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, CAP: tl.constexpr, ROUND: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr, INSERTS: tl.constexpr,
):
    """One (row block, vocabulary split): see the module docstring."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    nxt = tl.load(next_ptr + rows, mask=row_ok, other=-1)
    lo = pid_s * split_size
    hi = tl.minimum(lo + split_size, vocab)

    m = tl.full((BM,), float("-inf"), tl.float32)
    outside = tl.zeros((BM,), tl.float32)
    target = tl.zeros((BM,), tl.float32)
    # The running top-KP starts as KP keys of -inf (ids 0..KP-1): below every real logit. Columns
    # past the split's end get `lowest`, below those, so they never count as candidates.
    ninf = tl.full((BM, KP), float("-inf"), tl.float32).to(tl.int32, bitcast=True) ^ 0x7FFFFFFF
    best = (ninf.to(tl.int64) << 32) | tl.arange(0, KP)[None, :].to(tl.int64)
    lowest = tl.min(best, axis=1)[:, None] - 1

    for start in range(lo, hi, BN):
        cols = start + tl.arange(0, BN)
        col_ok = cols < hi
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, H, BK):
            ks = k0 + tl.arange(0, BK)
            if EVEN_K:
                a_mask = row_ok[:, None]
                b_mask = col_ok[:, None]
            else:
                a_mask = row_ok[:, None] & (ks[None, :] < H)
                b_mask = col_ok[:, None] & (ks[None, :] < H)
            a = tl.load(h_ptr + rows64[:, None] * H + ks[None, :], mask=a_mask, other=0.0)
            b = tl.load(w_ptr + cols.to(tl.int64)[:, None] * H + ks[None, :], mask=b_mask, other=0.0)
            if DOT_F32:
                # Interpreter only: its tl.dot multiplies bf16's uint16 storage as integers
                # (triton 3.9 `create_dot`). bf16 products are exact in fp32, so this is the
                # tensor cores' arithmetic (bf16 in, fp32 sums) up to summation order.
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        # The head's transforms, rounded to the weight's dtype after each op as torch rounds when
        # `apply_head` runs in bf16/fp16, so values and ties match the unfused path. bf16 rounds
        # to nearest even by bit arithmetic: the interpreter's fp32 -> bf16 cast truncates.
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ROUND == 1:
            r = acc.to(tl.int32, bitcast=True)
            acc = ((r + 0x7FFF + ((r >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        elif ROUND == 2:
            acc = acc.to(tl.float16).to(tl.float32)
        if SCALE:
            acc = acc * logit_scale
            if ROUND == 1:
                r = acc.to(tl.int32, bitcast=True)
                acc = ((r + 0x7FFF + ((r >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            elif ROUND == 2:
                acc = acc.to(tl.float16).to(tl.float32)
        if CAP:
            y = acc / softcap
            if ROUND == 1:
                r = y.to(tl.int32, bitcast=True)
                y = ((r + 0x7FFF + ((r >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            elif ROUND == 2:
                y = y.to(tl.float16).to(tl.float32)
            # tanh from exp: libdevice's tanh has no interpreter twin, and this one is tested.
            e = tl.exp(-2.0 * tl.abs(y))
            t = (1.0 - e) / (1.0 + e)
            t = tl.where(y < 0, -t, t)
            if ROUND == 1:
                r = t.to(tl.int32, bitcast=True)
                t = ((r + 0x7FFF + ((r >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            elif ROUND == 2:
                t = t.to(tl.float16).to(tl.float32)
            acc = t * softcap
            if ROUND == 1:
                r = acc.to(tl.int32, bitcast=True)
                acc = ((r + 0x7FFF + ((r >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            elif ROUND == 2:
                acc = acc.to(tl.float16).to(tl.float32)
        x = tl.where(col_ok[None, :], acc, float("-inf"))
        hit = (cols[None, :] == nxt[:, None]) & col_ok[None, :]  # only split-end columns (>= V) are masked
        target += tl.sum(tl.where(hit, x, 0.0), axis=1)

        bits = x.to(tl.int32, bitcast=True)
        key = (tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) << 32) | cols[None, :].to(tl.int64)
        key = tl.where(col_ok[None, :], key, lowest)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        evicted = tl.zeros((BM,), tl.float32)
        floor = tl.min(best, axis=1)
        most = tl.max(tl.sum((key > floor[:, None]).to(tl.int32), axis=1), axis=0)  # candidates, busiest row
        if most > INSERTS:
            # Many candidates (a split's first subtiles): the subtile's top-KP by a bitonic
            # network, joined with the running top-KP, and the top-KP of both.
            both = tl.reshape(tl.join(best, tl.topk(key, KP, dim=1)), (BM, 2 * KP))
            merged = tl.topk(both, KP, dim=1)
            gone = best < tl.min(merged, axis=1)[:, None]
            old32 = (best >> 32).to(tl.int32)
            old = tl.where(old32 >= 0, old32, old32 ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
            evicted = tl.sum(tl.where(gone, tl.exp(old - m_new[:, None]), 0.0), axis=1)
            best = merged
        elif most > 0:
            # A few (the usual case once a split is under way): each row's best remaining
            # candidate replaces its running minimum if larger, `most` times: a max and two
            # selects a round instead of two sorting networks. An entry put in is never the one
            # taken out in a later round (later candidates are smaller), so only old entries are
            # evicted.
            cand = tl.where(key > floor[:, None], key, lowest)
            for _ in range(most):
                top1 = tl.max(cand, axis=1)
                low = tl.min(best, axis=1)
                out = (best == low[:, None]) & (top1 > low)[:, None]
                old32 = (best >> 32).to(tl.int32)
                old = tl.where(old32 >= 0, old32, old32 ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
                evicted += tl.sum(tl.where(out, tl.exp(old - m_new[:, None]), 0.0), axis=1)
                best = tl.where(out, top1[:, None], best)
                cand = tl.where(cand == top1[:, None], lowest, cand)
        kth = tl.min(best, axis=1)
        fresh = tl.sum(tl.where(key < kth[:, None], tl.exp(x - m_new[:, None]), 0.0), axis=1)
        outside = outside * tl.exp(m - m_new) + evicted + fresh
        m = m_new

    at = rows64 * n_splits + pid_s
    tl.store(m_ptr + at, m, mask=row_ok)
    tl.store(out_ptr + at, outside, mask=row_ok)
    tl.store(tgt_ptr + at, target, mask=row_ok)
    tl.store(key_ptr + at[:, None] * KP + tl.arange(0, KP)[None, :], best, mask=row_ok[:, None])


_ROUNDING = {torch.bfloat16: 1, torch.float16: 2}  # the kernel's ROUND: logits rounded to the weight's dtype


def default_blocks(device: torch.device, rows: int, vocab: int, k: int) -> dict[str, int]:
    """Block sizes and vocabulary splits for `triton_topk_targets`; untuned (no GPU measured them).

    64 rows x 128 ids per subtile and 64 of H per `tl.dot` step: tensor-core shapes, small enough
    that the (64 x 128) fp32 logits and their int64 keys may stay in the registers of 8 warps
    (not checked on a GPU). Splits: see `_default_splits`. On CPU (the interpreter) one split.
    Up to 8 candidates in the busiest row merge by insertion: a round (a max over the subtile,
    two selects) costs about a tenth of the two sorting networks, counted in operations.
    """
    bm, bn = 64, max(128, _next_pow2(k))
    return {"block_rows": bm, "block_vocab": bn, "block_hidden": 64,
            "splits": _default_splits(device, rows, vocab, bm, bn), "inserts": 8, "num_warps": 8, "num_stages": 3}


def _default_splits(device: torch.device, rows: int, vocab: int, bm: int, bn: int) -> int:
    """Vocabulary splits so that row blocks x splits fill about 4 waves of the card's SMs, each
    split at least 8 subtiles long (its first subtiles merge by sorting, the costly way)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-4 * sms // -(-rows // bm)), -(-vocab // bn) // 8))


@torch.no_grad()
def triton_topk_targets(
    hidden: torch.Tensor,
    head: LMHead,
    next_ids: torch.Tensor,
    k: int,
    *,
    block_rows: int | None = None,
    block_vocab: int | None = None,
    block_hidden: int | None = None,
    splits: int | None = None,
    inserts: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> dict[str, np.ndarray]:
    """Top-K log-probs, the next token's log-prob and the tail mass, by the fused Triton kernel.

    Same contract as `fused_topk.fused_topk_targets` (and so `sparsify.topk_targets`). On CUDA the
    kernel is compiled; CPU tensors go through Triton's interpreter (for tests: very slow).

    Args:
        hidden: (n, H) final hidden states, any float dtype.
        head: The model's head (weight (V, H), optional bias and logit transforms).
        next_ids: (n,) int64, the token that follows each row, in [0, V).
        k: Entries kept per row, 1 <= k <= min(V, `fused_topk.TRITON_MAX_K`).
        block_rows, block_vocab, block_hidden: BM, BN, BK (powers of two, >= 16; BN is raised
            to K's power of two). splits: vocabulary splits. inserts: a subtile in which no row
            has more candidates than this is merged by insertion, else by sorting (0: always
            sort). num_warps, num_stages: Triton launch options. Each defaults to `default_blocks`.

    Returns:
        `topk_ids` (n, k) int32 by log-prob descending, `topk_logprobs` (n, k) float32,
        `target_logprob` (n,) float32, `tail_mass` (n,) float32.
    """
    n, vocab = hidden.shape[0], head.width
    next_ids = check_fused_inputs(hidden, head, next_ids, k)
    if k > TRITON_MAX_K:
        raise ConfigError(f"k={k}: the Triton top-K keeps at most {TRITON_MAX_K} per row; use fused_kernel='torch'")
    device = head.weight.device
    if n == 0:
        return empty_targets(k)
    kp = _next_pow2(k)
    cfg = default_blocks(device, min(n, _MAX_ROWS_PER_LAUNCH), vocab, k)
    given = {"block_rows": block_rows, "block_vocab": block_vocab, "block_hidden": block_hidden, "splits": splits,
             "inserts": inserts, "num_warps": num_warps, "num_stages": num_stages}
    cfg.update({name: value for name, value in given.items() if value is not None})
    cfg["block_vocab"] = max(cfg["block_vocab"], kp)
    if splits is None:
        cfg["splits"] = _default_splits(device, min(n, _MAX_ROWS_PER_LAUNCH), vocab, cfg["block_rows"],
                                        cfg["block_vocab"])
    for name in ("block_rows", "block_vocab", "block_hidden"):
        if cfg[name] < 16 or cfg[name] & (cfg[name] - 1):
            raise ConfigError(f"{name}={cfg[name]} must be a power of two >= 16 (tl.dot and tl.arange need it)")
    if device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise ConfigError("the Triton top-K runs CPU tensors only under Triton's interpreter: set TRITON_INTERPRET=1 "
                          "before triton is first imported (tests do), or use fused_kernel='torch'")
    weight = head.weight.contiguous()
    h = hidden.to(device=device, dtype=weight.dtype)
    if head.hidden_scale != 1.0:
        h = h * head.hidden_scale  # in the weight's dtype, as `apply_head` scales
    h = h.contiguous()
    parts = [_launch(h[lo:lo + _MAX_ROWS_PER_LAUNCH], weight, head, next_ids[lo:lo + _MAX_ROWS_PER_LAUNCH], k, kp,
                     cfg)
             for lo in range(0, n, _MAX_ROWS_PER_LAUNCH)]
    return {name: torch.cat(chunks).cpu().numpy() for name, chunks in zip(TOPK_FIELDS, zip(*parts))}


def _launch(h: torch.Tensor, weight: torch.Tensor, head: LMHead, next_ids: torch.Tensor, k: int, kp: int,
            cfg: dict[str, int]) -> tuple[torch.Tensor, ...]:
    """One kernel launch over `h`'s rows, then the merge of its splits."""
    n, (vocab, hidden) = h.shape[0], weight.shape
    bm, bn, bk = cfg["block_rows"], cfg["block_vocab"], cfg["block_hidden"]
    tiles = -(-vocab // bn)
    # Whole subtiles per split, and no split left empty (every split then holds a real logit,
    # so its running max is finite after its first subtile).
    split_size = -(-tiles // max(1, min(cfg["splits"], tiles))) * bn
    splits = -(-vocab // split_size)
    dev = h.device
    m = torch.empty((n, splits), dtype=torch.float32, device=dev)
    outside = torch.empty_like(m)
    target = torch.empty_like(m)
    keys = torch.empty((n, splits, kp), dtype=torch.int64, device=dev)
    bias = head.bias.contiguous() if head.bias is not None else weight  # not read without a bias
    # Triton launches on the current CUDA device: make it the head's (cuda:1, ...).
    on_device = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with on_device:
        _fused_topk_kernel[(-(-n // bm), splits)](
            h, weight, bias, next_ids.contiguous(),
            m, outside, target, keys,
            n, vocab, split_size,
            float(head.logit_scale), float(head.softcap or 1.0),
            H=hidden, EVEN_K=hidden % bk == 0,
            HAS_BIAS=head.bias is not None, SCALE=head.logit_scale != 1.0, CAP=head.softcap is not None,
            ROUND=_ROUNDING.get(weight.dtype, 0),
            PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",  # fp32 weights: no TF32 rounding
            DOT_F32=triton.knobs.runtime.interpret and weight.dtype != torch.float32,
            BM=bm, BN=bn, BK=bk, KP=kp, INSERTS=cfg["inserts"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return _merge_splits(m, outside, target, keys, k)


def _merge_splits(m: torch.Tensor, outside: torch.Tensor, target: torch.Tensor, keys: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, ...]:
    """The per-split results of the kernel folded into the final fields.

    Args:
        m, outside, target: (n, S) fp32: each split's max logit, mass outside its top-KP
            (relative to its max), and the next token's logit (0 in the splits not holding it).
        keys: (n, S, KP) int64 packed (logit, id) keys of each split's top-KP.
        k: Entries kept per row, <= S * KP real keys per row.

    Returns:
        (ids (n, k) int32, log-probs (n, k) fp32, target log-prob (n,) fp32, tail mass (n,) fp32).
    """
    n = m.shape[0]
    top_m = m.amax(dim=1, keepdim=True)
    outside = (outside * torch.exp(m - top_m)).sum(dim=1, keepdim=True)
    keys = keys.view(n, -1)
    top = torch.topk(keys, k, dim=1, sorted=True).values  # by (logit, id) descending
    # What this last merge leaves out joins the outside mass, summed directly.
    dropped = torch.where(keys < top[:, -1:], torch.exp(_key_logits(keys) - top_m), 0.0)
    outside = outside + dropped.sum(dim=1, keepdim=True)
    top_v = _key_logits(top)
    total = outside + torch.exp(top_v - top_m).sum(dim=1, keepdim=True)
    lse = top_m + torch.log(total)
    ids = (top & 0xFFFFFFFF).to(torch.int32)
    return ids, top_v - lse, target.sum(dim=1) - lse[:, 0], (outside / total)[:, 0]


def _key_logits(keys: torch.Tensor) -> torch.Tensor:
    """The fp32 logits in the high halves of packed keys (the kernel's packing, undone)."""
    k32 = (keys >> 32).to(torch.int32)
    return torch.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF).view(torch.float32)


def _next_pow2(k: int) -> int:
    return 1 << (k - 1).bit_length()
