"""Stage two's reader from an object store against local disk: positions per second, K = 32, side by side.

    .venv/bin/python benchmarks/bench_read.py             # ~3-5 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_read.py --quick     # a smaller cache, a smoke run

One cache (Zarr, compact, K = 32, 16 shards of 256 sequences x 512 tokens: ~131k positions and ~11 MB
a shard, about a stage-one shard's size) is written to local disk and copied as is to a real
S3-compatible server (moto, in its own process on loopback) behind a TCP proxy that adds 50 ms to
every request (tests/support/s3server.py). Its ids are uniform over 151,936 (the worst case for bytes over the
wire, see RESULTS.md's storage table), its log-probs sorted random values.

Each pass reads the whole cache as `logitcache train` does with its defaults: `ShardedStream` over a
`CacheSource` (window 2, shuffled), `SameTokenizerTargets` items, a DataLoader with one worker process
(`--num-workers 1`) and `Collator` batches of 8; a position is one teacher row in a batch. Rows:

    local, s3 + 50 ms      the default settings (read-ahead on: `storage.readahead`)
    ... read-ahead off     shards fetched one at a time (`read_ahead_bytes=0`), for comparison

Passes are interleaved round by round and each row is the median, so a load change on a shared
machine hits every row alike; wall time is what counts (waiting on the store is the point), and the
reader's CPU time (this process and its DataLoader worker, getrusage) is printed beside it. `--profile`
also runs one in-process pass on S3 under cProfile and prints where its time went.
Writes benchmarks/out/read_store.json.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from s3server import make_bucket, moto_server, s3_options, tcp_proxy  # noqa: E402

from logitcache.stages.train.alignment import SameTokenizerTargets  # noqa: E402
from logitcache.stages.train.collate import Collator  # noqa: E402
from logitcache.stages.train.data import CacheSource, ShardedStream  # noqa: E402
from logitcache.storage import CacheWriter, ShardData  # noqa: E402
from logitcache.storage.testing import index_metadata  # noqa: E402

OUT = Path(__file__).parent / "out"
VOCAB, K = 151_936, 32


def write_cache(path: str, *, shards: int, rows: int, length: int) -> int:
    """A K = 32 compact Zarr cache of random sequences; returns its number of positions."""
    rng = np.random.default_rng(0)
    w = CacheWriter(path, backend="zarr", encoding="compact", vocab_size=VOCAB, fingerprint="bench-read")
    total = 0
    for j in range(shards):
        p = length - 1
        lp = -np.sort(rng.exponential(2.0, (rows * p, K)).astype(np.float32), axis=1)
        lp -= np.logaddexp.reduce(lp, axis=1, keepdims=True) - np.log(0.9)  # the top-32 hold 0.9
        seqs = [{"row_index": j * rows + i, "input_ids": rng.integers(0, VOCAB, length), "positions": np.arange(p),
                 "topk_ids": rng.integers(0, VOCAB, (p, K)), "topk_logprobs": lp[i * p:(i + 1) * p],
                 "target_logprob": lp[i * p:(i + 1) * p, 0], "tail_mass": np.full(p, 0.1, np.float32)}
                for i in range(rows)]
        w.write_shard(j, ShardData.from_sequences(seqs))
        total += rows * p
    meta = index_metadata(K, vocab=VOCAB)
    meta["tokenizer"]["vocab_size"] = VOCAB
    meta["inputs"] = {"kind": "text", "stored_fields": []}
    w.finalize(meta)
    return total


class OneAtATime(CacheSource):
    """The default source with reading ahead off: each shard fetched when its window needs it."""

    def load_many(self, ids):
        return (shard for _, shard in self.cache.iter_shards(ids, read_ahead_bytes=0))


def one_pass(url: str, options: dict | None, *, ahead: bool, num_workers: int, store: tuple[int, ...] = ()) -> dict:
    """Read the whole cache as training does; returns positions, wall seconds, seconds to the first batch,
    the reader's CPU seconds and those of the `store` processes (the S3 server and the proxy)."""
    from torch.utils.data import DataLoader

    cls = CacheSource if ahead else OneAtATime
    stream = ShardedStream(cls(url, to_item=SameTokenizerTargets(VOCAB), storage_options=options),
                           seed=0, epochs=1, rank=0, world_size=1)
    loader = DataLoader(stream, batch_size=8, num_workers=num_workers, collate_fn=Collator(pad_id=0))
    cpu0, store0 = _cpu(), sum(map(_proc_cpu, store))
    t0 = time.perf_counter()
    positions, first = 0, None
    for batch in loader:
        positions += len(batch["teacher_ids"])
        if first is None:
            first, after_first = time.perf_counter() - t0, positions
    wall = time.perf_counter() - t0
    del loader  # the worker exits; its CPU time is counted once it is reaped
    return {"positions": positions, "wall": wall, "first_batch": first,
            "steady": (positions - after_first) / (wall - first), "cpu": _cpu() - cpu0,
            "store_cpu": sum(map(_proc_cpu, store)) - store0}


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _moto_pid() -> int:
    """The S3 server process this one started."""
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if proc.name.isdigit() and int(stat[1]) == os.getpid() and b"moto.server" in (proc / "cmdline").read_bytes():
                return int(proc.name)
        except OSError:
            continue
    raise RuntimeError("no moto server process found")


