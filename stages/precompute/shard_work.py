"""One storage shard of stage one: its rows -> teacher tokens -> engine -> `ShardData` -> written.

The single-process loop (`run.py`, `make_shard` then a `ShardWriterThread`) and the Ray actors
(`ray_job.py`, `make_shard` then `CacheWriter.write_shard`) compute shards with the same code
from the same `JobSettings`, so a shard's bytes do not depend on which of them made it: rows are
encoded by the same code, the engine gets token ids (never re-tokenized strings), and the engine
batches are the shard's sequences longest first, `batch_size` at a time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from logitcache.stages.precompute.data import Encoded, RowEncoder, Skipped
from logitcache.stages.precompute.engines import Engine, Request, run_ahead
from logitcache.stages.precompute.plan import sequence_seed, shard_rows
from logitcache.stages.precompute.targets import Targets
from logitcache.storage import CacheWriter, ShardData
from logitcache.storage.errors import ConfigError

__all__ = ["encode_rows", "compute_shard", "make_shard", "ShardWriterThread"]


def encode_rows(dataset, a: int, b: int, encoder: RowEncoder, *, strict: bool
                ) -> tuple[list[tuple[int, Encoded]], Counter, int]:
    """Encode source rows [a, b).

    Returns:
        ([(row index, Encoded)] in row order, skipped rows by reason, truncated row count).

    Raises:
        InvalidDataError: with `strict`, the first row that would be skipped, naming row and field.
    """
    columns = list(dict.fromkeys(encoder.spec.columns.values()))
    block = dataset.select_columns(columns)[a:b]  # columnar: {column: [values]}
    items, skipped, truncated = [], Counter(), 0
    for i in range(b - a):
        out = encoder({c: block[c][i] for c in columns})
        if isinstance(out, Skipped):
            if strict:
                raise out.error(a + i)
            skipped[out.reason] += 1
            continue
        truncated += out.truncated
        items.append((a + i, out))
    return items, skipped, truncated


def compute_shard(engine: Engine, items: list[tuple[int, Encoded]], *, mode: str, width: int, seed: int,
                  batch_size: int, text_fields: tuple[str, ...],
                  on_batch: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> ShardData | None:
    """Run the engine over a shard's sequences and pack the results.

    Args:
        engine: the teacher.
        items: (row index, Encoded) in row order.
        mode: "topk" or "sample"; in sample mode the engine's `sample_*` arrays become the
            shard's `topk_ids` (-1 padded), `topk_logprobs` and `sample_counts`.
        width: K (or N): the per-position width, used for a shard whose rows were all skipped.
        seed: the run's seed; each sequence's is `sequence_seed(seed, row)`.
        batch_size: sequences per engine call (`engines.run_ahead`).
        text_fields: stored text fields.
        on_batch: called with (sequences, positions) after each engine call (progress).
        should_stop: polled before each batch is handed to the engine; if it returns True the
            shard is dropped.

    Returns:
        The shard, or None when stopped.
    """
    # Engine batches are cut from the shard's sequences sorted longest first, not in row order: a
    # batch then holds sequences of similar length, so the hf engine pads less (its length
    # batching only sees one engine batch; in row order, chat-length text padded 6.6 % more tokens
    # and spent 9 % more in attention, benchmarks/RESULTS.md), and the first batch shows at once
    # whether the longest sequence fits. The shard is still packed in row order.
    order = sorted(range(len(items)), key=lambda i: -len(items[i][1].token_ids))
    batches = [[items[i] for i in order[lo:lo + batch_size]] for lo in range(0, len(order), batch_size)]
    stopped = []

    def requests():  # polled one batch ahead: run_ahead hands batch i+1 over before collecting batch i
        for batch in batches:
            if should_stop is not None and should_stop():
                stopped.append(True)
                return
            yield [Request(token_ids=e.token_ids, positions=e.positions, seed=sequence_seed(seed, row))
                   for row, e in batch]

    sequences = {}
    # The engine computes the next batch while this thread packs the current one (vLLM: in its
    # own process, see `engines.run_ahead`); the hf engine runs them in turn.
    for batch, results in zip(batches, run_ahead(engine, requests())):
        for (row, e), out in zip(batch, results):
            sequences[row] = _sequence(row, e, out, mode)
            if sequences[row]["topk_ids"].shape[1] != width:
                raise ConfigError(f"the engine returns {sequences[row]['topk_ids'].shape[1]} ids per position; "
                                  f"this cache is set up for {width} (--top-k / --samples)")
        if on_batch is not None:
            on_batch(len(batch), sum(len(e.positions) for _, e in batch))
    if stopped:
        return None
    if should_stop is not None and should_stop():
        return None
    if not sequences:
        return _empty_shard(width, mode == "sample", text_fields)
    return ShardData.from_sequences([sequences[row] for row, _ in items], text_fields=text_fields)


def make_shard(shard_id: int, *, dataset, encoder: RowEncoder, engine: Engine, text_fields: tuple[str, ...],
               rows_per_shard: int, strict: bool, targets: Targets, batch_size: int,
               on_batch: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> tuple[ShardData, dict] | None:
    """Encode and compute shard `shard_id` without writing it.

    Args:
        shard_id: the shard; it holds source rows [shard_id * rows_per_shard, ...).
        dataset: the source rows (a `datasets.Dataset`).
        encoder: row -> teacher tokens and supervised positions.
        engine: the teacher.
        text_fields: stored text fields.
        rows_per_shard, strict, targets, batch_size: as in `JobSettings`.
        on_batch, should_stop: see `compute_shard`.

    Returns:
        (the shard, the extra fields of its index entry), or None when stopped first.
    """
    a, b = shard_rows(shard_id, rows_per_shard, len(dataset))
    items, skipped, truncated = encode_rows(dataset, a, b, encoder, strict=strict)
    if on_batch is not None and (b - a) > len(items):
        on_batch(b - a - len(items), 0)  # skipped rows count as done for the progress bar
    shard = compute_shard(engine, items, mode=targets.mode, width=targets.width, seed=targets.seed,
                          batch_size=batch_size, text_fields=text_fields, on_batch=on_batch, should_stop=should_stop)
    if shard is None:
        return None
    extra = {"rows": [a, b], "skipped": dict(sorted(skipped.items())), "truncated": truncated,
             "engine_version": str(engine.version)}
    # The vLLM pooling path's start-up check of its head (nats); engines without one leave it out.
    check = getattr(engine, "head_check_max_diff", None)
    if check is not None:
        extra["head_check_max_diff"] = float(check)
    return shard, extra


class ShardWriterThread:
    """Writes finished shards on one background thread, one at a time, while the caller computes.

        with ShardWriterThread(writer, on_written=progress) as writes:
            for s in todo:
                writes.submit(s, *make_shard(s, ...))
        writes.written  # {shard id: entry}, in the order written

    `submit` first waits for the previous write (so at most one shard is queued besides the one
    being computed) and re-raises its error. Leaving the block waits for the last write, also
    when an exception is on its way out: a write is atomic (temp + rename), so it either lands
    whole or not at all. `on_written(shard_id, entry)` runs on the caller's thread.
    """

    def __init__(self, writer: CacheWriter, *, on_written: Callable[[int, dict], None] | None = None):
        self.writer, self.on_written = writer, on_written
        self.written: dict[int, dict] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: tuple[int, Future] | None = None

    def submit(self, shard_id: int, shard: ShardData, extra: dict) -> None:
        self.wait()
        self._pending = shard_id, self._pool.submit(self.writer.write_shard, shard_id, shard, extra=extra)

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; re-raise its error."""
        if self._pending is None:
            return
        shard_id, future = self._pending
        self._pending = None
        entry = future.result()
        self.written[shard_id] = entry
        if self.on_written is not None:
            self.on_written(shard_id, entry)

    def __enter__(self) -> "ShardWriterThread":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
            elif self._pending is not None:
                self._pending[1].exception()  # let it land (or fail) without masking the error in flight
        finally:
            self._pool.shutdown(wait=True)


