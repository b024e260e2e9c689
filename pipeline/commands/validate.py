"""`logitcache validate CACHE`: check every shard against the index."""

import argparse

from logitcache.pipeline.options import add_progress_option, add_storage_option, show_progress

HELP = "check a cache: the index, then every shard's checksum, counts and values"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("validate", help=HELP, description=HELP + ".\nExit 0 when all is well; otherwise "
                       "exit 1 and print each bad shard with the reason.",
                       epilog="examples:\n  logitcache validate ./cache\n  logitcache validate s3://bucket/cache",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", help="cache directory or fsspec URL (s3://, gs://, ...)")
    add_storage_option(p)
    add_progress_option(p)
    return p


def execute(args) -> dict:
    """The command's work: {"problems": one line per bad shard, "shards", "sequences", "positions"}."""
    from logitcache.pipeline.commands.precompute import parse_storage_options
    from logitcache.storage import open_cache

    cache = open_cache(args.cache, storage_options=parse_storage_options(args.storage_options))
    return {"problems": cache.validate(progress=show_progress(args.progress)), "shards": len(cache.shards),
            "sequences": len(cache), "positions": cache.index["counts"]["positions"]}


def run(args) -> int:
    result = execute(args)
    problems = result["problems"]
    for line in problems:
        print(f"BAD  {line}")
    if problems:
        print(f"{len(problems)} of {result['shards']} shard(s) failed validation")
        return 1
    print(f"OK   {result['shards']} shard(s), {result['sequences']} sequences, {result['positions']} positions")
    return 0
