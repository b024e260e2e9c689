"""The vLLM pooling engine: vLLM's final hidden states, our head applied in this process.

vLLM's pooling runner returns every token's final hidden state (after the final norm; the model is
wrapped with `convert="embed"`, its LM head left unbuilt). This process applies the head, loaded
from the checkpoint's safetensors by `storage.head`, to the supervised rows only, and sparsifies
them. Both modes (topk, sample) work here. On CPU its torch work gets the core(s) vLLM's worker
leaves (`torch_threads`); on a GPU vLLM's memory share leaves room for the head
(`pooling_gpu_memory_utilization`).

The engine checks itself at start-up (`pooling_check`): our head's logits against vLLM's own
logits step on the same hidden states, and refuses a model whose logits vLLM transforms in a way
the head table does not know (vLLM's Llama honours a config `logit_scale`; ours does not).

Not done, and why: applying the head and top-K inside vLLM's worker through a
`vllm.general_plugins` pooler. In 0.32 a model converted for pooling is built with its
`ParallelLMHead` and `LogitsProcessor` replaced by `StageMissingLayer` (adapters.py,
`_create_pooling_model_cls`), so a custom pooler on the `convert="embed"` model has no head and no
logit transform to call. It would need its own architecture per family, registered by the plugin
(a `*ForCausalLM` subclass that keeps its head and declares `is_pooling_model`), selected through
`hf_overrides={"architectures": ...}`, and returning (P, 2K+2) fp32 rows per request. That was
not tried in this round.

vLLM API: `PoolerConfig(task="token_embed", tok_pooling_type="ALL", use_activation=False)` and
`LLM.encode(..., pooling_task="token_embed")`: `tok_pooling_type` came with vLLM PR #32026
(January 2026); older releases spelled these `pooling_type="ALL"`, `normalize=False` and the
`encode` task. Quirk seen in 0.32.0: the pooling runner needs the tokenizer
(`skip_tokenizer_init=True` fails in its scoring I/O processor).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from logitcache.stages.precompute.engines.base import (TORCH_DTYPES, gather_inputs, split_rows,
                                                       targets_or_fallback)
from logitcache.stages.precompute.engines.pooling_check import checked_head
from logitcache.stages.precompute.engines.vllm_base import VLLMEngineBase
from logitcache.stages.precompute.fused_topk import FUSED_KERNELS, fused_kernel_choice
from logitcache.stages.precompute.targets import Targets
from logitcache.storage.errors import ConfigError
from logitcache.storage.head import head_from_checkpoint

__all__ = ["VLLMPoolingEngine", "pooling_gpu_memory_utilization"]

_GiB = 1 << 30


class VLLMPoolingEngine(VLLMEngineBase):
    """vLLM's hidden states + our head (see the module docstring).

    Args:
        model: Local directory or hub id.
        targets: What to keep per position.
        dtype: vLLM's model dtype ("auto" follows the checkpoint).
        device: Where the head runs; defaults to CUDA when available.
        max_batch_tokens: vLLM's `max_num_batched_tokens`; default 8192.
        trust_remote_code: Allow the checkpoint's own modelling code.
        revision: Hub revision.
        max_model_len: Longest request; defaults to `max_batch_tokens` on CPU (capped by the
            model), to vLLM's choice on GPU.
        slab_tokens: Tokens handed to vLLM per call; default 4 x `max_batch_tokens`.
        head_dtype: Dtype of the head matmul; default vLLM's model dtype, as the model itself
            computes its logits (and twice as fast as fp32 in bf16, on CPU too). "float32" gives
            logits free of bf16 rounding at the cost of a slower head.
        head_chunk_rows: Rows per head call.
        fused_head: Topk mode: head + logsumexp + top-K in one pass over vocabulary tiles
            (`fused_topk`); False builds each chunk's full logits first.
        fused_kernel: Which fused head, "auto" (the Triton kernel of `fused_topk_triton` when the
            head is on CUDA, the torch tile fold on CPU), "triton" or "torch" to force one.
        verify_head: Before starting, check our head against vLLM's own logits step on the same
            hidden states (`pooling_check`; costs one short-lived generate-runner start-up) and
            refuse a model whose logits vLLM transforms otherwise.
        reference: vLLM's side of the check, `(hidden, logits)` as `head_check_reference` returns
            them from a logprobs engine of the same teacher that is already running; the check
            then starts no engine of its own. Ignored when `verify_head` is False.
        torch_threads: On CPU: threads for this process's torch work (the head and top-K).
            Default: the cores vLLM's CPU worker leaves free (it binds to all but
            `VLLM_CPU_NUM_OF_RESERVED_CPU`, by default one per tensor-parallel rank); 0 leaves
            torch's own setting (every core, contending with the worker).
        **llm_kwargs: Passed to `vllm.LLM` (e.g. `tensor_parallel_size`, `gpu_memory_utilization`,
            `quantization`, `enforce_eager`, `kv_cache_memory_bytes`); they override ours.
    """

    path = "pooling"

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
        head_dtype: str | None = None,
        head_chunk_rows: int | None = None,
        fused_head: bool = True,
        fused_kernel: str = "auto",
        verify_head: bool = True,
        torch_threads: int | None = None,
        reference: tuple[np.ndarray, np.ndarray] | None = None,
        **llm_kwargs,
    ):
        # Before any engine starts: a bad name, or "triton" where the head cannot run it.
        if head_dtype is not None and head_dtype not in TORCH_DTYPES:
            raise ConfigError(f"head_dtype={head_dtype!r}; expected one of {sorted(TORCH_DTYPES)}")
        if fused_kernel not in FUSED_KERNELS:
            raise ConfigError(f"fused_kernel={fused_kernel!r}; expected one of {FUSED_KERNELS}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        fused_kernel_choice(fused_kernel, self.device, targets.width if targets.mode == "topk" else None)
        self.head_chunk_rows, self.fused_head, self.fused_kernel = head_chunk_rows, fused_head, fused_kernel
        self.head = None
        # Checked before this engine starts, so a refusal costs no second engine.
        self.head_check_max_diff = None  # nats: the check's largest logit difference
        if verify_head:
            self.head_check_max_diff = checked_head(
                model, reference, dtype=dtype, max_batch_tokens=max_batch_tokens, trust_remote_code=trust_remote_code,
                revision=revision, max_model_len=max_model_len, **llm_kwargs)
        from vllm.config import PoolerConfig
        from vllm.platforms import current_platform

        path_args = dict(
            runner="pooling",
            convert="embed",
            # use_activation=False: the embedding head would L2-normalize each hidden state.
            pooler_config=PoolerConfig(task="token_embed", tok_pooling_type="ALL", use_activation=False),
            # Pooling models upcast their output to fp32 by default; in the model's dtype
            # the hidden states cross the process boundary at half the bytes, losing nothing.
            hf_overrides={"head_dtype": "model"},
        )
        on_cpu = current_platform.is_cpu()
        if not on_cpu and "gpu_memory_utilization" not in llm_kwargs:
            # Our head runs beside vLLM on the same card: leave room for its weight and tiles.
            width, hidden = _config_head_shape(model, revision, trust_remote_code)
            head_bytes = torch.empty((), dtype=TORCH_DTYPES.get(head_dtype or "bfloat16")).element_size()
            path_args["gpu_memory_utilization"] = pooling_gpu_memory_utilization(
                torch.cuda.mem_get_info()[1], vocab=width, hidden=hidden, head_bytes=head_bytes)
        self._start(model, targets, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                    max_batch_tokens=max_batch_tokens, max_model_len=max_model_len, slab_tokens=slab_tokens,
                    path_args=path_args, user_args=llm_kwargs)
        if on_cpu:
            _give_torch_the_spare_cores(torch_threads, llm_kwargs.get("tensor_parallel_size", 1))
        torch_dtype = TORCH_DTYPES[head_dtype] if head_dtype else self.llm.model_config.dtype
        self.head = head_from_checkpoint(model, revision=revision, trust_remote_code=trust_remote_code,
                                         dtype=torch_dtype, device=self.device)
        if self.head.width != self.logits_width:
            self.close()
            raise ConfigError(
                f"the head loaded from {model!r} is {self.head.width} wide but vLLM's model is {self.logits_width}"
            )

    def _call(self, prompts: list[dict]):
        return self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)

    def _targets(self, outputs, checked, seeds) -> list[dict[str, np.ndarray]]:
        hidden = []
        for (ids, pos), out in zip(checked, outputs):
            data = out.outputs.data
            if data.shape[0] != len(ids):
                raise RuntimeError(f"vLLM returned {data.shape[0]} hidden states for a {len(ids)}-token prompt")
            hidden.append(data[torch.from_numpy(pos)])
        next_ids, row_seeds = gather_inputs(checked, seeds, self.targets)
        rows, self.fused_kernel = targets_or_fallback(
            torch.cat(hidden).to(self.device), self.head, next_ids, self.targets, seeds=row_seeds,
            chunk_rows=self.head_chunk_rows, fused=self.fused_head, fused_kernel=self.fused_kernel)
        return split_rows(rows, [len(pos) for _, pos in checked])

    def close(self) -> None:
        """Shut down vLLM's engine process and drop the head."""
        super().close()
        self.head = None


