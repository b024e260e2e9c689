"""`logitcache train` and `logitcache eval` from the command line.

    .venv/bin/pytest tests/pipeline/test_train_cli.py                       # the fast ones
    .venv/bin/pytest tests/pipeline/test_train_cli.py -m "slow or not slow"  # with the end-to-end runs
"""

import json

import pytest
import yaml
from trainkit import world

from logitcache.pipeline.cli import main


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"logitcache {command} --" in out


@pytest.mark.slow
def test_sft_without_cache_then_eval_json(tmp_path, capsys):
    w = world()
    out = tmp_path / "teacher"
    rc = main(["train", "--student", str(w.student), "--data", str(w.train), "--loss", "sft", "--out", str(out),
               "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--num-workers", "0", "--logging-steps", "1"])
    assert rc == 0
    assert "train: 3 steps" in capsys.readouterr().out
    result = json.loads((out / "logitcache_train.json").read_text())
    assert result["loss"]["name"] == "sft" and result["cache"] is None and result["global_step"] == 3
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()

    rc = main(["eval", "--model", str(out), "--data", str(w.heldout), "--cache", str(w.cache), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"model", "data", "cache"}
    assert set(report["data"]) == {"path", "sequences", "positions", "nll", "perplexity", "accuracy", "ece"}
    assert set(report["cache"]) == {"path", "teacher", "sequences", "positions", "nll", "perplexity", "accuracy", "ece",
                                    "teacher_positions", "teacher_agreement", "teacher_accuracy", "kd_loss"}
    assert report["cache"]["kd_loss"] > 0  # forward KL (the default --loss) from the cached teacher
    assert report["data"]["sequences"] == 8 and report["cache"]["sequences"] == 24
    assert 0.0 <= report["cache"]["teacher_agreement"] <= 1.0 and 0.0 <= report["data"]["ece"] <= 1.0


def test_yaml_config_with_loss_and_trainer_options(tmp_path):
    w = world()
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "student": str(w.student), "cache": str(w.cache), "out": str(tmp_path / "jsd"), "loss": "jsd",
        "loss_options": {"beta": 0.3}, "tail": "renorm", "max_steps": 2, "batch_size": 4, "num_workers": 0,
        "hf_args": {"max_grad_norm": 0.5}}))
    assert main(["train", "--config", str(config), "--kd-weight", "2"]) == 0
    result = json.loads((tmp_path / "jsd" / "logitcache_train.json").read_text())
    assert result["loss"]["options"] == {"beta": 0.3, "tail": "renorm"}
    assert result["loss"]["kd_weight"] == 2.0  # the command line overrides the file
    assert result["settings"]["hf_args"] == {"max_grad_norm": 0.5}


def test_eval_refuses_an_unknown_loss_or_option(capsys):
    w = world()
    assert main(["eval", "--model", str(w.student), "--cache", str(w.cache), "--loss", "nope"]) == 2
    assert "unknown loss 'nope'" in capsys.readouterr().err
    assert main(["eval", "--model", str(w.student), "--cache", str(w.cache), "--loss", "normkd", "--temperature",
                 "2"]) == 2
    assert "'normkd' has no option 'temperature'" in capsys.readouterr().err


def test_refusal_exits_2_with_the_reason(tmp_path, capsys):
    w = world()
    rc = main(["train", "--student", str(w.other_student), "--cache", str(w.cache), "--loss", "bild",
               "--out", str(tmp_path / "x"), "--max-steps", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "logitcache train: error:" in err and "mean other tokens" in err and "--loss uld" in err


@pytest.mark.slow
def test_end_to_end_precompute_hf_then_train_and_eval(tmp_path, capsys):
    """A cache written by stage one's own command trains a student; the student trains to agree with it."""
    w = world()
    cache = tmp_path / "cache"
    assert main(["precompute", "--teacher", str(w.teacher), "--data", str(w.train), "--prompt-field", "prompt",
                 "--response-field", "response", "--out", str(cache), "--engine", "hf", "--top-k", "8",
                 "--backend", "arrow", "--rows-per-shard", "8", "--no-progress"]) == 0
    out = tmp_path / "student"
    assert main(["train", "--student", str(w.student), "--cache", str(cache), "--teacher", str(w.teacher),
                 "--loss", "bild", "--top-k", "4", "--out", str(out), "--max-steps", "2", "--batch-size", "4",
                 "--num-workers", "0"]) == 0
    result = json.loads((out / "logitcache_train.json").read_text())
    assert result["cache"]["k"] == 8 and result["cache"]["same_tokenizer"]
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--cache", str(cache), "--json", "--max-sequences", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["cache"]["sequences"] == 4


def test_yaml_takes_every_name_of_an_option(tmp_path):
    """TrainingArguments' names and the short aliases are both keys a config file may use."""
    from logitcache.pipeline.cli import _parse_with_config, build_parser

    for names in ({"per_device_train_batch_size": 3, "learning_rate": 0.002, "gradient_accumulation_steps": 5},
                  {"batch_size": 3, "lr": 0.002, "grad_accum": 5}):
        config = tmp_path / "train.yaml"
        config.write_text(yaml.safe_dump({"student": "s", "cache": "c", "out": "o", **names}))
        args, _ = _parse_with_config(build_parser(), ["train", "--config", str(config)])
        assert (args.per_device_train_batch_size, args.learning_rate, args.gradient_accumulation_steps) == (3, 0.002, 5)


def test_transformers_spellings_of_training_arguments():
    """A command line copied from the HF docs runs unchanged: every underscore spelling `train` takes is a real
    TrainingArguments field, and means the same setting as logitcache's own flag."""
    import dataclasses

    from transformers import TrainingArguments

    from logitcache.pipeline.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    spellings = {o.lstrip("-") for a in train._actions for o in a.option_strings if "_" in o}
    # warmup_ratio: transformers 4's field for a share of the steps (5 reads a float warmup_steps < 1 so).
    assert spellings - {"warmup_ratio"} <= {f.name for f in dataclasses.fields(TrainingArguments)}, spellings
    assert {"per_device_train_batch_size", "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio",
            "logging_steps", "save_steps", "eval_steps", "report_to", "dataloader_num_workers",
            "gradient_accumulation_steps", "max_steps", "num_train_epochs", "output_dir",
            "resume_from_checkpoint"} <= spellings
    base = ["train", "--student", "s", "--cache", "c", "--loss", "kl"]
    hf = parser.parse_args([*base, "--output_dir", "o", "--per_device_train_batch_size", "4", "--learning_rate", "3e-5",
                            "--lr_scheduler_type", "linear", "--warmup_ratio", "0.1", "--num_train_epochs", "2",
                            "--gradient_accumulation_steps", "2", "--dataloader_num_workers", "0", "--report_to",
                            "tensorboard", "--logging_steps", "5", "--save_steps", "50", "--resume_from_checkpoint"])
    own = parser.parse_args([*base, "--out", "o", "--batch-size", "4", "--lr", "3e-5", "--scheduler", "linear",
                             "--warmup", "0.1", "--epochs", "2", "--grad-accum", "2", "--num-workers", "0",
                             "--report-to", "tensorboard", "--logging-steps", "5", "--save-steps", "50", "--resume"])
    assert vars(hf) == vars(own)
