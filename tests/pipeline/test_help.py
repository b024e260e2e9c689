"""Every command's `--help` as a user reads it: examples one to a line, continuations indented, prose
wrapped, no deprecated spelling or old login command, a hub dataset example that streams.

    .venv/bin/python -m pytest tests/pipeline/test_help.py -q

(That every example parses and passes `--print-config`: tests/pipeline/test_print_config.py.)
"""

import re
import shlex

import pytest

from logitcache.pipeline.cli import COMMANDS, build_parser, main
from logitcache.pipeline.options import DeprecatedAlias

PARSERS = build_parser()._subparsers._group_actions[0].choices
DEPRECATED = sorted({flag for parser in PARSERS.values() for action in parser._actions
                     if isinstance(action, DeprecatedAlias) for flag in action.option_strings})


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def example_lines(text: str) -> list[str]:
    """The shell lines of a help text, continuation lines joined (`\\` then newline)."""
    joined = re.sub(r" \\\n\s+", " ", text)
    return [line.strip() for line in joined.splitlines()
            if re.match(r"\s*(logitcache|torchrun|srun|python) ", line)]


def test_deprecated_spellings_are_known():
    assert "--format" in DEPRECATED  # what the next test looks for


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_cleanly(command, capsys):
    text = help_text(command, capsys)
    assert text.startswith(f"usage: logitcache {command} ")
    lines = text.splitlines()
    examples = example_lines(text)
    assert examples, "no example"
    start = None  # the indent of the command a continuation belongs to
    for i, line in enumerate(lines):
        if line.rstrip().endswith("\\"):  # a continuation: the next line is indented deeper, on its own line
            start = len(line) - len(line.lstrip()) if start is None else start
            assert len(lines[i + 1]) - len(lines[i + 1].lstrip()) > start, (line, lines[i + 1])
        else:
            start = None
        if re.match(r"\s*(logitcache|torchrun) ", line):
            # A lone `\` at a line's end inside the epilog's Python string joins two lines into one: the next
            # line's indent shows up inside it.
            assert "   " not in line.strip(), f"two lines printed as one: {line!r}"
        if line and not line.startswith(" "):  # prose: argparse wraps its own text; raw text must be wrapped by hand
            assert len(line) <= 120, f"an unwrapped paragraph: {line[:80]!r}..."
    for flag in DEPRECATED:
        assert not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{command} --help names {flag}"
    assert "huggingface-cli" not in text  # the Hub's old login command (now `hf auth login`)
    for example in examples:
        assert example.count("logitcache ") <= 1, example


def test_a_hub_dataset_example_streams(capsys):
    """A hub dataset id in an example streams it (`--streaming`): without it the whole dataset downloads."""
    seen = 0
    for command in ("precompute", "train", "eval"):
        for example in example_lines(help_text(command, capsys)):
            words = shlex.split(example.split(" #")[0])
            if "--data" not in words:
                continue
            data = words[words.index("--data") + 1]
            if re.fullmatch(r"[\w.-]+/[\w.-]+", data) and not re.search(r"\.(jsonl?|parquet|csv|txt)$", data):
                seen += 1
                assert "--streaming" in words, example
    assert seen, "no hub dataset example left: the fineweb-edu one streams"


def test_push_help_names_the_current_login(capsys):
    text = help_text("push", capsys)
    assert "hf auth login" in text and "--backend parquet" in text
