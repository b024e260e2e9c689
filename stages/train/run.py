"""Stage two: train a student by streaming a teacher's cache (or, for `--loss sft`, straight from text).

    logitcache train --student Qwen/Qwen2.5-0.5B --cache s3://bucket/cache --loss bild --top-k 8 \\
        --out ./student --max-steps 2000 --batch-size 8 --lr 1e-4
    torchrun --nproc-per-node 8 -m logitcache.pipeline train --student ... --cache ... --loss kl --out ./student
    # CPU, tiny models (see logitcache.pipeline.scratch):
    logitcache train --student /tmp/tiny --data /tmp/train.jsonl --loss sft --out /tmp/teacher --max-steps 50

The recipe, top to bottom (`train`):
  1. settings: the loss, its options and the CE/KD weights (`loss_settings`, decided once); the rank.
  2. student: model and tokenizer; the logits columns training uses (`student.load_student`).
  3. cache and refusals: the cache opened once; the teacher named by --teacher, the loss against
     the cache's mode and K, the student tokenizer against the cache's (same, or re-tokenized).
  4. dataset: a `ShardedStream` over the cache (or the jsonl), split by DDP rank and worker; several
     caches: a `mixing.MixedStream` drawing each sequence from cache i with its weight;
     the number of optimizer steps; batches padded, or packed into one row (--pack).
  5. trainer: TrainingArguments with that number, then `KDTrainer`, a transformers Trainer
     (accelerate, DeepSpeed/FSDP, checkpoints, loggers); the LM head fused into the loss; with
     --online-teacher, the teacher runs on every batch instead of the cache's targets (`online`).
  6. train, resuming from the last checkpoint in --out with --resume.
  7. save: model + tokenizer, each rank's data position, and `logitcache_train.json` (settings,
     cache identity, metrics, log history, optional held-out evaluation).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field

from logitcache.stages.train.loss_settings import loss_settings
from logitcache.storage.errors import ConfigError

__all__ = ["TrainSettings", "train", "loss_settings", "RESULT_NAME"]

RESULT_NAME = "logitcache_train.json"
@dataclass
class TrainSettings:
    """Every setting of a training run; the CLI's options (`logitcache train --help`)."""

    student: str
    out: str
    loss: str = "kl"
    cache: str | list[str] | None = None  # several: a weighted mixture (`mixing`)
    cache_weights: list[float] | None = None
    storage_options: dict | None = None  # fsspec options for the cache and data URLs (credentials, endpoint_url)
    data: str | None = None
    teacher: str | None = None
    online_teacher: str | None = None
    max_steps: int | None = None
    epochs: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.0
    scheduler: str = "cosine"
    seed: int = 0
    temperature: float | None = None
    top_k: int | None = None
    tail: str | None = None
    loss_options: dict = field(default_factory=dict)
    ce_weight: float | None = None
    kd_weight: float | None = None
    uld_lambda: float | None = None
    max_length: int | None = None
    num_workers: int = 1
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
    resume: bool = False
    eval_data: str | None = None
    eval_cache: str | None = None
    eval_steps: int | None = None
    deepspeed: str | None = None
    fsdp: str | None = None
    hf_args: dict = field(default_factory=dict)
    trust_remote_code: bool = False

    def __post_init__(self):
        if isinstance(self.cache, (list, tuple)) and len(self.cache) == 1:
            self.cache = self.cache[0]


