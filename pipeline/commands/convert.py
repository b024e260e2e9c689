"""`logitcache convert SRC DST --backend zarr|arrow`: rewrite a cache in the other backend."""

import argparse

from logitcache.pipeline.options import (add_deprecated_alias, add_progress_option, add_storage_option,
                                       show_progress)
from logitcache.storage.backends import BACKENDS

HELP = "rewrite a cache with another backend (zarr <-> arrow) and optionally another encoding"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help=HELP, description=HELP + ".\nLossless when the encoding is unchanged; "
                       "rerunning resumes an interrupted conversion.",
                       epilog="example:\n  logitcache convert ./cache-zarr ./cache-arrow --backend parquet",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the finished cache to read (path or fsspec URL)")
    p.add_argument("dst", help="where to write the converted cache")
    p.add_argument("--backend", choices=[*BACKENDS, "parquet"],
                   help="storage backend of the new cache (required): zarr, or parquet (alias: arrow)")
    add_deprecated_alias(p, "--format", "--backend", dest="backend", choices=[*BACKENDS, "parquet"])
    p.add_argument("--encoding", choices=["lossless", "float16", "compact"], default=None,
                   help="value encoding of the new cache (default: keep the source's)")
    add_storage_option(p, urls="the SRC and DST URLs alike (s3://, gs://)")
    add_progress_option(p)
    return p


def execute(args) -> dict:
    """The command's work; returns the new cache's index."""
    from logitcache.pipeline.commands.precompute import parse_storage_options
    from logitcache.storage import ConfigError, convert_cache

    if args.backend is None:
        raise ConfigError(f"convert: --backend is required ({' or '.join(BACKENDS)})")
    backend = "arrow" if args.backend == "parquet" else args.backend  # the name users look for
    return convert_cache(args.src, args.dst, backend=backend, encoding=args.encoding,
                         storage_options=parse_storage_options(args.storage_options),
                         progress=show_progress(args.progress))


def run(args) -> int:
    index = execute(args)
    print(f"wrote {args.dst}: {len(index['shards'])} shard(s), {sum(e['bytes'] for e in index['shards'])} bytes, "
          f"backend={index['backend']} encoding={index['encoding']['name']}")
    return 0
