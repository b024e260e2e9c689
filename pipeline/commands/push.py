"""`logitcache push CACHE REPO_ID`: share a finished cache as a Hugging Face dataset repo, with a dataset card."""

import argparse

from logitcache.pipeline.options import add_storage_option

HELP = "upload a finished Parquet cache to a Hugging Face dataset repo, with a generated dataset card"

DESCRIPTION = """\
Upload a finished Parquet cache (a folder, or a URL such as s3://...) to the Hugging Face dataset
repo REPO_ID (created if needed), with a generated README.md: its header (license, source dataset,
task category, size category, tags, and the configs that point datasets.load_dataset(REPO_ID) and the
Hub's viewer at the shards), then the teacher, K or N, encoding, fingerprint, counts, the mean
probability the stored ids hold, the columns as the shards type them, and the command that trains
from it. Others then train straight from the repo:

  logitcache train --cache hf://datasets/REPO_ID --student ... --loss kl --out ./student

The shards go first (several commits for a large cache; run the same command again to resume), the
index and card last, in one commit: until then the repo is no cache. A URL is read a batch of shards
(about 2 GiB) at a time through a temporary folder, not copied whole. A Zarr cache is refused with
the `logitcache convert ... --backend parquet` command that makes a Parquet copy: the Hub's viewer
and datasets.load_dataset read Parquet only.
Credentials: `hf auth login` (the Hub's own login), the HF_TOKEN variable, or --token-file FILE.
A token is never taken on the command line, where `ps` and the shell's history would show it.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("push", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  logitcache push ./cache me/qwen2.5-7b-instruct-top32 --private")
    p.add_argument("cache", help="a finished Parquet cache: a folder or a URL (s3://..., read without a full local copy)")
    p.add_argument("repo_id", metavar="REPO_ID", help="dataset repo, e.g. me/qwen-logits")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token-file", metavar="FILE",
                   help="a file holding the Hugging Face token (default: HF_TOKEN, else the Hub's login)")
    p.add_argument("--token", action=_RefuseToken, help=argparse.SUPPRESS)
    p.add_argument("--revision", help="branch to upload to (default: main)")
    p.add_argument("--license", metavar="ID",
                   help="the card's license, a Hub license id (e.g. apache-2.0, other); the teacher's and the "
                        "dataset's terms decide it (default: none stated)")
    add_storage_option(p)
    p.add_argument("--mass-shards", type=int, default=8, metavar="N",
                   help="shards read to measure the mean stored probability for the card (default 8; 0: skip)")
    return p


class _RefuseToken(argparse.Action):
    """`--token VALUE` is refused without echoing VALUE: a token on the command line is in `ps` and history."""

    def __call__(self, parser, namespace, values, option_string=None):
        from logitcache.storage.errors import ConfigError

        raise ConfigError("push: --token is not taken on the command line (`ps` and the shell's history show "
                          "it); use HF_TOKEN, `hf auth login`, or --token-file FILE")


def read_token_file(path: str) -> str:
    """The token in `path` (surrounding whitespace dropped). Raises ConfigError: unreadable or empty."""
    from logitcache.storage.errors import ConfigError

    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as e:
        raise ConfigError(f"push --token-file {path}: cannot read ({e.strerror})") from None
    if not token:
        raise ConfigError(f"push --token-file {path}: the file is empty")
    return token


def push_cache(cache: str, repo_id: str, *, api=None, private: bool = False, token: str | None = None,
               revision: str | None = None, mass_shards: int = 8, license: str | None = None,
               storage_options: dict | None = None, stage_bytes: int = 2 << 30) -> str:
    """Upload a finished Parquet cache (a local folder or any fsspec URL) with its card. Returns the card's text.

    The shards go first, with the Hub client's `upload_folder` (with hf_xet: chunked, deduplicated, split
    into several commits, and resumed by running it again); `index.json` and the card go last, in one
    commit, so the repo is a finished cache or, to `open_cache`, none. A remote cache is staged through a
    temporary folder about `stage_bytes` at a time (the client uploads files from a local path), never
    copied whole; a shard the repo already holds with the same sha256 is not fetched again.

    Args:
        api: a `huggingface_hub.HfApi` (default: a new one with `token`); tests point one at a loopback hub.

    Raises:
        ConfigError: not a finished cache (via `open_cache`), a Zarr cache, or credentials in its index.
    """
    import fnmatch
    import json
    import os

    import numpy as np

    from logitcache.storage import open_cache
    from logitcache.storage.card import CARD_NAME, SHARD_GLOB, dataset_card, shard_schema
    from logitcache.storage.errors import ConfigError
    from logitcache.storage.layout import INDEX_NAME
    from logitcache.storage.paths import safe_join
    from logitcache.storage.redact import redact_text

    opened = open_cache(cache, storage_options=storage_options)
    if opened.backend != "arrow":  # the Hub's viewer and datasets.load_dataset read Parquet shards only
        raise ConfigError(f"push: {cache} is a {opened.backend} cache; the Hub's dataset viewer and "
                          f"datasets.load_dataset read Parquet. Convert it first: logitcache convert {cache} "
                          f"{cache.rstrip('/')}-parquet --backend parquet")
    if redact_text(json.dumps(opened.index)) != json.dumps(opened.index):
        raise ConfigError(f"push: {cache}/index.json records a URL with credentials (written by an older "
                          f"logitcache); remove them from its dataset section before sharing the cache")
    names = [entry["name"] for entry in opened.shards]
    if "://" not in cache:
        # The card's configs glob reads every shard-*.parquet as rows: one the index does not name would be read.
        strays = sorted(set(fnmatch.filter(os.listdir(cache), SHARD_GLOB)) - set(names))
        if strays:
            raise ConfigError(f"push: {cache} holds {len(strays)} shard file(s) its index does not name "
                              f"({', '.join(strays[:3])}); datasets.load_dataset would read them as rows. "
                              f"Move them out of the folder first")
    mass = None
    if mass_shards > 0:
        tails = [shard.tail_mass for _, shard in opened.iter_shards(list(range(min(mass_shards, len(opened.shards)))))]
        tails = np.concatenate(tails) if tails else np.zeros(0)
        mass = float(1.0 - tails.astype(np.float64).mean()) if len(tails) else None
    card = dataset_card(opened.index, repo_id=repo_id, top_k_mass=mass, license=license,
                        schema=shard_schema(opened.fs, opened.root, opened.index))
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    message = f"logitcache cache {opened.fingerprint[:12]}"
    if "://" not in cache:
        api.upload_folder(folder_path=cache, repo_id=repo_id, repo_type="dataset", revision=revision,
                          allow_patterns=[SHARD_GLOB], commit_message=f"{message}: shards")
    else:
        _upload_staged(api, opened, repo_id, revision, stage_bytes, f"{message}: shards")
    from huggingface_hub import CommitOperationAdd

    index_bytes = opened.fs.cat_file(safe_join(opened.root, INDEX_NAME))  # the bytes the cache holds, unchanged
    api.create_commit(repo_id=repo_id, repo_type="dataset", revision=revision, commit_message=message,
                      operations=[CommitOperationAdd(INDEX_NAME, index_bytes),
                                  CommitOperationAdd(CARD_NAME, card.encode())])
    return card


def _upload_staged(api, opened, repo_id: str, revision: str | None, stage_bytes: int, message: str) -> None:
    """Upload a remote cache's shards through a temporary local folder, about `stage_bytes` at a time; each
    staged file is checked against the index's sha256 first, so a damaged shard is not published."""
    import hashlib
    import shutil
    import tempfile

    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    from logitcache.storage.errors import ShardError
    from logitcache.storage.paths import safe_join

    done = {}  # shards the repo holds as LFS/xet files, by sha256 (the index's checksum of a Parquet shard)
    try:
        for item in api.list_repo_tree(repo_id, repo_type="dataset", revision=revision):
            if getattr(item, "lfs", None) is not None:
                done[item.path] = item.lfs.sha256
    except (EntryNotFoundError, RevisionNotFoundError):  # nothing committed there yet: nothing to skip
        done = {}
    todo = [entry for entry in opened.shards if done.get(entry["name"]) != entry["sha256"]]
    start = 0
    while start < len(todo):
        end, size = start + 1, todo[start]["bytes"]
        while end < len(todo) and size + todo[end]["bytes"] <= stage_bytes:
            size += todo[end]["bytes"]
            end += 1
        stage = tempfile.mkdtemp(prefix="logitcache-push-")
        try:
            for entry in todo[start:end]:
                local = f"{stage}/{entry['name']}"
                opened.fs.get_file(safe_join(opened.root, entry["name"]), local)
                with open(local, "rb") as f:
                    if hashlib.file_digest(f, "sha256").hexdigest() != entry["sha256"]:
                        raise ShardError(f"push: {entry['name']} of {opened.url} does not match its sha256 in the "
                                         f"index; nothing of it was uploaded (`logitcache validate` lists them all)")
            api.upload_folder(folder_path=stage, repo_id=repo_id, repo_type="dataset", revision=revision,
                              commit_message=message)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        start = end


def execute(args) -> str:
    """The command's work; returns the dataset card it wrote and uploaded."""
    from logitcache.pipeline.commands.precompute import parse_storage_options

    token = read_token_file(args.token_file) if args.token_file else None  # None: HF_TOKEN or the login
    return push_cache(args.cache, args.repo_id, private=args.private, token=token, revision=args.revision,
                      mass_shards=args.mass_shards, license=args.license,
                      storage_options=parse_storage_options(args.storage_options))


def run(args) -> int:
    execute(args)
    print(f"pushed {args.cache} to https://huggingface.co/datasets/{args.repo_id}; train from it with "
          f"--cache hf://datasets/{args.repo_id}")
    return 0
