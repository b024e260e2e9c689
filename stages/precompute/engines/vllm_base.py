"""What both vLLM engines share: vLLM's arguments, the slab feeder that keeps vLLM busy, and shutting down.

Requests go to vLLM as token ids (`{"prompt_token_ids": ...}`), never re-tokenized, in slabs of
about `slab_tokens` tokens so that what vLLM returns stays bounded. One feeder thread hands slabs
to vLLM in order across `run`/`submit` calls, at most `AHEAD_SLABS` ahead of this process: with
`engines.run_ahead` (what stage one's shard loop uses) vLLM computes batch i+1 while this process
makes batch i's targets.

Memory defaults on CPU: unless `VLLM_CPU_KVCACHE_SPACE` is set or `kv_cache_memory_bytes` is
passed, the KV cache gets min(4 GiB, available memory / 4) (vLLM's own CPU default asks for 92%
of the machine), and `max_model_len` defaults to `max_batch_tokens`. Prefill-only work needs KV
room for about one scheduled batch, not a serving-sized pool.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from logitcache.stages.precompute.engines.base import Request, check_requests
from logitcache.stages.precompute.targets import Targets
from logitcache.storage.errors import ConfigError, InvalidDataError

__all__ = ["VLLMEngineBase", "Pending", "vllm_args", "token_slabs", "AHEAD_SLABS"]

AHEAD_SLABS = 3  # slabs whose outputs may wait for this process (bounds host memory)
_GiB = 1 << 30


def vllm_args(model: str, *, dtype: str, revision: str | None, trust_remote_code: bool, batch_tokens: int,
              max_model_len: int | None, on_cpu: bool, path_args: dict, user_args: dict) -> dict:
    """The keyword arguments of `vllm.LLM`: ours, then the path's, then the user's (`--engine-arg`), which win.

    Args:
        batch_tokens: vLLM's `max_num_batched_tokens`.
        max_model_len: The longest request; None: `batch_tokens` on CPU (capped by the model), vLLM's
            choice on GPU.
        on_cpu: vLLM runs on CPU (its KV cache is sized here, see the module docstring).
        path_args: What the pooling or logprobs path needs (its runner, ...).
        user_args: `--engine-arg`s that are not ours (`tensor_parallel_size`, `quantization`, ...);
            a dict `hf_overrides` is merged into the path's.
    """
    args = dict(
        model=model,
        dtype=dtype,
        revision=revision,
        trust_remote_code=trust_remote_code,
        max_num_batched_tokens=batch_tokens,
        # Each sequence is seen once: a prefix cache only costs hashing (and would let a
        # repeated prompt skip the very prefill whose outputs we want).
        enable_prefix_caching=False,
    )
    if on_cpu:
        args["max_model_len"] = max_model_len or min(batch_tokens, _config_max_len(model, revision, trust_remote_code))
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            import psutil

            args["kv_cache_memory_bytes"] = int(min(4 * _GiB, psutil.virtual_memory().available / 4))
    elif max_model_len:
        args["max_model_len"] = max_model_len
    args.update(path_args)
    user_args = dict(user_args)
    if isinstance(user_args.get("hf_overrides"), dict) and isinstance(args.get("hf_overrides"), dict):
        user_args["hf_overrides"] = {**args["hf_overrides"], **user_args["hf_overrides"]}
    args.update(user_args)
    return args


class VLLMEngineBase:
    """A running `vllm.LLM` fed in slabs; a subclass says how a slab runs (`_call`) and what its
    outputs become (`_targets`).

    Attributes:
        path: "pooling" or "logprobs".
        generated: tokens a request generates after its prompt (vLLM counts them against max_model_len).
        llm_args: the keyword arguments `vllm.LLM` was started with (`vllm_args`).
    """

    name = "vllm"
    path: str
    generated = 0

    def _start(self, model: str, targets: Targets, *, dtype: str, revision: str | None, trust_remote_code: bool,
               max_batch_tokens: int | None, max_model_len: int | None, slab_tokens: int | None, path_args: dict,
               user_args: dict) -> None:
        """Start vLLM (see `vllm_args`) and the feeder.

        Raises:
            ConfigError: vLLM refused its arguments (a misspelled or unsupported `--engine-arg`), or
                the targets' K exceeds the model's logits width.
        """
        import vllm
        from vllm.platforms import current_platform

        self.version = vllm.__version__
        self.targets = targets
        batch_tokens = max_batch_tokens or 8192
        # Small enough that sparsifying one slab overlaps computing the next, large enough that
        # the partly filled last step of each slab costs little.
        self.slab_tokens = slab_tokens or 4 * batch_tokens
        self.llm_args = vllm_args(model, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                                  batch_tokens=batch_tokens, max_model_len=max_model_len,
                                  on_cpu=current_platform.is_cpu(), path_args=path_args, user_args=user_args)
        try:
            self.llm = vllm.LLM(**self.llm_args)
        except (TypeError, ValueError) as e:  # vLLM's checks of its arguments (pydantic's are ValueErrors)
            given = f" (--engine-arg {_user_facing(user_args)})" if user_args else ""
            raise ConfigError(f"vLLM refused its settings{given}: {' '.join(str(e).split())}") from e
        # One thread hands slabs to vLLM in order, across run()/submit() calls (see `submit`).
        self._feeder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-feeder")
        self._room = threading.Semaphore(AHEAD_SLABS)
        self._closing = False
        self.max_request_tokens = self.llm.model_config.max_model_len - self.generated
        self.logits_width = self.llm.model_config.get_vocab_size()
        if targets.mode == "topk" and targets.width > self.logits_width:
            self.close()
            raise ConfigError(f"k={targets.width} exceeds the logits width {self.logits_width} of {model!r}")

    def run(self, requests: list[Request]) -> list[dict[str, np.ndarray]]:
        """Sparse targets for each request (see `Engine.run`)."""
        return self.submit(requests).result()

    def submit(self, requests: list[Request]) -> "Pending":
        """Hand requests to vLLM now; their targets are made when `.result()` is called.

        vLLM works through submitted slabs in order, in its own process, while this one makes
        the targets of earlier ones: a caller that submits batch i+1 before collecting batch i
        keeps vLLM busy across batches and shards (`engines.run_ahead`). At most
        `AHEAD_SLABS` slabs of outputs wait in memory; every `Pending` must be collected, in
        submission order.

        Raises:
            InvalidDataError: a bad request or one longer than `max_request_tokens`, before
                anything is submitted.
        """
        checked = check_requests(requests, self.logits_width)
        for i, (ids, _) in enumerate(checked):
            if len(ids) > self.max_request_tokens:
                raise InvalidDataError(
                    f"request {i} has {len(ids)} tokens; this engine takes at most {self.max_request_tokens} "
                    f"(max_model_len={self.llm.model_config.max_model_len}); build it with a larger max_model_len"
                    + ("; the logprobs path counts one generated token, so a request as long as the model's "
                       "context needs vllm_path=pooling" if self.generated else "")
                )
        slabs = token_slabs([len(ids) for ids, _ in checked], self.slab_tokens)
        futures = [(slab, self._feeder.submit(self._bounded, [checked[i][0] for i in slab])) for slab in slabs]
        return Pending(lambda: self._collect(requests, checked, futures))

    def _bounded(self, token_ids):
        # Runs on the feeder thread: wait for room, so outputs never pile up unboundedly.
        while not self._room.acquire(timeout=0.5):
            if self._closing:
                raise RuntimeError("the vLLM engine was closed with requests still submitted")
        try:
            return self._call([{"prompt_token_ids": ids.tolist()} for ids in token_ids])
        except BaseException:
            self._room.release()
            raise

    def _collect(self, requests, checked, futures) -> list[dict[str, np.ndarray]]:
        results: list[dict[str, np.ndarray]] = []
        for n, (slab, future) in enumerate(futures):
            try:
                outputs = future.result()
            except BaseException:
                for _, rest in futures[n + 1:]:  # let the feeder drain: they were submitted
                    rest.add_done_callback(lambda f: f.exception() is None and self._room.release())
                raise
            self._room.release()
            results += self._targets(outputs, [checked[i] for i in slab], [requests[i].seed for i in slab])
        return results

    def _call(self, prompts: list[dict]):
        """vLLM's outputs for one slab of prompts (on the feeder thread)."""
        raise NotImplementedError

    def _targets(self, outputs, checked, seeds) -> list[dict[str, np.ndarray]]:
        """One dict of `sparsify` fields per request of a slab, from vLLM's outputs."""
        raise NotImplementedError

    def close(self) -> None:
        """Shut down vLLM's engine process."""
        if getattr(self, "_feeder", None) is not None:
            self._closing = True
            self._feeder.shutdown(wait=True, cancel_futures=True)
        if getattr(self, "llm", None) is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


class Pending:
    """Targets of submitted requests, made on `result()` (see `VLLMEngineBase.submit`)."""

    def __init__(self, make):
        self._make = make

    def result(self) -> list[dict[str, np.ndarray]]:
        """One dict per request, as `Engine.run` returns them."""
        return self._make()


def token_slabs(lengths: list[int], slab_tokens: int) -> list[list[int]]:
    """Consecutive groups of request indices of about `slab_tokens` tokens each (at least one)."""
    slabs: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if slabs and total + n <= slab_tokens:
            slabs[-1].append(i)
            total += n
        else:
            slabs.append([i])
            total = n
    return slabs


def _user_facing(user_args: dict) -> str:
    from logitcache.storage.redact import is_credential_key

    return " ".join(f"{k}={'***' if is_credential_key(k) else v}" for k, v in user_args.items())


def _config_max_len(model: str, revision: str | None, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    text = config.get_text_config()
    return int(getattr(text, "max_position_embeddings", None) or 1 << 30)