def startup(url: str, options: dict | None) -> dict:
    """Seconds a fresh reader spends before its first item: opening the cache (a new filesystem client and
    the index), fetching shard 0, decoding it."""
    from logitcache.storage import open_cache

    t0 = time.perf_counter()
    cache = open_cache(url, storage_options={**(options or {}), "skip_instance_cache": True} if options else None)
    t1 = time.perf_counter()
    payload = cache._fetch(0)
    t2 = time.perf_counter()
    cache._decode(0, payload)
    return {"open": t1 - t0, "fetch_shard": t2 - t1, "decode_shard": time.perf_counter() - t2}


def profile_pass(url: str, options: dict) -> str:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    result = one_pass(url, options, ahead=True, num_workers=0)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
    return f"in-process pass on S3 + latency: {result['positions'] / result['wall'] / 1e6:.3f} M positions/s\n" + out.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 shards of 64 sequences, 1 round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency", type=float, default=0.05, help="seconds added to every request")
    ap.add_argument("--num-workers", type=int, default=1, help="DataLoader workers (train's default: 1)")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    shards, rows, length = (4, 64, 512) if a.quick else (16, 256, 512)
    if a.quick:
        a.rounds = 1
    import s3fs

    OUT.mkdir(exist_ok=True)
    machine = {"machine": platform.machine(), "cores": os.cpu_count(), "python": sys.version.split()[0],
               "s3fs": s3fs.__version__, "load_before": os.getloadavg()}
    print(f"machine: {machine}", flush=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp, moto_server() as (endpoint, _):
        local = os.path.join(tmp, "cache")
        t0 = time.perf_counter()
        total = write_cache(local, shards=shards, rows=rows, length=length)
        make_bucket(endpoint, "bench")
        fs = s3fs.S3FileSystem(**s3_options(endpoint))
        fs.put(local, "bench/cache", recursive=True)
        nbytes = sum(e["bytes"] for e in json.load(open(os.path.join(local, "index.json")))["shards"])
        print(f"cache: {shards} shards, {total:,} positions, {nbytes / 2**20:.1f} MiB "
              f"({nbytes / total:.1f} B/position), written and uploaded in {time.perf_counter() - t0:.0f} s", flush=True)
        with tcp_proxy(endpoint, latency=a.latency) as proxy, tcp_proxy(endpoint) as plain:
            s3 = ("s3://bench/cache", s3_options(proxy.endpoint))
            moto = _moto_pid()
            rows_ = {"local": (local, None, True, ()),
                     f"s3 + {a.latency * 1e3:.0f} ms": (*s3, True, (moto, proxy.proc.pid)),
                     "local, read-ahead off": (local, None, False, ()),
                     f"s3 + {a.latency * 1e3:.0f} ms, read-ahead off": (*s3, False, (moto, proxy.proc.pid)),
                     "s3, no latency added": ("s3://bench/cache", s3_options(plain.endpoint), True,
                                              (moto, plain.proc.pid))}
            runs = {name: [] for name in rows_}
            for r in range(a.rounds):
                for name, (url, options, ahead, store) in rows_.items():
                    res = one_pass(url, options, ahead=ahead, num_workers=a.num_workers, store=store)
                    assert res["positions"] == total, (res["positions"], total)
                    runs[name].append(res)
                    print(f"  round {r} {name:32s} {res['positions'] / res['wall'] / 1e6:6.3f} M positions/s, "
                          f"after the first batch {res['steady'] / 1e6:6.3f} M "
                          f"(wall {res['wall']:.2f} s, first batch {res['first_batch']:.2f} s, reader CPU "
                          f"{res['cpu']:.2f} s, store CPU {res['store_cpu']:.2f} s)", flush=True)
            starts = {"local": startup(local, None), "s3": startup(*s3)}
            print(f"start-up, seconds: {json.dumps(starts)}", flush=True)
            profile = profile_pass(*s3) if a.profile else None
    rate = {name: statistics.median(r["positions"] / r["wall"] for r in v) for name, v in runs.items()}
    steady = {name: statistics.median(r["steady"] for r in v) for name, v in runs.items()}
    cpu = {name: statistics.median(r["cpu"] for r in v) for name, v in runs.items()}
    store_cpu = {name: statistics.median(r["store_cpu"] for r in v) for name, v in runs.items()}
    first = {name: statistics.median(r["first_batch"] for r in v) for name, v in runs.items()}
    machine["load_after"] = os.getloadavg()
    s3_name = f"s3 + {a.latency * 1e3:.0f} ms"
    result = {"machine": machine, "setup": {**vars(a), "shards": shards, "rows": rows, "length": length, "k": K,
                                            "positions": total, "bytes": nbytes, "backend": "zarr",
                                            "encoding": "compact"},
              "positions_per_s": rate, "after_first_batch_per_s": steady, "reader_cpu_s": cpu, "store_cpu_s": store_cpu, "first_batch_s": first, "startup_s": starts,
              "s3_over_local": rate[s3_name] / rate["local"],
              "s3_over_local_after_first_batch": steady[s3_name] / steady["local"], "runs": runs}
    (OUT / "read_store.json").write_text(json.dumps(result, indent=1))
    print(f"\n| reader | M positions/s, whole pass | vs local | after the first batch | vs local | first batch s "
          f"| reader CPU s | store CPU s |\n|---|---|---|---|---|---|---|---|")
    for name in rate:
        print(f"| {name} | {rate[name] / 1e6:.3f} | {rate[name] / rate['local']:.2f} | {steady[name] / 1e6:.3f} | "
              f"{steady[name] / steady['local']:.2f} | {first[name]:.2f} | {cpu[name]:.2f} | {store_cpu[name]:.2f} |")
    print(f"(medians of {a.rounds} rounds)\nS3 + {a.latency * 1e3:.0f} ms / local disk, default settings: "
          f"{result['s3_over_local']:.2f} whole pass, {result['s3_over_local_after_first_batch']:.2f} after the first batch")
    if profile:
        print(profile)
    if not a.quick and a.latency == 0.05:
        from results import record

        steady_ratio = round(result["s3_over_local_after_first_batch"], 2)
        whole_ratio = round(result["s3_over_local"], 2)
        record("train.s3_read.steady", values={"S3 + 50 ms": steady_ratio}, met=steady_ratio >= 0.8)
        record("train.s3_read.whole_pass", values={"S3 + 50 ms": whole_ratio}, met=whole_ratio >= 0.8)


if __name__ == "__main__":
    main()
