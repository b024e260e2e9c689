"""`logitcache.pipeline.api`: the commands from Python, with the CLI's option names and checks, returning
results instead of printing them.

    .venv/bin/pytest tests/pipeline/test_api.py
"""

import json

import pytest
from trainkit import world

from logitcache.pipeline import api
from logitcache.pipeline.cli import COMMANDS
from logitcache.storage.errors import ConfigError


def test_one_function_per_command():
    names = {"eval": "evaluate"}
    assert {names.get(c, c) for c in COMMANDS} | {"open_cache", "cached_kd", "CachedKD"} == set(api.__all__)


def test_storage_commands_return_results(tmp_path, capsys):
    w = world()
    checked = api.validate(cache=str(w.cache))
    assert checked["problems"] == [] and checked["sequences"] == len(api.open_cache(str(w.cache)))
    summary = api.inspect(cache=str(w.cache), max_shards=2)
    assert summary["sequences"] == checked["sequences"] and summary["top_k"] == 8
    index = api.convert(src=str(w.cache), dst=str(tmp_path / "parquet"), backend="parquet")
    assert index["backend"] == "arrow" and api.validate(cache=str(tmp_path / "parquet"))["problems"] == []
    assert capsys.readouterr().out == ""  # results are returned, not printed


def test_train_and_evaluate_take_the_cli_names(tmp_path):
    w = world()
    out = tmp_path / "student"
    # transformers' spellings and logitcache's own alike
    result = api.train(student=str(w.student), cache=str(w.cache), loss="kl", output_dir=str(out), max_steps=2,
                       per_device_train_batch_size=4, learning_rate=1e-3, num_workers=0, save_steps=1000)
    assert result["global_step"] == 2 and result == json.loads((out / "logitcache_train.json").read_text())
    metrics = api.evaluate(model=str(out), cache=str(w.cache), device="cpu")
    assert 0 <= metrics["cache"]["teacher_agreement"] <= 1


def test_the_same_checks_as_the_command_line():
    w = world()
    with pytest.raises(ConfigError, match="exactly one of --max-steps and --epochs"):
        api.train(student=str(w.student), cache=str(w.cache), out="/tmp/never")
    with pytest.raises(ConfigError, match=r"--top-k.* -1: must be >= 1"):
        api.precompute(teacher=str(w.teacher), data="d.jsonl", out="/tmp/never", top_k=-1)
    with pytest.raises(ConfigError, match="unknown option.*topk"):
        api.precompute(teacher=str(w.teacher), data="d.jsonl", out="/tmp/never", topk=8)
    with pytest.raises(ConfigError, match=r"validate\(\): cache required"):
        api.validate()


def test_a_no_keyword_means_what_its_flag_means(tmp_path, capsys):
    """`no_progress=True` is `--no-progress`: the bar off (it once turned it on, as progress=True)."""
    w = world()
    for kwargs, bar in (({"progress": True}, True), ({"no_progress": False}, True), ({"no_progress": True}, False),
                        ({"progress": False}, False)):
        api.validate(cache=str(w.cache), **kwargs)
        assert ("validate: 100%" in capsys.readouterr().err) == bar, kwargs
    from logitcache.pipeline.cli import build_parser
    from logitcache.pipeline.options import negated_keywords

    parsers = build_parser()._subparsers._group_actions[0].choices
    assert {"no_progress", "no_fused_head"} <= negated_keywords(parsers["precompute"]) | negated_keywords(
        parsers["train"])


def test_a_plain_transformers_trainer_trains_from_a_cache(tmp_path):
    """The cache in someone else's trainer: a plain `transformers.Trainer` subclass (not logitcache's), with
    `cached_kd`'s dataset, collator and loss, trains a few steps; its loss is the one `KDTrainer` computes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from logitcache.stages.train.batch_loss import loss_parts, supervised_logits
    from logitcache.stages.train.loss_settings import loss_settings

    w = world()
    tokenizer = AutoTokenizer.from_pretrained(str(w.student))
    model = AutoModelForCausalLM.from_pretrained(str(w.student))
    kd = api.cached_kd(str(w.cache), tokenizer=tokenizer, logits_width=model.config.vocab_size, loss="kl")

    class MyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**kd.model_inputs(inputs))
            loss = kd.loss(outputs.logits, inputs)
            return (loss, outputs) if return_outputs else loss

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], remove_unused_columns=False, save_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, logging_steps=1)
    trainer = MyTrainer(model=model, args=args, train_dataset=kd.dataset, data_collator=kd.collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 3 and len(losses) == 3 and all(0 < x < 50 for x in losses)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())

    batch = kd.collator([item for _, item in zip(range(4), iter(kd.dataset))])
    logits = model(**kd.model_inputs(batch)).logits
    ours = loss_parts(supervised_logits(logits, batch["rows"], len(tokenizer)), batch, loss_settings("kl"))[0]
    assert torch.allclose(kd.loss(logits, batch), ours)
    with pytest.raises(ConfigError, match="uld"):
        api.cached_kd(str(w.cache), tokenizer=tokenizer, logits_width=model.config.vocab_size, loss="uld")
