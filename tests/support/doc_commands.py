"""Shell commands quoted in markdown docs, so tests can check them against the real CLIs.

    from doc_commands import commands_in, parse_logitcache
    for command in commands_in("docs/SCALING.md"):
        parse_logitcache(command.argv)          # AssertionError naming the doc line if it does not parse

What counts: fenced code blocks tagged bash, sh, shell or zsh (every line) and console (the lines
after a `$ ` prompt). Backslash continuations are joined, comments and here-document bodies
dropped, and each logical line is split into simple commands at `&&`, `||`, `;`, `|`, `&` and
parentheses. Shell expansions (`$VAR`, `${VAR...}`, `$(...)`, `$((...))`) become the placeholder
"1", which parses as a number, a name or a path. A `logitcache` command is a word named
`logitcache` (any directory) followed by arguments, or `-m logitcache.pipeline[.cli]`, so the
launcher forms (`srun logitcache ...`, `torchrun ... -m logitcache.pipeline.cli train ...`,
`ray job submit ... -- logitcache ...`) count too.
"""

from __future__ import annotations

import io
import posixpath
import re
import shlex
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from logitcache.storage.errors import LogitCacheError

__all__ = ["DocCommand", "fenced_blocks", "shell_commands", "commands_in", "parse_logitcache", "parse_with"]

SHELL_LANGUAGES = ("bash", "sh", "shell", "zsh")
PLACEHOLDER = "1"
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_EXPANSIONS = [re.compile(p) for p in (r"\$\(\([^()]*\)\)", r"\$\([^()]*\)", r"\$\{[^{}]*\}",
                                       r"\$[A-Za-z_][A-Za-z0-9_]*", r"\$[0-9@*#?$!-]")]
_HEREDOC = re.compile(r"<<(-?)\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\2")
_SEPARATORS = {"&&", "||", ";", ";;", "|", "|&", "&", "(", ")"}  # and any other run of these characters
_REDIRECT = re.compile(r"^[0-9]*(<|>|>>|<<|<<<|>&|<&|&>|&>>)$")
_MODULES = ("logitcache.pipeline", "logitcache.pipeline.cli")


@dataclass(frozen=True)
class DocCommand:
    """One simple command from a doc.

    Attributes:
        where: "path:line" of the command's first line.
        words: the whole simple command (launcher included), expansions replaced.
        start: index in `words` of the program: `logitcache`, or the module after `-m`.
    """

    where: str
    words: tuple[str, ...]
    start: int

    @property
    def argv(self) -> list[str]:
        """The arguments `logitcache` receives: `["train", "--student", ...]`."""
        return list(self.words[self.start + 1:])

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


def fenced_blocks(markdown_path: str | Path, languages: tuple[str, ...] | None = None) -> list[tuple[int, str, str]]:
    """Fenced code blocks as (line of the first content line, language tag, text); all, or those tagged `languages`."""
    lines = Path(markdown_path).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language, start = len(match.group(1)), match.group(2), match.group(3).lower(), i + 1
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence[0] * len(fence)):
            i += 1
        if languages is None or language in languages:
            # A fence indented inside a list item: its content loses up to that much indentation.
            body = [line[min(indent, len(line) - len(line.lstrip(" "))):] for line in lines[start:i]]
            blocks.append((start + 1, language, "\n".join(body)))
        i += 1
    return blocks


def _logical_lines(first_line: int, language: str, text: str):
    """(line number, logical line) of a shell block: continuations joined, here-documents skipped."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        number, line = first_line + i, lines[i]
        i += 1
        if language == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i]
            i += 1
        heredoc = _HEREDOC.search(line)
        if heredoc:
            strip_tabs, end = heredoc.group(1) == "-", heredoc.group(3)
            while i < len(lines) and (lines[i].lstrip("\t") if strip_tabs else lines[i]) != end:
                i += 1
            i += 1
            line = line[:heredoc.start()]
        yield number, line


def _words(line: str) -> list[str]:
    for pattern in _EXPANSIONS:
        line = pattern.sub(PLACEHOLDER, line)
    line = re.sub(r"(?<=\s)[0-9]+(?=[<>])", "", line)  # `2>&1`: the descriptor is no argument
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def shell_commands(markdown_path: str | Path) -> list[tuple[str, list[str]]]:
    """Every simple command of the doc's shell blocks as ("path:line", words), redirections removed."""
    out = []
    for first, language, text in fenced_blocks(markdown_path, SHELL_LANGUAGES + ("console",)):
        for number, line in _logical_lines(first, language, text):
            try:
                words = _words(line)
            except ValueError as e:  # unbalanced quotes
                raise AssertionError(f"{markdown_path}:{number}: cannot split {line!r} ({e})") from None
            current: list[str] = []
            skip_next = False
            for word in words + [";"]:
                if skip_next:
                    skip_next = False
                elif _REDIRECT.match(word):
                    skip_next = True  # and its target
                elif word in _SEPARATORS or set(word) <= set("();<>|&"):
                    if current:
                        out.append((f"{markdown_path}:{number}", current))
                    current = []
                else:
                    current.append(word)
    return out


def commands_in(markdown_path: str | Path) -> list[DocCommand]:
    """The `logitcache` commands of a doc's shell blocks (see the module docstring)."""
    found = []
    for where, words in shell_commands(markdown_path):
        for i, word in enumerate(words[:-1]):
            module = i > 0 and words[i - 1] == "-m" and word in _MODULES
            if posixpath.basename(word) == "logitcache" or module:
                found.append(DocCommand(where, tuple(words), i))
                break
    return found


def parse_with(parser, argv: list[str], where: str = ""):
    """`parser.parse_args(argv)`, with argparse's exit turned into an AssertionError quoting its message.
    `--help` returns None."""
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            return parser.parse_args(argv)
    except SystemExit as e:
        if e.code == 0:
            return None
        raise AssertionError(f"{where}: {shlex.join(argv)}\n{err.getvalue().strip()}") from None
    except LogitCacheError as e:  # the CLI's parser reports usage errors as ConfigError
        raise AssertionError(f"{where}: {shlex.join(argv)}\n{e}") from None


def parse_logitcache(argv: list[str], where: str = ""):
    """Parse `logitcache ARGV` with the real CLI parser. With `--config FILE`, options the file may
    supply are not required (as in `logitcache.pipeline.cli`); the file itself is not read."""
    from logitcache.pipeline.cli import build_parser

    parser = build_parser()
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        sub = parser._subparsers._group_actions[0].choices.get(argv[0])
        for action in sub._actions if sub is not None else ():
            action.required = False
    return parse_with(parser, argv, where)
