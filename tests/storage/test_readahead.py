"""Reading ahead: bounded in memory, in order, errors at their turn, and really overlapping on a slow store.

    pytest tests/storage/test_readahead.py
"""

import itertools
import threading
import time

import numpy as np
import pytest
from s3server import make_bucket, s3_options, tcp_proxy
from synthetic import TEXT_FIELDS, VOCAB, make_sequence, metadata

from logitcache.storage import CacheWriter, ShardData, ShardError, open_cache
from logitcache.storage.readahead import read_ahead


class Ledger:
    """A fetch that takes `delay` s and records the bytes held: fetches started and not yet received by the
    caller, so its peak counts the item in the caller's hands too (the budget does not)."""

    def __init__(self, sizes, delay=0.01):
        self.sizes, self.delay, self.lock = sizes, delay, threading.Lock()
        self.held = self.peak = self.running = self.most_running = 0
        self.log = []  # ("start" | "end", key) in order

    def fetch(self, key):
        with self.lock:
            self.held += self.sizes[key]
            self.peak = max(self.peak, self.held)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.log.append(("start", key))
        time.sleep(self.delay)
        with self.lock:
            self.running -= 1
            self.log.append(("end", key))
        return f"payload {key}"

    def handed(self, key):
        with self.lock:
            self.held -= self.sizes[key]


def test_bytes_held_ahead_never_exceed_the_budget_and_come_back_in_order():
    sizes = [30, 20, 30, 10, 30, 20] * 5  # with no budget, 8 queued would hold ~200
    ledger = Ledger(sizes)
    got = []
    for key, payload in read_ahead(ledger.fetch, range(len(sizes)), size=sizes.__getitem__, budget=100, workers=4):
        ledger.handed(key)
        assert payload == f"payload {key}"
        got.append(key)
        time.sleep(0.02)  # the caller is slower than the store: the read-ahead fills up to its budget
    assert got == list(range(len(sizes)))
    assert ledger.peak <= 100 + max(sizes)  # ahead + the one in hand
    assert ledger.peak >= 80 and ledger.most_running >= 2  # it did read ahead, several at once


def test_it_starts_with_two_fetches_so_the_first_is_not_slowed_by_the_rest():
    ledger = Ledger([10] * 10, delay=0.05)
    reader = read_ahead(ledger.fetch, range(10), size=lambda k: 10, budget=1000, workers=8)
    for _ in reader:
        pass
    assert ledger.log.index(("start", 2)) > ledger.log.index(("end", 0))  # the third waited for the first
    assert ledger.most_running > 2  # then it widens


def test_a_shard_larger_than_the_budget_is_read_alone():
    sizes = [10, 500, 10, 10]
    ledger = Ledger(sizes)
    for key, _ in read_ahead(ledger.fetch, range(4), size=sizes.__getitem__, budget=100, workers=4):
        ledger.handed(key)
    i = ledger.log.index(("start", 1))
    assert ledger.log[i - 1:i + 2] == [("end", 0), ("start", 1), ("end", 1)]  # nothing else fetched meanwhile


def test_a_failed_fetch_raises_at_its_turn_after_the_earlier_ones():
    def fetch(key):
        if key == 3:
            raise ShardError("shard 3 is broken")
        return key

    got = []
    with pytest.raises(ShardError, match="shard 3"):
        for key, _ in read_ahead(fetch, range(8), size=lambda k: 1, budget=100, workers=4):
            got.append(key)
    assert got == [0, 1, 2]


def test_leaving_early_stops_drawing_keys_from_an_endless_stream():
    drawn = []
    keys = (drawn.append(k) or k for k in itertools.count())
    reader = read_ahead(lambda k: k, keys, size=lambda k: 1, budget=1000, workers=4)
    assert [k for k, _ in itertools.islice(reader, 5)] == list(range(5))
    reader.close()
    assert len(drawn) <= 5 + 2 * 4  # at most 2 x workers queued ahead of the caller


