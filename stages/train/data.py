"""`ShardedStream`: a torch IterableDataset over a cache (or the rows of --data), one item per sequence.

    stream = ShardedStream(CacheSource("s3://bucket/cache", to_item=SameTokenizerTargets(vocab_size=32000)),
                           seed=0, rank=0, world_size=1)
    loader = DataLoader(stream, batch_size=8, collate_fn=Collator(pad_id=0), num_workers=2)
    for batch in loader:
        stream.record(batch["stream"])          # what the training loop consumed: the resume position
    torch.save(stream.state_dict(), ...)        # a position, never buffered data

Order, a pure function of (seed, epoch, world size, number of DataLoader workers):

1. Shard order: the source's shards permuted by (seed, epoch).
2. The epoch's stream is those shards' sequences, shard after shard. DDP rank r takes the contiguous
   span [r * n, (r + 1) * n) of it, n = N // world_size, so every rank runs the same number of
   steps (DDP deadlocks otherwise). The last N mod world_size sequences of each epoch's stream (fewer
   than world_size, different ones every epoch) are left out. Worker w takes a contiguous part of its
   rank's span, so it reads whole shards except at its two ends.
3. Shuffle buffer: a worker reads its part `window` shards at a time and yields their sequences in a
   permutation drawn from (seed, epoch, rank, worker, window number). At most `window` shards are
   resident per worker, so memory is flat as the cache grows.

Epochs run back to back inside each worker; with `epochs=None` the stream never ends (the Trainer
stops at `max_steps`). A worker's position is the number of sequences of its stream consumed since
the start of training, across epochs. Every batch carries `stream` = [worker, num_workers, position]
(all items of a batch come from one worker); the training loop hands it to `record`, so the position
counts what was trained on, not what was prefetched. Resuming re-derives the order and starts each
worker at its position, skipping whole windows without reading them: no sequence is duplicated or
missed. Resuming needs the same world size and number of workers (checked).
"""

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from logitcache.storage.errors import ConfigError
from logitcache.storage.redact import redact_url

__all__ = ["ShardedStream", "CacheSource", "RowsSource", "distributed_layout", "resume_position", "this_worker"]

STATE_VERSION = 1


def distributed_layout() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed if initialized, else torchrun's env."""
    import os

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class CacheSource:
    """A cache's shards, each sequence turned into a training item by `to_item`.

    Args:
        cache: an open `storage.Cache` (its url, storage options and verify setting are kept for
            the workers), or a cache directory or fsspec URL to open.
        to_item: picklable callable, cache sequence dict -> training item (see `alignment`).
        storage_options: passed to fsspec (with a URL).
        verify: check shard checksums on read (with a URL).

    DataLoader workers get their own handle, opened lazily in each process.
    """

    def __init__(self, cache, *, to_item: Callable[[dict], dict], storage_options: dict | None = None,
                 verify: bool = True):
        from logitcache.storage import Cache, open_cache

        if isinstance(cache, Cache):
            storage_options, verify = cache.storage_options, cache.verify
        else:
            cache = open_cache(str(cache), storage_options=storage_options, verify=verify)
        self.url, self.to_item, self.storage_options, self.verify = cache.url, to_item, storage_options, verify
        self._cache = cache
        self.shard_sizes = [e["sequences"] for e in self._cache.shards]
        self.identity = {"cache": self._cache.fingerprint, "sequences": len(self._cache)}

    @property
    def cache(self):
        if self._cache is None:
            from logitcache.storage import open_cache

            self._cache = open_cache(self.url, storage_options=self.storage_options, verify=self.verify)
        return self._cache

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}

    def load(self, j: int):
        return self.cache.read_shard(j)

    def load_many(self, ids: Iterator[int]) -> Iterator:
        """The shards `ids` in order, the next ones fetched while these are decoded (`Cache.iter_shards`)."""
        return (shard for _, shard in self.cache.iter_shards(ids))

    def item(self, shard, s: int) -> dict:
        return self.to_item(shard.sequence(s))


class RowsSource:
    """Rows of --data (`storage.rows.load_rows`) in pseudo-shards of `rows_per_shard`, for training or
    evaluating without a cache.

    Args:
        rows: the loaded rows: a `datasets.Dataset`, or `--streaming`'s `StreamedRows` (anything with
            len() and `rows[a:b]` -> {column: [values]}).
        name: the --data value (kept without credentials: the identity is saved in checkpoints).
        to_item: picklable callable, row dict (with "row_index" added) -> training item.
        rows_per_shard: rows per pseudo-shard (the unit of shuffling and of work splitting).

    A shard's rows are read when it is loaded (a streamed source reads only then).
    """

    def __init__(self, rows, *, name: str, to_item: Callable[[dict], dict], rows_per_shard: int = 1024):
        if rows_per_shard < 1:
            raise ConfigError(f"rows_per_shard={rows_per_shard} must be >= 1")
        n = len(rows)
        if n == 0:
            raise ConfigError(f"--data {redact_url(name)}: no rows")
        self.rows, self.to_item, self.rows_per_shard = rows, to_item, rows_per_shard
        self.shard_sizes = [min(rows_per_shard, n - start) for start in range(0, n, rows_per_shard)]
        self.identity = {"data": redact_url(str(name)), "rows": n}

    def load(self, j: int) -> list[dict]:
        first = j * self.rows_per_shard
        block = self.rows[first:first + self.shard_sizes[j]]
        return [{**{c: values[i] for c, values in block.items()}, "row_index": first + i}
                for i in range(self.shard_sizes[j])]

    def item(self, rows: list[dict], s: int) -> dict:
        return self.to_item(rows[s])


