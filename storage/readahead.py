"""`read_ahead`: fetch the next items' bytes while the current one is used, several at once, in bounded memory.

    for j, payload in read_ahead(fetch, shard_ids, size=lambda j: entries[j]["bytes"], budget=64 << 20):
        decode(payload)                          # the following shards are being fetched meanwhile

An object store answers each request after a round trip (tens of ms), so reading shard after shard
leaves the reader idle for most of the time. Here up to `workers` fetches run at once in threads (the
fsspec calls release the GIL while they wait, and so do hashlib and the decoders on large buffers),
and the results come back in the order of `keys`.

Memory: the fetched payloads not yet handed over plus the fetches under way hold at most `budget` bytes
(by `size`, the index's byte count), besides the one the caller holds; one fetch is always allowed,
however large, so a shard bigger than the budget is still read (alone).

It starts with two keys under way and adds one each time the caller takes a result (up to 2 x
`workers` queued): all of them started at once would share the store's bandwidth, and the first,
which the caller waits for, would arrive last (measured: the first batch 2x later).

`keys` is consumed lazily, so an endless stream of keys is fine. Closing the iterator (or leaving a loop
over it) cancels the fetches not yet started; those under way finish in their threads and are dropped.
"""

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

__all__ = ["read_ahead", "READ_AHEAD_BYTES", "READ_WORKERS"]

READ_AHEAD_BYTES = 256 << 20  # what one reader may hold ahead; a stage-one shard at K = 32 is ~4-20 MB
READ_WORKERS = 8  # fetches at once (threads)


def read_ahead(fetch: Callable, keys: Iterable, *, size: Callable[[object], int], budget: int = READ_AHEAD_BYTES,
               workers: int = READ_WORKERS) -> Iterator[tuple[object, object]]:
    """Yield (key, fetch(key)) for each of `keys`, in order, fetching ahead (module docstring).

    Args:
        fetch: key -> payload; called in worker threads. Its exceptions are raised here, at its key's turn.
        keys: the keys in the order they will be used (read lazily).
        size: key -> the payload's size in bytes, known before fetching (what the budget counts).
        budget: bytes fetched ahead at most; 0 turns reading ahead off (one fetch at a time, here, no thread).
        workers: fetches under way at most (>= 1).
    """
    keys = iter(keys)
    if budget <= 0:
        for key in keys:
            yield key, fetch(key)
        return
    pending: deque[tuple[object, int, Future]] = deque()
    held = 0  # bytes of `pending`: fetched or being fetched, not yet handed over
    upcoming = None  # the next key, drawn but not yet submitted (it did not fit the budget)
    depth = 2  # keys queued at most: one more per result taken, up to 2 x workers
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read-ahead")

    def fill():
        nonlocal held, upcoming
        while len(pending) < depth:
            if upcoming is None:
                upcoming = next(keys, _END)
            if upcoming is _END:
                return
            n = int(size(upcoming))
            if pending and held + n > budget:
                return
            pending.append((upcoming, n, pool.submit(fetch, upcoming)))
            held += n
            upcoming = None

    try:
        fill()
        while pending:
            key, n, future = pending.popleft()
            payload = future.result()
            held -= n
            depth = min(depth + 1, 2 * workers)  # bounded: tiny shards must not draw an endless key stream far ahead
            fill()  # before handing over: the freed budget starts the next fetches while the caller works
            yield key, payload
    finally:
        for _, _, future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


_END = object()
