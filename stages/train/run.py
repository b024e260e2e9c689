"""Stage two: train a student by streaming a teacher's cache (or, for `--loss sft`, straight from text).

    logitcache train --student Qwen/Qwen2.5-0.5B --cache s3://bucket/cache --loss bild --top-k 8 \\
        --out ./student --max-steps 2000 --batch-size 8 --lr 1e-4
    torchrun --nproc-per-node 8 -m logitcache.pipeline train --student ... --cache ... --loss kl --out ./student
    # CPU, tiny models (see logitcache.pipeline.scratch):
    logitcache train --student /tmp/tiny --data /tmp/train.jsonl --loss sft --out /tmp/teacher --max-steps 50

The recipe, top to bottom (`train`): first every decision, then the run.
  1. settings: refused where they cannot run together (`TrainSettings.check`); the loss plan
     (`loss_settings`: the loss, its options, keep-k, the CE/KD weights); the rank.
  2. student: model and tokenizer, with LoRA adapters if asked; the logits columns training uses.
  3. data: `sources.open_training_data`, the one door: a mixture of caches, one cache (same
     tokenizer or re-tokenized) or a jsonl, each cache opened once and refused where it does not
     fit the loss, the teacher or the student; a `ShardedStream` split by DDP rank and worker.
     The held-out sources for --eval-data / --eval-cache, through the same door.
  4. trainer: TrainingArguments (the number of optimizer steps from --epochs), then `KDTrainer`,
     a transformers Trainer (accelerate, DeepSpeed/FSDP, checkpoints, loggers); the LM head fused
     into the loss; with --online-teacher, the teacher runs on every batch instead of the cache's
     targets (`online`).
  5. train, resuming from the last checkpoint in --out with --resume.
  6. save: model + tokenizer, each rank's data position, and `logitcache_train.json` (settings,
     cache identity, metrics, log history, optional held-out evaluation).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field

from logitcache.stages.train.loss_settings import loss_settings
from logitcache.storage.errors import ConfigError
from logitcache.storage.inputs import ChatOptions
from logitcache.storage.redact import is_credential_key, redact_options, redact_text

__all__ = ["TrainSettings", "train", "decide", "loss_settings", "RESULT_NAME"]

RESULT_NAME = "logitcache_train.json"


@dataclass(frozen=True)
class TrainSettings:
    """Every setting of a training run; the CLI's options (`logitcache train --help`), each field named
    as its option's destination. A setting that mirrors a transformers `TrainingArguments` field has
    that field's name (`learning_rate`, `per_device_train_batch_size`, `output_dir`, ...); the CLI
    still takes the short spellings (`--lr`, `--batch-size`, `--out`).

    `cache` is always a tuple: empty without a cache, several for a weighted mixture (`mixing`); a
    single URL or a list is turned into one.
    """

    student: str
    output_dir: str
    loss: str = "kl"
    cache: tuple[str, ...] = ()
    cache_weights: list[float] | None = None
    storage_options: dict | None = None  # fsspec options for the cache and data URLs (credentials, endpoint_url)
    data: str | None = None
    teacher: str | None = None
    online_teacher: str | None = None
    max_steps: int | None = None
    num_train_epochs: int | None = None
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: float = 0.0  # as transformers': steps if >= 1, else a share of all steps
    lr_scheduler_type: str = "cosine"
    seed: int = 0
    temperature: float | None = None
    top_k: int | None = None
    tail: str | None = None
    loss_options: dict = field(default_factory=dict)
    ce_weight: float | None = None
    kd_weight: float | None = None
    uld_lambda: float | None = None
    max_length: int | None = None
    dataloader_num_workers: int = 1
    shuffle_window: int = 2
    chunk_size: int | None = None
    fused_head: bool = True
    pack: bool = False
    dtype: str = "float32"
    student_revision: str | None = None
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    merge_lora: bool = False
    bf16: bool = False
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    report_to: str = "none"
    progress: bool = True  # bars on stderr: the Trainer's (not TrainingArguments.disable_tqdm) and transformers'
    resume_from_checkpoint: bool = False  # as Trainer.train(resume_from_checkpoint=True): the last in output_dir
    eval_data: str | None = None
    eval_cache: str | None = None
    eval_steps: int | None = None
    deepspeed: str | None = None
    fsdp: str | None = None
    hf_args: dict = field(default_factory=dict)
    trust_remote_code: bool = False
    # How --data (and --eval-data) are loaded and read, as `precompute --data` takes them.
    split: str | None = None
    data_config: str | None = None
    data_revision: str | None = None
    streaming: bool = False
    max_rows: int | None = None
    text_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    messages_field: str | None = None
    tools_field: str | None = None
    prompt_format: str | None = None
    eval_split: str | None = None
    # The student's chat rendering: a template file (path or URL) and template variables.
    chat_template: str | None = None
    chat_template_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        cache = self.cache
        object.__setattr__(self, "cache", () if cache is None else (cache,) if isinstance(cache, str) else tuple(cache))

    def check(self) -> None:
        """Refuse settings that cannot run together, before anything is loaded.

        Raises:
            ConfigError: naming the flags.
        """
        from logitcache.stages.train.online import check_online_loss

        if not self.cache and self.loss != "sft" and self.online_teacher is None:
            raise ConfigError(f"--loss {self.loss} distills from a cache: give --cache (only --loss sft trains from "
                              f"--data alone)")
        if self.online_teacher is not None:
            check_online_loss(self.loss)
        if not self.cache and self.data is None:
            raise ConfigError(f"--loss {self.loss} without --cache needs --data (rows of 'messages', "
                              f"'prompt'/'response' or 'text', or the columns the field flags name)")
        if (self.max_steps is None) == (self.num_train_epochs is None):
            raise ConfigError("give exactly one of --max-steps and --epochs")
        if len(self.cache) > 1 and self.num_train_epochs is not None:
            raise ConfigError("--epochs is not defined for a mixture of caches (each cache repeats at its own rate); "
                              "give --max-steps")
        for name in ("max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "eval_steps"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.dataloader_num_workers < 0:
            raise ConfigError(f"--num-workers {self.dataloader_num_workers} must be >= 0")
        if self.cache_weights is not None and len(self.cache) < 2:
            raise ConfigError("--cache-weights weighs several caches (--cache A B); give more than one --cache")
        if len(self.cache) > 1 and self.data is not None:
            raise ConfigError("--data is for --loss sft or one cache re-tokenized for another student; a mixture "
                              "of caches reads their token ids, so drop --data")
        if self.lora_r is None and (self.merge_lora or self.lora_alpha is not None or self.lora_target_modules):
            raise ConfigError("--lora-alpha, --lora-target-modules and --merge-lora need --lora-r (LoRA's rank)")
        if self.eval_steps is not None and not (self.eval_data or self.eval_cache):
            raise ConfigError("--eval-steps evaluates --eval-data and/or --eval-cache while training; give one")
        if self.pack and self.online_teacher is not None:
            raise ConfigError("--online-teacher runs the teacher on padded batches; drop --pack")
        self._check_data_options()

    def data_fields(self) -> dict:
        """The field flags given, as `InputSpec.build` takes them."""
        names = ("text_field", "prompt_field", "response_field", "messages_field", "tools_field")
        return {name: getattr(self, name) for name in names if getattr(self, name)}

    def _check_data_options(self) -> None:
        from logitcache.storage.inputs import ChatOptions, InputSpec

        if self.eval_split and not self.eval_data:
            raise ConfigError("--eval-split is the split of --eval-data; give --eval-data")
        names = ("split", "data_config", "data_revision", "streaming", "max_rows", *self.data_fields())
        given = [f"--{n.replace('_', '-')}" for n in names if getattr(self, n)]
        if given and self.data is None and self.eval_data is None:
            raise ConfigError(f"{', '.join(given)} describe how --data (and --eval-data) are read; give --data")
        # The file is read when training starts; a stand-in says here that one is given.
        chat = ChatOptions("(file)" if self.chat_template else None, self.chat_template_kwargs or {})
        if self.data_fields():
            InputSpec.build(**self.data_fields(), prompt_format=self.prompt_format or "plain", max_length=None,
                            chat=chat)


def train(s: TrainSettings) -> dict:
    """Run the recipe (module docstring). Returns the contents of `logitcache_train.json`; after a
    SIGTERM/SIGINT, {"stopped_by": signal name, "global_step", "log_history"} (a checkpoint of that
    step is in `s.output_dir`; nothing else is written).

    Raises:
        ConfigError: bad or conflicting settings, or a cache and student that do not fit together.
    """
    from logitcache.stages.train.evaluate import transformers_bars

    with transformers_bars(s.progress):  # its "Loading weights" and "Writing model shards" too
        return _train(s)


def _train(s: TrainSettings) -> dict:
    from logitcache.stages.train.collate import Collator
    from logitcache.stages.train.sources import DataOptions, Reader, open_training_data
    from logitcache.stages.train.student import fused_head_problem, packing_problem
    from logitcache.stages.train.trainer import KDTrainer, data_state_name

    # 1. Settings, the loss plan, the rank.
    plan = decide(s)
    last = _last_checkpoint(s.output_dir, resume=s.resume_from_checkpoint)
    # torchrun's variables, which TrainingArguments reads too (checked against it in step 4).
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    # 2. Student and tokenizer.
    student, model = _load_student(s)
    if s.pack and (problem := packing_problem(model)):
        raise ConfigError(f"--pack: {s.student}: {problem}")
    chat = ChatOptions.load(s.chat_template, s.chat_template_kwargs, storage_options=s.storage_options)
    reader = Reader(s.student, student.tokenizer, student.vocab_size, s.max_length or student.max_length,
                    storage_options=s.storage_options, chat=chat, prompt_format=s.prompt_format)
    rows = DataOptions(split=s.split, config_name=s.data_config, revision=s.data_revision, streaming=s.streaming,
                       max_rows=s.max_rows, fields=s.data_fields())

    # 3. Data, through the one door; the loss reads the caches' sampling temperature.
    data = open_training_data(s.cache, data=s.data, weights=s.cache_weights, plan=plan, teacher=s.teacher,
                              reader=reader, seed=s.seed, window=s.shuffle_window, epochs=s.num_train_epochs,
                              rank=rank, world_size=world_size, rows=rows)
    plan = plan.reading(data.sample_temperature)
    eval_sources = _eval_sources(s, reader, rows, plan)

    # 4. Trainer.
    args = _training_arguments(s, data.stream, rank=rank, world_size=world_size)
    online = None
    if s.online_teacher is not None:
        from logitcache.stages.train.online import load_online_teacher

        online = load_online_teacher(s.online_teacher, loss=plan.name, student_tokenizer=reader.tokenizer,
                                     student_vocab=reader.vocab, device=args.device,
                                     trust_remote_code=s.trust_remote_code)
    trainer = KDTrainer(model=model, args=args, train_dataset=data.stream,
                        data_collator=Collator(pad_id=student.pad_id, pack=s.pack), processing_class=reader.tokenizer,
                        plan=plan, vocab_size=reader.vocab, chunk_size=s.chunk_size, fused_head=s.fused_head,
                        eval_sources=eval_sources if s.eval_steps else None, eval_pad_id=student.pad_id,
                        online_teacher=online)

    if s.fused_head and not trainer.fused_head and rank == 0:
        _say(f"the fused head is off: {fused_head_problem(trainer.model, args, fsdp=trainer.is_fsdp_enabled)}; the loss takes the model's "
             f"(B, T, V) logits")

    # 5. Train.
    if s.resume_from_checkpoint and last is None:
        _say(f"--resume: no checkpoint in {s.output_dir} yet; starting from step 0")
    output = trainer.train(resume_from_checkpoint=last if s.resume_from_checkpoint else None)
    if trainer.stop.name is not None:  # preempted: the checkpoint of this step is the result
        step = trainer.state.global_step
        _say(f"stopped by {trainer.stop.name} at step {step}; {s.output_dir}/checkpoint-{step} holds the model, optimizer "
             f"and data position. Rerun the same command with --resume to continue.")
        return {"stopped_by": trainer.stop.name, "global_step": step, "log_history": trainer.state.log_history}

    # 6. Save.
    model = _save_model(s, trainer, model, reader.tokenizer)
    with open(os.path.join(s.output_dir, data_state_name(rank)), "w") as f:
        json.dump(data.stream.state_dict(), f)
    result = {"settings": _recorded(s), "loss": plan.record(), "student_vocab_size": reader.vocab,
              "cache": data.cache, "data": s.data, "world_size": world_size, "max_steps": args.max_steps,
              "fused_head": trainer.fused_head,
              "global_step": trainer.state.global_step, "sequences_per_rank": data.stream.consumed(),
              "train_metrics": output.metrics, "log_history": trainer.state.log_history}
    if len(s.cache) > 1:  # the realised mixture: sequences this rank took from each cache
        result["cache"]["sequences_per_cache"] = dict(zip(s.cache, data.stream.per_stream()))
    if s.eval_data:  # every rank scores its share (under FSDP every rank must join the forwards)
        from logitcache.stages.train.evaluate import evaluate_source

        result["eval"] = {"data": s.eval_data, **evaluate_source(model, eval_sources["data"], pad_id=student.pad_id,
                                                                 vocab_size=reader.vocab, batch_size=s.per_device_train_batch_size,
                                                                 device=args.device, **trainer.eval_options())}
    result = _redact_urls(result)
    if trainer.is_world_process_zero():
        with open(os.path.join(s.output_dir, RESULT_NAME), "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


def _recorded(s: TrainSettings) -> dict:
    """The settings as `logitcache_train.json` records them: the student folder is shared, so storage
    options keep only harmless values (`storage.redact`)."""
    return {**asdict(s), "storage_options": redact_options(s.storage_options)}


def _redact_urls(value):
    """`value` (JSON-like) with the credentials of every URL in its strings and keys hidden."""
    if isinstance(value, dict):
        return {_redact_urls(k): _redact_urls(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_urls(v) for v in value]
    return redact_text(value) if isinstance(value, str) else value


def decide(s: TrainSettings):
    """Every refusal the settings alone can give, and the run's `LossPlan`; nothing is loaded (also
    `train --print-config`).

    Raises:
        ConfigError: naming the flags.
    """
    s.check()
    plan = loss_settings(s.loss, temperature=s.temperature, top_k=s.top_k, tail=s.tail, options=s.loss_options,
                         ce_weight=s.ce_weight, kd_weight=s.kd_weight, uld_lambda=s.uld_lambda)
    if s.online_teacher is not None and plan.keep_k is not None:
        raise ConfigError(f"--top-k keeps the first k cached ids; --online-teacher supplies the whole vocabulary "
                          f"instead, so --top-k applies only to losses that take it (bild), not --loss {plan.name}")
    check_hf_args(s.hf_args, {})
    return plan


def _last_checkpoint(out: str, *, resume: bool) -> str | None:
    """The last checkpoint in `out`, refused unless the run resumes.

    Raises:
        ConfigError: checkpoints in `out` without --resume.
    """
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(out) if os.path.isdir(out) else None
    if last and not resume:
        raise ConfigError(f"--out {out} already holds checkpoints ({os.path.basename(last)}); pass --resume to "
                          f"continue that run, or choose another --out")
    return last


def _load_student(s: TrainSettings):
    """(`student.Student`, the model that trains: the student's, with LoRA adapters when --lora-r is given)."""
    from logitcache.stages.train.student import load_student

    student = load_student(s.student, dtype=s.dtype, trust_remote_code=s.trust_remote_code,
                           revision=s.student_revision, attn_implementation=s.attn_implementation)
    if s.lora_r is None:
        return student, student.model
    return student, with_lora(student.model, r=s.lora_r, alpha=s.lora_alpha, dropout=s.lora_dropout,
                              target_modules=s.lora_target_modules)


def _eval_sources(s: TrainSettings, reader, rows, plan) -> dict:
    """{"data": RowsSource, "cache": CacheSource} for --eval-data / --eval-cache (the cache: same tokenizer,
    and one the loss can read: refused now rather than at the first evaluation). --eval-data is read with
    --data's field flags and --data-config, at --eval-split (default: train)."""
    from dataclasses import replace

    from logitcache.stages.train.checks import check_loss_fits_cache
    from logitcache.stages.train.sources import eval_cache_source, rows_source

    sources = {}
    if s.eval_data:
        sources["data"] = rows_source(s.eval_data, reader=reader, rows=replace(rows, split=s.eval_split, max_rows=None,
                                                                               streaming=False))
    if s.eval_cache:
        sources["cache"] = eval_cache_source(s.eval_cache, reader=reader, flag="--eval-cache")
        check_loss_fits_cache(sources["cache"].cache.index, plan, cache=f"--eval-cache {s.eval_cache}")
    return sources


def _training_arguments(s: TrainSettings, stream, *, rank: int, world_size: int):
    """The run's TrainingArguments: the flags', --hf-arg's, and the number of optimizer steps (from --epochs).

    Raises:
        ConfigError: --hf-arg for a field a flag sets (`check_hf_args`), or a launcher whose rank and
            world size are not the environment's.
    """
    from logitcache.stages.train.trainer import training_arguments

    max_steps = s.max_steps
    if s.num_train_epochs is not None:
        batches = stream.batches_per_rank(s.per_device_train_batch_size, s.dataloader_num_workers, s.num_train_epochs)
        max_steps = -(-batches // s.gradient_accumulation_steps)
    own = {name: getattr(s, name) for name in PASSED_AS_IS}
    own.update(max_steps=max_steps, disable_tqdm=not s.progress)
    if s.eval_steps is not None:  # `check` made sure there is something to evaluate
        own.update(eval_strategy="steps", eval_steps=s.eval_steps, per_device_eval_batch_size=s.per_device_train_batch_size)
    if s.gradient_checkpointing:
        # Non-reentrant: gradients reach the adapters even where the frozen embeddings need none.
        own.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    args = training_arguments(s.output_dir, **own, **check_hf_args(s.hf_args, own))
    if (args.process_index, args.world_size) != (rank, world_size):
        raise ConfigError(f"the launcher says rank {args.process_index} of {args.world_size}, the environment "
                          f"RANK={rank} WORLD_SIZE={world_size}; launch with torchrun or accelerate")
    return args


def _save_model(s: TrainSettings, trainer, model, tokenizer):
    """Save the student (with LoRA: the adapters, or with --merge-lora the merged student and the adapters in
    out/adapter); returns the model as saved."""
    if not s.merge_lora:
        trainer.save_model(s.output_dir)
        return model
    trainer.save_model(os.path.join(s.output_dir, "adapter"))
    model = model.merge_and_unload()
    if trainer.is_world_process_zero():
        model.save_pretrained(s.output_dir)
        tokenizer.save_pretrained(s.output_dir)
    return model


def _say(message: str) -> None:
    print(f"train: {redact_text(message)}", file=sys.stderr, flush=True)


# TrainSettings fields that TrainingArguments takes as they are, under the same name. The other fields named
# after one are read on the way: output_dir, max_steps and num_train_epochs (optimizer steps),
# resume_from_checkpoint (Trainer.train's), eval_steps and gradient_checkpointing (with their companions).
PASSED_AS_IS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
                "warmup_steps", "lr_scheduler_type", "seed", "bf16", "logging_steps", "save_steps", "save_total_limit",
                "report_to", "dataloader_num_workers", "deepspeed", "fsdp")

# TrainingArguments that `train` sets from its own flags (or `training_arguments` itself): not for --hf-arg.
_HF_FLAGS = {**{name: f"--{name.replace('_', '-')}" for name in PASSED_AS_IS},
             "max_steps": "--max-steps/--epochs", "num_train_epochs": "--epochs", "output_dir": "--out",
             "resume_from_checkpoint": "--resume", "gradient_checkpointing": "--gradient-checkpointing",
             "eval_strategy": "--eval-steps", "eval_steps": "--eval-steps", "disable_tqdm": "--progress/--no-progress"}
_HF_FIXED = ("remove_unused_columns", "ignore_data_skip")


def check_hf_args(hf_args: dict, own: dict) -> dict:
    """`--hf-arg` settings, refused where a flag or logitcache already sets the same TrainingArguments field.

    Raises:
        ConfigError: a field with a flag of its own, one the data stream needs fixed, or no such field.
    """
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in hf_args:
        if key in _HF_FLAGS or key in own:
            raise ConfigError(f"--hf-arg {key}=...: TrainingArguments.{key} is set by {_HF_FLAGS.get(key, 'a flag')}; "
                              f"use that flag")
        if key in _HF_FIXED:
            raise ConfigError(f"--hf-arg {key}=...: logitcache streams its own data and fixes {key}")
        if key not in fields:
            raise ConfigError(f"--hf-arg {key}=...: transformers' TrainingArguments has no field {key!r}")
        if is_credential_key(key):  # HF Trainer pickles its arguments into every checkpoint
            raise ConfigError(f"--hf-arg {key}=...: a credential is not taken here (every checkpoint's "
                              f"training_args.bin would hold it); use `hf auth login` or HF_TOKEN")
    return dict(hf_args)


def with_lora(model, *, r: int, alpha: float | None, dropout: float, target_modules: list[str] | None):
    """`model` with LoRA adapters (peft): only they train; the LM head stays whole for the fused loss.

    Raises:
        ConfigError: peft missing, or a rank, alpha or dropout out of range, or no module matched.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("--lora-r needs peft: pip install peft") from None
    if not (isinstance(r, int) and r >= 1):
        raise ConfigError(f"--lora-r {r!r} must be a positive integer")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"--lora-dropout {dropout} must be in [0, 1)")
    config = LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=dropout,
                        target_modules=target_modules or "all-linear", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft's "Target modules {...} not found in the base model"
        raise ConfigError(f"--lora-target-modules {' '.join(target_modules or [])}: {e}") from None
