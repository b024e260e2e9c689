"""Checks on option values, declared once per option, run on the parsed options of every command.

Flags and `--config FILE.yaml` values meet in one `argparse.Namespace`, and `check_options` runs
after both are merged and before a command's `run` (so before any model loads). A YAML file
therefore gets exactly the checks a flag gets, and the same message.

Two kinds of checks:
- generic, read from each option's argparse declaration: its `type` (int, float, str), its
  `choices`, and `store_true` flags being booleans. These matter for YAML values, which argparse
  does not convert or check.
- declared here in `RULES`: ranges of numbers (`Number`) and what a path must be (`PATH_RULES`).
  An option name that a command does not have is ignored, so one table serves every command.

    .venv/bin/python -m pytest tests/pipeline/test_bad_inputs.py -q

Old flag names are kept as deprecated aliases (`add_deprecated_alias`): the alias sets the new
option's value and prints one line on stderr saying what to type instead; `--config` files accept
the old key as well, with the same warning.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

from logitcache.storage.errors import ConfigError

__all__ = ["Number", "RULES", "PATH_RULES", "check_options", "flag_name", "DeprecatedAlias", "add_deprecated_alias",
           "warn_deprecated", "add_chat_template_options", "chat_template_kwargs", "add_student_data_options",
           "add_progress_option", "show_progress", "add_storage_option", "negated_keywords"]


@dataclass(frozen=True)
class Number:
    """A finite number in [low, high] (`above`: strictly greater than `low`)."""

    low: float | None = None
    high: float | None = None
    above: bool = False

    def problem(self, value: float) -> str | None:
        """What is wrong with `value`, or None."""
        if not math.isfinite(value):
            return "must be a finite number"
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return f"must be {'>' if self.above else '>='} {_fmt(self.low)}"
        if self.high is not None and value > self.high:
            return f"must be <= {_fmt(self.high)}"
        return None


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE, NON_NEGATIVE, ABOVE_ZERO = Number(1), Number(0), Number(0, above=True)
SEED = Number(0, 2**32 - 1)  # numpy's and torch's seed range

# Option dest -> range, for every command at once; a per-command entry wins over "*".
RULES: dict[str, dict[str, Number]] = {
    "*": {
        "batch_size": POSITIVE, "max_length": Number(2), "top_k": POSITIVE, "temperature": ABOVE_ZERO,
        "seed": SEED, "max_steps": POSITIVE, "epochs": POSITIVE,
    },
    "precompute": {
        "samples": POSITIVE, "max_batch_tokens": POSITIVE, "rows_per_shard": POSITIVE,
        "num_shards": POSITIVE, "shard_index": NON_NEGATIVE, "num_jobs": POSITIVE, "job_index": NON_NEGATIVE,
        "ray_actors": POSITIVE, "max_rows": POSITIVE,
    },
    "train": {
        "per_device_train_batch_size": POSITIVE, "num_train_epochs": POSITIVE, "learning_rate": ABOVE_ZERO,
        "weight_decay": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "gradient_accumulation_steps": POSITIVE,
        "ce_weight": NON_NEGATIVE, "kd_weight": NON_NEGATIVE, "uld_lambda": NON_NEGATIVE,
        "dataloader_num_workers": NON_NEGATIVE, "shuffle_window": POSITIVE, "chunk_size": POSITIVE, "save_steps": POSITIVE,
        "save_total_limit": POSITIVE, "logging_steps": POSITIVE,
        "lora_r": POSITIVE, "lora_alpha": ABOVE_ZERO, "lora_dropout": NON_NEGATIVE, "eval_steps": POSITIVE,
        "cache_weights": NON_NEGATIVE,
    },
    "eval": {"max_sequences": POSITIVE},
    "inspect": {"max_shards": POSITIVE},
    "push": {"mass_shards": NON_NEGATIVE},
}

# Option dest -> what the path must be, per command:
#   "model": a local model folder, or (when no such path exists) a hub id;
#   "out_dir": a folder to create or reuse, never an existing file;
#   "in_dir": a cache folder to read (an existing file is refused; a missing one is the reader's to report);
#   "out_file": a file to write, whose folder exists;
#   "in_file": a file to read (a folder is refused; a missing one when the command runs here).
# fsspec URLs (s3://, memory://, ...) are left to the storage layer.
PATH_RULES: dict[str, dict[str, str]] = {
    "precompute": {"teacher": "model", "out": "out_dir", "chat_template": "in_file"},
    "merge": {"cache": "in_dir"},
    "train": {"student": "model", "output_dir": "out_dir", "cache": "in_dir", "eval_cache": "in_dir",
              "chat_template": "in_file"},
    "eval": {"model": "model", "cache": "in_dir", "chat_template": "in_file"},
    "validate": {"cache": "in_dir"},
    "inspect": {"cache": "in_dir", "plot": "out_file"},
    "convert": {"src": "in_dir", "dst": "out_dir"},
    "push": {"cache": "in_dir"},
}


def flag_name(action: argparse.Action) -> str:
    """How the user writes an option: `--max-steps`, every name of one with aliases
    (`--learning-rate/--lr`), or a positional's metavar/name (`CACHE`). transformers' underscore
    spellings (`--learning_rate`) are left out: they are the same names written the other way."""
    if action.option_strings:
        longs = ([s for s in action.option_strings if s.startswith("--") and "_" not in s]
                 or list(action.option_strings))
        return "/".join(sorted(longs, key=len, reverse=True))
    return action.metavar if isinstance(action.metavar, str) else action.dest.upper()


def check_options(command: str, parser: argparse.ArgumentParser, args: argparse.Namespace,
                  from_config: dict | None = None, *, open_paths: bool = True) -> None:
    """Refuse any option value that is of the wrong type, out of range, or a path of the wrong kind.

    Args:
        command: the subcommand's name (`train`, ...), which selects its rules.
        parser: that subcommand's parser (its actions declare types and choices).
        args: the parsed options, flags and `--config` values merged.
        from_config: {dest: value} read from `--config`, to say where a bad value came from.
        open_paths: whether a model path must exist here (False for `--print-config`, which checks
            a command line written for another machine).

    Raises:
        ConfigError: naming the option, its value, and what was expected.
    """
    ranges = {**RULES["*"], **RULES.get(command, {})}
    paths = PATH_RULES.get(command, {})
    for action in parser._actions:
        dest = action.dest
        if dest in ("help", "config") or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value is None or value is argparse.SUPPRESS:
            continue
        where = ""
        if from_config and dest in from_config and from_config[dest] is value:
            where = " (from --config)"
        name = f"{flag_name(action)} {value if isinstance(value, str) else repr(value)}{where}"
        problem = _type_problem(action, value)
        # Options that take several values (--cache A B) check each one; a YAML scalar stands for one.
        values = value if action.nargs in ("+", "*") and isinstance(value, list) else [value]
        for one in values:
            if problem is None and dest in ranges and isinstance(one, (int, float)) and not isinstance(one, bool):
                problem = ranges[dest].problem(one)
            if problem is None and dest in paths and isinstance(one, str):
                problem = _path_problem(paths[dest], one, must_exist=open_paths)
            if problem and len(values) > 1:
                name = f"{flag_name(action)} {one if isinstance(one, str) else repr(one)}{where}"
            if problem:
                raise ConfigError(f"{name}: {problem}")


def _type_problem(action: argparse.Action, value) -> str | None:
    if action.nargs in ("+", "*") and not isinstance(action, argparse._AppendAction):
        values = value if isinstance(value, list) else [value]  # YAML: a list, or one scalar
        if not values and action.nargs == "+":
            return "expected at least one value"
        one = argparse.Action(action.option_strings, action.dest, type=action.type, choices=action.choices)
        return next((p for v in values if (p := _type_problem(one, v))), None)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        return None if isinstance(value, bool) else "expected true or false"
    if isinstance(action, argparse._AppendAction):
        return None  # lists from flags, or mappings from YAML: the command reads both
    if action.type is int and (isinstance(value, bool) or not isinstance(value, int)):
        return "expected a whole number"
    if action.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "expected a number"
    if action.type in (None, str) and action.nargs is None and not isinstance(value, str):
        return f"expected text, got {type(value).__name__}"
    if action.choices is not None and value not in action.choices:
        return f"expected one of {', '.join(map(str, action.choices))}"
    return None


def _is_url(value: str) -> bool:
    return "://" in value


def _path_problem(kind: str, value: str, *, must_exist: bool = True) -> str | None:
    if _is_url(value):
        return None
    path = os.path.expanduser(value)
    if kind == "model":
        if os.path.isfile(path):
            return "is a file; expected a model folder (config.json, weights, tokenizer) or a hub id"
        if must_exist and not os.path.exists(path) and not _is_hub_id(value):
            return "no such folder, and not a hub model id (owner/name); check the path"
    elif kind == "out_dir":
        if os.path.exists(path) and not os.path.isdir(path):
            return "is an existing file; expected a folder to write into (choose another path)"
    elif kind == "in_dir":
        if os.path.isfile(path):
            return "is a file; expected a cache folder (or fsspec URL)"
    elif kind == "in_file":
        if os.path.isdir(path):
            return "is a folder; expected a file"
        if must_exist and not os.path.exists(path):
            return "no such file"
    elif kind == "out_file":
        if os.path.isdir(path):
            return "is a folder; expected a file name to write"
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            return f"its folder {parent} does not exist"
    return None


def _is_hub_id(value: str) -> bool:
    """`name` or `owner/name` as the hub accepts it (huggingface_hub's own rule when installed)."""
    if value.startswith((".", "/", "~")) or value.count("/") > 1:
        return False
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        return True
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


class DeprecatedAlias(argparse.Action):
    """Store into the new option's `dest`, warning that `replacement` is the name to use."""

    def __init__(self, option_strings, dest, *, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warn_deprecated(option_string, self.replacement)
        setattr(namespace, self.dest, values)


def warn_deprecated(old: str, new: str) -> None:
    print(f"logitcache: warning: {old} is deprecated; use {new}", file=sys.stderr)


def add_deprecated_alias(group, old: str, new: str, *, dest: str, **kwargs) -> None:
    """Accept `old` as a hidden alias of the option `new` (whose destination is `dest`)."""
    group.add_argument(old, dest=dest, action=DeprecatedAlias, replacement=new, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS, **kwargs)


def _template_kwarg(text: str) -> tuple[str, object]:
    """`--chat-template-kwargs KEY=VALUE`: the value read as YAML (false, 3, [a, b], {"k": 1}, text)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not YAML/JSON ({e})") from None


def add_chat_template_options(group, *, template_help: str, kwargs_help: str) -> None:
    """`--chat-template FILE` and `--chat-template-kwargs KEY=VALUE` (repeatable; in YAML a mapping)."""
    group.add_argument("--chat-template", metavar="FILE", help=template_help)
    group.add_argument("--chat-template-kwargs", dest="chat_template_kwargs", action="append",
                       type=_template_kwarg, default=None, metavar="KEY=VALUE", help=kwargs_help)


def chat_template_kwargs(value) -> dict | None:
    """--chat-template-kwargs as a dict: [(key, value), ...] from flags, a mapping from YAML; None if not given.

    Raises:
        ConfigError: a YAML value that is neither.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list) and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
        return dict(value)
    raise ConfigError(f"--chat-template-kwargs: expected KEY=VALUE pairs (in YAML a mapping), got {value!r}")


# What --chat-template and --chat-template-kwargs do for a student (train, eval): the help of both commands.
_STUDENT_TEMPLATE = (
    "a Jinja chat template file (path or URL) the STUDENT renders chats with, instead of its tokenizer's: --data "
    "rows, and a cache re-tokenized for a student with another tokenizer (whose chats are otherwise rendered with "
    "the student's own template: a template file recorded in the cache was written for the teacher's special "
    "tokens). A cache read with the teacher's tokenizer is used as its ids are, so the file must be the one the "
    "cache records")
_STUDENT_KWARGS = (
    "a variable for the student's chat template, repeatable, the value read as YAML/JSON (e.g. Qwen3's "
    "enable_thinking=false); in YAML a mapping. A cache re-tokenized for another tokenizer is rendered with the "
    "variables the cache records (a cache made with enable_thinking=false trains the student without thinking "
    "too), these replacing them key by key; a cache read with the teacher's tokenizer must record the same values")


def add_student_data_options(group, *, data_flags: str) -> None:
    """--data's loading and field flags as `precompute --data` takes them, and the chat options, for
    `train` and `eval` (the student's side). `data_flags` names the options they apply to."""
    group.add_argument("--split", help=f"split of {data_flags}; slices work, e.g. 'train[:1000]' (default: train)")
    group.add_argument("--data-config", metavar="NAME", help="hub dataset configuration (subset) name")
    group.add_argument("--data-revision", metavar="REV", help="hub dataset revision (branch, tag or commit)")
    group.add_argument("--streaming", action="store_true",
                       help="read .parquet/.jsonl files (local or URL) lazily, a shard of rows when it is needed, "
                            "or stream a hub dataset id (needs --max-rows or a row slice)")
    group.add_argument("--max-rows", type=int, metavar="N", help=f"use the first N rows of {data_flags}")
    group.add_argument("--text-field", metavar="F", help="column with plain text (every token supervised)")
    group.add_argument("--prompt-field", metavar="P", help="column with the prompt (not supervised)")
    group.add_argument("--response-field", metavar="R", help="column with the response (supervised)")
    group.add_argument("--messages-field", metavar="M", help="column with chat messages (assistant turns supervised)")
    group.add_argument("--tools-field", metavar="T", help="with --messages-field: column of tool schemas for the "
                                                          "chat template")
    group.add_argument("--prompt-format", choices=["plain", "chat"],
                       help="prompt/response rows: plain (default) or chat (a user and an assistant turn through the "
                            "student's chat template); a cache's rows keep the format the cache records")
    add_chat_template_options(group, template_help=_STUDENT_TEMPLATE, kwargs_help=_STUDENT_KWARGS)


def add_progress_option(parser) -> None:
    """`--progress/--no-progress` of the commands that read a whole cache (validate, inspect, eval, merge,
    convert) and of `train` (TrainingArguments.disable_tqdm); unset, a bar shows only on a terminal, so piped
    and scripted runs print only their result."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress bar on stderr (default: only when stderr is a terminal)")


def add_storage_option(parser, *, urls: str = "a CACHE URL (s3://, gs://)") -> None:
    """`--storage-option KEY=VALUE`, repeatable, of the commands that open caches (`parse_storage_options`
    reads it); `urls`: what the options reach, for the help."""
    parser.add_argument("--storage-option", dest="storage_options", action="append", metavar="KEY=VALUE",
                        help=f"fsspec option for {urls}, repeatable (e.g. endpoint_url=http://...); credentials "
                             "are otherwise read from the usual environment")


def show_progress(flag: bool | None) -> bool:
    """`--progress`'s value, its default (None) decided here: a bar only on a terminal."""
    return sys.stderr.isatty() if flag is None else flag


def negated_keywords(parser: argparse.ArgumentParser) -> set[str]:
    """Option names, in snake_case, that set their destination to the opposite of the value given for them
    (a `--config` key or an `api` keyword): `no_progress` (`--no-progress` stores False), `no_fused_head`
    (`--fused-head/--no-fused-head`)."""
    return {flag.lstrip("-").replace("-", "_") for action in parser._actions for flag in action.option_strings
            if flag.lstrip("-").replace("-", "_") != action.dest and (
                isinstance(action, argparse._StoreFalseAction)
                or (isinstance(action, argparse.BooleanOptionalAction) and flag.startswith("--no-")))}
