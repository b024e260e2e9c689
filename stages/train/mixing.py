"""`MixedStream`: several caches interleaved by weight, deterministic and resumable (`train --cache A B
--cache-weights 3 1`), the way teams combine shared logit datasets.

    streams = [ShardedStream(CacheSource(url, to_item=targets), seed=0, rank=r, world_size=n) for url in urls]
    mixed = MixedStream(streams, weights=[3, 1], seed=0, names=urls)   # each item: A with p 0.75, B with 0.25
    loader = DataLoader(mixed, batch_size=8, collate_fn=Collator(pad_id=0), num_workers=2)

The rule is `datasets.interleave_datasets(probabilities=p, seed=seed)`'s: every item comes from
cache i with probability p_i = weights[i] / sum(weights), drawn independently. Here the draws are a
pure function of (seed, rank, worker, position): block b of `BLOCK` draws comes from numpy's
generator seeded with [seed, rank, worker, b, MIX_TAG]. Each cache is read through its own endless
`ShardedStream` (its shards permuted per epoch, split by rank and DataLoader worker, shuffled in
windows), so a cache that is drawn past its end starts its next epoch, as interleave_datasets'
`stopping_strategy="all_exhausted"` oversamples, but without end: the run's length is --max-steps.

Resume. A worker's state is one number, its position in the mixture (items consumed). How many of
those items came from cache i is the count of i among the draws before it, recomputed from the
draws; cache i's stream restarts at that count, skipping its finished windows unread. A DataLoader takes batches
from its workers in turn, so the worker whose turn was next plays worker 0's part after a resume:
a run stopped and resumed yields the batches of an uninterrupted one, in order, with any number of
ranks and workers.

Which caches mix (`sources.check_mixable`, where a mixture is opened): one teacher vocabulary (the
same ids mean the same tokens), one mode (topk or sample), one K unless the loss keeps the first k
of each (`--top-k`), and one sampling temperature for sample-mode caches. A student with another
tokenizer (ULD) reads one cache at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import IterableDataset

from logitcache.stages.train.data import ShardedStream, resume_position, this_worker
from logitcache.storage.errors import ConfigError

__all__ = ["MixedStream", "mixture_probabilities", "BLOCK"]

BLOCK = 4096  # draws per generator: the resume cost is one bincount per block before the position
MIX_TAG = 0x6D6978  # "mix": keeps the draws' seeds apart from the shard-order and window seeds
STATE_VERSION = 1


def mixture_probabilities(weights: Sequence[float] | None, n: int, names: Sequence[str]) -> list[float]:
    """Weights -> probabilities (weights / their sum); equal weights when None.

    Raises:
        ConfigError: not one weight per cache, a negative or non-finite weight, or all zero.
    """
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ConfigError(f"--cache-weights gives {len(weights)} weight(s) for {n} caches ({', '.join(names)}); "
                          f"give one per --cache, in the same order")
    for name, w in zip(names, weights):
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"--cache-weights: the weight of {name} is {w}; weights must be finite and >= 0")
    total = sum(weights)
    if total <= 0:
        raise ConfigError("--cache-weights are all 0; at least one cache needs a positive weight")
    return [w / total for w in weights]


class MixedStream(ShardedStream):
    """Items of several `ShardedStream`s, each drawn with its probability (module docstring).

    Args:
        streams: one endless (`epochs=None`) stream per cache, all of one rank and world size.
        weights: one non-negative weight per stream (normalized); None: equal.
        seed: decides the draws (each stream's own order comes from its own seed).
        names: how messages and `state_dict` name the streams (e.g. the cache URLs).

    Raises:
        ConfigError: fewer than two streams, bad weights, or streams of other ranks or with an end.
    """

    def __init__(self, streams: Sequence[ShardedStream], *, weights: Sequence[float] | None = None, seed: int = 0,
                 names: Sequence[str] | None = None):
        IterableDataset.__init__(self)
        if len(streams) < 2:
            raise ConfigError("a mixture needs at least two caches")
        self.names = list(names) if names is not None else [str(s.source.identity) for s in streams]
        self.probabilities = mixture_probabilities(weights, len(streams), self.names)
        layouts = {(s.rank, s.world_size) for s in streams}
        if len(layouts) != 1:
            raise ConfigError(f"the mixed streams have different ranks or world sizes {sorted(layouts)}")
        if any(s.epochs is not None for s in streams):
            raise ConfigError("mixed caches are read as endless streams; give the run's length as --max-steps")
        self.streams, self.seed = list(streams), int(seed)
        (self.rank, self.world_size), = layouts
        self.shuffle, self.window, self.epochs = streams[0].shuffle, streams[0].window, None
        self.per_rank = sum(s.per_rank for s in streams)
        self._num_workers: int | None = None
        self._consumed: list[int] = []

    # ---- the draws --------------------------------------------------------------------------------

    def draws(self, worker: int, block: int) -> np.ndarray:
        """(BLOCK,) int64 stream numbers of the worker's items BLOCK * block ... BLOCK * (block + 1) - 1."""
        rng = np.random.default_rng([self.seed, self.rank, worker, block, MIX_TAG])
        return rng.choice(len(self.streams), size=BLOCK, p=self.probabilities).astype(np.int64)

    def drawn(self, worker: int, position: int) -> np.ndarray:
        """(num_streams,) int64 items each stream gave the worker before `position`."""
        counts = np.zeros(len(self.streams), dtype=np.int64)
        full, rest = divmod(position, BLOCK)
        for block in range(full):
            counts += np.bincount(self.draws(worker, block), minlength=len(self.streams))
        if rest:
            counts += np.bincount(self.draws(worker, full)[:rest], minlength=len(self.streams))
        return counts

    # ---- iteration -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = this_worker(self._num_workers)
        if self._consumed:
            # A DataLoader takes batches from its workers in turn, starting with worker 0. The worker whose
            # turn was next when the run stopped (the first one with the fewest items) plays worker 0's
            # part now, so the resumed batches come in the uninterrupted order, not only as the same set.
            first = int(np.argmin(self._consumed))
            worker = (worker + first) % num_workers
        for name, stream, p in zip(self.names, self.streams, self.probabilities):
            if p > 0 and stream.part_length(worker, num_workers) == 0:
                raise ConfigError(f"--cache {name}: {int(stream.sizes.sum())} sequence(s) cannot feed "
                                  f"{self.world_size} rank(s) x {num_workers} DataLoader worker(s); every worker "
                                  f"needs at least one (use fewer --num-workers)")
        position = self._consumed[worker] if self._consumed else 0
        parts = [s.items(worker, num_workers, int(c)) for s, c in zip(self.streams, self.drawn(worker, position))]
        block, offset = divmod(position, BLOCK)
        while True:
            for i in self.draws(worker, block)[offset:]:
                item = next(parts[i])
                position += 1
                item["stream"] = np.array([worker, num_workers, position], dtype=np.int64)
                yield item
            block, offset = block + 1, 0

    # ---- position -------------------------------------------------------------------------------

    def per_stream(self) -> list[int]:
        """Items each stream has given this rank's training loop so far (the realised mixture)."""
        counts = np.zeros(len(self.streams), dtype=np.int64)
        for worker, position in enumerate(self._consumed):
            counts += self.drawn(worker, position)
        return counts.tolist()

    def epoch_progress(self) -> float:
        """Items consumed over the caches' sequences per rank (all caches together)."""
        return self.consumed() / self.per_rank

    def state_dict(self) -> dict:
        """This rank's position in the mixture: JSON-able, no data (the per-cache counts are for reading)."""
        return {"version": STATE_VERSION, "mixture": [s.source.identity for s in self.streams],
                "probabilities": list(self.probabilities), "seed": self.seed, "shuffle": self.shuffle,
                "window": self.window, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self._num_workers, "consumed": list(self._consumed),
                "per_cache": dict(zip(self.names, self.per_stream()))}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position saved by `state_dict` (before iterating).

        Raises:
            ConfigError: the position belongs to other caches (or another order of them), weights,
                seed, shuffle window, rank or world size.
        """
        if state.get("version") != STATE_VERSION or "mixture" not in state:
            raise ConfigError("cannot resume: the saved data position is not one of a mixture of caches (was the "
                              "run started with one --cache?)")
        self._num_workers, self._consumed = resume_position(state, {
            "mixture": [s.source.identity for s in self.streams], "probabilities": list(self.probabilities),
            "seed": self.seed, "shuffle": self.shuffle, "window": self.window, "rank": self.rank,
            "world_size": self.world_size})

    def batches_per_rank(self, batch_size: int, num_workers: int, epochs: int) -> int:
        raise ConfigError("--epochs is not defined for a mixture of caches (each cache repeats at its own rate); "
                          "give --max-steps")
