"""The layering rules, checked on every import in the source, including those inside functions.

    .venv/bin/python -m pytest tests/test_layering.py

`storage/` imports neither the stages nor the pipeline; stage one (`stages/precompute`) and stage
two (`stages/train`) never import each other; the stages never import the pipeline. Imports are
read with `ast`, so an import hidden in a function body or an `importlib.import_module("...")` with
a literal name counts as much as one at the top of a module.
"""

from __future__ import annotations

import pytest
from source_imports import FOLDERS, ROOT, imported_modules, source_files

# (layer prefix, module prefixes it must not import).
RULES = [
    ("logitcache.storage", ("logitcache.stages", "logitcache.pipeline")),
    ("logitcache.stages.precompute", ("logitcache.stages.train",)),
    ("logitcache.stages.train", ("logitcache.stages.precompute",)),
    ("logitcache.stages", ("logitcache.pipeline",)),
]
# The source folders are installed only under the `logitcache.` namespace; a bare `import storage`
# would work in a checkout and fail in a wheel.
BARE = tuple(FOLDERS)


def violations(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """The layering rules `module` breaks, one line per offending import."""
    bad = []
    for line, name in imported_modules(source, module, is_package=is_package):
        if name.split(".")[0] in BARE:
            bad.append(f"line {line}: imports {name!r}; use the installed name logitcache.{name}")
        for layer, forbidden in RULES:
            if module == layer or module.startswith(layer + "."):
                for prefix in forbidden:
                    if name == prefix or name.startswith(prefix + "."):
                        bad.append(f"line {line}: {layer} must not import {prefix} (imports {name!r})")
    return bad


def test_source_obeys_the_layering_rules():
    files = list(source_files())
    assert len(files) > 40  # the walk found the source, not an empty folder
    bad = [f"{path.relative_to(ROOT)} {msg}" for path, module, is_pkg in files
           for msg in violations(path.read_text(), module, is_package=is_pkg)]
    assert not bad, "layering broken:\n" + "\n".join(bad)


@pytest.mark.parametrize("module, source", [
    ("logitcache.storage.cache", "def f():\n    from logitcache.stages.train import data\n"),
    ("logitcache.storage.cache", "import logitcache.pipeline.cli\n"),
    ("logitcache.storage.cache", "from logitcache import pipeline\n"),
    ("logitcache.stages.precompute.run", "class A:\n    def m(self):\n        import logitcache.stages.train.run\n"),
    ("logitcache.stages.train.run", "from ..precompute import plan\n"),
    ("logitcache.stages.train.run", "import importlib\nimportlib.import_module('logitcache.stages.precompute.plan')\n"),
    ("logitcache.stages.train.run", "import importlib\nx = importlib.import_module(f'logitcache.pipeline.{n}')\n"),
    ("logitcache.stages.precompute.engines.hf", "if True:\n    from logitcache.pipeline.scratch import toy_corpus\n"),
    ("logitcache.pipeline.cli", "from storage.cache import open_cache\n"),
])
def test_checker_catches_each_kind_of_crossing(module, source):
    assert violations(source, module), source


@pytest.mark.parametrize("module, source", [
    ("logitcache.pipeline.cli", "from logitcache.stages.train import run\nfrom logitcache.stages.precompute import run\n"),
    ("logitcache.stages.train.run", "from logitcache.storage import open_cache\nfrom . import data\n"),
    ("logitcache.stages.precompute.run", "from logitcache.stages.precompute.engines import build_engine\n"),
    ("logitcache.storage.cache", "import importlib\nimportlib.import_module('logitcache.storage.zarr_backend')\n"),
])
def test_checker_allows_the_permitted_directions(module, source):
    assert violations(source, module) == []
