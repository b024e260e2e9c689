"""What an import costs: `logitcache.storage` loads its names on first use, and a backend's library
(zarr, pyarrow) is imported by the first use of that backend, not by `logitcache --help`.

    .venv/bin/python -m pytest tests/test_lazy_imports.py      # ~5 s: fresh interpreters, no torch

Each check runs a fresh interpreter: this one has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import logitcache.storage as storage
from logitcache.storage.backend_base import Backend
from logitcache.storage.backends import BACKENDS

HEAVY = ("zarr", "numcodecs", "pyarrow", "fsspec", "numpy", "torch", "transformers", "tqdm", "yaml")


def modules_loaded_by(code: str) -> list[str]:
    """Which of HEAVY a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code, allowed", [
    ("import logitcache.storage", ()),
    ("from logitcache.storage.errors import ConfigError", ()),
    # Stage one's head and stage two's fused loss read the LM head: torch, and nothing of the format.
    ("import logitcache.storage.head", ("torch", "numpy", "tqdm")),  # torch imports numpy and tqdm
    ("from logitcache.storage import ConfigError, layout\nassert layout.INDEX_NAME", ()),
    # The registry's names, and `logitcache --help`: the backends are not built.
    ("from logitcache.storage import BACKENDS\nassert sorted(BACKENDS) == ['arrow', 'zarr'] and 'zarr' in BACKENDS", ()),
    ("from logitcache.pipeline.cli import build_parser\nbuild_parser()", ("yaml",)),  # --config files
])
def test_importing_loads_only_what_is_used(code, allowed):
    assert set(modules_loaded_by(code)) <= set(allowed), code


def test_a_backend_imports_its_library_when_first_used():
    assert "zarr" in modules_loaded_by("from logitcache.storage import get_backend\nget_backend('zarr')")
    loaded = modules_loaded_by("from logitcache.storage import get_backend\nget_backend('arrow')")
    assert "pyarrow" in loaded and "zarr" not in loaded


def test_every_public_name_resolves_to_its_module():
    for name in storage.__all__:
        value = getattr(storage, name)
        module = storage._MODULE_OF[name]
        expected = sys.modules[f"logitcache.storage.{module}"]
        assert value is (expected if module == name else getattr(expected, name)), name
    assert set(storage.__all__) <= set(dir(storage))
    namespace: dict = {}
    exec("from logitcache.storage import *", namespace)
    assert set(storage.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'open_cach'"):
        storage.open_cach  # noqa: B018 - a typo is an AttributeError, not a silent None


def test_registry_builds_each_backend_once_under_its_own_name():
    for name in BACKENDS:
        backend = BACKENDS[name]
        assert isinstance(backend, Backend) and backend.name == name and BACKENDS[name] is backend
    assert "parquet" not in BACKENDS and len(BACKENDS) == 2
    with pytest.raises(KeyError):
        BACKENDS["parquet"]
