"""The end-to-end demo, quick preset: teacher from scratch, vLLM caches, five students, eval, report.

Marked slow (about 2-4 minutes on 2 cores); `make demo QUICK=1` runs the same thing.

    pytest -m slow tests/pipeline/test_demo.py
"""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    res = subprocess.run([sys.executable, "-m", "logitcache.pipeline.demo", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "quick"
    report = json.loads((out / "report.json").read_text())
    rows = {r["model"]: r for r in report["models"]}
    assert set(rows) == {"teacher", "student sft", "student kl", "student bild", "student rskd", "student uld"}
    for name, row in rows.items():
        assert row["perplexity"] and row["accuracy"] is not None, name
    assert rows["teacher"]["agreement"] == pytest.approx(1.0, abs=0.02)  # its own held-out cache
    for png in ("loss_curves.png", "topk_mass.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    for cache in ("cache_topk", "cache_sample"):
        assert json.loads((out / cache / "index.json").read_text())["engine"]["name"] == "vllm"
    # A rerun reuses every finished step.
    again = subprocess.run([sys.executable, "-m", "logitcache.pipeline.demo", "--quick", "--out", str(tmp_path)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout.count("[reuse]") >= 10, again.stdout
