"""Stage two's training: refusals, every loss trains, padded logits, resume mid-epoch, DDP on CPU.

    .venv/bin/pytest tests/stages/train/test_trainer.py                          # without the two-process DDP run
    .venv/bin/pytest tests/stages/train/test_trainer.py -m "slow or not slow"
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from trainkit import build_cache, ddp_run, world

from logitcache.stages.train.loss_settings import loss_settings
from logitcache.stages.train.run import TrainSettings, train
from logitcache.stages.train.trainer import KDTrainer
from logitcache.storage.errors import ConfigError


def settings(tmp_path, **kw):
    w = world()
    base = dict(student=str(w.student), cache=str(w.cache), output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                learning_rate=1e-2, logging_steps=1, dataloader_num_workers=0, save_steps=1000)
    return TrainSettings(**{**base, **kw})


def logged(result, key):
    return [h[key] for h in result["log_history"] if key in h and "loss" in h]


@pytest.fixture(scope="module")
def sample_cache():
    w = world()
    return build_cache(w.root / "sample_cache", w.teacher, w.tokenizer, w.rows, samples=16)


@pytest.fixture(scope="module")
def padded_teacher_cache():
    """A cache from a teacher whose logits are 13 columns wider than its tokenizer: ids >= vocab get cached."""
    from logitcache.pipeline.scratch import make_tiny_llama

    w = world()
    teacher = make_tiny_llama(w.root / "padded_teacher", w.tokenizer, hidden_size=64, num_heads=2, num_layers=1,
                              seed=5, pad_vocab_to=len(w.tokenizer) + 13, head_std=1.0, dtype=torch.float32)
    return build_cache(w.root / "padded_cache", teacher, w.tokenizer, w.rows[:12], k=16)


# ---- refusals ---------------------------------------------------------------------------------------

def test_refuses_a_student_with_another_tokenizer(tmp_path):
    w = world()
    from transformers import AutoTokenizer

    other, teacher = AutoTokenizer.from_pretrained(w.other_student), AutoTokenizer.from_pretrained(w.teacher)
    first = next(i for i in range(len(teacher)) if other.convert_ids_to_tokens(i) != teacher.convert_ids_to_tokens(i))
    with pytest.raises(ConfigError) as e:
        train(settings(tmp_path, student=str(w.other_student), loss="kl"))
    msg = str(e.value)
    # The teacher's folder is here, so the refusal names the exact first ids that mean other tokens.
    assert f"id {first}: cache {teacher.convert_ids_to_tokens(first)!r}" in msg
    assert str(w.other_student) in msg and str(w.teacher) in msg and "--loss uld" in msg


def test_refuses_a_cache_of_another_teacher(tmp_path):
    w = world()
    with pytest.raises(ConfigError, match="was made by teacher"):
        train(settings(tmp_path, teacher="Qwen/Qwen2.5-7B"))
    train(settings(tmp_path, teacher=str(w.teacher) + "/", max_steps=1))  # the same teacher, spelled differently


@pytest.mark.parametrize("kw, match", [
    (dict(loss="rskd"), "sample-mode cache"),
    (dict(loss="kl", top_k=9), "K = 8"),
    (dict(loss="uld", uld_lambda=1.0, kd_weight=2.0), "not both"),
    (dict(loss="kl", loss_options={"beta": 0.5}), "no option 'beta'"),
    (dict(loss="normkd", temperature=2.0), "no option 'temperature'"),
    (dict(loss="kl", cache=None, data="x.jsonl"), "give --cache"),
    (dict(max_steps=None), "exactly one of"),
])
def test_refuses_bad_settings(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        train(settings(tmp_path, **kw))


def test_refuses_to_overwrite_checkpoints_without_resume(tmp_path):
    train(settings(tmp_path, max_steps=1, save_steps=1))
    with pytest.raises(ConfigError, match="--resume"):
        train(settings(tmp_path, max_steps=1))


# ---- padded logits width ------------------------------------------------------------------------------

def test_padded_logits_are_sliced_to_the_tokenizer(tmp_path, padded_teacher_cache):
    """Student logits wider than the tokenizer are cut to it; cached ids in the padding go to the tail."""
    from logitcache.storage import open_cache

    w = world()
    cache = open_cache(str(padded_teacher_cache))
    assert max(int(s.topk_ids.max()) for _, s in cache.iter_shards()) >= len(w.tokenizer)  # padding ids are cached
    for student in (w.padded_student, w.student):
        result = train(settings(tmp_path / student.name, student=str(student), cache=str(padded_teacher_cache),
                                loss="kl", max_steps=2))
        assert result["student_vocab_size"] == len(w.tokenizer)
        assert all(torch.isfinite(torch.tensor(logged(result, "kd"))))


def test_compute_loss_slices_padded_columns():
    """Padded columns with huge logits change nothing: compute_loss uses the first vocab_size columns."""
    from types import SimpleNamespace

    from logitcache.stages.train.alignment import SameTokenizerTargets
    from logitcache.stages.train.collate import Collator
    from logitcache.stages.train.losses import kl, sft
    from logitcache.storage import open_cache

    w = world()
    v = len(w.tokenizer)
    batch = Collator(pad_id=0)([SameTokenizerTargets(v)(open_cache(str(w.cache))[i]) for i in range(2)])
    logits = torch.randn(*batch["input_ids"].shape, v + 13)
    logits[..., v:] = 50.0
    model = lambda **kw: SimpleNamespace(logits=logits)  # noqa: E731
    trainer = KDTrainer.__new__(KDTrainer)  # the loss only: no model, no data
    trainer.plan, trainer.chunk_size, trainer._sums, trainer._weights = loss_settings("kl"), None, {}, {}
    trainer.vocab_size, trainer.fused_head = v, False
    got = trainer.compute_loss(model, batch)
    s = logits.reshape(-1, v + 13)[batch["rows"], :v]
    want = sft(s, labels=batch["next_ids"]) + kl(s, batch["teacher_ids"], batch["teacher_logprobs"],
                                                tail_mass=batch["tail_mass"])
    assert torch.allclose(got, want, atol=1e-5)
    trainer.vocab_size = None
    assert trainer.compute_loss(model, batch) > want + 10


@pytest.mark.parametrize("loss, kw", [("kl", {"temperature": 2.0}), ("kl", {}), ("bild", {"top_k": 4}), ("uld", {}),
                                      ("rskd", {})], ids=["kl-T2", "kl", "bild", "uld", "rskd"])
def test_loss_parts_fuses_ce_into_the_kd_pass(loss, kw):
    """loss_parts (one pass: `losses.kd_with_ce`) = ce_weight * sft + kd_weight * KD on the teacher rows.

    Some supervised rows have no teacher row (kd_select picks the others), as after a row is dropped
    from distillation or with another tokenizer; the logged parts are the separate losses' own.
    """
    from logitcache.stages.train.losses import get_loss, sft
    from logitcache.stages.train.trainer import loss_parts

    g = torch.Generator().manual_seed(0)
    n, v, k = 9, 50, 6
    s = torch.randn(n, v, generator=g, dtype=torch.float64)
    lp, ids = torch.randn(n, v, generator=g, dtype=torch.float64).mul(3).log_softmax(-1).topk(k, -1)
    kd_select = torch.tensor([0, 2, 3, 6, 8])
    batch = {"next_ids": torch.randint(0, v, (n,), generator=g), "kd_select": kd_select,
             "teacher_ids": ids[kd_select], "teacher_logprobs": lp[kd_select],
             "tail_mass": (1 - lp.exp().sum(-1))[kd_select], "sample_counts": torch.randint(1, 5, (5, k), generator=g)}
    fused, separate = s.clone().requires_grad_(), s.clone().requires_grad_()
    plan = loss_settings(loss, options=kw, ce_weight=0.5, kd_weight=2.0)
    total, logged = loss_parts(fused, batch, plan, chunk_size=4)
    want_logged = {}
    ce = sft(separate, labels=batch["next_ids"], metrics=want_logged)
    extra = {"counts": batch["sample_counts"]} if loss == "rskd" else {}
    kd = get_loss(loss)(separate[kd_select], batch["teacher_ids"], batch["teacher_logprobs"],
                        tail_mass=batch["tail_mass"], metrics=want_logged, **extra, **kw)
    want_logged.update(ce=ce.detach(), kd=kd.detach())
    total.backward()
    (0.5 * ce + 2.0 * kd).backward()
    torch.testing.assert_close(total, 0.5 * ce.detach() + 2.0 * kd.detach())
    torch.testing.assert_close(fused.grad, separate.grad)
    assert {"ce", "kd", "accuracy"} <= set(logged) and ("top1_agreement" in logged) == (loss != "uld")
    torch.testing.assert_close(logged, want_logged)


# ---- every loss trains ------------------------------------------------------------------------------

FAMILIES = [
    ("kl", {}), ("rkl", {}), ("jsd", {}), ("skl", {}), ("srkl", {}), ("topk_kl", {}),
    ("dkd", {}), ("nkd", {}), ("normkd", {}), ("bild", {"top_k": 4}), ("uld", {}), ("rskd", {}),
]
# The default run trains one family of each kind (a divergence, a baseline, the cross-tokenizer one);
# the rest, ~5 s each on 2 cores, run with -m slow (and in `make test`).
_EVERYDAY = {"kl", "bild", "uld"}
_FAMILY_PARAMS = [pytest.param(loss, kw, id=loss, marks=() if loss in _EVERYDAY else pytest.mark.slow)
                  for loss, kw in FAMILIES]


@pytest.mark.parametrize("loss, kw", _FAMILY_PARAMS)
def test_each_loss_trains_and_its_kd_term_decreases(tmp_path, loss, kw, request):
    w = world()
    # Only rskd reads the sample-mode cache: built on its first use, not in the default selection.
    extra = dict(cache=str(request.getfixturevalue("sample_cache"))) if loss == "rskd" else {}
    if loss == "uld":
        extra = dict(student=str(w.other_student))  # another tokenizer: re-tokenizes the cached text
    # ULD is an L1 distance, already small here (a tiny teacher and student): a smaller step.
    lr = 5e-3 if loss == "uld" else 2e-2
    result = train(settings(tmp_path, loss=loss, ce_weight=0.0, max_steps=8, learning_rate=lr, **kw, **extra))
    kd = logged(result, "kd")
    assert len(kd) == 8 and all(map(lambda x: x == x, kd))
    assert sum(kd[-3:]) / 3 < kd[0], kd
    if loss == "bild":
        assert 0.0 <= logged(result, "bild_coverage")[0] <= 1.0
    if loss != "uld":
        assert "top1_agreement" in result["log_history"][0]


def test_sft_without_a_cache(tmp_path):
    w = world()
    result = train(settings(tmp_path, loss="sft", cache=None, data=str(w.train), max_steps=None, num_train_epochs=2,
                            per_device_train_batch_size=8, eval_data=str(w.heldout)))
    ce = logged(result, "ce")
    assert result["global_step"] == 6 and result["sequences_per_rank"] == 48  # 24 rows x 2 epochs, batch 8
    assert ce[-1] < ce[0]
    assert set(result["eval"]) >= {"perplexity", "accuracy", "ece", "nll", "positions"}
    assert (Path(result["settings"]["output_dir"]) / "model.safetensors").exists()


def test_sft_and_eval_on_chat_data(tmp_path):
    """`--data` and `--eval-data` in the messages format: trained and evaluated on assistant turns only."""
    from trainkit import write_jsonl

    w = world()
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
             for r in w.rows]
    data = write_jsonl(tmp_path / "chats.jsonl", chats)
    result = train(settings(tmp_path, loss="sft", cache=None, data=str(data), eval_data=str(data), max_steps=2))
    assert result["global_step"] == 2 and result["eval"]["positions"] > 0
    # Positions evaluated = assistant tokens + their end-of-turn: the same count as the encoder supervises.
    from logitcache.stages.train.alignment import IGNORE, TextExample

    expected = sum(int((TextExample(w.tokenizer)({**c, "row_index": 0})["labels"] != IGNORE).sum()) for c in chats)
    assert result["eval"]["positions"] == expected


def test_uld_reads_the_text_from_data_when_the_cache_stores_none(tmp_path):
    w = world()
    cache = build_cache(tmp_path / "no_text", w.teacher, w.tokenizer, w.rows[:8], store_text=False)
    with pytest.raises(ConfigError, match="give the source data as --data"):
        train(settings(tmp_path, student=str(w.other_student), cache=str(cache), loss="uld"))
    result = train(settings(tmp_path, student=str(w.other_student), cache=str(cache), loss="uld", data=str(w.train)))
    assert result["global_step"] == 2 and not result["cache"]["same_tokenizer"]


# ---- resume -----------------------------------------------------------------------------------------

def test_resume_mid_epoch_trains_on_exactly_the_remaining_sequences(tmp_path, monkeypatch):
    seen = []
    step = KDTrainer.training_step

    def recording(self, model, inputs, num_items_in_batch=None):
        seen.append(inputs["row_index"].tolist())
        return step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(KDTrainer, "training_step", recording)
    # 24 sequences, batch 3: 8 steps an epoch; checkpoint at step 2; 2 workers.
    common = dict(max_steps=5, per_device_train_batch_size=3, dataloader_num_workers=2, save_steps=2, save_total_limit=None)
    train(settings(tmp_path, **common))
    uninterrupted = seen[:]
    out = tmp_path / "out"
    for later in ("checkpoint-4", "checkpoint-5"):
        shutil.rmtree(out / later)
    seen.clear()
    result = train(settings(tmp_path, resume_from_checkpoint=True, **common))
    assert result["global_step"] == 5
    assert sorted(sum(seen, [])) == sorted(sum(uninterrupted[2:], []))
    assert not set(sum(seen, [])) & set(sum(uninterrupted[:2], []))
    state = json.loads((out / "logitcache_data_rank0.json").read_text())
    assert sum(state["consumed"]) == 15 and state["num_workers"] == 2


# ---- DDP ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # torchrun's default rendezvous port: one run at a time
def test_ddp_two_processes_on_cpu_see_disjoint_data():
    """Two gloo ranks under torchrun (`trainkit.ddp_run`, also test_trainer_fsdp.py's DDP baseline): each
    trains on its own sequences, and each checkpoint holds each rank's own data position."""
    out, result = ddp_run()
    assert result["wrapper"] == ["DistributedDataParallel"] * 2
    rows = result["rows"]
    assert len(rows[0]) == len(rows[1]) == 8  # 4 steps x 2 sequences
    assert not set(rows[0]) & set(rows[1])
    assert result["world_size"] == 2 and result["global_step"] == 4
    for r in range(2):
        state = json.loads((out / "checkpoint-2" / f"logitcache_data_rank{r}.json").read_text())
        assert state["rank"] == r and state["world_size"] == 2 and state["consumed"] == [4]


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")
def test_evaluation_is_shared_across_ranks_and_equals_one_process():
    """The same DDP run's evaluation at step 4 (`--eval-cache`, 12 batches of 2): each rank scored its own
    batches (about half the positions, together all of them), and the all-reduced metrics and the gathered
    per-position scores every rank returns are one process's evaluation of the step-4 checkpoint."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from logitcache.stages.train.alignment import SameTokenizerTargets
    from logitcache.stages.train.data import CacheSource
    from logitcache.stages.train.evaluate import evaluate_source

    out, result = ddp_run()
    w = world()
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-4", dtype=torch.float32)
    v = len(w.tokenizer)
    one = evaluate_source(model, CacheSource(str(w.cache), to_item=SameTokenizerTargets(v)), pad_id=0, vocab_size=v,
                          batch_size=2, per_position=True)
    logged_eval = [h for h in result["log_history"] if "eval_cache_nll" in h]
    assert [h["step"] for h in logged_eval] == [4]
    for key in ("nll", "accuracy", "ece", "teacher_agreement", "teacher_accuracy", "kd_loss"):
        assert logged_eval[0][f"eval_cache_{key}"] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    assert logged_eval[0]["eval_cache_positions"] == one["positions"]
    assert logged_eval[0]["eval_cache_sequences"] == one["sequences"] == 24
    ranks = [np.load(out / f"eval_rank{r}.npz") for r in range(2)]
    scored = [int(found["scored"][0]) for found in ranks]
    assert sum(scored) == one["positions"] and 0 < scored[0] < one["positions"]  # each its share, none twice
    for found in ranks:
        for key in ("nll", "correct", "agree"):
            assert found[f"{key}0"].shape == one["per_position"][key].shape
            np.testing.assert_allclose(found[f"{key}0"], one["per_position"][key], rtol=1e-5, atol=1e-6)


def test_a_held_out_cache_of_another_tokenizer_gets_the_tokenizer_refusal(tmp_path, capsys):
    """`eval --cache` and `train --eval-cache` with a model whose tokenizer is not the cache's: the tokenizer
    refusal, naming the first id that means another token (they once stopped on "unknown loss 'eval'")."""
    from logitcache.pipeline.cli import main

    w = world()
    with pytest.raises(ConfigError, match="--eval-cache reads the cache's teacher token ids") as e:
        train(settings(tmp_path, student=str(w.other_student), cache=None, loss="sft", data=str(w.train),
                       eval_cache=str(w.cache), eval_steps=1))
    assert "id " in str(e.value) and "unknown loss" not in str(e.value)
    assert not (tmp_path / "out").exists()  # refused before the trainer was built
    assert main(["eval", "--model", str(w.other_student), "--cache", str(w.cache), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "eval --cache reads the cache's teacher token ids" in err and "unknown loss" not in err


def test_settings_are_decided_once_before_anything_loads(tmp_path):
    """Frozen settings, `cache` always a tuple, and the settings-only refusals before the student is loaded."""
    import dataclasses

    one = TrainSettings(student="nowhere", output_dir="o", cache="a", max_steps=1)
    assert one.cache == ("a",) and TrainSettings(student="s", output_dir="o", cache=["a", "b"]).cache == ("a", "b")
    assert TrainSettings(student="s", output_dir="o", loss="sft", data="d.jsonl").cache == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.cache = ("b",)
    for kw, match in ((dict(cache_weights=[1.0]), "more than one --cache"), (dict(lora_alpha=4.0), "need --lora-r"),
                      (dict(eval_steps=0), "--eval-steps must be a positive integer")):
        with pytest.raises(ConfigError, match=match):  # a student "nowhere" would fail later, on loading
            train(dataclasses.replace(one, **kw))


def test_the_loss_plan_decides_top_k_once():
    """--top-k is BiLD's k for BiLD and keep-k for the others; the cache's draw temperature reaches rskd alone."""
    bild, kl = loss_settings("bild", top_k=4), loss_settings("kl", top_k=4)
    assert (bild.options["top_k"], bild.keep_k, bild.top_k) == (4, None, 4)
    assert (kl.keep_k, kl.top_k, "top_k" in kl.options) == (4, 4, False)
    assert kl.reading(0.5) is kl and kl.record()["options"] == {}
    rskd = loss_settings("rskd").reading(0.5)
    assert rskd.options["sample_temperature"] == 0.5 and rskd.record()["options"] == {"sample_temperature": 0.5}
    with pytest.raises(ConfigError, match="--top-k does not apply to --loss sft"):
        loss_settings("sft", top_k=4)
