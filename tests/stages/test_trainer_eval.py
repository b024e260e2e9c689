"""Evaluation while training logs the KD loss on held-out teacher targets, the number `logitcache eval` reports.

    .venv/bin/python -m pytest tests/stages/test_trainer_eval.py -x -q
"""

import json

import pytest
import torch
from trainkit import world

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
    result = train(TrainSettings(student=str(w.student), cache=str(w.cache), out=str(out), loss="kl", temperature=2.0,
                                 max_steps=2, batch_size=4, lr=2e-2, logging_steps=1, num_workers=0, save_steps=1,
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
