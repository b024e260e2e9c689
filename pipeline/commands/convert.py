"""`logitcache convert SRC DST --format zarr|arrow`: rewrite a cache in the other backend."""

import argparse

HELP = "rewrite a cache with another backend (zarr <-> arrow) and optionally another encoding"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help=HELP, description=HELP + ". Lossless when the encoding is unchanged; "
                       "rerunning resumes an interrupted conversion.",
                       epilog="example: logitcache convert ./cache-zarr ./cache-arrow --format arrow")
    p.add_argument("src", help="the finished cache to read (path or fsspec URL)")
    p.add_argument("dst", help="where to write the converted cache")
    p.add_argument("--format", required=True, choices=["zarr", "arrow"], help="backend of the new cache")
    p.add_argument("--encoding", choices=["lossless", "float16", "compact"], default=None,
                   help="value encoding of the new cache (default: keep the source's)")
    return p


def run(args) -> int:
    from logitcache.storage import convert_cache

    index = convert_cache(args.src, args.dst, backend=args.format, encoding=args.encoding)
    print(f"wrote {args.dst}: {len(index['shards'])} shard(s), {sum(e['bytes'] for e in index['shards'])} bytes, "
          f"format={index['backend']} encoding={index['encoding']['name']}")
    return 0
