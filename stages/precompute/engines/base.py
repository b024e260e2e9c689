"""What every teacher engine shares: the request, the interface, and hidden states -> targets.

An engine turns teacher-tokenized sequences into sparse targets at the positions a caller
supervises. Row t of a request's result is the teacher's distribution after seeing tokens
0..t, i.e. its prediction of token t+1. The result fields are those of `sparsify`: top-K or
sampled ids and log-probs, the actual next token's log-prob, and the tail mass.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from logitcache.stages.precompute.fused_topk import fused_kernel_choice, fused_topk_targets
from logitcache.stages.precompute.targets import Targets
from logitcache.storage.head import LMHead
from logitcache.stages.precompute.sparsify import (
    position_seeds,
    sample_targets,
    topk_targets,
)
from logitcache.storage.errors import InvalidDataError

__all__ = ["Request", "Engine", "check_requests", "gather_inputs", "targets_from_hidden", "split_rows",
           "run_ahead", "targets_or_fallback"]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Request:
    """One teacher-tokenized sequence and the positions to supervise.

    Attributes:
        token_ids: The sequence, length T >= 2.
        positions: (P,) int supervised positions t, 0 <= t < T-1, in the order the result rows
            should have; row t predicts token t+1.
        seed: Per-sequence seed for sample mode (derived by the caller from a global seed and
            the sequence's index in the dataset).
    """

    token_ids: list[int]
    positions: np.ndarray
    seed: int = 0


class Engine(Protocol):
    """A teacher that computes sparse targets for requests.

    Attributes:
        name: The engine ("hf", "vllm").
        version: The version of the library doing the forward pass.
        logits_width: The model's output width; may exceed the tokenizer's vocabulary.
    """

    name: str
    version: str
    logits_width: int

    def run(self, requests: list[Request]) -> list[dict[str, np.ndarray]]:
        """One dict per request, in order, with P rows each in the order of its positions."""
        ...

    def close(self) -> None:
        """Release the model (and any engine process)."""
        ...


def run_ahead(engine: Engine, batches: Iterable[list[Request]]) -> Iterator[list[dict[str, np.ndarray]]]:
    """`engine.run` over batches, each handed to the engine before the previous one's targets are made.

    An engine with `submit(requests) -> Pending` (vLLM) computes batch i+1 in its own process while
    this one makes batch i's targets, so it never waits on us between batches; any other engine
    simply runs each batch in turn. Results come out in batch order, one list per batch.

    A consumer that stops early still has the batch already handed over computed (and dropped),
    so that the engine is left with nothing in flight.
    """
    submit = getattr(engine, "submit", None)
    if submit is None:
        for batch in batches:
            yield engine.run(batch)
        return
    pending = []  # handed over, not yet collected: at most two
    try:
        for batch in batches:
            pending.append(submit(batch))
            if len(pending) > 1:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()
    finally:
        for handed_over in pending:
            handed_over.result()


def check_requests(requests: list[Request], vocab: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate requests; return (token_ids (T,) int64, positions (P,) int64) for each.

    Raises:
        InvalidDataError: naming the request index and what is wrong with it.
    """
    checked = []
    for i, req in enumerate(requests):
        ids = np.asarray(req.token_ids)
        pos = np.asarray(req.positions)
        if ids.ndim != 1 or ids.size < 2 or (ids.size and ids.dtype.kind not in "iu"):
            raise InvalidDataError(
                f"request {i}: token_ids must be a 1-D integer sequence of length >= 2; got {ids.dtype} {ids.shape}"
            )
        if ids.min() < 0 or ids.max() >= vocab:
            raise InvalidDataError(f"request {i}: token_ids must lie in [0, {vocab}); got [{ids.min()}, {ids.max()}]")
        if pos.ndim != 1 or (pos.size and pos.dtype.kind not in "iu"):
            raise InvalidDataError(f"request {i}: positions must be a 1-D integer array; got {pos.dtype} {pos.shape}")
        if pos.size and (pos.min() < 0 or pos.max() >= ids.size - 1):
            raise InvalidDataError(
                f"request {i}: positions must lie in [0, T-1) = [0, {ids.size - 1}) (row t predicts token t+1); "
                f"got [{pos.min()}, {pos.max()}]"
            )
        checked.append((ids.astype(np.int64), pos.astype(np.int64)))
    return checked


def targets_from_hidden(
    hidden: torch.Tensor,
    head: LMHead,
    next_ids: torch.Tensor,
    targets: Targets,
    *,
    seeds: np.ndarray | None = None,
    chunk_rows: int | None = None,
    fused: bool = True,
    fused_kernel: str = "auto",
) -> dict[str, np.ndarray]:
    """Apply the head and sparsify, a chunk of rows at a time.

    In topk mode with `fused` (the default) the head, the logsumexp and the top-K run in one
    pass over vocabulary tiles (`fused_topk_targets`): no (rows x V) block of logits is built.
    Sample mode needs each row's whole distribution (its CDF), so it always takes the chunked
    path: logits for `chunk_rows` rows, then `sample_targets`.

    Args:
        hidden: (n, H) final hidden states of the supervised rows.
        head: The model's head; logits are (chunk_rows, V) at a time, never (n, V).
        next_ids: (n,) int64 token after each row.
        targets: What to keep.
        seeds: (n,) uint64 per-row seeds; required in sample mode.
        chunk_rows: Rows per head call; defaults to 64M logits (128 MiB in bf16), or to
            `fused_topk.default_tiles` when fused.
        fused: Use the fused head + top-K in topk mode.
        fused_kernel: Which fused implementation (`fused_topk.fused_kernel_choice`): "auto" runs
            the Triton kernel (`fused_topk_triton`, which ignores `chunk_rows`) on CUDA, the torch
            tile fold elsewhere; "triton" or "torch" forces one.

    Returns:
        The `sparsify` fields, n rows each.
    """
    if fused and targets.mode == "topk":
        if fused_kernel_choice(fused_kernel, head.weight.device, targets.width) == "triton":
            from logitcache.stages.precompute.fused_topk_triton import triton_topk_targets

            return triton_topk_targets(hidden, head, next_ids, targets.width)
        return fused_topk_targets(hidden, head, next_ids, targets.width, chunk_rows=chunk_rows)
    n = hidden.shape[0]
    chunk_rows = chunk_rows or max(1, (1 << 26) // head.width)
    parts = []
    # Zero rows still go through once, for correctly typed empty arrays.
    for lo in range(0, n, chunk_rows) or [0]:
        hi = min(lo + chunk_rows, n)
        logits = head(hidden[lo:hi])
        ids = next_ids[lo:hi].to(logits.device)
        if targets.mode == "topk":
            parts.append(topk_targets(logits, ids, targets.width))
        else:
            parts.append(
                sample_targets(
                    logits, ids, num_samples=targets.width, temperature=targets.temperature, seeds=seeds[lo:hi]
                )
            )
    return {name: np.concatenate([p[name] for p in parts]) for name in targets.fields}


def targets_or_fallback(
    hidden: torch.Tensor, head: LMHead, next_ids: torch.Tensor, targets: Targets, *, fused_kernel: str, **kwargs
) -> tuple[dict[str, np.ndarray], str]:
    """`targets_from_hidden`, and the `fused_kernel` for the engine's next call.

    With "auto", a Triton kernel that fails to compile or launch (it is new and was not compiled
    on every GPU it may meet) does not end an hours-long job: a warning says why, this call and
    the later ones take the torch tile fold (returned as "torch"). An explicit "triton" raises.

    Args:
        hidden, head, next_ids, targets: As `targets_from_hidden`. fused_kernel: the engine's option.
        **kwargs: Further `targets_from_hidden` arguments (seeds, chunk_rows, fused).

    Returns:
        (the `sparsify` fields, the `fused_kernel` to pass next time).
    """
    try:
        return targets_from_hidden(hidden, head, next_ids, targets, fused_kernel=fused_kernel, **kwargs), fused_kernel
    except Exception as e:
        if fused_kernel != "auto" or not _raised_in_triton(e):
            raise
        warnings.warn(f"the Triton fused head failed ({type(e).__name__}: {str(e)[:500]}); this engine uses the "
                      "torch tile fold from now on (fused_kernel='torch')", RuntimeWarning, stacklevel=2)
        return targets_from_hidden(hidden, head, next_ids, targets, fused_kernel="torch", **kwargs), "torch"


def _raised_in_triton(error: BaseException) -> bool:
    """Whether `error` is Triton's or came out of Triton's code (its compiler raises plain
    RuntimeErrors from MLIR passes), not out of ours or torch's."""
    if any(cls.__module__.split(".")[0] == "triton" for cls in type(error).__mro__):
        return True
    tb = error.__traceback__
    while tb is not None:
        if f"{os.sep}triton{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def split_rows(rows: dict[str, np.ndarray], counts: list[int]) -> list[dict[str, np.ndarray]]:
    """Split the concatenated rows of several requests back into one dict per request."""
    bounds = np.cumsum(counts)[:-1]
    per_field = {name: np.split(arr, bounds) for name, arr in rows.items()}
    return [{name: per_field[name][i] for name in rows} for i in range(len(counts))]


def gather_inputs(
    checked: list[tuple[np.ndarray, np.ndarray]], seeds: list[int], targets: Targets
) -> tuple[torch.Tensor, np.ndarray | None]:
    """The next-token ids (n,) int64 and, in sample mode, the per-row seeds (n,) uint64 of the
    supervised rows of several requests, concatenated in request order."""
    next_ids = torch.from_numpy(np.concatenate([ids[pos + 1] for ids, pos in checked] or [np.zeros(0, np.int64)]))
    if targets.mode != "sample":
        return next_ids, None
    row_seeds = [position_seeds(seed, pos) for (_, pos), seed in zip(checked, seeds)]
    return next_ids, np.concatenate(row_seeds or [np.zeros(0, np.uint64)])

