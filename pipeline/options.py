"""Command-line helpers shared by the commands: old flag names kept as deprecated aliases.

    add_deprecated_alias(group, "--num-shards", "--num-jobs", dest="num_jobs", type=int)

The alias sets the new option's value and prints one line on stderr saying what to type instead.
`--config` files accept the old key (`num_shards:`) as well, with the same warning.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["DeprecatedAlias", "add_deprecated_alias", "warn_deprecated"]


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
