"""`logitcache push CACHE REPO_ID`: share a finished cache as a Hugging Face dataset repo, with a dataset card."""

import argparse

HELP = "upload a finished cache to a Hugging Face dataset repo, with a generated dataset card"

DESCRIPTION = """\
Upload a finished local cache folder to the Hugging Face dataset repo REPO_ID (created if needed),
with a generated README.md: teacher, K or N, encoding, fingerprint, counts, the mean probability
the stored ids hold, the columns and how to decode them, and the command that trains from it.
Others then train straight from the repo:

  logitcache train --cache hf://datasets/REPO_ID --student ... --loss kl --out ./student

A cache written with --backend parquet is also a plain dataset: datasets.load_dataset(REPO_ID).
Credentials: `hf auth login` (the Hub's own login), the HF_TOKEN variable, or --token-file FILE.
A token is never taken on the command line, where `ps` and the shell's history would show it.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("push", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  logitcache push ./cache me/qwen2.5-7b-instruct-top32 --private")
    p.add_argument("cache", help="a finished local cache folder")
    p.add_argument("repo_id", metavar="REPO_ID", help="dataset repo, e.g. me/qwen-logits")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token-file", metavar="FILE",
                   help="a file holding the Hugging Face token (default: HF_TOKEN, else the Hub's login)")
    p.add_argument("--token", action=_RefuseToken, help=argparse.SUPPRESS)
    p.add_argument("--revision", help="branch to upload to (default: main)")
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
               revision: str | None = None, mass_shards: int = 8) -> str:
    """Write the card into the cache folder and upload the folder. Returns the card's text.

    Args:
        api: a `huggingface_hub.HfApi` (default: a new one with `token`); tests pass a local stand-in.

    Raises:
        ConfigError: not a local folder, or not a finished cache (via `open_cache`).
    """
    import json
    import os

    import numpy as np

    from logitcache.storage import open_cache
    from logitcache.storage.card import CARD_NAME, dataset_card
    from logitcache.storage.errors import ConfigError
    from logitcache.storage.redact import redact_text

    if "://" in cache or not os.path.isdir(cache):
        raise ConfigError(f"push CACHE: {cache} is not a local folder; push uploads a local cache "
                          f"(copy a remote one here first)")
    opened = open_cache(cache)
    if opened.backend != "arrow":  # the Hub's viewer and datasets.load_dataset read Parquet shards only
        raise ConfigError(f"push: {cache} is a {opened.backend} cache; the Hub's dataset viewer and "
                          f"datasets.load_dataset read Parquet. Convert it first: logitcache convert {cache} "
                          f"{cache.rstrip('/')}-parquet --backend parquet")
    if redact_text(json.dumps(opened.index)) != json.dumps(opened.index):
        raise ConfigError(f"push: {cache}/index.json records a URL with credentials (written by an older "
                          f"logitcache); remove them from its dataset section before sharing the cache")
    mass = None
    if mass_shards > 0:
        tails = [shard.tail_mass for _, shard in opened.iter_shards(list(range(min(mass_shards, len(opened.shards)))))]
        tails = np.concatenate(tails) if tails else np.zeros(0)
        mass = float(1.0 - tails.astype(np.float64).mean()) if len(tails) else None
    card = dataset_card(opened.index, repo_id=repo_id, top_k_mass=mass)
    with open(os.path.join(cache, CARD_NAME), "w") as f:
        f.write(card)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    # job.json is the writers' record (resume state), not part of the shared dataset.
    api.upload_folder(folder_path=cache, repo_id=repo_id, repo_type="dataset", revision=revision,
                      ignore_patterns=["job.json", "*.tmp-*"],
                      commit_message=f"logitcache cache {opened.fingerprint[:12]}")
    return card


def execute(args) -> str:
    """The command's work; returns the dataset card it wrote and uploaded."""
    token = read_token_file(args.token_file) if args.token_file else None  # None: HF_TOKEN or the login
    return push_cache(args.cache, args.repo_id, private=args.private, token=token, revision=args.revision,
                      mass_shards=args.mass_shards)


def run(args) -> int:
    execute(args)
    print(f"pushed {args.cache} to https://huggingface.co/datasets/{args.repo_id}; train from it with "
          f"--cache hf://datasets/{args.repo_id}")
    return 0
