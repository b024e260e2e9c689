"""The `logitcache` command line.

    logitcache --help
    logitcache <command> --help

Every command lives in `logitcache.pipeline.commands.<name>` with `add_parser(subparsers)` and
`run(args) -> int`, and imports its heavy dependencies inside `run`, so `--help` stays fast.
Commands that take many settings (precompute, train) also accept `--config FILE.yaml`; flags given
on the command line override the file. Every command takes `--print-config`: it checks the options
and the rules between them with nothing loaded, and prints the resolved settings as that YAML.

Errors (docs/ERRORS.md): every failure a user can cause or fix is a `LogitCacheError`, printed as one
line `logitcache <command>: error: ...` after any progress bar is closed, with exit status 2. Other
exceptions are bugs and keep their traceback. `--debug` (anywhere on the line) or LOGITCACHE_DEBUG=1
shows the traceback of every error.
"""

import argparse
import importlib
import os
import re
import sys

import yaml

from logitcache.pipeline.options import DeprecatedAlias, check_options, negated_keywords, warn_deprecated
from logitcache.storage.errors import ConfigError, LogitCacheError, io_failure
from logitcache.storage.redact import REDACTED, credentials_in, redact_text

__all__ = ["main", "build_parser"]

COMMANDS = ("precompute", "merge", "train", "eval", "validate", "inspect", "convert", "push")


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors become `ConfigError`s, so they take the one error path (subparsers
    are built with the parent's class, so every command's parser is one of these)."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="logitcache",
        description="Cache a teacher's top-K (or sampled) log-probs once, then train students from the cache.",
        epilog="Run `logitcache <command> --help` for the options of each command. Errors are one line; "
               "--debug (anywhere on the command line) or LOGITCACHE_DEBUG=1 adds the traceback.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"logitcache.pipeline.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"logitcache.pipeline.commands.{name}":
                raise
            continue  # command not built yet
        sub_parser = module.add_parser(sub)
        sub_parser.add_argument("--print-config", action="store_true",
                                help="check every option and the rules between them without loading a model or "
                                     "reading data, print the resolved settings as YAML (credentials redacted) "
                                     "that --config reads back, and exit")
        sub_parser.set_defaults(_run=module.run, _check=getattr(module, "check", None))
    return parser


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv; if it names --config, use the YAML's keys as defaults and parse again."""
    args, _ = _parse_with_config(parser, argv)
    return args


def _parse_with_config(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """(`_apply_config`'s namespace, the {dest: value} the --config file gave, for error messages)."""
    sub_parser = parser._subparsers._group_actions[0].choices.get(argv[0] if argv else None)
    if sub_parser is None or not any(a.dest == "config" for a in sub_parser._actions):
        return parser.parse_args(argv), {}
    # Find --config before the real parse: options the file provides may be required ones.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv[1:])[0].config
    if not path:
        return parser.parse_args(argv), {}
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
    keys = {k: _config_key(sub_parser, k.replace("-", "_")) for k in values}
    for dest in set(keys.values()):
        if len(names := [k for k, d in keys.items() if d == dest]) > 1:  # `lr:` and `learning_rate:`
            raise ConfigError(f"--config {path}: {' and '.join(names)} name the same option; keep one")
    negated = negated_keywords(sub_parser)  # `no_progress: true` is --no-progress
    values = {keys[k]: (not v if k.replace("-", "_") in negated and isinstance(v, bool) else v)
              for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)} for `logitcache {argv[0]}`")
    sub_parser.set_defaults(**values)
    # Required options may now come from the file.
    for action in sub_parser._actions:
        if action.dest in values:
            action.required = False
    return parser.parse_args(argv), values


