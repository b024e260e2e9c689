"""logitcache from Python: one function per command, for scripts and other trainers.

    from logitcache.pipeline import api

    api.precompute(teacher="Qwen/Qwen2.5-7B-Instruct", data="chats.jsonl", messages_field="messages",
                   out="./cache", top_k=32)                      # -> PrecomputeResult
    api.validate(cache="./cache")["problems"]                    # -> [] when every shard checks out
    result = api.train(student="Qwen/Qwen2.5-0.5B", cache="./cache", loss="bild", output_dir="./student",
                       max_steps=1000, learning_rate=1e-4)       # -> what logitcache_train.json holds
    api.evaluate(model="./student", cache="./cache")["cache"]["teacher_agreement"]
    cache = api.open_cache("./cache")                            # the reader any trainer can use
    for shard_id, shard in cache.iter_shards(): ...

    kd = api.cached_kd("./cache", tokenizer=tok, logits_width=model.config.vocab_size, loss="kl")
    # in your own transformers.Trainer (or loop): train_dataset=kd.dataset, data_collator=kd.collator,
    # and in compute_loss: kd.loss(model(**kd.model_inputs(inputs)).logits, inputs)

Keyword arguments are the command's options in snake_case (`top_k`, `storage_options`), the same names
a `--config` YAML takes; `logitcache <command> --help` lists them. `train`'s options that mirror a
transformers `TrainingArguments` field take its name (`per_device_train_batch_size`, `learning_rate`,
`output_dir`: `TrainSettings`' fields and `--print-config`'s keys); the command line's short names
(`batch_size`, `lr`, `out`) are accepted too, as in a YAML, but not both for one option. They pass the same checks as the command line, in the same
code (a wrong value raises the same `ConfigError`), and each function returns what the command
computed instead of printing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from logitcache.storage import open_cache
from logitcache.storage.errors import ConfigError

__all__ = ["precompute", "merge", "train", "evaluate", "validate", "inspect", "convert", "push", "open_cache",
           "cached_kd", "CachedKD"]


def precompute(**options):
    """`logitcache precompute`: returns the `PrecomputeResult` (out, fingerprint, shards, stopped_by, index)."""
    return _run("precompute", options)


def merge(**options) -> dict:
    """`logitcache merge`: returns the finished cache's index."""
    return _run("merge", options)


def train(**options) -> dict:
    """`logitcache train`: returns what `logitcache_train.json` holds (settings, metrics, log history)."""
    return _run("train", options)


def evaluate(**options) -> dict:
    """`logitcache eval`: returns the metrics of --data and/or --cache."""
    return _run("eval", options)


def validate(**options) -> dict:
    """`logitcache validate`: returns {"problems": one line per bad shard, "shards", "sequences", "positions"}."""
    return _run("validate", options)


def inspect(**options) -> dict:
    """`logitcache inspect`: returns the summary `inspect --json` prints."""
    return _run("inspect", options)


def convert(**options) -> dict:
    """`logitcache convert`: returns the new cache's index."""
    return _run("convert", options)


def push(**options) -> str:
    """`logitcache push`: returns the dataset card it uploaded (the token: HF_TOKEN, the login, or token_file)."""
    return _run("push", options)


@dataclass(frozen=True)
class CachedKD:
    """A cache ready for a trainer of your own (`cached_kd`).

    Attributes:
        dataset: a torch IterableDataset of the cache's sequences (shuffled by shard window, split by
            rank and DataLoader worker; `state_dict()` is its resume position).
        collator: pads a list of its items into a batch (`stages.train.collate`).
        plan: the loss and its options (`loss_settings`).
        vocab: the student logits' columns the loss reads.
    """

    dataset: object
    collator: object
    plan: object
    vocab: int

    @staticmethod
    def model_inputs(batch: dict) -> dict:
        """What the model's forward takes from a batch: input_ids and attention_mask (or position_ids)."""
        from logitcache.stages.train.trainer import model_inputs

        return model_inputs(batch)

    def loss(self, logits, batch: dict):
        """The batch's loss, 0-dim: ce_weight * CE + kd_weight * KD over its supervised positions.

        Args:
            logits: (B, T, W) the student's output on `model_inputs(batch)`, W >= vocab.
        """
        from logitcache.stages.train.batch_loss import loss_parts, supervised_logits

        if batch["rows"].shape[0] == 0:  # nothing supervised: a zero that keeps the graph
            return logits.sum() * 0.0
        return loss_parts(supervised_logits(logits, batch["rows"], self.vocab), batch, self.plan)[0]


