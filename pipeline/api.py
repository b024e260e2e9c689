"""logitcache from Python: one function per command, for scripts and other trainers.

    from logitcache.pipeline import api

    api.precompute(teacher="Qwen/Qwen2.5-7B-Instruct", data="chats.jsonl", messages_field="messages",
                   out="./cache", top_k=32)                      # -> PrecomputeResult
    api.validate(cache="./cache")["problems"]                    # -> [] when every shard checks out
    result = api.train(student="Qwen/Qwen2.5-0.5B", cache="./cache", loss="bild", out="./student",
                       max_steps=1000)                           # -> what logitcache_train.json holds
    api.evaluate(model="./student", cache="./cache")["cache"]["teacher_agreement"]
    cache = api.open_cache("./cache")                            # the reader any trainer can use
    for shard_id, shard in cache.iter_shards(): ...

Keyword arguments are the command's options in snake_case (`top_k`, `storage_options`,
`per_device_train_batch_size`: any of an option's names), the same names a `--config` YAML takes;
`logitcache <command> --help` lists them. They pass the same checks as the command line, in the same
code (a wrong value raises the same `ConfigError`), and each function returns what the command
computed instead of printing it.
"""

from __future__ import annotations

from logitcache.storage import open_cache
from logitcache.storage.errors import ConfigError

__all__ = ["precompute", "merge", "train", "evaluate", "validate", "inspect", "convert", "push", "open_cache"]


def precompute(**options):
    """`logitcache precompute`: returns the `PrecomputeResult` (out, fingerprint, shards, stopped_by, index)."""
    return _run("precompute", options)


def merge(**options) -> dict:
    """`logitcache merge`: returns the finished cache's index."""
    return _run("merge", options)


def train(**options) -> dict:
    """`logitcache train`: returns what `logitcache_train.json` holds (settings, metrics, log history)."""
    return _run("train", options)


def evaluate(**options) -> dict:
    """`logitcache eval`: returns the metrics of --data and/or --cache."""
    return _run("eval", options)


def validate(**options) -> dict:
    """`logitcache validate`: returns {"problems": one line per bad shard, "shards", "sequences", "positions"}."""
    return _run("validate", options)


def inspect(**options) -> dict:
    """`logitcache inspect`: returns the summary `inspect --json` prints."""
    return _run("inspect", options)


def convert(**options) -> dict:
    """`logitcache convert`: returns the new cache's index."""
    return _run("convert", options)


def push(**options) -> str:
    """`logitcache push`: returns the dataset card it uploaded (the token: HF_TOKEN, the login, or token_file)."""
    return _run("push", options)


def keywords(parser) -> dict[str, str]:
    """{keyword: option destination} of a command's parser: every name of every option in snake_case
    (`top_k`; `lr`, `learning_rate` and `batch_size`, `per_device_train_batch_size` alike)."""
    names = {}
    for action in parser._actions:
        if action.dest not in ("help", "config", "print_config") and not action.dest.startswith("_"):
            names[action.dest] = action.dest
            for flag in action.option_strings:
                names.setdefault(flag.lstrip("-").replace("-", "_"), action.dest)
    return names


def _run(command: str, options: dict):
    import importlib

    from logitcache.pipeline.cli import build_parser
    from logitcache.pipeline.options import check_options

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    names = keywords(sub)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ConfigError(f"{command}(): unknown option(s) {', '.join(unknown)}; `logitcache {command} --help` "
                          f"lists them")
    values = {names[k]: v for k, v in options.items()}
    missing = [a.dest for a in sub._actions if a.required and a.dest not in values]
    if missing:
        raise ConfigError(f"{command}(): {', '.join(missing)} required")
    sub.set_defaults(**values)
    for action in sub._actions:
        action.required = False
    args = parser.parse_args([command])
    check_options(command, sub, args)
    if args._check is not None:
        args._check(args)
    return importlib.import_module(f"logitcache.pipeline.commands.{command}").execute(args)

