"""LM head -> online logsumexp -> top-K in one pass over the vocabulary, a tile at a time.

The unfused path (`LMHead` then `sparsify.topk_targets`) builds a (rows x V) block of logits
and then walks it five more times (fp32 copy, top-K, max, exp, sums). At V ~ 152k a block of a
few hundred rows is hundreds of MB: every one of those passes is a trip to main memory (or HBM),
and together they cost as much as the forward pass itself. Here the head's weight is cut into
vocabulary tiles small enough that a (rows x tile) block of logits stays in cache; each tile is
made, folded into running statistics and dropped:

- a running max `m` and sum of exp(x - m) (the online logsumexp of Milakov & Gimelshein 2018);
- a running top-K: the K best so far merged with the tile's own top-K (on CPU, past the first
  tile, with the tile's candidates found group by group, `_tile_top_above`);
- the probability mass outside the running top-K, summed directly (the tile's entries outside its
  own top-K, plus whatever the merge evicts) so that a tiny tail keeps its relative precision,
  exactly as `sparsify.topk_targets` promises;
- the logit of the actual next token, picked up in the tile that holds it.

Results equal `topk_targets(head(hidden), ...)` up to fp32 summation order (ties between equal
logits may come out in another order). Top-K mode only: sampling needs a CDF over the whole row.
The same torch code runs on CPU and CUDA; the tile sizes differ (`default_tiles`). On CUDA the
engines run the Triton kernel of `fused_topk_triton` instead by default (`fused_kernel_choice`),
which keeps each tile's logits in registers rather than in HBM. On CPU the
chunks of rows are folded side by side on one worker thread per torch thread, each with a single
torch thread (`_fold_on_workers`): a tile's dozen small ops would otherwise each pay a fork/join.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from logitcache.stages.precompute.sparsify import TOPK_FIELDS
from logitcache.storage.errors import ConfigError, InvalidDataError
from logitcache.storage.head import LMHead, apply_head

__all__ = ["fused_topk_targets", "default_tiles", "fused_kernel_choice", "FUSED_KERNELS", "TRITON_MAX_K"]

# Which implementation folds the fused head (engine option `fused_kernel`): "triton" is the
# kernel of `fused_topk_triton` (CUDA), "torch" the tile fold here, "auto" the kernel where it runs.
FUSED_KERNELS = ("auto", "triton", "torch")
TRITON_MAX_K = 256  # the kernel keeps K (padded to a power of two) int64 keys per row in registers

_GROUP = 32  # ids per group in `_tile_top_above`: a (rows, t / 32, 32) view, amax over the last axis


def default_tiles(device: torch.device, hidden_size: int, vocab: int) -> tuple[int, int]:
    """(rows per chunk, vocabulary ids per tile) for `fused_topk_targets`.

    On CPU, 256 rows x 4096 ids: a 4 MiB fp32 block of logits stays in cache (L3) while it is
    folded, and the head's weight is read once per 256 rows. Measured on a 2-core EPYC at
    V = 151,680, H = 256 (benchmarks/RESULTS.md), 1024-wide tiles lose to the per-tile top-K and
    8192-wide ones to cache misses. On CUDA the tiles are large (launches cost, caches matter
    less): 4096 rows x 16384 ids, 256 MiB of fp32 logits at a time instead of 2.4 GiB at V = 152k.
    """
    if device.type == "cuda":
        return 4096, min(vocab, 16384)
    return 256, min(vocab, 4096)


def fused_kernel_choice(kernel: str, device: torch.device | str, k: int | None = None) -> str:
    """Which implementation of the fused head runs: "triton" or "torch".

    "auto" takes the Triton kernel on CUDA where `triton` is importable and K fits it, else the
    torch tile fold (on CPU the fold is the tuned path, see benchmarks/RESULTS.md). "triton" is
    refused where the kernel cannot run rather than quietly replaced.

    Args:
        kernel: One of `FUSED_KERNELS`.
        device: Where the head's weight lives.
        k: Entries kept per row; None skips the check of K against `TRITON_MAX_K`.

    Raises:
        ConfigError: an unknown name, or "triton" without CUDA, without triton, or with K too large.
    """
    if kernel not in FUSED_KERNELS:
        raise ConfigError(f"fused_kernel={kernel!r}; expected one of {FUSED_KERNELS}")
    if kernel == "torch":
        return "torch"
    on_cuda = torch.device(device).type == "cuda"
    has_triton = importlib.util.find_spec("triton") is not None
    fits = k is None or k <= TRITON_MAX_K
    if kernel == "auto":
        return "triton" if on_cuda and has_triton and fits else "torch"
    if not on_cuda:
        raise ConfigError(f"fused_kernel='triton' needs a CUDA device for the head; it is on {device}. "
                          "Use 'auto' or 'torch'")
    if not has_triton:
        raise ConfigError("fused_kernel='triton' needs the `triton` package, which is not installed; "
                          "use 'auto' or 'torch'")
    if not fits:
        raise ConfigError(f"fused_kernel='triton' keeps at most K = {TRITON_MAX_K} per row; got k={k}. "
                          "Use 'auto' or 'torch'")
    return "triton"


@torch.no_grad()
def fused_topk_targets(
    hidden: torch.Tensor,
    head: LMHead,
    next_ids: torch.Tensor,
    k: int,
    *,
    chunk_rows: int | None = None,
    vocab_tile: int | None = None,
    workers: int | None = None,
) -> dict[str, np.ndarray]:
    """Top-K log-probs, the next token's log-prob and the tail mass, straight from hidden states.

    Args:
        hidden: (n, H) final hidden states, any float dtype.
        head: The model's head (weight (V, H), optional bias and logit transforms).
        next_ids: (n,) int64, the token that follows each row, in [0, V).
        k: Entries kept per row, 1 <= k <= V.
        chunk_rows: Rows per chunk; default from `default_tiles`.
        vocab_tile: Vocabulary ids per tile (at least k); default from `default_tiles`.
        workers: On CPU, threads that fold chunks of rows side by side, each with one torch
            thread (see `_fold_on_workers`); default `torch.get_num_threads()`. 1 folds every
            chunk on the calling thread with its own torch threads. Ignored on CUDA.

    Returns:
        The fields of `sparsify.topk_targets`: `topk_ids` (n, k) int32 by log-prob descending,
        `topk_logprobs` (n, k) float32, `target_logprob` (n,) float32, `tail_mass` (n,) float32.
    """
    n, vocab = hidden.shape[0], head.width
    device = head.weight.device
    next_ids = check_fused_inputs(hidden, head, next_ids, k)
    if n == 0:
        return empty_targets(k)
    rows_default, tile_default = default_tiles(device, head.weight.shape[1], vocab)
    chunk_rows, vocab_tile = chunk_rows or rows_default, max(vocab_tile or tile_default, k)
    workers = 1 if device.type != "cpu" else max(1, workers or torch.get_num_threads())
    if workers > 1:
        # Every worker gets rows even when the batch is smaller than workers x chunk_rows.
        chunk_rows = max(1, min(chunk_rows, -(-n // workers)))

    def fold(lo: int) -> tuple[torch.Tensor, ...]:
        h = hidden[lo : lo + chunk_rows].to(device=device, dtype=head.weight.dtype)
        return _fold_chunk(h, head, next_ids[lo : lo + chunk_rows], k, vocab_tile)

    starts = range(0, n, chunk_rows)
    parts = _fold_on_workers(fold, starts, workers) if workers > 1 and len(starts) > 1 else map(fold, starts)
    return {name: torch.cat(chunks).cpu().numpy() for name, chunks in zip(TOPK_FIELDS, zip(*parts))}


def check_fused_inputs(hidden: torch.Tensor, head: LMHead, next_ids: torch.Tensor, k: int) -> torch.Tensor:
    """The checks both fused heads (this fold and the Triton kernel) make; `next_ids` on the head's device.

    Raises:
        ConfigError: k outside [1, V]. InvalidDataError: next_ids not (n,) or outside [0, V).
    """
    n, vocab = hidden.shape[0], head.width
    if not 1 <= k <= vocab:
        raise ConfigError(f"k={k} must be between 1 and the logits width {vocab}")
    next_ids = next_ids.to(device=head.weight.device, dtype=torch.int64)
    if tuple(next_ids.shape) != (n,):
        raise InvalidDataError(f"next_ids has shape {tuple(next_ids.shape)}; expected ({n},), one per hidden row")
    if n and (int(next_ids.min()) < 0 or int(next_ids.max()) >= vocab):
        raise InvalidDataError(f"next_ids must lie in [0, {vocab}) (the logits width); got "
                               f"[{int(next_ids.min())}, {int(next_ids.max())}]")
    return next_ids


def empty_targets(k: int) -> dict[str, np.ndarray]:
    """The `sparsify.topk_targets` fields for zero rows, correctly typed."""
    return {"topk_ids": np.zeros((0, k), np.int32), "topk_logprobs": np.zeros((0, k), np.float32),
            "target_logprob": np.zeros(0, np.float32), "tail_mass": np.zeros(0, np.float32)}


def _fold_on_workers(fold, starts: range, workers: int) -> list[tuple[torch.Tensor, ...]]:
    """`fold` over every chunk start on `workers` threads, each with one torch thread; in order.

    A tile's folding is a dozen small ops on a (256 x 4096) block. With torch's own threads on
    them, every op pays an OpenMP fork/join, and on a shared machine each join waits for the
    slowest thread: measured at 2 threads, the fold's own work cost 1.6x the head matmul in a
    whole job (benchmarks/RESULTS.md). Here each chunk of rows is folded on one core from start
    to end, matmul included, and torch ops release the GIL, so the cores work side by side.
    `torch.set_num_threads` in a worker sets that thread's OpenMP/MKL threads and the default
    for threads started later; the caller's setting is put back afterwards.
    """
    threads = torch.get_num_threads()

    def one_thread(lo: int) -> tuple[torch.Tensor, ...]:
        torch.set_num_threads(1)
        with torch.no_grad():  # grad mode is per thread; the caller's does not reach a worker
            return fold(lo)

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="fused-topk") as pool:
            return list(pool.map(one_thread, starts))
    finally:
        torch.set_num_threads(threads)


def _fold_chunk(h: torch.Tensor, head: LMHead, next_ids: torch.Tensor, k: int, tile: int):
    """One chunk of rows through every vocabulary tile; see the module docstring."""
    rows, vocab = h.shape[0], head.width
    m = torch.full((rows, 1), -torch.inf, device=h.device)
    total = torch.zeros((rows, 1), device=h.device)
    outside = torch.zeros((rows, 1), device=h.device)
    target = torch.zeros((rows,), device=h.device)
    best_v = torch.empty((rows, 0), device=h.device)
    best_i = torch.empty((rows, 0), dtype=torch.long, device=h.device)
    for vlo in range(0, vocab, tile):
        vhi = min(vlo + tile, vocab)
        bias = None if head.bias is None else head.bias[vlo:vhi]
        # Columns vlo:vhi of `head(h)`: the weight rows are a view, the transforms the head's own.
        x = apply_head(h, head.weight[vlo:vhi], bias, hidden_scale=head.hidden_scale, logit_scale=head.logit_scale,
                       softcap=head.softcap).float()  # (rows, t) fp32; the only block of this size
        rel = next_ids - vlo
        inside = (rel >= 0) & (rel < vhi - vlo)
        target = torch.where(inside, x.gather(1, rel.clamp(0, vhi - vlo - 1)[:, None])[:, 0], target)
        if best_v.shape[1] == k and h.device.type == "cpu" and (vhi - vlo) % _GROUP == 0:
            tile_v, tile_i, tile_max = _tile_top_above(x, best_v.min(dim=-1, keepdim=True).values, k)
        else:
            tile_v, tile_i = torch.topk(x, min(k, vhi - vlo), dim=-1, sorted=False)
            tile_max = tile_v.max(dim=-1, keepdim=True).values
        new_m = torch.maximum(m, tile_max)
        # Two passes over the block, both in place (x is not needed again): exp(x - m) with the
        # tile's own top-K zeroed, summed. That sum is the tile's outside mass, summed directly so
        # a tiny tail keeps its relative precision; the tile's total adds the top-K's k terms
        # rather than summing the block a second time.
        tile_outside = x.sub_(new_m).exp_().scatter_(1, tile_i, 0.0).sum(dim=-1, keepdim=True)
        tile_total = tile_outside + (tile_v - new_m).exp_().sum(dim=-1, keepdim=True)
        rescale = (m - new_m).exp()  # 0 on the first tile (m = -inf)
        total = total * rescale + tile_total
        outside = outside * rescale + tile_outside
        m = new_m
        cand_v, cand_i = torch.cat([best_v, tile_v], dim=1), torch.cat([best_i, tile_i + vlo], dim=1)
        if cand_v.shape[1] > k:
            best_v, slot = torch.topk(cand_v, k, dim=-1, sorted=False)
            best_i = cand_i.gather(1, slot)
            # What the merge evicts leaves the top-K: add its mass, summed directly.
            evicted = (cand_v - m).exp_().scatter_(1, slot, 0.0)
            outside += evicted.sum(dim=-1, keepdim=True)
        else:
            best_v, best_i = cand_v, cand_i
    best_v, order = torch.sort(best_v, dim=-1, descending=True)
    best_i = best_i.gather(1, order)
    lse = m + total.log()
    return best_i.to(torch.int32), best_v - lse, target - lse[:, 0], (outside / total)[:, 0]


def _tile_top_above(x: torch.Tensor, floor: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries of a tile that may still enter the running top-K, without a top-K over the tile.

    Once the running top-K holds k entries, only entries above its smallest (`floor`) can enter
    it; past the first few tiles a row has a handful of them in 4096. So: the max of each group
    of `_GROUP` ids (a fast, vectorised pass), then the groups whose max clears the floor, then a
    top-K over those groups' entries only. A full `torch.topk` over the tile costs about a third
    of the tile's head matmul on CPU; this costs a small fraction of it. Entries left out are
    below the floor or below k better entries of the same tile, so they are outside the final
    top-K either way, and their mass goes to the directly summed outside mass as before.

    Args:
        x: (rows, t) fp32 logits of one tile, t a multiple of `_GROUP`, contiguous.
        floor: (rows, 1) the smallest logit of each row's running top-K.
        k: Entries kept per row.

    Returns:
        (values (rows, j) fp32, ids (rows, j) int64 within the tile, tile max (rows, 1)), j <= k:
        j is 0 when no row has an entry above its floor; rows with fewer than j such entries
        fill up with lower ones, which the merge then evicts.
    """
    rows, t = x.shape
    group_max = x.view(rows, t // _GROUP, _GROUP).amax(dim=-1)  # (rows, t / _GROUP)
    tile_max = group_max.amax(dim=-1, keepdim=True)
    need = int((group_max > floor).sum(dim=-1).max())  # groups holding a candidate, most in any row
    if need == 0:
        return x.new_empty((rows, 0)), torch.empty((rows, 0), dtype=torch.long), tile_max
    if need * _GROUP * 4 > t:  # candidates everywhere (an early tile): the plain top-K is cheaper
        values, ids = torch.topk(x, min(k, t), dim=-1, sorted=False)
        return values, ids, tile_max
    _, groups = torch.topk(group_max, need, dim=-1, sorted=False)  # (rows, need)
    ids = (groups[:, :, None] * _GROUP + torch.arange(_GROUP)).view(rows, need * _GROUP)
    values, slot = torch.topk(x.gather(1, ids), min(k, need * _GROUP), dim=-1, sorted=False)
    return values, ids.gather(1, slot), tile_max
