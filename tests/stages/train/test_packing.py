"""Padding-free packing: the same loss and gradient as padded batches; sdpa and eager exact on CPU; exact resume.

    .venv/bin/python -m pytest tests/stages/train/test_packing.py -x -q
"""

import json
import shutil

import pytest
import torch
from trainkit import world

from logitcache.stages.train.alignment import SameTokenizerTargets
from logitcache.stages.train.collate import Collator
from logitcache.stages.train.loss_settings import loss_settings
from logitcache.stages.train.run import TrainSettings, train
from logitcache.stages.train.student import packing_problem
from logitcache.stages.train.trainer import KDTrainer, training_arguments
from logitcache.storage import open_cache
from logitcache.storage.errors import ConfigError


def items(n=4):
    w = world()
    cache = open_cache(str(w.cache))
    return [SameTokenizerTargets(len(w.tokenizer))(cache[i]) for i in range(n)]


def test_packed_batch_holds_the_same_rows_in_one_row():
    its = items()
    padded, packed = Collator(pad_id=0)(its), Collator(pad_id=0, pack=True)(its)
    lengths = [len(it["input_ids"]) for it in its]
    assert len(set(lengths)) > 1  # padding to remove
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    for key in ("next_ids", "kd_select", "teacher_ids", "teacher_logprobs", "row_index"):
        assert torch.equal(packed[key], padded[key]), key
    # The same token at each supervised row, and the next token after it.
    assert torch.equal(packed["input_ids"].reshape(-1)[packed["rows"]], padded["input_ids"].reshape(-1)[padded["rows"]])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "model-logits"])
def test_packed_loss_and_gradient_equal_padded(tmp_path, attn, fused):
    """KDTrainer.compute_loss on the packed batch == on the padded batch: attention never crosses items."""
    from transformers import AutoModelForCausalLM

    w = world()
    its = items()
    out = []
    for pack in (False, True):
        model = AutoModelForCausalLM.from_pretrained(w.student, dtype=torch.float32, attn_implementation=attn)
        assert packing_problem(model) is None
        trainer = KDTrainer(model=model, args=training_arguments(str(tmp_path / f"{pack}"), max_steps=1,
                                                                 report_to="none", use_cpu=True),
                            plan=loss_settings("kl"), vocab_size=len(w.tokenizer), fused_head=fused)
        loss = trainer.compute_loss(model, Collator(pad_id=0, pack=pack)(its))
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (padded, padded_g), (packed, packed_g) = out
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    for name in padded_g:
        torch.testing.assert_close(packed_g[name], padded_g[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_position_ids_the_items_would_attend_across(tmp_path):
    """The yardstick: the same packed row with positions 0..T-1 (one long sequence) gives another loss."""
    from transformers import AutoModelForCausalLM

    w = world()
    model = AutoModelForCausalLM.from_pretrained(w.student, dtype=torch.float32, attn_implementation="sdpa")
    trainer = KDTrainer(model=model, args=training_arguments(str(tmp_path), max_steps=1, report_to="none",
                                                             use_cpu=True), plan=loss_settings("kl"), vocab_size=len(w.tokenizer))
    batch = Collator(pad_id=0, pack=True)(items())
    with torch.no_grad():
        good = trainer.compute_loss(model, batch)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
        crossed = trainer.compute_loss(model, batch)
    assert abs(good - crossed) > 1e-3


def test_pack_refuses_an_attention_that_ignores_position_ids():
    from types import SimpleNamespace

    assert "does not separate" in packing_problem(SimpleNamespace(config=SimpleNamespace(_attn_implementation="foo")))


def test_train_packed_matches_padded_and_resumes(tmp_path):
    """Two steps packed = two steps padded (same data, loss within fp32 noise); resume reads the same position."""
    w = world()
    base = dict(student=str(w.student), cache=str(w.cache), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                dataloader_num_workers=0, save_steps=1, seed=0)
    runs = {pack: train(TrainSettings(output_dir=str(tmp_path / str(pack)), pack=pack, **base)) for pack in (False, True)}
    losses = {pack: [h["loss"] for h in r["log_history"] if "loss" in h] for pack, r in runs.items()}
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-4), losses
    assert runs[True]["sequences_per_rank"] == runs[False]["sequences_per_rank"]
    resumed = train(TrainSettings(output_dir=str(tmp_path / "True"), pack=True, resume_from_checkpoint=True, **{**base, "max_steps": 3}))
    assert resumed["global_step"] == 3
    state = json.loads((tmp_path / "True" / "checkpoint-2" / "logitcache_data_rank0.json").read_text())
    assert state  # the position the resumed run started from
    with pytest.raises(ConfigError):
        train(TrainSettings(output_dir=str(tmp_path / "x"), pack=True, **{**base, "max_steps": 0}))


def test_packed_run_stopped_mid_epoch_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    """--pack with 2 workers, stopped after step 2 of 6 (8 steps an epoch): the resumed run's packed batches
    (items, tokens, position_ids) and logged losses equal the uninterrupted run's steps 3-6."""
    w = world()
    seen = []
    step = KDTrainer.training_step

    def recording(self, model, inputs, num_items_in_batch=None):
        seen.append((inputs["row_index"].tolist(), inputs["input_ids"].tolist(), inputs["position_ids"].tolist()))
        return step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(KDTrainer, "training_step", recording)
    base = dict(student=str(w.student), cache=str(w.cache), output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=3,
                learning_rate=1e-2, logging_steps=1, dataloader_num_workers=2, save_steps=2, save_total_limit=None, seed=3, pack=True)
    whole = train(TrainSettings(**base))
    uninterrupted = seen[:]
    assert len(uninterrupted) == 6 and all(len(b[0]) == 3 and len(b[1]) == 1 for b in uninterrupted)  # packed rows
    for later in ("checkpoint-4", "checkpoint-6"):
        shutil.rmtree(tmp_path / "out" / later)
    seen.clear()
    resumed = train(TrainSettings(**base, resume_from_checkpoint=True))
    assert resumed["global_step"] == 6
    assert seen == uninterrupted[2:]
    logs = {r: {h["step"]: h for h in res["log_history"] if "loss" in h} for r, res in (("a", whole), ("b", resumed))}
    for s in (3, 4, 5, 6):
        for key in ("loss", "ce", "kd", "grad_norm", "learning_rate"):
            assert logs["b"][s][key] == pytest.approx(logs["a"][s][key], rel=1e-6, abs=0), (s, key)
