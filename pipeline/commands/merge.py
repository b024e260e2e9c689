"""`logitcache merge CACHE`: finalize a cache that independent precompute jobs filled."""

import argparse

from logitcache.pipeline.options import add_progress_option, add_storage_option, show_progress

HELP = "finalize a cache filled by several `precompute --num-jobs N --job-index I` jobs"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", help=HELP, description=HELP + ".\nReads the jobs' record (job.json) and their "
                       "shard entries, refuses while a job still runs (holds its lease),\nmissing shards (naming "
                       "them), overlapping rows or shards from other settings, and writes the index.\nSafe to run again.",
                       epilog="examples:\n  logitcache merge ./cache\n  logitcache merge s3://bucket/cache",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", help="cache folder or fsspec URL")
    add_storage_option(p)
    add_progress_option(p)
    return p


def execute(args) -> dict:
    """The command's work; returns the finished cache's index."""
    from logitcache.pipeline.commands.precompute import parse_storage_options
    from logitcache.stages.precompute.plan import finalize_cache, read_job_record, writer_from_record
    from logitcache.storage.errors import CacheBusyError
    from logitcache.storage.lease import describe, live_leases
    from logitcache.storage.paths import resolve

    options = parse_storage_options(args.storage_options)
    running = live_leases(*resolve(args.cache, options))
    if running:
        name, lease = running[0]
        raise CacheBusyError(f"{args.cache}: {len(running)} job(s) still running, e.g. {name[:-5]} "
                             f"({describe(lease)}); merge once they have finished")
    record = read_job_record(args.cache, storage_options=options)
    writer = writer_from_record(args.cache, record, storage_options=options)
    return finalize_cache(writer, record, done=writer.finished_shards(progress=show_progress(args.progress)))


def run(args) -> int:
    index = execute(args)
    counts = index["counts"]
    print(f"merged {args.cache}: {len(index['shards'])} shard(s), {counts['sequences']} sequences, "
          f"{counts['positions']} positions, {counts['skipped']} row(s) skipped, {counts['truncated']} truncated "
          f"(fingerprint {index['fingerprint'][:12]})")
    return 0
