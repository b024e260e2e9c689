"""The `logitcache` command line.

    logitcache --help
    logitcache <command> --help

Every command lives in `logitcache.pipeline.commands.<name>` with `add_parser(subparsers)` and
`run(args) -> int`, and imports its heavy dependencies inside `run`, so `--help` stays fast.
Commands that take many settings also accept `--config FILE.yaml`; flags given on the command line
override the file.
"""

import argparse
import importlib
import sys

import yaml

from logitcache.pipeline.options import DeprecatedAlias, warn_deprecated
from logitcache.storage.errors import ConfigError, LogitCacheError

__all__ = ["main", "build_parser"]

COMMANDS = ("precompute", "merge", "train", "eval", "validate", "inspect", "convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logitcache",
        description="Cache a teacher's top-K (or sampled) log-probs once, then train students from the cache.",
        epilog="Run `logitcache <command> --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"logitcache.pipeline.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"logitcache.pipeline.commands.{name}":
                raise
            continue  # command not built yet
        sub_parser = module.add_parser(sub)
        sub_parser.set_defaults(_run=module.run)
    return parser


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv; if it names --config, use the YAML's keys as defaults and parse again."""
    sub_parser = parser._subparsers._group_actions[0].choices.get(argv[0] if argv else None)
    if sub_parser is None or not any(a.dest == "config" for a in sub_parser._actions):
        return parser.parse_args(argv)
    # Find --config before the real parse: options the file provides may be required ones.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv[1:])[0].config
    if not path:
        return parser.parse_args(argv)
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    known = {a.dest for a in sub_parser._actions}
    values = {_config_key(sub_parser, k.replace("-", "_")): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)} for `logitcache {argv[0]}`")
    sub_parser.set_defaults(**values)
    # Required options may now come from the file.
    for action in sub_parser._actions:
        if action.dest in values:
            action.required = False
    return parser.parse_args(argv)


def _config_key(sub_parser: argparse.ArgumentParser, key: str) -> str:
    """A config file's key as the option's destination: an old (deprecated) name maps to the new one."""
    for action in sub_parser._actions:
        if isinstance(action, DeprecatedAlias) and key in (s.lstrip("-").replace("-", "_") for s in action.option_strings):
            warn_deprecated(f"config key {key!r}", f"{action.replacement.lstrip('-').replace('-', '_')!r}")
            return action.dest
    return key


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _apply_config(parser, argv)
        return int(args._run(args) or 0)
    except LogitCacheError as e:
        print(f"logitcache {argv[0] if argv else ''}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
