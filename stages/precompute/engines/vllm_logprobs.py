"""The vLLM prompt-logprobs engine: vLLM computes `prompt_logprobs=K` itself.

Position 0 has no distribution (vLLM returns None there), so our row t is vLLM's entry t+1, and
each entry holds the actual token first (it may lie outside the top K), then the top K by rank.
Top-K only: sample mode needs the full distribution, so it needs the pooling engine.

vLLM API: `SamplingParams(flat_logprobs=True)` (PR #28914, November 2025), `LLM(logprobs_mode=...)`.
Quirk seen in 0.32.0: a logprobs request counts its one generated token against `max_model_len`.
"""

from __future__ import annotations

import numpy as np
import torch

from logitcache.stages.precompute.engines.logits_tap import LOGITS_TAP
from logitcache.stages.precompute.engines.vllm_base import VLLMEngineBase
from logitcache.stages.precompute.sparsify import tail_mass
from logitcache.stages.precompute.targets import Targets
from logitcache.storage.errors import ConfigError

__all__ = ["VLLMLogprobsEngine"]


class VLLMLogprobsEngine(VLLMEngineBase):
    """vLLM's own top-K prompt log-probs (see the module docstring).

    Args:
        model, targets, dtype, max_batch_tokens, trust_remote_code, revision, max_model_len,
            slab_tokens: As `VLLMPoolingEngine`.
        device: Unused (vLLM places the model); taken because every engine is given it.
        **llm_kwargs: Passed to `vllm.LLM`; they override ours.
    """

    path = "logprobs"
    generated = 1  # the one token generated after the prompt, which vLLM counts against max_model_len

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
        max_model_len: int | None = None,
        slab_tokens: int | None = None,
        **llm_kwargs,
    ):
        if targets.mode != "topk":
            raise ConfigError(
                "sample mode needs the pooling path (vllm_path='pooling'): prompt_logprobs gives only top-K"
            )
        path_args = dict(
            runner="generate",
            max_logprobs=targets.width,
            logprobs_mode="raw_logprobs",
            skip_tokenizer_init=True,
            # Only adds methods to vLLM's worker, called by name for the pooling engine's head check.
            worker_extension_cls=LOGITS_TAP,
        )
        self._start(model, targets, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                    max_batch_tokens=max_batch_tokens, max_model_len=max_model_len, slab_tokens=slab_tokens,
                    path_args=path_args, user_args=llm_kwargs)

    def _call(self, prompts: list[dict]):
        from vllm import SamplingParams

        params = SamplingParams(prompt_logprobs=self.targets.width, max_tokens=1, flat_logprobs=True, detokenize=False)
        return self.llm.generate(prompts, params, use_tqdm=False)

    def _targets(self, outputs, checked, seeds) -> list[dict[str, np.ndarray]]:
        return [_rows_from_prompt_logprobs(out.prompt_logprobs, ids, pos, self.targets.width)
                for (ids, pos), out in zip(checked, outputs)]


def _rows_from_prompt_logprobs(flat, ids: np.ndarray, pos: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Our rows at `pos` from vLLM's `FlatLogprobs` for a prompt `ids` (see the module docstring)."""
    starts = np.asarray(flat.start_indices, dtype=np.int64)[pos + 1]
    ends = np.asarray(flat.end_indices, dtype=np.int64)[pos + 1]
    if len(pos) and not (ends - starts == k + 1).all():
        counts = sorted(set((ends - starts).tolist()))
        raise RuntimeError(f"vLLM returned {counts} prompt logprobs per position; expected {k + 1}")
    token_ids = np.asarray(flat.token_ids, dtype=np.int64)
    logprobs = np.asarray(flat.logprobs, dtype=np.float32)
    if len(pos) and not (token_ids[starts] == ids[pos + 1]).all():
        raise RuntimeError("vLLM's first prompt logprob per position is not the prompt token's")
    topk = starts[:, None] + np.arange(1, k + 1)
    topk_logprobs = logprobs[topk].reshape(len(pos), k)
    return {
        "topk_ids": token_ids[topk].reshape(len(pos), k).astype(np.int32),
        "topk_logprobs": topk_logprobs,
        "target_logprob": logprobs[starts],
        "tail_mass": tail_mass(torch.from_numpy(topk_logprobs)).numpy(),
    }