def _config_key(sub_parser: argparse.ArgumentParser, key: str) -> str:
    """A config file's key as the option's destination. Any of an option's names works as a key
    (`learning_rate:` and `lr:` alike); an old (deprecated) name maps to the new one, with a warning."""
    for action in sub_parser._actions:
        names = {s.lstrip("-").replace("-", "_") for s in action.option_strings}
        if key not in names or key == action.dest:
            continue
        if isinstance(action, DeprecatedAlias):
            warn_deprecated(f"config key {key!r}", f"{action.replacement.lstrip('-').replace('-', '_')!r}")
        return action.dest
    return key


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status (0 ok, 2 error, 1 `validate` found bad shards)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LOGITCACHE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv and argv[0] in COMMANDS else None
    secrets = credentials_in(argv)
    try:
        parser = build_parser()
        args, from_config = _parse_with_config(parser, argv)
        secrets |= credentials_in([], _parsed_storage_options(args))
        sub_parser = parser._subparsers._group_actions[0].choices[args.command]
        check_options(args.command, sub_parser, args, from_config, open_paths=not args.print_config)
        if args.print_config:
            if args._check is not None:
                args._check(args)  # the command's rules between options
            print(yaml.safe_dump(resolved_options(sub_parser, args), sort_keys=False), end="")
            return 0
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"logitcache {command or ''}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        error = user_error(e)
        _close_progress_bars()
        if error is None or debug:
            raise  # a bug (or --debug): the traceback is the useful output
        message = redact_text(one_line(str(error)))
        for secret in sorted(secrets, key=len, reverse=True):  # a credential quoted outside a URL (a client naming a bucket "key:secret@b")
            message = message.replace(secret, REDACTED)
        print(f"logitcache{' ' + command if command else ''}: error: {message}", file=sys.stderr, flush=True)
        return 2


def resolved_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """{option: value} of a parsed command as `--config` YAML takes it: plain YAML values, KEY=VALUE
    lists as mappings, and storage options with their credentials redacted (`storage.redact`)."""
    from logitcache.storage.redact import redact_options

    out = {}
    for action in parser._actions:
        dest = action.dest
        if dest in ("help", "config", "print_config") or dest.startswith("_") or not hasattr(args, dest):
            continue
        value = _plain(getattr(args, dest))
        if dest == "storage_options" and value is not None:
            value = redact_options(_parsed_storage_options(args))
        elif isinstance(value, list) and value and all(isinstance(v, list) and len(v) == 2 for v in value):
            value = dict(value)  # --hf-arg / --loss-option KEY=VALUE pairs
        out[dest] = value
    return out


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _parsed_storage_options(args: argparse.Namespace) -> dict | None:
    """The command's --storage-option values as the run reads them (`parse_storage_options`), if it takes any."""
    from logitcache.pipeline.commands.precompute import parse_storage_options

    return parse_storage_options(getattr(args, "storage_options", None))


def user_error(e: BaseException) -> LogitCacheError | None:
    """The library error `e` is, or stands for; None for a bug.

    `OSError`s that reach the CLI are the environment's (a disk full, a permission, an object store
    that went away): the library wraps them where it knows more, and this is the net for the rest."""
    if isinstance(e, LogitCacheError):
        return e
    return io_failure(e)  # OSErrors and network clients' errors (an endpoint that does not answer)


_WORKER_TRACEBACK = "Original Traceback (most recent call last):"
_QUALIFIED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")


def one_line(message: str) -> str:
    """Messages that quote other tools may span lines; a user's terminal and log get one.

    An error re-raised from a DataLoader worker carries the worker's traceback in its message;
    the line that matters is its last (`module.Error: what went wrong`)."""
    lines = [part.strip() for part in message.splitlines() if part.strip()]
    if any(_WORKER_TRACEBACK in line for line in lines):
        return _QUALIFIED.sub("", lines[-1]) + " (in a data-loading worker)"
    return " ".join(lines) or "(no message)"


def _close_progress_bars() -> None:
    """Close every live tqdm bar, ending its line, so an error never prints glued to a bar."""
    tqdm_std = sys.modules.get("tqdm.std")
    if tqdm_std is None:
        return
    for bar in list(getattr(tqdm_std.tqdm, "_instances", ())):
        try:
            bar.leave = True  # a kept bar ends with a newline; a cleared one leaves the cursor mid-line
            bar.close()
        except Exception:  # a half-built bar: nothing more to tidy
            pass


if __name__ == "__main__":
    sys.exit(main())
