"""The README's commands are real: every `logitcache ...` line parses with the CLI, and the files and
make targets it names exist.

    pytest tests/pipeline/test_readme.py
"""

import re
from pathlib import Path

import pytest
from doc_commands import commands_in, fenced_blocks, parse_logitcache

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
COMMANDS = commands_in(README)


def test_readme_shows_both_stages_and_the_format_commands():
    assert {"precompute", "train", "eval", "validate", "inspect", "convert"} <= {c.argv[0] for c in COMMANDS}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.where.rsplit(':', 1)[1]}-{c.argv[0]}")
def test_readme_command_parses(command):
    parse_logitcache(command.argv, command.where)


def test_readme_links_and_make_targets_exist():
    text = README.read_text()
    for link in re.findall(r"\]\(((?!https?:)[^)#]+)\)", text):
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"\bmake (\w+)", text)):
        assert re.search(rf"^{target}:", makefile, re.M), f"README uses `make {target}`, not in the Makefile"


def test_python_section_calls_real_functions_with_real_options():
    """The README's Python block: each `api.f(...)` is a function of `logitcache.pipeline.api`, and each keyword
    one of that command's option names."""
    import ast

    from logitcache.pipeline import api
    from logitcache.pipeline.cli import build_parser

    blocks = [text for _, _, text in fenced_blocks(README, ("python",))]
    assert blocks, "the README has no python block"
    parsers = build_parser()._subparsers._group_actions[0].choices
    calls = [node for text in blocks for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", None) == "api"]
    assert {c.func.attr for c in calls} >= {"precompute", "train", "evaluate", "open_cache"}
    for call in calls:
        assert call.func.attr in api.__all__, call.func.attr
        if call.func.attr not in ("open_cache", "cached_kd"):
            command = {"evaluate": "eval"}.get(call.func.attr, call.func.attr)
            assert {k.arg for k in call.keywords} <= set(api.keywords(parsers[command])), call.func.attr
