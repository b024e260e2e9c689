"""Evaluation while training logs the KD loss on held-out teacher targets, the number `logitcache eval` reports.

    .venv/bin/python -m pytest tests/stages/train/test_trainer_eval.py -x -q
    .venv/bin/python -m pytest tests/stages/train/test_trainer_eval.py -x -q -m slow   # the 152k-vocabulary peak
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from trainkit import SUPPORT, world

from logitcache.stages.train.run import TrainSettings, train


def test_eval_steps_log_the_kd_loss_that_logitcache_eval_reports(tmp_path, capsys):
    """kl at T=2, evaluated every step: eval_cache_kd_loss at each checkpoint = `logitcache eval --loss kl --temperature 2`,
    and = the loss function applied one sequence at a time (so the pooling over teacher rows is right)."""
    from transformers import AutoModelForCausalLM

    from logitcache.pipeline.cli import main
    from logitcache.stages.train.alignment import SameTokenizerTargets
    from logitcache.stages.train.collate import Collator
    from logitcache.stages.train.losses import get_loss
    from logitcache.storage import open_cache

    w = world()
    out = tmp_path / "out"
    result = train(TrainSettings(student=str(w.student), cache=str(w.cache), output_dir=str(out), loss="kl", temperature=2.0,
                                 max_steps=2, per_device_train_batch_size=4, learning_rate=2e-2, logging_steps=1, dataloader_num_workers=0, save_steps=1,
                                 save_total_limit=None, eval_steps=1, eval_cache=str(w.cache), eval_data=str(w.heldout)))
    capsys.readouterr()  # the Trainer's own log lines
    evals = {h["step"]: h for h in result["log_history"] if "eval_cache_perplexity" in h}
    assert sorted(evals) == [1, 2]
    for key in ("eval_cache_kd_loss", "eval_cache_perplexity", "eval_cache_accuracy", "eval_cache_teacher_agreement",
                "eval_data_perplexity"):
        assert key in evals[1] and key in evals[2], key
    assert "eval_data_kd_loss" not in evals[2]  # a jsonl has no teacher targets
    assert evals[2]["eval_cache_kd_loss"] != evals[1]["eval_cache_kd_loss"]  # measured on the model of that step

    v = len(w.tokenizer)
    cache = open_cache(str(w.cache))
    kl = get_loss("kl")
    for step in (1, 2):
        checkpoint = str(out / f"checkpoint-{step}")
        assert main(["eval", "--model", checkpoint, "--cache", str(w.cache), "--loss", "kl", "--temperature", "2",
                     "--batch-size", "4", "--device", "cpu", "--json"]) == 0
        reported = json.loads(capsys.readouterr().out)["cache"]
        assert reported["kd_loss"] == pytest.approx(evals[step]["eval_cache_kd_loss"], rel=1e-6)
        if step == 1:
            continue
        # Reference: the registry's kl, one sequence at a time, pooled by teacher rows.
        model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        total, rows = 0.0, 0
        with torch.no_grad():
            for i in range(len(cache)):
                batch = Collator(pad_id=0)([SameTokenizerTargets(v)(cache[i])])
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                s = logits.reshape(-1, logits.shape[-1])[batch["rows"], :v][batch["kd_select"]]
                n = batch["teacher_ids"].shape[0]
                total += kl(s, batch["teacher_ids"], batch["teacher_logprobs"], tail_mass=batch["tail_mass"],
                            temperature=2.0).item() * n
                rows += n
        assert reported["kd_loss"] == pytest.approx(total / rows, rel=1e-4)
    # Another temperature is another number: the option reaches the loss.
    main(["eval", "--model", str(out / "checkpoint-2"), "--cache", str(w.cache), "--device", "cpu", "--json"])
    assert json.loads(capsys.readouterr().out)["cache"]["kd_loss"] != pytest.approx(evals[2]["eval_cache_kd_loss"])


@pytest.mark.parametrize("loss", ["kl", "bild"])
def test_evaluation_through_the_head_in_chunks_equals_the_model_logits(loss):
    """`evaluate_batches` with the head applied a chunk of rows at a time (chunks of 7 rows, so chunk edges
    fall inside sequences) = on the model's own (B, T, V) logits, metric by metric and position by position;
    the student's logits are 13 columns wider than its tokenizer."""
    from transformers import AutoModelForCausalLM

    from logitcache.stages.train.alignment import SameTokenizerTargets
    from logitcache.stages.train.data import CacheSource
    from logitcache.stages.train.evaluate import evaluate_source, kd_term
    from logitcache.stages.train.loss_settings import loss_settings

    w = world()
    model = AutoModelForCausalLM.from_pretrained(w.padded_student, dtype=torch.float32)
    v = len(w.tokenizer)
    source = CacheSource(str(w.cache), to_item=SameTokenizerTargets(v))
    options = {"top_k": 4} if loss == "bild" else {}
    got, want = (evaluate_source(model, source, pad_id=0, vocab_size=v, batch_size=5, per_position=True,
                                 kd=kd_term(loss_settings(loss, options=options)), head=head, **kw)
                 for head, kw in ((True, {"chunk_size": 7}), (False, {})))
    assert got["positions"] == want["positions"] > 7 * 5 and got["teacher_positions"] == want["teacher_positions"]
    for key in ("nll", "accuracy", "ece", "teacher_agreement", "teacher_accuracy", "kd_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    for key in ("nll", "correct", "agree"):
        np.testing.assert_allclose(got["per_position"][key], want["per_position"][key], rtol=1e-5, atol=1e-6)


_EVAL_PEAK = r"""
import gc, json, sys
sys.path.insert(0, sys.argv[1])
import torch
from big_vocab import big_world
from transformers import AutoModelForCausalLM
from logitcache.stages.train.alignment import SameTokenizerTargets
from logitcache.stages.train.data import CacheSource
from logitcache.stages.train.evaluate import evaluate_source

w = big_world(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(w["student"], dtype=torch.float32)
source = CacheSource(w["cache"], to_item=SameTokenizerTargets(w["vocab"]))
out = {"tokens": w["tokens"], "vocab": w["vocab"]}
for mode in ("head", "logits"):
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
    before = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
    found = evaluate_source(model, source, pad_id=1, vocab_size=w["vocab"], batch_size=8, head=mode == "head",
                            chunk_size=64)
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    out[mode] = {"growth": peak - before, "kd_loss": found["kd_loss"]}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_evaluation_of_a_152k_vocabulary_student_never_builds_the_full_logits(big_vocab_world):
    """Evaluation while training (and `logitcache eval`) at V = 151,936, batches of 8 x 128 tokens: peak RSS
    growth below half a (B, T, V) fp32 logits tensor (622 MB); through the model's logits (the yardstick) more
    than one. Chunks of 64 rows, as in test_fused_head's training peak: the automatic chunk (~128 MiB of fp32
    logits) is a fifth of this small batch's logits, and the chunk's logits, log-softmax and loss buffers
    (measured 454 MB growth) would hide the difference; at 8 x 2,048 tokens it is 1/80 of them.
    One fresh process (glibc returns freed tensors at once, see test_fused_head): the head first, then the
    yardstick, whose growth what the first left behind can only lower."""
    if sys.platform != "linux" or not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's resettable peak RSS")
    here = str(SUPPORT)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", _EVAL_PEAK, here, str(big_vocab_world)], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    logits_bytes = out["tokens"] * out["vocab"] * 4
    assert out["logits"]["growth"] > logits_bytes, out
    assert out["head"]["growth"] < 0.5 * logits_bytes, out
    assert out["head"]["kd_loss"] == pytest.approx(out["logits"]["kd_loss"], rel=1e-5)