def train(s: TrainSettings) -> dict:
    """Run the recipe (module docstring). Returns the contents of `logitcache_train.json`; after a
    SIGTERM/SIGINT, {"stopped_by": signal name, "global_step", "log_history"} (a checkpoint of that
    step is in `s.out`; nothing else is written).

    Raises:
        ConfigError: bad or conflicting settings, or a cache and student that do not fit together.
    """
    from transformers.trainer_utils import get_last_checkpoint

    from logitcache.stages.train.alignment import CrossTokenizerTargets, SameTokenizerTargets, TextExample
    from logitcache.stages.train.checks import check_cache_teacher, check_loss_fits_cache, check_tokenizer
    from logitcache.stages.train.collate import Collator
    from logitcache.stages.train.data import CacheSource, JsonlSource, ShardedStream
    from logitcache.stages.train.losses import registry
    from logitcache.stages.train.student import load_student
    from logitcache.stages.train.trainer import KDTrainer, data_state_name, packing_problem, training_arguments
    from logitcache.storage import open_cache

    # 1. Settings.
    if s.cache is None and s.loss != "sft" and s.online_teacher is None:
        raise ConfigError(f"--loss {s.loss} distills from a cache: give --cache (only --loss sft trains from --data alone)")
    if s.online_teacher is not None:
        from logitcache.stages.train.online import ONLINE_LOSSES

        if s.loss not in ONLINE_LOSSES:
            raise ConfigError(f"--online-teacher gives the teacher's full distribution to a top-K loss "
                              f"({', '.join(ONLINE_LOSSES)}); --loss {s.loss} is not one")
    if s.cache is None and s.data is None:
        raise ConfigError(f"--loss {s.loss} without --cache needs --data (a .jsonl with 'text' or 'prompt'/'response')")
    if (s.max_steps is None) == (s.epochs is None):
        raise ConfigError("give exactly one of --max-steps and --epochs")
    if isinstance(s.cache, (list, tuple)) and s.epochs is not None:
        raise ConfigError("--epochs is not defined for a mixture of caches (each cache repeats at its own rate); "
                          "give --max-steps")
    for name in ("max_steps", "epochs", "batch_size", "grad_accum"):
        value = getattr(s, name)
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if s.num_workers < 0:
        raise ConfigError(f"--num-workers {s.num_workers} must be >= 0")
    ls = loss_settings(s.loss, temperature=s.temperature, top_k=s.top_k, tail=s.tail, options=s.loss_options,
                       ce_weight=s.ce_weight, kd_weight=s.kd_weight, uld_lambda=s.uld_lambda)
    if s.online_teacher is not None and ls["keep_k"] is not None:
        raise ConfigError(f"--top-k keeps the first k cached ids; --online-teacher supplies the whole vocabulary "
                          f"instead, so --top-k applies only to losses that take it (bild), not --loss {s.loss}")
    last = get_last_checkpoint(s.out) if os.path.isdir(s.out) else None
    if last and not s.resume:
        raise ConfigError(f"--out {s.out} already holds checkpoints ({os.path.basename(last)}); pass --resume to "
                          f"continue that run, or choose another --out")
    # torchrun's variables, which TrainingArguments reads too (checked against it in step 5).
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    # 2. Student and tokenizer.
    student = load_student(s.student, dtype=s.dtype, trust_remote_code=s.trust_remote_code,
                           revision=s.student_revision, attn_implementation=s.attn_implementation)
    model, tokenizer, vocab, pad_id = student.model, student.tokenizer, student.vocab_size, student.pad_id
    if s.lora_r is not None:
        model = with_lora(model, r=s.lora_r, alpha=s.lora_alpha, dropout=s.lora_dropout,
                          target_modules=s.lora_target_modules)
    elif s.merge_lora or s.lora_alpha is not None or s.lora_target_modules:
        raise ConfigError("--lora-alpha, --lora-target-modules and --merge-lora need --lora-r (LoRA's rank)")
    max_length = s.max_length or student.max_length

    # 3. Cache and refusals (the cache is opened here, once; the data source reads through it).
    cache, cache_info, same_tokenizer = None, None, True
    mixture = isinstance(s.cache, (list, tuple))
    if s.cache_weights is not None and not mixture:
        raise ConfigError("--cache-weights weighs several caches (--cache A B); give more than one --cache")
    if mixture:
        from logitcache.stages.train.mixing import open_mixture

        if s.data is not None:
            raise ConfigError("--data is for --loss sft or one cache re-tokenized for another student; a mixture "
                              "of caches reads their token ids, so drop --data")
        stream, cache_info, sample_temperature = open_mixture(
            s.cache, weights=s.cache_weights, loss=s.loss, top_k=s.top_k, keep_k=ls["keep_k"], teacher=s.teacher,
            student=s.student, tokenizer=tokenizer, vocab=vocab, max_length=max_length, seed=s.seed,
            window=s.shuffle_window, rank=rank, world_size=world_size, storage_options=s.storage_options)
        if "sample_temperature" in registry.get(s.loss).option_names() and sample_temperature is not None:
            ls["options"]["sample_temperature"] = sample_temperature
    elif s.cache is not None:
        cache = open_cache(s.cache, storage_options=s.storage_options)
        index = cache.index
        check_cache_teacher(index, s.teacher, cache=s.cache)
        check_loss_fits_cache(index, s.loss, top_k=s.top_k, cache=s.cache)
        if "sample_temperature" in registry.get(s.loss).option_names():
            # The draws' temperature is a fact of the cache, recorded in its index.
            ls["options"]["sample_temperature"] = float(index["sparsification"].get("temperature", 1.0))
        has_text = s.data is not None or bool(index.get("text_fields"))
        same_tokenizer = check_tokenizer(index, tokenizer, loss=s.loss, student=s.student, cache=s.cache,
                                         has_text=has_text, teacher_tokenizer=_local_tokenizer(index, s))
        if same_tokenizer and s.data is not None:
            raise ConfigError("--data is read for --loss sft without a cache, or as the text a student with another "
                              "tokenizer re-tokenizes; this student shares the cache's tokenizer, so drop --data")
        cache_info = {"url": s.cache, "fingerprint": cache.fingerprint, "teacher": index["teacher"],
                      "mode": cache.mode, "k": cache.k, "sequences": len(cache), "same_tokenizer": same_tokenizer}

    # 4. Dataset, split by rank; the number of optimizer steps.
    if cache is not None and same_tokenizer:
        to_item = SameTokenizerTargets(vocab, max_length=max_length, keep_k=ls["keep_k"])
    elif cache is not None:
        fields = _text_fields(index, s.data)
        # The cache's own text is what the teacher saw (cut where stage one truncated); --data is the fallback.
        cached_text = set(fields) <= set(index.get("text_fields", []))
        if cached_text and s.data:
            _say(f"the cache stores the {'/'.join(fields)} text; re-tokenizing that, not --data {s.data}")
        to_item = CrossTokenizerTargets(tokenizer, fields=fields, max_length=max_length, keep_k=ls["keep_k"],
                                        texts=None if cached_text else _rows_by_index(s.data, index),
                                        prompt_format=index["inputs"].get("prompt_format", "plain"))
    if cache is not None:
        source = CacheSource(cache, to_item=to_item)
    elif not mixture:
        source = JsonlSource(s.data, to_item=TextExample(tokenizer, max_length=max_length, where=s.data),
                             storage_options=s.storage_options)
    if not mixture:
        stream = ShardedStream(source, seed=s.seed, window=s.shuffle_window, epochs=s.epochs, rank=rank,
                               world_size=world_size)
    max_steps = s.max_steps
    if s.epochs is not None:
        max_steps = -(-stream.batches_per_rank(s.batch_size, s.num_workers, s.epochs) // s.grad_accum)

    # 5. Trainer.
    own = dict(max_steps=max_steps, per_device_train_batch_size=s.batch_size,
               gradient_accumulation_steps=s.grad_accum, learning_rate=s.lr, weight_decay=s.weight_decay,
               warmup_steps=s.warmup, lr_scheduler_type=s.scheduler, seed=s.seed, bf16=s.bf16,
               logging_steps=s.logging_steps, save_steps=s.save_steps, save_total_limit=s.save_total_limit,
               report_to=s.report_to, dataloader_num_workers=s.num_workers, deepspeed=s.deepspeed, fsdp=s.fsdp)
    eval_sources = _eval_sources(s, tokenizer, vocab, max_length)
    if s.eval_steps is not None:
        if not eval_sources:
            raise ConfigError("--eval-steps evaluates --eval-data and/or --eval-cache while training; give one")
        if not (isinstance(s.eval_steps, int) and s.eval_steps >= 1):
            raise ConfigError(f"--eval-steps {s.eval_steps!r} must be a positive integer")
        own.update(eval_strategy="steps", eval_steps=s.eval_steps, per_device_eval_batch_size=s.batch_size)
    if s.gradient_checkpointing:
        # Non-reentrant: gradients reach the adapters even where the frozen embeddings need none.
        own.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    args = training_arguments(s.out, **own, **check_hf_args(s.hf_args, own))
    if (args.process_index, args.world_size) != (rank, world_size):
        raise ConfigError(f"the launcher says rank {args.process_index} of {args.world_size}, the environment "
                          f"RANK={rank} WORLD_SIZE={world_size}; launch with torchrun or accelerate")
    if s.pack and (problem := packing_problem(model)):
        raise ConfigError(f"--pack: {s.student}: {problem}")
    if s.pack and s.online_teacher is not None:
        raise ConfigError("--online-teacher runs the teacher on padded batches; drop --pack")
    online = None
    if s.online_teacher is not None:
        from logitcache.stages.train.online import load_online_teacher

        online = load_online_teacher(s.online_teacher, loss=s.loss, student_tokenizer=tokenizer, student_vocab=vocab,
                                     device=args.device, trust_remote_code=s.trust_remote_code)
    collate = Collator(pad_id=pad_id, pack=s.pack)
    trainer = KDTrainer(model=model, args=args, train_dataset=stream, data_collator=collate,
                        processing_class=tokenizer, loss=s.loss, loss_options=ls["options"],
                        ce_weight=ls["ce_weight"], kd_weight=ls["kd_weight"], vocab_size=vocab,
                        chunk_size=s.chunk_size, fused_head=s.fused_head,
                        eval_sources=eval_sources if s.eval_steps else None, eval_pad_id=pad_id,
                        online_teacher=online)

    # 6. Train.
    if s.resume and last is None:
        _say(f"--resume: no checkpoint in {s.out} yet; starting from step 0")
    output = trainer.train(resume_from_checkpoint=last if s.resume else None)
    if trainer.stop.name is not None:  # preempted: the checkpoint of this step is the result
        step = trainer.state.global_step
        _say(f"stopped by {trainer.stop.name} at step {step}; {s.out}/checkpoint-{step} holds the model, optimizer "
             f"and data position. Rerun the same command with --resume to continue.")
        return {"stopped_by": trainer.stop.name, "global_step": step, "log_history": trainer.state.log_history}

    # 7. Save (with LoRA: the adapters, or the merged student and the adapters in out/adapter).
    if s.merge_lora:
        trainer.save_model(os.path.join(s.out, "adapter"))
        model = model.merge_and_unload()
        if trainer.is_world_process_zero():
            model.save_pretrained(s.out)
            tokenizer.save_pretrained(s.out)
    else:
        trainer.save_model(s.out)
    with open(os.path.join(s.out, data_state_name(rank)), "w") as f:
        json.dump(stream.state_dict(), f)
    result = {"settings": asdict(s), "loss": {"name": s.loss, **ls}, "student_vocab_size": vocab,
              "cache": cache_info, "data": s.data, "world_size": world_size, "max_steps": args.max_steps,
              "fused_head": trainer.fused_head,
              "global_step": trainer.state.global_step, "sequences_per_rank": stream.consumed(),
              "train_metrics": output.metrics, "log_history": trainer.state.log_history}
    if mixture:  # the realised mixture: sequences this rank took from each cache
        result["cache"]["sequences_per_cache"] = dict(zip(s.cache, stream.per_stream()))
    if s.eval_data and trainer.is_world_process_zero():
        from logitcache.stages.train.evaluate import evaluate_source

        eval_source = JsonlSource(s.eval_data, to_item=TextExample(tokenizer, max_length=max_length, where=s.eval_data),
                                  storage_options=s.storage_options)
        result["eval"] = {"data": s.eval_data, **evaluate_source(model, eval_source, pad_id=pad_id, vocab_size=vocab,
                                                                 batch_size=s.batch_size, device=args.device)}
    if trainer.is_world_process_zero():
        with open(os.path.join(s.out, RESULT_NAME), "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


# TrainingArguments that `train` sets from its own flags (or `training_arguments` itself): not for --hf-arg.
_HF_FLAGS = {"max_steps": "--max-steps/--epochs", "per_device_train_batch_size": "--per-device-train-batch-size",
             "gradient_accumulation_steps": "--gradient-accumulation-steps", "learning_rate": "--learning-rate",
             "weight_decay": "--weight-decay", "warmup_steps": "--warmup", "lr_scheduler_type": "--scheduler",
             "seed": "--seed", "bf16": "--bf16", "logging_steps": "--logging-steps", "save_steps": "--save-steps",
             "save_total_limit": "--save-total-limit", "report_to": "--report-to",
             "dataloader_num_workers": "--num-workers", "deepspeed": "--deepspeed", "fsdp": "--fsdp",
             "gradient_checkpointing": "--gradient-checkpointing", "output_dir": "--out",
             "num_train_epochs": "--epochs", "resume_from_checkpoint": "--resume",
             "eval_strategy": "--eval-steps", "eval_steps": "--eval-steps"}
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


def _eval_sources(s: TrainSettings, tokenizer, vocab: int, max_length: int | None) -> dict:
    """{"data": JsonlSource, "cache": CacheSource} for --eval-data / --eval-cache (the cache: same tokenizer)."""
    from logitcache.stages.train.alignment import SameTokenizerTargets, TextExample
    from logitcache.stages.train.checks import check_tokenizer
    from logitcache.stages.train.data import CacheSource, JsonlSource
    from logitcache.storage import open_cache

    sources = {}
    if s.eval_data:
        sources["data"] = JsonlSource(s.eval_data, to_item=TextExample(tokenizer, max_length=max_length,
                                                                     where=s.eval_data),
                                      storage_options=s.storage_options)
    if s.eval_cache:
        cache = open_cache(s.eval_cache, storage_options=s.storage_options)
        if not check_tokenizer(cache.index, tokenizer, loss="eval", student=s.student, cache=s.eval_cache,
                               has_text=False):
            raise ConfigError(f"--eval-cache {s.eval_cache} was made with another tokenizer than the student's; "
                              f"teacher agreement compares token ids")
        sources["cache"] = CacheSource(cache, to_item=SameTokenizerTargets(vocab, max_length=max_length))
    return sources


def _text_fields(index: dict, data: str | None) -> tuple[str, ...]:
    from logitcache.storage.inputs import STORED_FIELDS

    fields = STORED_FIELDS[index["inputs"]["kind"]]  # validated when the index was read
    if data is None and not set(fields) <= set(index.get("text_fields", [])):
        raise ConfigError(f"the cache stores no {'/'.join(fields)} text for a student with another tokenizer to "
                          f"re-tokenize; give the source data as --data")
    return fields


def _rows_by_index(path: str, index: dict) -> dict[int, dict]:
    """Rows of the jsonl the cache was made from, by row number, under the cache's stored field names."""
    from logitcache.storage.inputs import STORED_FIELDS

    columns = index["inputs"].get("columns") or {}
    names = (*STORED_FIELDS[index["inputs"]["kind"]], *(("tools",) if "tools" in columns else ()))
    rows = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[len(rows)] = {name: row.get(columns.get(name, name))
                                   for name in names}
    return rows


def _local_tokenizer(index: dict, s: TrainSettings):
    """The teacher's tokenizer when its folder is here (exact ids in refusals); never fetched from a hub."""
    path = index["teacher"].get("name_or_path")
    if not path or not os.path.isdir(path):
        return None
    from transformers import AutoTokenizer

    try:
        # The folder is named by the cache, not by the user: --trust-remote-code (given for the student) does
        # not run code from it.
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError):
        return None


def _say(message: str) -> None:
    print(f"train: {message}", file=sys.stderr, flush=True)
