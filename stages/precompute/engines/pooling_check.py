"""The vLLM pooling path checks its own head against vLLM's logits before a job writes anything.

The pooling path applies a standalone LM head rebuilt from the checkpoint (`storage.head`), whose
logit transforms come from a per-family table. vLLM's model code applies its own: its Llama, for
one, multiplies the logits by a config's `logit_scale`, which the table honours for Cohere only
(transformers' Llama ignores it). A family whose logits vLLM transforms in a way the table does not
know would silently write a cache that is not the teacher vLLM serves. So every pooling engine,
once at start-up, computes the top-K of a few probe sequences both ways, our head on vLLM's hidden
states and vLLM's own `prompt_logprobs`, and refuses to start if they disagree beyond bf16 noise.

The reference needs vLLM's generate runner, a second engine; only one may run at a time, so it
runs first, over the probe sequences, and is shut down before the pooling engine starts. That is
why the probes are fixed text in the teacher's own tokenizer (`probe_token_ids`), not the job's
first batch, which the engine has not seen when it starts.

Tolerance: both sides compute bf16 logits from the same bf16 hidden states (the pooling runner's
and the generate runner's may differ in the last bit, batch shapes differ). A log-prob is
logit - logsumexp, each rounded at bf16's relative 2^-8, so the allowed difference per entry is
`ATOL + RTOL * |log-prob|`. A missing scale of 1.1 moves a log-prob of -5 by about 0.5.
"""

from __future__ import annotations

import numpy as np

from logitcache.storage.errors import ConfigError

__all__ = ["probe_token_ids", "compare_topk", "PROBE_K", "ATOL", "RTOL"]

PROBE_K = 16  # ids per probe row compared; enough to see a scale, cheap for prompt_logprobs
ATOL = 0.1  # nats; bf16 logits at |logit| ~ 8 are 1/32 apart, and both sides round them
RTOL = 0.02  # per nat of |log-prob|: ~4 bf16 ulps of the logit and of the logsumexp

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


def compare_topk(ours: list[dict[str, np.ndarray]], reference: list[dict[str, np.ndarray]], *, model: str) -> float:
    """Check the pooling path's top-K rows against vLLM's `prompt_logprobs` rows.

    Compared per row: the sorted top-K log-probs elementwise (robust to ties between ids) and the
    actual next token's log-prob, each within `ATOL + RTOL * |log-prob|`.

    Args:
        ours, reference: One dict per probe sequence with `topk_logprobs` (P, K) float32 and
            `target_logprob` (P,) float32, the same positions in both.
        model: Named in the error.

    Returns:
        The largest difference seen, in nats.

    Raises:
        ConfigError: naming the largest difference, where it was, and what to do.
    """
    worst, where = 0.0, None
    for s, (a, b) in enumerate(zip(ours, reference)):
        for name in ("topk_logprobs", "target_logprob"):
            x, y = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
            if x.shape != y.shape:
                raise ConfigError(f"pooling-path check of {model!r}: {name} shapes differ, {x.shape} vs {y.shape}")
            excess = np.abs(x - y) - (ATOL + RTOL * np.abs(y))
            if excess.size and excess.max() > 0 and (where is None or excess.max() > where[0]):
                i = np.unravel_index(int(excess.argmax()), excess.shape)
                where = (excess.max(), s, name, i[0], float(x[i]), float(y[i]))
            if x.size:
                worst = max(worst, float(np.abs(x - y).max()))
    if where is not None:
        _, s, name, row, x, y = where
        raise ConfigError(
            f"the vLLM pooling path's LM head for {model!r} disagrees with vLLM's own logits: probe sequence {s}, "
            f"position {row}, {name} {x:.4f} (our head on vLLM's hidden states) vs {y:.4f} (vLLM's prompt_logprobs), "
            f"beyond bf16 noise ({ATOL} + {RTOL} x |log-prob|). vLLM transforms this model's logits in a way "
            "logitcache's head table (storage/head.py) does not know (for example a config `logit_scale` that "
            "vLLM's model applies); nothing was written. Use vllm_path='logprobs', whose log-probs are vLLM's own."
        )
    return worst
