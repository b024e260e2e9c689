"""The distribution: a real (non-editable) wheel holds every package, under the logitcache namespace only.

    .venv/bin/python -m pytest tests/test_packaging.py -m "slow or not slow"    # with the wheel build

The wheel is built from a copy of the sources in a temporary folder, so setuptools' `build/` and
`*.egg-info` never land in the checkout.
"""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"pipeline": "logitcache.pipeline", "stages": "logitcache.stages", "storage": "logitcache.storage"}


def _source_packages() -> set[str]:
    found = set()
    for folder, prefix in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([prefix, *rel.parts]))
    return found


def test_every_source_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert _source_packages() == listed


@pytest.mark.slow  # builds a wheel in a subprocess: ~10 s of CPU
def test_wheel_contains_every_module_and_nothing_top_level(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in MAPPED:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    before = sorted(p.name for p in ROOT.iterdir())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=300, cwd=tmp_path)
    assert sorted(p.name for p in ROOT.iterdir()) == before  # nothing written into the checkout
    wheel = next((tmp_path / "dist").glob("logitcache-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"logitcache"}
    for folder, prefix in MAPPED.items():
        for py in (ROOT / folder).rglob("*.py"):
            assert "/".join([*prefix.split("."), *py.relative_to(ROOT / folder).parts]) in names, py
