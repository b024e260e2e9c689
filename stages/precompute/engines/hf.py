"""The transformers engine: the model body in length-bucketed batches, our head at supervised rows.

Requests are sorted by length and packed into right-padded batches under a token budget
(padded size, batch x longest), so little compute goes to padding. The model body
(`model.base_model`) returns final hidden states; the head is applied only to the supervised
rows, a chunk at a time, so full (tokens x vocab) logits are never built. At start-up the
standalone head is checked once against the model's own forward logits (`verify_head`).

Runs on CPU and CUDA; bf16 on CUDA and fp32 on CPU unless `dtype` says otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

from logitcache.stages.precompute.engines.base import (
    TORCH_DTYPES,
    Request,
    check_requests,
    gather_inputs,
    split_rows,
    targets_or_fallback,
)
from logitcache.stages.precompute.fused_topk import fused_kernel_choice
from logitcache.stages.precompute.targets import Targets
from logitcache.storage.head import head_from_model, verify_head
from logitcache.storage.errors import ConfigError

__all__ = ["HFEngine", "length_batches"]



class HFEngine:
    """A transformers causal LM as a teacher (see the module docstring).

    Args:
        model: Local directory or hub id.
        targets: What to keep per position.
        dtype: "auto" (bf16 on CUDA, fp32 on CPU), "float32", "bfloat16" or "float16".
        device: "cpu", "cuda", "cuda:1", ...; defaults to CUDA when available.
        max_batch_tokens: Padded tokens per forward (batch size x longest sequence); a longer
            sequence runs alone. Defaults to 16384 on CUDA, 4096 on CPU.
        trust_remote_code: Allow the checkpoint's own modelling code.
        revision: Hub revision.
        head_chunk_rows: Rows per head call (logits are chunk x V at a time).
        attn_implementation: Passed to `from_pretrained` ("sdpa", "eager", ...).
        fused_head: In topk mode, head + logsumexp + top-K in one pass over vocabulary tiles
            (`fused_topk`); False builds each chunk's full logits first (the reference path).
        fused_kernel: Which fused head: "auto" (the Triton kernel of `fused_topk_triton` on
            CUDA, the torch tile fold on CPU), "triton" or "torch" to force one.
    """

    name = "hf"

    def __init__(
        self,
        model: str,
        *,
        targets: Targets,
        dtype: str = "auto",
        device: str | None = None,
        max_batch_tokens: int | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        head_chunk_rows: int | None = None,
        attn_implementation: str | None = None,
        fused_head: bool = True,
        fused_kernel: str = "auto",
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Checked first: a bad name, or "triton" where it cannot run, fails before anything loads.
        fused_kernel_choice(fused_kernel, self.device, targets.width if targets.mode == "topk" else None)
        self.fused_kernel = fused_kernel
        import transformers
        from transformers import AutoModelForCausalLM

        self.version = transformers.__version__
        self.targets = targets
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif dtype in TORCH_DTYPES:
            torch_dtype = TORCH_DTYPES[dtype]
        else:
            raise ConfigError(f"dtype={dtype!r}; expected 'auto' or one of {sorted(TORCH_DTYPES)}")
        self.max_batch_tokens = max_batch_tokens or (16384 if self.device.type == "cuda" else 4096)
        self.head_chunk_rows = head_chunk_rows
        self.fused_head = fused_head
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self.model = AutoModelForCausalLM.from_pretrained(
            model,
            dtype=torch_dtype,
            device_map=str(self.device),
            revision=revision,
            trust_remote_code=trust_remote_code,
            **kwargs,
        ).eval()
        self.head = head_from_model(self.model)
        self.logits_width = self.head.width
        if targets.mode == "topk" and targets.width > self.logits_width:
            raise ConfigError(f"k={targets.width} exceeds the logits width {self.logits_width} of {model!r}")
        probe = torch.arange(min(16, self.logits_width), device=self.device)[None]
        verify_head(self.model, self.head, probe)

    @torch.inference_mode()
    def run(self, requests: list[Request]) -> list[dict[str, np.ndarray]]:
        """Sparse targets for each request (see `Engine.run`)."""
        checked = check_requests(requests, self.logits_width)
        results: list[dict[str, np.ndarray] | None] = [None] * len(requests)
        for batch in length_batches([len(ids) for ids, _ in checked], self.max_batch_tokens):
            items = [checked[i] for i in batch]
            next_ids, seeds = gather_inputs(items, [requests[i].seed for i in batch], self.targets)
            rows, self.fused_kernel = targets_or_fallback(
                self._hidden_rows(items), self.head, next_ids, self.targets, seeds=seeds,
                chunk_rows=self.head_chunk_rows, fused=self.fused_head, fused_kernel=self.fused_kernel,
            )
            for i, out in zip(batch, split_rows(rows, [len(pos) for _, pos in items])):
                results[i] = out
        return results

    def close(self) -> None:
        """Drop the model; frees GPU memory once no other reference holds it."""
        self.model = self.head = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _hidden_rows(self, batch: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
        """Final hidden states (rows, H) at the supervised positions of a batch, request order."""
        longest = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for b, (ids, _) in enumerate(batch):
            input_ids[b, : len(ids)] = torch.from_numpy(ids)
            mask[b, : len(ids)] = 1
        hidden = self.model.base_model(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
        ).last_hidden_state
        rows = torch.cat([torch.full((len(pos),), b) for b, (_, pos) in enumerate(batch)])
        cols = torch.from_numpy(np.concatenate([pos for _, pos in batch]))
        return hidden[rows.to(self.device), cols.to(self.device)]


def length_batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Group indices so each batch's padded size (count x longest) fits the budget.

    Longest first, so the first batch shows at once whether the longest sequence fits in
    memory, and neighbours in a batch have similar lengths (little padding).

    Args:
        lengths: Sequence lengths.
        max_batch_tokens: Budget of padded tokens per batch; a longer sequence is a batch alone.

    Returns:
        Batches of indices into `lengths`; every index appears once.
    """
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        # Sorted longest first, so a batch's first member sets its padded length.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
