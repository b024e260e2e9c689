"""The vLLM pooling path checks its own head against vLLM's logits step before a job writes anything.

The pooling path applies a standalone LM head rebuilt from the checkpoint (`storage.head`), whose
logit transforms come from a per-family table. vLLM's model code applies its own: its Llama, for
one, multiplies the logits by a config's `logit_scale`, which the table honours for Cohere only
(transformers' Llama ignores it). A family whose logits vLLM transforms in a way the table does not
know would silently write a cache that is not the teacher vLLM serves.

So the check asks one question: does our head turn vLLM's hidden states into the logits vLLM's
model would? A short-lived generate-runner engine runs a few probe sequences (fixed text in the
teacher's own tokenizer, `probe_token_ids`) with `prompt_logprobs`, which makes vLLM's runner call
its logits step (`model.compute_logits`: the model's `lm_head` and `LogitsProcessor`) on every
prompt position. A worker extension (`logits_tap`) records that step's input hidden states and
output logits. Once the pooling engine has loaded our head, `compare_logits` applies it to the
*same* hidden states and compares logits. That engine runs first and is shut down before the
pooling engine starts (one vLLM engine at a time).

Why not compare against vLLM's `prompt_logprobs` from the pooling runner's hidden states (this
check's first form): the two engines' forward passes differ by bf16 drift through the layers
(different batch shapes, eager against compiled), which grows with depth and with the size of the
logits. On the full demo's trained teacher it reached 0.38 nats at a log-prob of -1.7 and refused a
correct head, while our head on vLLM's hidden states was 0.02 nats from an fp32 forward.

Tolerance, with the same hidden states on both sides: each side rounds its logits to the head's
dtype (bf16: a relative 2^-9) and again after any scale or softcap, so an entry may differ by
`RTOL * |logit|` (RTOL = 2^-6, twice the sum of those roundings). The matmul's own rounding scales
with its products, not with their sum: vLLM's CPU kernel may round partial sums to bf16, so a
logit near zero made of large products of opposite signs can differ by a few bf16 steps of
`sum_j |w_ij h_j|` (seen: 0.010 at a logit of -0.025 on a random 152k-vocabulary teacher). Hence
`ATOL_DOT * (|h| @ |W|^T)` on top (ATOL_DOT = 2^-7). The bound scales with the logits, so the large
logits of a trained teacher pass; a missing scale of 1.1 moves every logit by 9 % of its size,
which the row's largest logits exceed many times over.

A caller that already runs a logprobs engine of the same teacher passes what that engine records
instead (`reference=`, from `head_check_reference`), and no reference engine starts. On CPU the
reference engine's scheduler runs in this process, its worker in its own, which saves one of the two
spawned processes (each imports torch and vLLM).
"""

from __future__ import annotations

import contextlib
import copy
import os

import numpy as np

from logitcache.stages.precompute.engines.base import Request
from logitcache.stages.precompute.engines.logits_tap import tap_result
from logitcache.stages.precompute.engines.vllm_logprobs import VLLMLogprobsEngine
from logitcache.stages.precompute.targets import Targets
from logitcache.storage.errors import ConfigError

__all__ = ["checked_head", "head_check_reference", "probe_token_ids", "compare_logits", "PROBE_ROWS", "RTOL",
           "ATOL_DOT"]

PROBE_ROWS = 64  # probe positions whose full logits rows come back from vLLM's worker (64 x V fp32)
RTOL = 2.0 ** -6  # per unit of |logit|: two roundings to bf16 on each side, doubled
ATOL_DOT = 2.0 ** -7  # per unit of sum_j |w_ij h_j|: the matmul's accumulation rounding

_PROBE_TEXTS = (
    "The committee met on Tuesday to review the budget. After a long discussion, they agreed to "
    "postpone the decision until the auditors had finished their report, which was due in March.",
    "def mean(values):\n    \"\"\"Return the arithmetic mean of a non-empty list.\"\"\"\n"
    "    if not values:\n        raise ValueError('mean of an empty list')\n    return sum(values) / len(values)\n",
    "Q: How many minutes are there in a week?\nA: A day has 24 hours of 60 minutes, so 1440 minutes; "
    "a week has 7 days, so 7 x 1440 = 10080 minutes.",
)


