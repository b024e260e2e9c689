"""Trainer options users expect: LoRA (peft) with saved and merged adapters, model loading options,
TrainingArguments' names as flags, and `--hf-arg` collisions.

    .venv/bin/python -m pytest tests/stages/train/test_train_options.py -x -q
"""

import pytest
import torch
from trainkit import world

from logitcache.stages.train.run import TrainSettings, train
from logitcache.storage.errors import ConfigError


def settings(tmp_path, **kw):
    w = world()
    base = dict(student=str(w.student), cache=str(w.cache), output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                learning_rate=1e-2, logging_steps=1, dataloader_num_workers=0, save_steps=1000)
    return TrainSettings(**{**base, **kw})


def test_lora_trains_only_the_adapters_and_saves_them_merged(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    w = world()
    result = train(settings(tmp_path, loss="kl", lora_r=4, lora_target_modules=["q_proj", "v_proj"], merge_lora=True))
    assert result["fused_head"] is True  # the head is not adapted: the fused loss still applies
    kd = [h["kd"] for h in result["log_history"] if "kd" in h]
    assert len(kd) == 3 and kd[-1] < kd[0]
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(w.student, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(w.student, dtype=torch.float32),
                                        out / "adapter")
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])}
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed), changed
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_lora_adapters_alone_without_merge(tmp_path):
    train(settings(tmp_path, loss="sft", cache=None, data=str(world().train), lora_r=2, max_steps=1))
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("kw, match", [
    (dict(lora_r=0), "positive integer"),
    (dict(lora_r=2, lora_dropout=1.0), "lora-dropout"),
    (dict(merge_lora=True), "need --lora-r"),
    (dict(lora_r=2, lora_target_modules=["nope_proj"]), "lora-target-modules"),
    (dict(hf_args={"learning_rate": 0.1}), "--learning-rate"),
    (dict(hf_args={"per_device_train_batch_size": 2}), "--per-device-train-batch-size"),
    (dict(hf_args={"remove_unused_columns": True}), "fixes remove_unused_columns"),
    (dict(hf_args={"not_a_field": 1}), "no field"),
    (dict(attn_implementation="no_such_attention"), "cannot load"),
])
def test_refusals(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        train(settings(tmp_path, **kw))


def test_gradient_checkpointing_and_attention_options(tmp_path):
    result = train(settings(tmp_path, loss="kl", gradient_checkpointing=True, attn_implementation="eager",
                            hf_args={"max_grad_norm": 0.5}, max_steps=2))
    assert result["global_step"] == 2


def test_cli_takes_training_arguments_names_and_the_short_aliases():
    from logitcache.pipeline.cli import build_parser

    parser = build_parser()
    common = ["train", "--student", "s", "--out", "o"]
    long = parser.parse_args(common + ["--per-device-train-batch-size", "3", "--gradient-accumulation-steps", "2",
                                       "--learning-rate", "0.5"])
    short = parser.parse_args(common + ["--batch-size", "3", "--grad-accum", "2", "--lr", "0.5"])
    for args in (long, short):
        assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.learning_rate) == (3, 2, 0.5)
    lora = parser.parse_args(common + ["--lora-r", "8", "--lora-target-modules", "q_proj", "v_proj",
                                       "--attn-implementation", "sdpa", "--student-revision", "main",
                                       "--gradient-checkpointing", "--pack", "--no-fused-head"])
    assert (lora.lora_r, lora.lora_target_modules, lora.attn_implementation) == (8, ["q_proj", "v_proj"], "sdpa")
    assert lora.gradient_checkpointing and lora.pack and not lora.fused_head and lora.student_revision == "main"


def test_evaluation_while_training_logs_the_eval_command_metrics(tmp_path):
    """--eval-data and --eval-cache every 2 steps, through Trainer.evaluate; the same numbers as `logitcache eval`."""
    from logitcache.stages.train.evaluate import evaluate

    w = world()
    result = train(settings(tmp_path, loss="kl", max_steps=4, eval_steps=2, eval_data=str(w.heldout),
                            eval_cache=str(w.cache), save_steps=4))
    evals = [h for h in result["log_history"] if "eval_data_perplexity" in h]
    assert [h["step"] for h in evals] == [2, 4]
    for key in ("eval_data_accuracy", "eval_data_ece", "eval_cache_teacher_agreement", "eval_cache_perplexity"):
        assert key in evals[-1], key
    # At step 4 the model is the final one: the standalone command gives the same numbers.
    standalone = evaluate(str(tmp_path / "out"), data=str(w.heldout), cache=str(w.cache), device="cpu")
    assert evals[-1]["eval_data_perplexity"] == pytest.approx(standalone["data"]["perplexity"], rel=1e-4)
    assert evals[-1]["eval_cache_teacher_agreement"] == pytest.approx(standalone["cache"]["teacher_agreement"])


def test_eval_steps_needs_something_to_evaluate(tmp_path):
    with pytest.raises(ConfigError, match="--eval-steps"):
        train(settings(tmp_path, eval_steps=2))
