"""Teacher engines: token sequences in, sparse teacher targets out.

    engine = build_engine("hf", "/path/to/teacher", mode="topk", k=32)
    [targets] = engine.run([Request(token_ids=ids, positions=np.arange(len(ids) - 1))])
    engine.close()

`hf` runs transformers (CPU or CUDA); `vllm` runs vLLM (see `vllm_engine` for its two paths). Every
engine is given the same `Targets` (what to keep per position) and the common arguments below.
Engine modules are imported on demand: importing vLLM is slow and starts nothing useful for
the hf engine.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect

from logitcache.stages.precompute.engine_registry import ENGINE_NAMES, ENGINES
from logitcache.stages.precompute.engines.base import Engine, Request, run_ahead
from logitcache.stages.precompute.targets import Targets
from logitcache.storage.errors import ConfigError

__all__ = ["Engine", "Request", "build_engine", "default_engine_name", "run_ahead", "ENGINE_NAMES"]


def build_engine(
    name: str,
    model: str,
    *,
    mode: str = "topk",
    k: int = 32,
    num_samples: int = 64,
    temperature: float = 1.0,
    dtype: str = "auto",
    device: str | None = None,
    max_batch_tokens: int | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    **engine_kwargs,
) -> Engine:
    """Start a teacher engine.

    Args:
        name: "hf" or "vllm".
        model: Local model directory or hub id.
        mode: "topk" or "sample" (RS-KD).
        k: Ids kept per position in topk mode.
        num_samples: Draws per position in sample mode.
        temperature: Sampling temperature (sample mode only; topk log-probs are at 1).
        dtype: "auto", "float32", "bfloat16" or "float16".
        device: Where the hf engine (or the vllm pooling path's head) runs; default CUDA if any.
        max_batch_tokens: Tokens per forward pass (hf: padded batch; vllm:
            `max_num_batched_tokens`).
        trust_remote_code: Allow the checkpoint's own modelling code.
        revision: Hub revision.
        **engine_kwargs: Engine-specific options, e.g. `vllm_path`, `max_model_len`,
            `head_chunk_rows`; see `HFEngine`, `VLLMPoolingEngine` and `VLLMLogprobsEngine`.

    Raises:
        ConfigError: unknown engine name, bad target settings, or an option the engine lacks.
    """
    targets = Targets(mode=mode, width=k if mode == "topk" else num_samples, temperature=temperature)
    common = dict(
        targets=targets,
        dtype=dtype,
        device=device,
        max_batch_tokens=max_batch_tokens,
        trust_remote_code=trust_remote_code,
        revision=revision,
    )
    if name not in ENGINES:
        raise ConfigError(f"engine {name!r}; expected one of {tuple(ENGINES)}")
    module, _, attr = ENGINES[name][0].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        if unknown := sorted(set(engine_kwargs) - set(params)):
            known = sorted(set(params) - set(common) - {"model"})
            raise ConfigError(f"engine {name!r} has no option(s) {unknown}; it takes {known}")
    return cls(model, **common, **engine_kwargs)


def default_engine_name() -> str:
    """ "vllm" where vLLM is installed and a CUDA GPU is present, else "hf"."""
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "hf"
