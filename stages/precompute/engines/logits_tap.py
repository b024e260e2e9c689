"""A vLLM worker extension that records what vLLM's own logits step is given and gives back.

vLLM's model runner turns final hidden states into logits with `model.compute_logits`: the
model's `lm_head` and its `LogitsProcessor` (any `logit_scale`, softcap, vocabulary trim). The
pooling path's head check (`pooling_check`) needs exactly that pair, the same hidden states on
both sides, so it loads this class into a generate-runner engine's worker
(`LLM(worker_extension_cls=LOGITS_TAP)`) and calls its methods by name (`LLM.collective_rpc`):
nothing is pickled, and the worker's forward is untouched.

This module is imported inside vLLM's worker process: it imports nothing heavy at module level.
"""

from __future__ import annotations

__all__ = ["LogitsTap", "LOGITS_TAP", "tap_result"]

LOGITS_TAP = f"{__name__}.LogitsTap"


class LogitsTap:
    """Mixed into vLLM's worker class; the method names are prefixed to avoid clashing with it."""

    def logitcache_tap_start(self, max_rows: int) -> None:
        """Record up to `max_rows` (hidden state, logits) rows of later `compute_logits` calls."""
        model = self.model_runner.model
        original = model.compute_logits
        rows: list = []

        def tapped(hidden_states, *args, **kwargs):
            logits = original(hidden_states, *args, **kwargs)
            room = max_rows - sum(len(h) for h, _ in rows)
            if logits is not None and room > 0:
                rows.append((hidden_states[:room].float().cpu(), logits[:room].float().cpu()))
            return logits

        model.compute_logits = tapped  # an instance attribute: shadows the method, undone below
        self._logitcache_tap = (model, rows)

    def logitcache_tap_stop(self) -> list[tuple[bytes, list[int]]]:
        """Stop recording; [(hidden (n, H)), (logits (n, V))] as (float32 bytes, shape) pairs.

        float32 holds bf16 and fp16 values exactly, so the caller recovers vLLM's own numbers;
        raw bytes, because vLLM's RPC reply decodes no arrays (`tap_result` rebuilds them).
        """
        import torch

        model, rows = self._logitcache_tap
        del model.compute_logits
        del self._logitcache_tap
        parts = [torch.cat(part) for part in zip(*rows)] if rows else [torch.zeros(0, 0)] * 2
        return [(t.numpy().tobytes(), list(t.shape)) for t in parts]


def tap_result(reply) -> tuple:
    """(hidden, logits) float32 numpy arrays from one worker's `logitcache_tap_stop` reply."""
    import numpy as np

    return tuple(np.frombuffer(data, np.float32).reshape(shape).copy() for data, shape in reply)