def probe_token_ids(model: str, *, revision: str | None, trust_remote_code: bool, width: int,
                    max_tokens: int) -> list[list[int]]:
    """A few short sequences in the teacher's tokenizer (prose, code, arithmetic).

    Args:
        model: Model directory or hub id (its tokenizer is read; the pooling runner needs it too).
        revision, trust_remote_code: As for the model.
        width: The logits width; ids at or beyond it are dropped.
        max_tokens: Longest probe (the reference engine's request limit).

    Returns:
        Token id lists of length >= 2, at most `max_tokens` each.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    probes = []
    for text in _PROBE_TEXTS:
        ids = [i for i in tok(text)["input_ids"] if i < width][:max_tokens]
        if len(ids) >= 2:
            probes.append(ids)
    if not probes:  # a tokenizer that yields almost nothing for English: fixed ids instead
        probes = [np.random.default_rng(0).integers(0, width, min(64, max_tokens)).tolist()]
    return probes


def compare_logits(head, hidden: np.ndarray, logits: np.ndarray, *, model: str, chunk_rows: int = 32) -> float:
    """Check our head against vLLM's logits step on the same hidden states.

    Args:
        head: Our `LMHead` (its dtype and device are the job's).
        hidden: (n, H) float32, the hidden states vLLM's logits step was given (`logits_tap`).
        logits: (n, V) float32, what it returned.
        model: Named in the error.
        chunk_rows: Rows per head call.

    Returns:
        The largest difference between the two sides' logits (nats).

    Raises:
        ConfigError: a shape that differs, or an entry beyond the tolerance (naming the worst one).
    """
    import torch

    if len(hidden) == 0 or hidden.shape[0] != logits.shape[0] or logits.shape[1] != head.width:
        raise ConfigError(f"pooling-path check of {model!r}: vLLM's logits step gave hidden states {hidden.shape} "
                          f"and logits {logits.shape}; expected matching rows {head.width} wide")
    worst, where = 0.0, None
    for lo in range(0, len(hidden), chunk_rows):
        h = torch.from_numpy(hidden[lo:lo + chunk_rows])
        want = torch.from_numpy(logits[lo:lo + chunk_rows]).double()
        ours = head(h).double().cpu()
        h_abs = h.float().abs() * abs(head.hidden_scale)
        products = torch.cat([torch.nn.functional.linear(h_abs, head.weight[v:v + 16384].float().abs().cpu())
                              for v in range(0, head.width, 16384)], dim=1).double()  # vocabulary tiles: bounded memory
        diff = (ours - want).abs()
        excess = diff - (RTOL * want.abs() + ATOL_DOT * abs(head.logit_scale) * products)
        worst = max(worst, float(diff.max()))
        top = float(excess.max())
        if top > 0 and (where is None or top > where[0]):
            row, col = divmod(int(excess.argmax()), excess.shape[1])
            where = (top, lo + row, col, float(ours[row, col]), float(want[row, col]))
    if where is not None:
        _, row, col, x, y = where
        raise ConfigError(
            f"the vLLM pooling path's LM head for {model!r} disagrees with vLLM's own logits step on the same hidden "
            f"states: probe position {row}, id {col}, logit {x:.4f} (our head) vs {y:.4f} (vLLM's lm_head and logits "
            f"processor), beyond bf16 rounding ({RTOL:g} x |logit| + {ATOL_DOT:g} x sum |w h|). vLLM "
            "transforms this model's logits in a way logitcache's head table (storage/head.py) does not know (for "
            "example a config `logit_scale` that vLLM's model applies); nothing was written. Use "
            "vllm_path='logprobs', whose log-probs are vLLM's own."
        )
    return worst


def checked_head(model: str, reference: tuple[np.ndarray, np.ndarray] | None, **engine_kwargs) -> float:
    """The check, before the pooling engine starts (so a refusal costs no second engine).

    Our head is an fp32 copy: only the transform is in question; the job's own head differs from it
    by its dtype's rounding, which `compare_logits` allows for.

    Args:
        model: The teacher.
        reference: `(hidden, logits)` from `head_check_reference`, or None to start a logprobs engine
            for it (`reference_logits`) with `engine_kwargs` (the pooling engine's dtype, revision,
            trust_remote_code, max_batch_tokens, max_model_len and vLLM arguments).

    Returns:
        The largest logit difference (nats).

    Raises:
        ConfigError: the head disagrees with vLLM's logits step (`compare_logits`).
    """
    import torch

    from logitcache.storage.head import head_from_checkpoint

    if reference is None:
        reference = reference_logits(model, **engine_kwargs)
    head = head_from_checkpoint(model, revision=engine_kwargs.get("revision"),
                                trust_remote_code=engine_kwargs.get("trust_remote_code", False),
                                dtype=torch.float32, device="cpu")
    return compare_logits(head, *reference, model=model)


def reference_logits(model: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's side of the check (see `head_check_reference`), from a logprobs engine started for it and closed."""
    # Three short probes, once: compiling the graph (vLLM's default) would cost more than running
    # them, and the logits step is the same code either way.
    kwargs.setdefault("enforce_eager", True)
    with _engine_core_in_this_process(kwargs):
        engine = VLLMLogprobsEngine(model, targets=Targets(width=1), **kwargs)
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
    on CPU"). The worker keeps its own process (`distributed_executor_backend="mp"`), where vLLM
    binds its OpenMP threads.

    An EngineCore in this process leaves two things behind, both undone on exit: it freezes
    vLLM's environment variables (`vllm.envs.enable_envs_cache`), with multiprocessing off, which
    would put the next engine's scheduler here too; and it sets torch to one thread.
    """
    import torch
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


def head_check_reference(engine: VLLMLogprobsEngine, model: str, *, revision: str | None = None,
                         trust_remote_code: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's side of the check, from a running logprobs engine.

    Runs the probe sequences with prompt log-probs, so that vLLM's runner applies its logits step
    to every probe position, and records that step's inputs and outputs in vLLM's worker
    (`logits_tap`). What a pooling engine computes before it starts, for a caller that already runs
    a logprobs engine of the same teacher and passes the result as `reference=` instead of starting
    a third engine.

    Args:
        engine: A `VLLMLogprobsEngine` of `model` (built with the `logits_tap` extension, as it is
            unless `worker_extension_cls` was overridden).
        model, revision, trust_remote_code: The teacher (its tokenizer makes the probes).

    Returns:
        (hidden (n, H), logits (n, V)), float32, n <= PROBE_ROWS.
    """
    if engine.path != "logprobs":
        raise ConfigError(f"the head check's reference comes from a logprobs-path engine, not {engine.path!r}")
    probing = copy.copy(engine)
    probing.targets = Targets(width=1)
    probes = probe_token_ids(model, revision=revision, width=engine.logits_width,
                             trust_remote_code=trust_remote_code, max_tokens=min(128, engine.max_request_tokens))
    engine.llm.collective_rpc("logitcache_tap_start", args=(PROBE_ROWS,))
    try:
        probing.run([Request(token_ids=ids, positions=np.arange(len(ids) - 1)) for ids in probes])
    finally:
        reply = engine.llm.collective_rpc("logitcache_tap_stop")[0]
    return tap_result(reply)
