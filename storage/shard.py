"""`ShardData`: one shard in memory as flat columns, and its validation.

Sequences are ragged, so every per-token and per-position array is one flat array with an offsets
array beside it (the Arrow / CSR layout): sequence ``s`` owns ``input_ids[token_offsets[s]:token_offsets[s+1]]``
and position rows ``position_offsets[s]:position_offsets[s+1]``.

Alignment convention: the teacher row stored for position ``t`` is the distribution that predicts
token ``t + 1``, so every supervised ``t`` satisfies ``0 <= t < len(input_ids) - 1``.
"""

from dataclasses import dataclass, field

import numpy as np

from logitcache.storage.errors import InvalidDataError

__all__ = ["ShardData", "POSITION_FIELDS", "ARRAY_FIELDS"]

# Per-position columns (P rows). `sample_counts` exists only in sample mode, `sample_logz` only in
# sample-mode caches whose index says `sparsification.sample_logz: true` (see docs/FORMAT.md).
POSITION_FIELDS = ("topk_ids", "topk_logprobs", "target_logprob", "tail_mass", "sample_counts", "sample_logz")

# Each array's dtype in memory (the attributes of `ShardData`), whatever a backend stored.
_DTYPES = {"row_index": np.int64, "input_ids": np.int32, "token_offsets": np.int64, "positions": np.int32,
           "position_offsets": np.int64, "topk_ids": np.int32, "topk_logprobs": np.float32,
           "target_logprob": np.float32, "tail_mass": np.float32, "sample_counts": np.uint16,
           "sample_logz": np.float32}
ARRAY_FIELDS = tuple(_DTYPES)  # the array attributes, in ShardData's order
# Always copied (fresh, writable arrays), as both readers did before they shared this table.
_COPIED = ("row_index", "target_logprob", "tail_mass", "sample_counts", "sample_logz")


