"""Synthetic sparse targets for tests: computed from random logits the way an engine computes them."""

import numpy as np

VOCAB = 600


def make_sequence(rng, row: int, length: int, k: int, vocab: int = VOCAB, *, sample: bool = False) -> dict:
    """One sequence's targets, computed from random logits the way an engine would."""
    logits = rng.standard_normal((length, vocab)) * 3.0
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    input_ids = rng.integers(0, vocab, length)
    positions = np.arange(1, length - 1)  # skip t=0 to exercise a non-trivial supervision mask
    rows = logp[positions]
    ids = np.argsort(-rows, axis=1)[:, :k]
    lp = np.take_along_axis(rows, ids, 1).astype(np.float32)
    seq = {
        "row_index": row, "input_ids": input_ids, "positions": positions, "topk_ids": ids, "topk_logprobs": lp,
        "target_logprob": rows[np.arange(len(positions)), input_ids[positions + 1]].astype(np.float32),
        "tail_mass": -np.expm1(np.logaddexp.reduce(lp, axis=1)).astype(np.float32),
        "prompt": f"prompt {row} ünïcode", "response": f"response {row}",
    }
    if sample:  # pad the last two slots as sample mode does when fewer unique ids were drawn
        seq["sample_counts"] = rng.integers(1, 5, ids.shape).astype(np.uint16)
        seq["topk_ids"] = ids.copy()
        seq["topk_ids"][:, -2:] = -1
        seq["sample_counts"][:, -2:] = 0
        seq["topk_logprobs"] = lp.copy()
        seq["topk_logprobs"][:, -2:] = 0.0
    return seq


TEXT_FIELDS = ("prompt", "response")


def metadata(k: int, mode: str = "topk", vocab: int = VOCAB) -> dict:
    return {
        "teacher": {"name_or_path": "tiny-teacher", "revision": None, "config_hash": "abc"},
        "tokenizer": {"fingerprint": "tok", "vocab_size": vocab - 8, "logits_width": vocab},
        "dataset": {"name": "synthetic", "fingerprint": "data"},
        "inputs": {"kind": "prompt_response", "columns": {"prompt": "prompt", "response": "response"},
                   "stored_fields": list(TEXT_FIELDS), "max_length": 64},
        "sparsification": {"mode": mode, "k": k, "temperature": 1.0},
        "engine": {"name": "synthetic", "version": "0"},
    }
