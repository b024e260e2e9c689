"""`train`'s settings carry transformers' TrainingArguments names; the short names users have in configs still load.

    .venv/bin/python -m pytest tests/pipeline/test_train_names.py -q
"""

import dataclasses

import pytest
import yaml
from transformers import TrainingArguments

from logitcache.pipeline.api import keywords
from logitcache.pipeline.cli import build_parser, main
from logitcache.stages.train.run import PASSED_AS_IS, TrainSettings
from logitcache.storage.errors import ConfigError

HF_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
SETTINGS = {f.name for f in dataclasses.fields(TrainSettings)}
OLD = {"out": "output_dir", "batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
       "lr": "learning_rate", "warmup": "warmup_steps", "scheduler": "lr_scheduler_type", "epochs": "num_train_epochs",
       "resume": "resume_from_checkpoint", "num_workers": "dataloader_num_workers"}


def train_parser():
    return build_parser()._subparsers._group_actions[0].choices["train"]


def test_every_setting_with_a_training_arguments_namesake_has_its_exact_name():
    """An option any of whose spellings is a TrainingArguments field is stored under that field's name, which is
    the TrainSettings field it fills; no TrainSettings field keeps a short name."""
    mirrored = set()
    for action in train_parser()._actions:
        namesakes = {s.lstrip("-").replace("-", "_") for s in action.option_strings} & HF_FIELDS
        if namesakes:
            assert action.dest in namesakes and action.dest in SETTINGS, (action.option_strings, action.dest)
            mirrored.add(action.dest)
    assert set(OLD.values()) <= mirrored and not SETTINGS & set(OLD)
    # Every TrainSettings field named after a TrainingArguments field is one of these options (no field that only
    # shares a name), and the fields handed over as they are are real TrainingArguments fields.
    assert SETTINGS & HF_FIELDS == mirrored and set(PASSED_AS_IS) <= mirrored


def test_a_yaml_with_the_old_names_still_loads_and_prints_the_new_ones(tmp_path, capsys):
    old = {"student": "Qwen/Qwen2.5-0.5B", "cache": "s3://b/c", "loss": "kl", "out": str(tmp_path / "s"),
           "epochs": 2, "batch_size": 4, "grad_accum": 2, "lr": 3.0e-4, "warmup": 0.05, "scheduler": "linear",
           "num_workers": 0, "resume": True}
    config = tmp_path / "old.yaml"
    config.write_text(yaml.safe_dump(old))
    assert main(["train", "--config", str(config), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for short, name in OLD.items():
        assert name in printed and short not in printed, short
        assert printed[name] == old[short], name
    # What it prints is a config in the new names that reads back to the same settings.
    config.write_text(yaml.safe_dump(printed))
    assert main(["train", "--config", str(config), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == printed


def test_two_names_of_one_option_are_refused(tmp_path, capsys):
    config = tmp_path / "both.yaml"
    config.write_text("student: s\ncache: c\nout: o\nmax_steps: 1\nlr: 1.0e-3\nlearning_rate: 2.0e-3\n")
    assert main(["train", "--config", str(config), "--print-config"]) == 2
    assert "lr and learning_rate name the same option" in capsys.readouterr().err
    from logitcache.pipeline import api

    with pytest.raises(ConfigError, match="lr and learning_rate name the same option"):
        api.train(student="s", cache="c", output_dir="o", max_steps=1, lr=1e-3, learning_rate=2e-3)


def test_the_api_takes_both_names():
    names = keywords(train_parser())
    for short, name in OLD.items():
        assert names[short] == names[name] == name


def test_hf_arg_refusals_name_real_flags():
    """`--hf-arg learning_rate=...` is refused naming the flag to use instead; every such flag exists."""
    from logitcache.stages.train.run import _HF_FLAGS, check_hf_args

    flags = {s for action in train_parser()._actions for s in action.option_strings}
    for field, named in _HF_FLAGS.items():
        assert field in HF_FIELDS and set(named.split("/")) <= flags, (field, named)
    with pytest.raises(ConfigError, match="TrainingArguments.learning_rate is set by --learning-rate"):
        check_hf_args({"learning_rate": 1e-3}, {})
