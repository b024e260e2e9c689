"""The end-to-end demo: teacher from scratch, vLLM caches, seven students (one online, one LoRA), eval, report,
and the commands a user runs next on a cache (validate, inspect --plot, convert).

Runs the demo's own code path with its `smoke` preset (every step and model of `make demo QUICK=1`, on a
quarter of the corpus and a fifth of the training steps), then reruns it. Marked slow (about 1-2 minutes on 2 cores).

    pytest -m slow tests/pipeline/test_demo.py
"""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    demo = [sys.executable, "-m", "logitcache.pipeline.demo", "--preset", "smoke", "--out", str(tmp_path)]
    res = subprocess.run(demo, capture_output=True, text=True, env=env, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "smoke"
    report = json.loads((out / "report.json").read_text())
    rows = {r["model"]: r for r in report["models"]}
    assert set(rows) == {"teacher", "student sft", "student kl", "student bild", "student bild online", "student rskd",
                         "student uld", "student sft + lora bild"}
    for name, row in rows.items():
        assert row["perplexity"] and row["accuracy"] is not None, name
    assert rows["teacher"]["agreement"] == pytest.approx(1.0, abs=0.02)  # its own held-out cache
    # Online bild ran the teacher in the loop: every student id is in its full distribution.
    online = json.loads((out / "student_bild_online" / "logitcache_train.json").read_text())
    cached = json.loads((out / "student_bild" / "logitcache_train.json").read_text())
    assert online["settings"]["online_teacher"] == str(out / "teacher")
    assert all(h["bild_coverage"] == 1.0 for h in online["log_history"] if "bild_coverage" in h)
    assert any(h["bild_coverage"] < 1.0 for h in cached["log_history"] if "bild_coverage" in h)
    # Paired differences: every same-tokenizer student is scored on the same positions.
    paired = {(r["model"], r["baseline"]): r for r in report["paired"]}
    first = paired[("student bild", "student bild online")]
    assert first["positions"] == rows["student bild"]["positions"] == rows["student bild online"]["positions"]
    assert first["accuracy"] == pytest.approx(rows["student bild"]["accuracy"] - rows["student bild online"]["accuracy"])
    # Pairing removes the positions' shared difficulty: tighter than one model's binomial s.e.
    assert 0 <= first["accuracy_se"] < rows["student bild"]["accuracy_se"]
    mass = report["topk_mass"]["cache_heldout"]
    assert mass["k"] == 32 and 0.0 < mass["p10"] <= mass["p50"] <= 1.0
    for png in ("loss_curves.png", "topk_mass.png"):  # the second is `inspect --plot`'s
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # The user's next commands, run as a user runs them: validate, inspect, convert, a LoRA student.
    topk = json.loads((out / "cache_topk" / "index.json").read_text())
    assert (out / "validate_topk.txt").read_text().startswith(f"OK   {len(topk['shards'])} shard(s)")
    assert json.loads((out / "inspect_cache_topk.json").read_text())["positions"] == topk["counts"]["positions"]
    parquet = json.loads((out / "cache_topk_parquet" / "index.json").read_text())
    assert parquet["backend"] == "arrow" and parquet["fingerprint"] == topk["fingerprint"]
    assert parquet["counts"] == topk["counts"]
    lora = json.loads((out / "student_lora" / "logitcache_train.json").read_text())
    settings = lora["settings"]
    assert settings["lora_r"] == 8 and settings["pack"] and settings["cache"] == [str(out / "cache_topk_parquet")]
    assert settings["student"] == str(out / "student_sft")
    evals = [h for h in lora["log_history"] if "eval_cache_teacher_agreement" in h]
    assert len(evals) >= 2  # every --eval-steps while it trained
    assert ("student sft + lora bild", "student sft") in paired
    # Every student's curve is in both panels: each one logs its label cross entropy (bild: --ce-weight 0.5).
    for folder in ("student_bild", "student_bild_online", "student_lora"):
        history = json.loads((out / folder / "logitcache_train.json").read_text())["log_history"]
        assert any("ce" in h for h in history), folder
    engines = {cache: json.loads((out / cache / "index.json").read_text())["engine"] for cache in ("cache_topk",
                                                                                                 "cache_sample")}
    assert {e["name"] for e in engines.values()} == {"vllm"}
    # The top-K cache's engine checked the teacher's head against vLLM's logits; the sample cache's, of the
    # same teacher in the same run, was told not to repeat it (one vLLM start-up fewer), and says so.
    # (Its figure is the largest logit difference on the same hidden states: bf16 rounding, well under 0.5.)
    assert 0 <= engines["cache_topk"]["head_check_max_diff"] < 0.5
    assert engines["cache_sample"]["head_check_max_diff"] is None
    assert engines["cache_sample"]["options"]["verify_head"] is False
    # A rerun reuses every finished step.
    again = subprocess.run(demo, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout.count("[reuse]") >= 10, again.stdout


def test_call_task_passes_each_parameter_by_its_own_name():
    from logitcache.pipeline.corpus import call_pairs

    source = "class A:\n    def f(self, a, /, b, *xs, c=1, **kw):\n        pass\n\ndef g():\n    pass\n\ndef h(x=2):\n    pass\n"
    pairs = sorted(call_pairs(source), key=lambda p: p["prompt"])
    assert pairs == [{"prompt": "def f(self, a, /, b, *xs, c=1, **kw):\n", "response": "self.f(a, b, *xs, c=c, **kw)"},
                     {"prompt": "def h(x=2):\n", "response": "h(x)"}]  # g() has nothing to pass: left out


def test_paired_difference_is_the_mean_and_standard_error_of_per_position_differences():
    import numpy as np

    from logitcache.pipeline.report import paired_difference

    rng = np.random.default_rng(0)
    base = rng.random(500) < 0.4
    other = np.where(rng.random(500) < 0.1, ~base, base)  # agrees on ~90% of positions
    mean, se = paired_difference(other, base)
    d = other.astype(float) - base.astype(float)
    assert mean == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / np.sqrt(500))
    # Pairing removes the shared difficulty: far below the unpaired s.e. of the difference.
    unpaired = np.sqrt(base.var(ddof=1) / 500 + other.var(ddof=1) / 500)
    assert se < 0.6 * unpaired
    with pytest.raises(ValueError, match="one length"):
        paired_difference(base, base[:-1])