def test_budget_zero_reads_one_at_a_time_in_the_callers_thread():
    threads = set()
    for _ in read_ahead(lambda k: threads.add(threading.get_ident()), range(3), size=lambda k: 1, budget=0):
        pass
    assert threads == {threading.get_ident()}


def _write_cache(url, shards, *, backend, opts=None, rows=2, length=12):
    rng = np.random.default_rng(0)
    w = CacheWriter(url, backend=backend, encoding="compact", vocab_size=VOCAB, fingerprint="ra",
                    text_fields=TEXT_FIELDS, storage_options=opts)
    for j in range(shards):
        seqs = [make_sequence(rng, j * rows + i, length, 4) for i in range(rows)]
        w.write_shard(j, ShardData.from_sequences(seqs, text_fields=TEXT_FIELDS))
    w.finalize(metadata(4))


def test_cache_reads_ahead_within_its_budget(tmp_path):
    """On a real cache: the shards fetched and not yet decoded never hold more than the budget's bytes."""
    _write_cache(str(tmp_path / "c"), 10, backend="arrow")
    cache = open_cache(str(tmp_path / "c"))
    sizes = [e["bytes"] for e in cache.shards]
    ledger = Ledger(sizes, delay=0.0)
    fetch, decode = cache._fetch, cache._decode

    def slow_fetch(j):
        ledger.fetch(j)
        return fetch(j)

    def counted_decode(j, payload):
        ledger.handed(j)
        time.sleep(0.01)
        return decode(j, payload)

    cache._fetch, cache._decode = slow_fetch, counted_decode
    budget = 3 * max(sizes)
    read = [j for j, _ in cache.iter_shards(read_ahead_bytes=budget, read_workers=2)]
    assert read == list(range(10))
    assert 2 * min(sizes) <= ledger.peak <= budget + max(sizes)


@pytest.mark.parametrize("backend", ["arrow", pytest.param("zarr", marks=pytest.mark.slow)])
def test_reading_ahead_overlaps_the_stores_round_trips(s3, backend):
    """Behind a proxy adding latency to every request, shards read one at a time wait at least
    shards x latency x the round trips a shard needs; the default read-ahead hides most of that.
    Zarr: ~24 objects a shard, ~0.15 s of the loopback server's CPU each (more under load), so a
    longer latency for the waiting to stand out (~15 s: slow)."""
    endpoint, _ = s3
    bucket = f"lc-ahead-{backend}"
    make_bucket(endpoint, bucket)
    # Zarr hides less: 6 shards x 24 objects queue for the 64 connections (measured: 0.44-0.79 of the
    # waiting hidden with the machine's load average at 8-14; arrow ~0.9).
    shards, latency, hidden = {"arrow": (8, 0.2, 0.5), "zarr": (6, 0.4, 0.3)}[backend]
    _write_cache(f"s3://{bucket}/c", shards, backend=backend, opts=s3_options(endpoint))
    # Round trips one after the other: arrow HEAD, GET (s3fs asks the size first); zarr a listing,
    # then its ~24 objects at once.
    trips = 2
    with tcp_proxy(endpoint, latency=latency) as proxy:
        cache = open_cache(f"s3://{bucket}/c", storage_options=s3_options(proxy.endpoint))
        t0 = time.perf_counter()
        one_by_one = [s.row_index.tolist() for _, s in cache.iter_shards(read_ahead_bytes=0)]
        sequential = time.perf_counter() - t0
        t0 = time.perf_counter()
        ahead = [s.row_index.tolist() for _, s in cache.iter_shards()]
        overlapped = time.perf_counter() - t0
    assert one_by_one == ahead == [[2 * j, 2 * j + 1] for j in range(shards)]
    waited = shards * latency * trips
    assert sequential >= waited  # the proxy's latency is real
    # A share of the round trips' time hidden. (Not a ratio of the two times: the loopback server's CPU
    # work, the same in both, grows with the machine's load.)
    assert sequential - overlapped >= hidden * waited, (overlapped, sequential)