def cached_kd(cache: str, *, tokenizer, logits_width: int, loss: str = "kl", top_k: int | None = None,
              temperature: float | None = None, loss_options: dict | None = None, max_length: int | None = None,
              storage_options: dict | None = None, seed: int = 0, epochs: int | None = None) -> CachedKD:
    """One cache as a dataset, a collator and a loss for a trainer of your own, checked as `train` checks
    it (the loss against the cache's mode and K, the tokenizer against the cache's).

    Args:
        cache: a cache folder or URL. tokenizer: the student's (it must read the cache's ids as the
            teacher's tokens; another tokenizer needs `train --loss uld`). logits_width: the student
            logits' width (`model.config.vocab_size`). loss, top_k, temperature, loss_options: as
            `train --loss ...`. epochs: passes over the cache (None: without end; give the trainer
            max_steps).

    Raises:
        ConfigError: what `train` would refuse.
    """
    import os

    from logitcache.stages.train.checks import student_vocab_size
    from logitcache.stages.train.collate import Collator
    from logitcache.stages.train.loss_settings import loss_settings
    from logitcache.stages.train.sources import Reader, open_training_data

    plan = loss_settings(loss, temperature=temperature, top_k=top_k, options=loss_options)
    if not plan.loss.needs_teacher_tokenizer:
        raise ConfigError(f"cached_kd: --loss {loss} re-tokenizes the cache for another tokenizer; use "
                          f"`logitcache train` for it")
    vocab = student_vocab_size(tokenizer, logits_width, student="the student")
    reader = Reader("the student", tokenizer, vocab, max_length, storage_options)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    data = open_training_data([cache], data=None, weights=None, plan=plan, teacher=None, reader=reader, seed=seed,
                              window=2, epochs=epochs, rank=rank, world_size=world_size)
    plan = plan.reading(data.sample_temperature)  # rskd: the temperature the cache was drawn at
    pad = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    return CachedKD(data.stream, Collator(pad), plan, vocab)


def keywords(parser) -> dict[str, str]:
    """{keyword: option destination} of a command's parser: every name of every option in snake_case
    (`top_k`; `lr`, `learning_rate` and `batch_size`, `per_device_train_batch_size` alike)."""
    names = {}
    for action in parser._actions:
        if action.dest not in ("help", "config", "print_config") and not action.dest.startswith("_"):
            names[action.dest] = action.dest
            for flag in action.option_strings:
                names.setdefault(flag.lstrip("-").replace("-", "_"), action.dest)
    return names


def _run(command: str, options: dict):
    import importlib

    from logitcache.pipeline.cli import build_parser
    from logitcache.pipeline.options import check_options, negated_keywords

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    names = keywords(sub)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ConfigError(f"{command}(): unknown option(s) {', '.join(unknown)}; `logitcache {command} --help` "
                          f"lists them")
    for dest in {names[k] for k in options}:
        if len(same := [k for k in options if names[k] == dest]) > 1:  # lr= and learning_rate=
            raise ConfigError(f"{command}(): {' and '.join(same)} name the same option; give one")
    negated = negated_keywords(sub)  # no_progress=True is progress=False, as --no-progress is
    values = {names[k]: (not v if k in negated and isinstance(v, bool) else v) for k, v in options.items()}
    missing = [a.dest for a in sub._actions if a.required and a.dest not in values]
    if missing:
        raise ConfigError(f"{command}(): {', '.join(missing)} required")
    sub.set_defaults(**values)
    for action in sub._actions:
        action.required = False
    args = parser.parse_args([command])
    check_options(command, sub, args)
    if args._check is not None:
        args._check(args)
    return importlib.import_module(f"logitcache.pipeline.commands.{command}").execute(args)