def _sequence(row: int, e: Encoded, out: dict, mode: str) -> dict:
    seq = {"row_index": row, "input_ids": np.asarray(e.token_ids, dtype=np.int32), "positions": e.positions,
           "target_logprob": out["target_logprob"], "tail_mass": out["tail_mass"], **e.texts}
    seq.update(topk_ids=out["topk_ids"], topk_logprobs=out["topk_logprobs"])
    if mode == "sample":
        seq.update(sample_counts=out["sample_counts"], sample_logz=out["sample_logz"])
    return seq


def _empty_shard(width: int, sample: bool, text_fields: tuple[str, ...]) -> ShardData:
    """A shard whose every row was skipped: it still exists, so shard ids stay fixed row ranges."""
    return ShardData(
        row_index=np.zeros(0, np.int64), input_ids=np.zeros(0, np.int32), token_offsets=np.zeros(1, np.int64),
        positions=np.zeros(0, np.int32), position_offsets=np.zeros(1, np.int64),
        topk_ids=np.zeros((0, width), np.int32), topk_logprobs=np.zeros((0, width), np.float32),
        target_logprob=np.zeros(0, np.float32), tail_mass=np.zeros(0, np.float32),
        sample_counts=np.zeros((0, width), np.uint16) if sample else None,
        sample_logz=np.zeros(0, np.float32) if sample else None,
        texts={name: [] for name in text_fields})
