"""`logitcache inspect CACHE [--json] [--plot out.png]`: sizes and the long-tail picture."""

import argparse
import json

from logitcache.pipeline.options import add_progress_option, add_storage_option, show_progress

HELP = "summarize a cache: counts, bytes per position and per entry, and how much probability the top-K holds"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help=HELP, description=HELP + ".",
                       epilog="examples:\n  logitcache inspect ./cache --plot topk_mass.png\n"
                              "  logitcache inspect s3://bucket/cache --json --max-shards 8",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", help="cache directory or fsspec URL")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--plot", metavar="PNG", help="save a histogram of the top-K probability mass per position")
    p.add_argument("--max-shards", type=int, default=None, metavar="N",
                   help="read at most this many shards for the mass statistics (default: all)")
    add_storage_option(p)
    add_progress_option(p)
    return p


def summarize(cache, max_shards: int | None = None, *, progress: bool = False):
    """Return (summary dict, per-position top-K mass array) for a cache; `progress`: a bar on stderr, in shards."""
    import numpy as np
    from tqdm.auto import tqdm

    idx = cache.index
    counts, total_bytes = idx["counts"], sum(e["bytes"] for e in idx["shards"])
    n = len(cache.shards) if max_shards is None else min(max_shards, len(cache.shards))
    shards = tqdm(cache.iter_shards(range(n)), total=n, desc="inspect", unit="shard", disable=not progress)
    mass = [1.0 - shard.tail_mass for _, shard in shards]
    mass = np.concatenate(mass) if mass else np.zeros(0)
    positions = max(counts["positions"], 1)
    summary = {
        "format": idx["backend"], "format_version": idx["format_version"], "encoding": idx["encoding"]["name"],
        "mode": idx["sparsification"]["mode"], "top_k": idx["sparsification"]["k"],
        "sequences": counts["sequences"], "tokens": counts["tokens"], "positions": counts["positions"],
        "shards": len(idx["shards"]), "bytes": total_bytes,
        "bytes_per_position": total_bytes / positions,
        "bytes_per_entry": total_bytes / (positions * idx["sparsification"]["k"]),
        "topk_mass": {q: float(np.quantile(mass, p)) if mass.size else None
                      for q, p in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))} | {"mean": float(mass.mean()) if mass.size else None},
        "teacher": idx["teacher"].get("name_or_path"), "fingerprint": idx["fingerprint"],
        "other_counts": {k: v for k, v in counts.items() if k not in ("sequences", "tokens", "positions")},
    }
    return summary, mass


def plot_mass(mass, k: int, path: str) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.hist(mass, bins=50, range=(0, 1), color="#3b6ea8")
    ax.set_xlabel(f"probability mass in the top-{k} ids")
    ax.set_ylabel("positions")
    if len(mass):  # the same middle element sorted() would give, in linear time over millions of positions
        median = float(np.partition(mass, len(mass) // 2)[len(mass) // 2])
        ax.set_title(f"Teacher top-{k} mass per position (median {median:.3f})")
    else:
        ax.set_title("no positions")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def execute(args) -> dict:
    """The command's work: the summary `--json` prints (after drawing --plot if asked)."""
    from logitcache.pipeline.commands.precompute import parse_storage_options
    from logitcache.storage import open_cache

    cache = open_cache(args.cache, storage_options=parse_storage_options(args.storage_options))
    summary, mass = summarize(cache, args.max_shards, progress=show_progress(args.progress))
    if args.plot:
        plot_mass(mass, summary["top_k"], args.plot)
    return summary


def run(args) -> int:
    summary = execute(args)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    m = summary["topk_mass"]
    rows = [
        ("cache", args.cache), ("format", f"{summary['format']} v{summary['format_version']}, {summary['encoding']} encoding"),
        ("teacher", summary["teacher"]), ("mode", f"{summary['mode']}, K={summary['top_k']}"),
        ("sequences", summary["sequences"]), ("tokens", summary["tokens"]), ("positions", summary["positions"]),
        ("shards", summary["shards"]), ("bytes", f"{summary['bytes']:,}"),
        ("bytes/position", f"{summary['bytes_per_position']:.1f}"), ("bytes/entry", f"{summary['bytes_per_entry']:.2f}"),
    ]
    if m["mean"] is not None:
        rows.append(("top-K mass", f"mean {m['mean']:.3f}  p10 {m['p10']:.3f}  median {m['p50']:.3f}  p90 {m['p90']:.3f}"))
    rows += [(k, v) for k, v in summary["other_counts"].items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.plot:
        print(f"{'plot':<{width}}  {args.plot}")
    return 0
