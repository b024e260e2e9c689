"""Online distillation (`train --online-teacher`) and per-position evaluation (`eval --positions`).

    .venv/bin/python -m pytest tests/stages/train/test_online.py -q
"""

import json

import numpy as np
import pytest
import torch
from trainkit import world

from logitcache.pipeline.cli import main
from logitcache.stages.train.alignment import TextExample
from logitcache.stages.train.collate import Collator
from logitcache.stages.train.loss_settings import loss_settings
from logitcache.stages.train.online import OnlineTeacher
from logitcache.stages.train.trainer import loss_parts, supervised_logits

import loss_reference as ref  # tests/support/loss_reference.py (on the path: pyproject's pythonpath)


def _batch_and_models():
    from transformers import AutoModelForCausalLM

    w = world()
    teacher = AutoModelForCausalLM.from_pretrained(w.teacher, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(w.student, dtype=torch.float32)
    to_item = TextExample(w.tokenizer)
    items = [to_item({**row, "row_index": i}) for i, row in enumerate(w.rows[:6])]
    return w, teacher, student, Collator(pad_id=w.tokenizer.pad_token_id or 0)(items)


@pytest.mark.parametrize("loss, options, reference", [
    ("bild", {"top_k": 4, "temperature": 3.0}, lambda s, t: ref.bild(s, t, top_k=4, temperature=3.0)),
    ("kl", {"temperature": 2.0}, lambda s, t: ref.kl(s, t, temperature=2.0)),
])
def test_online_targets_compute_the_full_vocabulary_loss(loss, options, reference):
    """The online batch is a cache with K = V: the loss equals its full-logits reference, value and gradient."""
    w, teacher, student, batch = _batch_and_models()
    vocab = len(w.tokenizer)
    online = OnlineTeacher(teacher, vocab)(batch)
    n = batch["rows"].shape[0]
    assert online["teacher_ids"].shape == (n, vocab) and "kd_select" not in online
    assert bool((online["teacher_logprobs"].diff(dim=-1) <= 0).all())  # sorted, as a cache is

    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s = supervised_logits(logits, batch["rows"], vocab).detach().requires_grad_(True)
    total, _ = loss_parts(s, online, loss_settings(loss, options=options, ce_weight=0.0))
    (grad,) = torch.autograd.grad(total, s)

    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    t = supervised_logits(t_logits, batch["rows"], vocab)
    s_ref = s.detach().clone().requires_grad_(True)
    ref = reference(s_ref, t)
    (grad_ref,) = torch.autograd.grad(ref, s_ref)
    assert total.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-7)


def test_train_online_on_the_cache_batches_then_eval_positions(tmp_path, capsys):
    w = world()
    out = tmp_path / "online"
    rc = main(["train", "--student", str(w.student), "--cache", str(w.cache), "--online-teacher", str(w.teacher),
               "--loss", "bild", "--top-k", "4", "--out", str(out), "--max-steps", "2", "--batch-size", "4",
               "--num-workers", "0", "--logging-steps", "1", "--ce-weight", "0"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "logitcache_train.json").read_text())
    assert result["settings"]["online_teacher"] == str(w.teacher) and result["global_step"] == 2
    logged = [h for h in result["log_history"] if "kd" in h]
    # Every student id is in the teacher's full distribution.
    assert logged and all(h["bild_coverage"] == 1.0 for h in logged)
    capsys.readouterr()

    positions = tmp_path / "positions.npz"
    rc = main(["eval", "--model", str(out), "--data", str(w.heldout), "--cache", str(w.cache), "--json",
               "--positions", str(positions)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    with np.load(positions, allow_pickle=False) as arrays:
        got = dict(arrays)
    assert set(got) == {"data_nll", "data_correct", "cache_nll", "cache_correct", "cache_agree"}
    for part in ("data", "cache"):
        assert len(got[f"{part}_nll"]) == report[part]["positions"]
        assert got[f"{part}_correct"].mean() == pytest.approx(report[part]["accuracy"])
        assert got[f"{part}_nll"].mean() == pytest.approx(report[part]["nll"], rel=1e-5)
    assert got["cache_agree"].mean() == pytest.approx(report["cache"]["teacher_agreement"])


def test_train_online_from_text_without_a_cache(tmp_path):
    w = world()
    assert main(["train", "--student", str(w.student), "--data", str(w.train), "--online-teacher", str(w.teacher),
                 "--loss", "kl", "--out", str(tmp_path / "kl"), "--max-steps", "1", "--batch-size", "4",
                 "--num-workers", "0"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--loss", "rskd"], "--loss rskd is not one"),
    (["--loss", "kl", "--top-k", "4"], "--top-k"),
    (["--loss", "bild", "--pack"], "drop --pack"),
])
def test_online_refusals(tmp_path, capsys, args, message):
    w = world()
    rc = main(["train", "--student", str(w.student), "--cache", str(w.cache), "--online-teacher", str(w.teacher),
               *args, "--out", str(tmp_path / "x"), "--max-steps", "1"])
    assert rc == 2 and message in capsys.readouterr().err


def test_online_teacher_with_another_tokenizer_is_refused(tmp_path, capsys):
    w = world()
    rc = main(["train", "--student", str(w.student), "--data", str(w.train), "--online-teacher", str(w.other_student),
               "--loss", "bild", "--out", str(tmp_path / "x"), "--max-steps", "1", "--num-workers", "0"])
    assert rc == 2 and "another tokenizer" in capsys.readouterr().err
