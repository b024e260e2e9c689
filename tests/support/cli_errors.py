"""The one-line error contract of the CLI, asserted by the bad-input sweep and the fault tests."""

from __future__ import annotations

import re

ERROR_LINE = re.compile(r"logitcache( [a-z]+)?: error: \S.*")


def assert_contract(rc: int, err: str, command: str | None, named: tuple[str, ...]) -> str:
    """Non-zero exit; the last line of stderr is the only error line, in the one-line format, not glued
    to a progress bar, naming every string in `named`; no traceback. Returns that line."""
    assert rc != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no error printed"
    last = lines[-1]
    assert ERROR_LINE.fullmatch(last), f"not one error line: {last!r}\n{err}"
    assert last.startswith(f"logitcache {command}: error: " if command else "logitcache: error: "), last
    assert sum("error:" in line for line in lines) == 1, err
    for name in named:
        assert name in last, f"{name!r} not named in {last!r}"
    return last