@dataclass
class ShardData:
    """A shard's decoded contents.

    Attributes:
        row_index: (S,) int64 row of the source dataset each sequence came from.
        input_ids: (T,) int32 teacher token ids of all sequences, concatenated.
        token_offsets: (S+1,) int64 offsets into `input_ids`.
        positions: (P,) int32 supervised positions t within their sequence (row t predicts t+1).
        position_offsets: (S+1,) int64 offsets into the position axis.
        topk_ids: (P, K) int32 teacher token ids, by log-prob descending; -1 pads sample mode.
        topk_logprobs: (P, K) float32 normalized teacher log-probs at `topk_ids`.
        target_logprob: (P,) float32 teacher log-prob of the actual next token.
        tail_mass: (P,) float32 probability outside the stored ids: 1 - sum(exp(topk_logprobs)).
        sample_counts: (P, K) uint16 draws per id in sample mode (0 at padding), else None.
        sample_logz: (P,) float32 log sum_j p_j^(1/tau), the normaliser of the distribution the ids
            were drawn from (sample mode; older sample caches lack it), else None.
        sample_temperature: tau, set by the reader from the index where `sample_logz` is stored; with
            both, `sequence()` also gives each stored id's draw log-probability (`sample_logprobs`).
        texts: source text fields, each a list of S strings (for re-tokenizing students).
    """

    row_index: np.ndarray
    input_ids: np.ndarray
    token_offsets: np.ndarray
    positions: np.ndarray
    position_offsets: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprob: np.ndarray
    tail_mass: np.ndarray
    sample_counts: np.ndarray | None = None
    sample_logz: np.ndarray | None = None
    sample_temperature: float | None = None
    texts: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        return len(self.token_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.token_offsets[-1])

    @property
    def num_positions(self) -> int:
        return int(self.position_offsets[-1])

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    def sequence(self, s: int) -> dict:
        """Sequence `s` as a dict of numpy views (no copies) plus its text fields."""
        t0, t1 = self.token_offsets[s], self.token_offsets[s + 1]
        p0, p1 = self.position_offsets[s], self.position_offsets[s + 1]
        item = {
            "row_index": int(self.row_index[s]),
            "input_ids": self.input_ids[t0:t1],
            "positions": self.positions[p0:p1],
            "topk_ids": self.topk_ids[p0:p1],
            "topk_logprobs": self.topk_logprobs[p0:p1],
            "target_logprob": self.target_logprob[p0:p1],
            "tail_mass": self.tail_mass[p0:p1],
        }
        if self.sample_counts is not None:
            item["sample_counts"] = self.sample_counts[p0:p1]
        if self.sample_logz is not None:
            item["sample_logz"] = self.sample_logz[p0:p1]
            if self.sample_temperature is not None:
                # The probability each stored id was drawn with: p^(1/tau) / Z, in log space; 0 at padding.
                lp, logz = self.topk_logprobs[p0:p1], self.sample_logz[p0:p1, None]
                item["sample_logprobs"] = np.where(self.topk_ids[p0:p1] >= 0, lp / self.sample_temperature - logz,
                                                   0.0).astype(np.float32)
        for name, values in self.texts.items():
            item[name] = values[s]
        return item

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], *, texts: dict[str, list[str]] | None = None) -> "ShardData":
        """A shard from its flat columns by name (as a backend stored them), each cast to its dtype.

        Args:
            arrays: every attribute's array but `texts`; `topk_logprobs` decoded already
                (`encoding.decode_logprobs`); `sample_counts` only in sample mode.
            texts: the text fields, each a list of S strings.
        """
        cast = {name: values.astype(_DTYPES[name], copy=name in _COPIED) for name, values in arrays.items()}
        return cls(**cast, texts=dict(texts or {}))

    @classmethod
    def from_sequences(cls, sequences: list[dict], *, text_fields: tuple[str, ...] = ()) -> "ShardData":
        """Pack per-sequence dicts (the keys of `sequence()`) into flat columns.

        Raises:
            InvalidDataError: a field is missing or shapes disagree, naming the sequence.
        """
        if not sequences:
            raise InvalidDataError("a shard needs at least one sequence")
        sample = "sample_counts" in sequences[0]
        for i, seq in enumerate(sequences):
            missing = [f for f in ("row_index", "input_ids", "positions", "topk_ids", "topk_logprobs",
                                   "target_logprob", "tail_mass", *text_fields) if f not in seq]
            if sample and "sample_counts" not in seq:
                missing.append("sample_counts")
            if missing:
                raise InvalidDataError(f"sequence {i}: missing field(s) {', '.join(missing)}")
            p = len(seq["positions"])
            for f in POSITION_FIELDS:
                if f in seq and len(seq[f]) != p:
                    raise InvalidDataError(
                        f"sequence {i} (row {seq['row_index']}): {f} has {len(seq[f])} rows, positions has {p}")

        def cat(name, ndim=1):
            parts = [np.asarray(s[name]) for s in sequences]
            if ndim == 2:
                widths = {p.shape[1] if p.ndim == 2 else -1 for p in parts}
                if len(widths) != 1 or -1 in widths:
                    raise InvalidDataError(f"{name}: every sequence needs a (P, K) array with the same K, got {widths}")
                return np.concatenate(parts).astype(_DTYPES[name], copy=False).reshape(-1, widths.pop())
            return np.concatenate([p.reshape(-1) for p in parts])

        lengths = np.array([len(s["input_ids"]) for s in sequences], dtype=np.int64)
        npos = np.array([len(s["positions"]) for s in sequences], dtype=np.int64)
        arrays = {
            "row_index": np.array([int(s["row_index"]) for s in sequences], dtype=np.int64),
            "input_ids": cat("input_ids"), "token_offsets": np.concatenate([[0], np.cumsum(lengths)]),
            "positions": cat("positions"), "position_offsets": np.concatenate([[0], np.cumsum(npos)]),
            "topk_ids": cat("topk_ids", 2), "topk_logprobs": cat("topk_logprobs", 2),
            "target_logprob": cat("target_logprob"), "tail_mass": cat("tail_mass"),
        }
        if sample:
            arrays["sample_counts"] = cat("sample_counts", 2)
            if "sample_logz" in sequences[0]:
                arrays["sample_logz"] = cat("sample_logz")
        return cls.from_arrays(arrays, texts={f: [str(s[f]) for s in sequences] for f in text_fields})

    def validate(self, *, vocab_size: int, where: str = "shard") -> None:
        """Check structure and values before anything is written.

        Raises:
            InvalidDataError: mismatched lengths, NaN/inf values, ids outside [0, vocab_size),
                positions that do not predict a token inside their sequence. Names `where` and the field.
        """
        # Zero sequences is valid: stage one writes such a shard when every row of its range was
        # skipped, so that shard ids stay a fixed function of row ranges.
        s = self.num_sequences
        if s < 0:
            raise InvalidDataError(f"{where}: token_offsets is empty; it needs S+1 entries")
        for name, off, n in (("token_offsets", self.token_offsets, len(self.input_ids)),
                             ("position_offsets", self.position_offsets, len(self.positions))):
            if len(off) != s + 1 or off[0] != 0 or off[-1] != n or np.any(np.diff(off) < 0):
                raise InvalidDataError(f"{where}: {name} is not a valid offsets array over {n} rows")
        if len(self.row_index) != s:
            raise InvalidDataError(f"{where}: row_index has {len(self.row_index)} entries for {s} sequences")
        p = len(self.positions)
        if self.topk_ids.ndim != 2 or self.topk_ids.shape[0] != p or self.topk_logprobs.shape != self.topk_ids.shape:
            raise InvalidDataError(f"{where}: topk_ids {self.topk_ids.shape} and topk_logprobs "
                                   f"{self.topk_logprobs.shape} must both be (P={p}, K)")
        for name in ("target_logprob", "tail_mass"):
            if getattr(self, name).shape != (p,):
                raise InvalidDataError(f"{where}: {name} has shape {getattr(self, name).shape}, expected ({p},)")
        if self.sample_counts is not None and self.sample_counts.shape != self.topk_ids.shape:
            raise InvalidDataError(f"{where}: sample_counts {self.sample_counts.shape} != topk_ids {self.topk_ids.shape}")
        if self.sample_logz is not None:
            if self.sample_counts is None:
                raise InvalidDataError(f"{where}: sample_logz belongs to sample mode; this shard has no sample_counts")
            if self.sample_logz.shape != (p,) or not np.all(np.isfinite(self.sample_logz)):
                raise InvalidDataError(f"{where}: sample_logz needs ({p},) finite values, got shape "
                                       f"{self.sample_logz.shape}")
        for name, values in self.texts.items():
            if len(values) != s or not all(isinstance(v, str) for v in values):
                raise InvalidDataError(f"{where}: text field {name!r} needs {s} strings")
        for name in ("topk_logprobs", "target_logprob", "tail_mass"):
            bad = ~np.isfinite(getattr(self, name))
            if bad.any():
                row = int(np.argwhere(bad)[0][0])
                raise InvalidDataError(f"{where}: {name} has NaN or inf (first at position row {row})")
        if np.any(self.topk_logprobs > 1e-3) or np.any(self.target_logprob > 1e-3):
            raise InvalidDataError(f"{where}: log-probabilities must be <= 0")
        if np.any(self.tail_mass < -1e-3) or np.any(self.tail_mass > 1 + 1e-3):
            raise InvalidDataError(f"{where}: tail_mass must lie in [0, 1]")
        if len(self.input_ids) and (self.input_ids.min() < 0 or self.input_ids.max() >= vocab_size):
            raise InvalidDataError(f"{where}: input_ids outside [0, {vocab_size})")
        pad = self.topk_ids == -1
        if self.sample_counts is None and pad.any():
            raise InvalidDataError(f"{where}: topk_ids has -1 padding, which only sample mode allows")
        real = self.topk_ids[~pad]
        if real.size and (real.min() < 0 or real.max() >= vocab_size):
            raise InvalidDataError(f"{where}: topk_ids outside [0, {vocab_size}) (max {int(real.max())})")
        if self.sample_counts is not None and np.any(self.sample_counts[pad] != 0):
            raise InvalidDataError(f"{where}: sample_counts must be 0 where topk_ids is -1 padding")
        # Each supervised position t must predict a token of its own sequence: 0 <= t < T_s - 1.
        seq_of_pos = np.repeat(np.arange(s), np.diff(self.position_offsets))
        seq_len = np.diff(self.token_offsets)[seq_of_pos]
        if np.any(self.positions < 0) or np.any(self.positions >= seq_len - 1):
            raise InvalidDataError(f"{where}: a supervised position t is outside [0, len(input_ids) - 1)")
