"""Value encodings for the cached log-probabilities.

- ``lossless``: float32, exactly what the engine computed.
- ``float16``: half precision (about 3 significant digits).
- ``compact``: log-probs quantized to multiples of ``COMPACT_STEP`` nats (max error ``COMPACT_STEP/2``
  = 0.0156 nats), stored as int16 *deltas along the K axis*: ``q = round(-logprob / step)``,
  ``stored[:, 0] = q[:, 0]``, ``stored[:, j] = q[:, j] - q[:, j-1]``. Top-K rows are sorted descending,
  so deltas are small non-negative integers that byte-shuffle + zstd squeeze to well under a byte.
  Decoding is ``-cumsum(stored, axis=1) * step`` and needs nothing but numpy.

Per-position scalars: ``target_logprob`` is float32 in ``lossless`` and float16 otherwise; ``tail_mass``
is float32 in every encoding. A fine-tuned teacher's tail is often below float16's smallest subnormal
(6e-8; values under about 3e-8 round to 0), and the losses take logs of it, so half precision there
would turn a small tail into none. Caches written before this stored it as float16 and still read.
"""

import numpy as np

from logitcache.storage.errors import ConfigError

__all__ = ["ENCODINGS", "COMPACT_STEP", "encode_logprobs", "decode_logprobs", "scalar_dtype", "TAIL_MASS_DTYPE",
           "check_encoding"]

ENCODINGS = ("lossless", "float16", "compact")
COMPACT_STEP = 1.0 / 32.0  # a power of two: -q * step is exact in float32, so re-encoding is lossless
_Q_MAX = 32767  # int16 range: log-probs below -1024 nats are clipped to -1024


def check_encoding(encoding: str) -> str:
    if encoding not in ENCODINGS:
        raise ConfigError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    return encoding


def encode_logprobs(logprobs: np.ndarray, encoding: str) -> np.ndarray:
    """Encode (P, K) float log-probs for storage. Returns float32, float16 or int16 (P, K)."""
    check_encoding(encoding)
    if encoding == "lossless":
        return np.ascontiguousarray(logprobs, dtype=np.float32)
    if encoding == "float16":
        return np.ascontiguousarray(logprobs, dtype=np.float16)
    q = np.clip(np.rint(-np.asarray(logprobs, dtype=np.float64) / COMPACT_STEP), 0, _Q_MAX).astype(np.int32)
    deltas = np.diff(q, axis=1, prepend=0)
    return deltas.astype(np.int16)


def decode_logprobs(stored: np.ndarray, encoding: str) -> np.ndarray:
    """Inverse of `encode_logprobs`: (P, K) float32 log-probs."""
    check_encoding(encoding)
    if encoding == "compact":
        q = np.cumsum(stored, axis=1, dtype=np.int32)
        return (q.astype(np.float32) * np.float32(-COMPACT_STEP)).astype(np.float32)
    return np.asarray(stored, dtype=np.float32)


# Storage dtype of `tail_mass` in every encoding (see the module docstring).
TAIL_MASS_DTYPE = np.dtype(np.float32)


def scalar_dtype(encoding: str) -> np.dtype:
    """Storage dtype of `target_logprob` (`tail_mass` is always `TAIL_MASS_DTYPE`)."""
    check_encoding(encoding)
    return np.dtype(np.float32) if encoding == "lossless" else np.dtype(np.float16)
