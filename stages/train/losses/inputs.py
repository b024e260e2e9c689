"""Argument checks for the losses: shapes and dtypes (free, no device sync) and option values.

Values inside the tensors (NaN, ids out of range) are not checked here: that would cost a device
sync per step, and the cache reader validates them when a shard is read.
"""

import torch

from logitcache.storage.errors import ConfigError, InvalidDataError

__all__ = ["check_logits", "check_teacher", "check_rows", "check_index", "check_choice", "check_range",
           "check_chunk_size",
           "check_cache_rows"]


def check_logits(student_logits: torch.Tensor) -> tuple[int, int]:
    """Returns (N, V) of (N, V) float student logits with N >= 1."""
    if not isinstance(student_logits, torch.Tensor) or student_logits.ndim != 2:
        raise InvalidDataError(f"student_logits: expected a (N, V) tensor, got {_shape(student_logits)}")
    if not student_logits.is_floating_point():
        raise InvalidDataError(f"student_logits: expected a float dtype, got {student_logits.dtype}")
    if student_logits.shape[0] == 0 or student_logits.shape[1] == 0:
        raise InvalidDataError(
            f"student_logits: expected N >= 1 positions and V >= 1, got {tuple(student_logits.shape)}")
    return student_logits.shape[0], student_logits.shape[1]


def check_teacher(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    same_vocab: bool = True,
    rows: int | None = None,
) -> int:
    """Checks the (N, K) cache rows against the (N, V) logits and returns K.

    Args:
        same_vocab: the ids index the student's vocabulary, so K <= V is required.
        rows: the number of cache rows expected when it is not the logits' N (`kd_select`'s N_kd).
    """
    n, vocab = check_logits(student_logits)
    want = f"student_logits' {n} rows" if rows is None else f"kd_select's {rows} rows"
    n = n if rows is None else rows
    for name, t in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] != n:
            raise InvalidDataError(f"{name}: expected ({n}, K) to match {want}, got {_shape(t)}")
    if teacher_logprobs.shape != teacher_ids.shape:
        raise InvalidDataError(
            f"teacher_logprobs: expected the shape of teacher_ids {tuple(teacher_ids.shape)}, "
            f"got {tuple(teacher_logprobs.shape)}")
    if teacher_ids.dtype.is_floating_point or teacher_ids.dtype == torch.bool:
        raise InvalidDataError(f"teacher_ids: expected an integer dtype, got {teacher_ids.dtype}")
    if not teacher_logprobs.is_floating_point():
        raise InvalidDataError(f"teacher_logprobs: expected a float dtype, got {teacher_logprobs.dtype}")
    k = teacher_ids.shape[1]
    if k == 0:
        raise InvalidDataError("teacher_ids: expected K >= 1 cached ids per position, got K = 0")
    if same_vocab and k > vocab:
        raise InvalidDataError(f"teacher_ids: K = {k} cached ids exceed the student vocabulary V = {vocab}")
    return k


def check_rows(name: str, t: torch.Tensor | None, shape: tuple[int, ...], *, integer: bool = False) -> None:
    """Checks an optional per-position input (tail_mass, labels, counts) has `shape`."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        raise InvalidDataError(f"{name}: expected shape {shape}, got {_shape(t)}")
    if integer and (t.dtype.is_floating_point or t.dtype == torch.bool):
        raise InvalidDataError(f"{name}: expected an integer dtype, got {t.dtype}")


def check_index(name: str, t: torch.Tensor | None, n: int) -> None:
    """Checks an optional (M,) integer index into n rows, M <= n (`kd_select`). Values are not read."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] > n:
        raise InvalidDataError(f"{name}: expected a (M,) index into the {n} rows of student_logits, M <= {n}; "
                               f"got {_shape(t)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise InvalidDataError(f"{name}: expected an integer dtype, got {t.dtype}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def check_range(name: str, value: float, low: float, high: float, *, low_open: bool = True,
                high_open: bool = True) -> None:
    """Raises ConfigError unless low < value < high (or <= where the end is closed)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{name}={value} must lie in {bounds}")


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"chunk_size={chunk_size!r} must be a positive number of rows, or None for automatic")


def check_cache_rows(student_logits, teacher_ids, teacher_logprobs, tail_mass, n_rows, *, min_k=1, same_vocab=True):
    """Checks the inputs for N_kd = `n_rows` teacher rows (None: the logits' N); returns (V, K)."""
    n, vocab = check_logits(student_logits)
    k = check_teacher(student_logits, teacher_ids, teacher_logprobs, same_vocab=same_vocab, rows=n_rows)
    check_rows("tail_mass", tail_mass, (n if n_rows is None else n_rows,))
    if k < min_k:
        raise ConfigError(f"this loss splits target from non-target classes and needs K >= {min_k} cached ids, "
                          f"got K = {k}")
    return vocab, k


def _shape(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