def _give_torch_the_spare_cores(torch_threads: int | None, tensor_parallel: int) -> None:
    """Set this process's torch threads to the cores vLLM's CPU worker leaves (see `torch_threads`)."""
    if torch_threads == 0:
        return
    if torch_threads is None:
        if os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
            return  # the user placed the worker; we cannot tell what is left
        reserved = os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU")
        torch_threads = int(reserved) if reserved else tensor_parallel
    torch.set_num_threads(max(1, min(torch_threads, os.cpu_count() or 1)))


def pooling_gpu_memory_utilization(total_bytes: int, *, vocab: int, hidden: int, head_bytes: int = 2,
                                   rows: int = 4096, tile: int = 16384, vllm_share: float = 0.9) -> float:
    """vLLM's `gpu_memory_utilization` for the pooling path, with our head's memory taken out.

    vLLM reserves `gpu_memory_utilization` of the card up front (0.9 by default). The pooling
    path's head lives in this process on the same card: its weight (V x H) and the fused top-K's
    working set, a (rows x tile) block of logits in the head's dtype and its fp32 copy (the exp
    runs in place; `fused_topk.default_tiles` on CUDA), plus a (rows x H) block of hidden states.

    Args:
        total_bytes: The card's memory (`torch.cuda.mem_get_info()[1]`).
        vocab: Logits width V.
        hidden: Hidden size H.
        head_bytes: Bytes per element of the head's weight (2 for bf16).
        rows, tile: The fused top-K's rows per chunk and ids per tile.
        vllm_share: What vLLM would take without us.

    Returns:
        The fraction to pass to vLLM.

    Raises:
        ConfigError: the head leaves vLLM less than a tenth of the card.
    """
    tile = min(tile, vocab)
    head = vocab * hidden * head_bytes
    work = rows * tile * (head_bytes + 4) + rows * hidden * (head_bytes + 4)
    share = vllm_share - (head + work) / total_bytes
    if share < 0.1:
        raise ConfigError(
            f"the pooling path's head needs {(head + work) / _GiB:.1f} GiB next to vLLM on a "
            f"{total_bytes / _GiB:.1f} GiB card, leaving vLLM {share:.2f} of it; use vllm_path='logprobs' "
            "or pass gpu_memory_utilization yourself"
        )
    return share


def _config_head_shape(model: str, revision: str | None, trust_remote_code: bool) -> tuple[int, int]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    text = config.get_text_config()
    return int(text.vocab_size), int(text.hidden_size)