class ShardedStream(IterableDataset):
    """Sequences of a sharded source, split across DDP ranks and DataLoader workers, resumable.

    Args:
        source: `CacheSource`, `RowsSource`, or any object with `shard_sizes`, `identity`,
            `load(j)` and `item(loaded_shard, s)`.
        seed: decides the shard order and the shuffles, with the epoch.
        shuffle: False keeps index order (for evaluation).
        window: shards per shuffle window (resident per worker).
        epochs: number of passes; None for an endless stream.
        rank, world_size: this process's DDP rank; default from `distributed_layout()`.

    Raises:
        ConfigError: bad settings, or a source with fewer sequences than ranks.
    """

    def __init__(self, source, *, seed: int = 0, shuffle: bool = True, window: int = 2, epochs: int | None = None,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if rank is None or world_size is None:
            rank, world_size = distributed_layout()
        if window < 1:
            raise ConfigError(f"shuffle window={window} must be >= 1 shard")
        if epochs is not None and epochs < 1:
            raise ConfigError(f"epochs={epochs} must be >= 1")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        self.source, self.seed, self.shuffle, self.window, self.epochs = source, int(seed), shuffle, window, epochs
        self.rank, self.world_size = rank, world_size
        self.sizes = np.asarray(source.shard_sizes, dtype=np.int64)
        self.per_rank = int(self.sizes.sum()) // world_size
        if self.per_rank == 0:
            raise ConfigError(f"{source.identity}: {int(self.sizes.sum())} sequence(s) cannot be split across "
                              f"{world_size} ranks; every rank needs at least one")
        self._num_workers: int | None = None
        self._consumed: list[int] = []

    # ---- the order ------------------------------------------------------------------------------

    def part_length(self, worker: int, num_workers: int) -> int:
        """Sequences per epoch in worker `worker`'s part of this rank's span."""
        base, extra = divmod(self.per_rank, num_workers)
        return base + (1 if worker < extra else 0)

    def shard_order(self, epoch: int) -> np.ndarray:
        """(num_shards,) shard ids in the epoch's order."""
        if not self.shuffle:
            return np.arange(len(self.sizes))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.sizes))

    def segments(self, epoch: int, worker: int, num_workers: int) -> list[tuple[int, int, int]]:
        """The worker's part of `epoch` as (shard id, first, end) sequence ranges within shards, in order."""
        start = self.rank * self.per_rank + sum(self.part_length(w, num_workers) for w in range(worker))
        end = start + self.part_length(worker, num_workers)
        order = self.shard_order(epoch)
        bounds = np.concatenate([[0], np.cumsum(self.sizes[order])])
        out = []
        first = int(np.searchsorted(bounds, start, side="right")) - 1
        for i in range(max(first, 0), len(order)):
            lo, hi = max(start, bounds[i]), min(end, bounds[i + 1])
            if lo >= end:
                break
            if hi > lo:
                out.append((int(order[i]), int(lo - bounds[i]), int(hi - bounds[i])))
        return out

    def windows(self, epoch: int, worker: int, num_workers: int) -> Iterator[tuple[list, np.ndarray]]:
        """(segments, order) per shuffle window: `order` (n,) int64 indexes the window's sequences,
        numbered segment after segment."""
        segs = self.segments(epoch, worker, num_workers)
        for number, i in enumerate(range(0, len(segs), self.window)):
            group = segs[i:i + self.window]
            n = sum(hi - lo for _, lo, hi in group)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, self.rank, worker, number]).permutation(n)
            else:
                order = np.arange(n)
            yield group, order

    def keys(self, worker: int, num_workers: int, *, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
        """(shard id, sequence within shard) of the worker's stream from position `start` to `stop`,
        without reading any shard. The reference for tests and for checking a run's coverage."""
        for _, group, order, skip in self._plan(worker, num_workers, start):
            ranges = _window_keys(group)
            for k in order[skip:]:
                if stop is not None and start >= stop:
                    return
                yield ranges[k]
                start += 1

    def _plan(self, worker: int, num_workers: int, position: int):
        """Windows from `position` on: (epoch, segments, order, items to skip in this window)."""
        n = self.part_length(worker, num_workers)
        if n == 0:
            return
        epoch, offset = divmod(position, n)
        while self.epochs is None or epoch < self.epochs:
            for group, order in self.windows(epoch, worker, num_workers):
                if offset >= len(order):
                    offset -= len(order)
                    continue
                yield epoch, group, order, offset
                offset = 0
            epoch, offset = epoch + 1, 0

    # ---- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = this_worker(self._num_workers)
        position = self._consumed[worker] if self._consumed else 0
        for item in self.items(worker, num_workers, position):
            position += 1
            item["stream"] = np.array([worker, num_workers, position], dtype=np.int64)
            yield item

    def items(self, worker: int, num_workers: int, position: int) -> Iterator[dict]:
        """The worker's items from `position` on (no "stream" entry), decoding a window's shards when the
        first of its items is asked for; shards before `position` are skipped unread. A source with
        `load_many` (a cache) is handed the plan's shard ids to fetch ahead of their windows."""
        ids = (j for _, group, _, _ in self._plan(worker, num_workers, position) for j, _, _ in group)
        load_many = getattr(self.source, "load_many", None)
        shards = load_many(ids) if load_many is not None else map(self.source.load, ids)
        try:
            for _, group, order, skip in self._plan(worker, num_workers, position):
                loaded = {j: next(shards) for j, _, _ in group}
                ranges = _window_keys(group)
                for k in order[skip:]:  # `position` already counts the skipped part
                    j, s = ranges[k]
                    yield self.source.item(loaded[j], s)
                del loaded
        finally:
            getattr(shards, "close", lambda: None)()

    # ---- position ------------------------------------------------------------------------------

    def record(self, stream) -> None:
        """Note that the training loop consumed a batch. `stream`: (3,) or (B, 3) [worker, workers, position]."""
        values = torch.as_tensor(stream).reshape(-1, 3).max(dim=0).values.tolist()
        worker, num_workers, position = (int(v) for v in values)
        if self._num_workers is None:
            self._num_workers, self._consumed = num_workers, [0] * num_workers
        assert num_workers == self._num_workers, (num_workers, self._num_workers)
        self._consumed[worker] = max(self._consumed[worker], position)

    def consumed(self) -> int:
        """Sequences this rank has consumed since the start of training."""
        return sum(self._consumed)

    def epoch_progress(self) -> float:
        """Epochs this rank has consumed, as a fraction (consumed / sequences per rank and epoch)."""
        return self.consumed() / self.per_rank

    def state_dict(self) -> dict:
        """This rank's position: JSON-able, no data."""
        return {"version": STATE_VERSION, "source": self.source.identity, "seed": self.seed, "shuffle": self.shuffle,
                "window": self.window, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self._num_workers, "consumed": list(self._consumed),
                "epoch": min(self._consumed) // self.part_length(0, self._num_workers) if self._consumed else 0}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position saved by `state_dict` (before iterating).

        Raises:
            ConfigError: the position belongs to another source, seed, shuffle, rank or world size.
        """
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"data position version {state.get('version')!r}; this logitcache writes {STATE_VERSION}")
        self._num_workers, self._consumed = resume_position(state, {
            "source": self.source.identity, "seed": self.seed, "shuffle": self.shuffle, "window": self.window,
            "rank": self.rank, "world_size": self.world_size})

    def batches_per_rank(self, batch_size: int, num_workers: int, epochs: int) -> int:
        """Batches each rank's DataLoader yields in `epochs` epochs from the start (workers batch alone)."""
        workers = max(num_workers, 1)
        return sum(math.ceil(epochs * self.part_length(w, workers) / batch_size) for w in range(workers))


def this_worker(saved_num_workers: int | None) -> tuple[int, int]:
    """(worker id, workers per rank) of the DataLoader worker this runs in; (0, 1) outside one.

    Args:
        saved_num_workers: the workers per rank of a resumed data position, or None (a fresh start).

    Raises:
        ConfigError: the resumed position was saved with another number of workers (it names both).
    """
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    if saved_num_workers is not None and saved_num_workers != num_workers:
        raise ConfigError(f"the data position was saved with {saved_num_workers} DataLoader worker(s) per rank "
                          f"and this run has {num_workers}; resume with --num-workers {saved_num_workers}")
    return worker, num_workers


def resume_position(state: dict, mine: dict) -> tuple[int, list[int]]:
    """The (num_workers, consumed per worker) of a saved data position, once it is checked to be this run's.

    Args:
        state: a reader's `state_dict()`, as saved with the checkpoint.
        mine: the settings the position depends on, as this run has them ({key: value}, JSON-like).

    Raises:
        ConfigError: `state` has another value for one of `mine`'s keys (the message names both values).
    """
    for key, value in mine.items():
        if state.get(key) != value:
            raise ConfigError(f"cannot resume: the saved data position has {key}={state.get(key)!r}, "
                              f"this run has {key}={value!r}")
    return state["num_workers"], [int(c) for c in state["consumed"]]


def _window_keys(group: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    return [(j, s) for j, lo, hi in group for s in range(lo, hi)]
