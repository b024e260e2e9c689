"""`logitcache train`: train a student from a cache (or, with --loss sft, from text alone)."""

import argparse

from logitcache.pipeline.options import (add_progress_option, add_student_data_options, chat_template_kwargs,
                                       show_progress)
from logitcache.stages.train.losses import registry

HELP = "train a student by streaming a teacher's cache (any loss), or from a jsonl dataset (--loss sft)"

EPILOG = """\
examples:
  # BiLD from a top-32 cache, k = 8
  logitcache train --student Qwen/Qwen2.5-0.5B --cache s3://bucket/cache --loss bild --top-k 8 \\
      --out ./student --max-steps 2000 --batch-size 8 --lr 1e-4
  # forward KL at T = 2, KD only
  logitcache train --student ./small --cache ./cache --loss kl --temperature 2 --ce-weight 0 --out ./kl --epochs 1
  # a student with another tokenizer: ULD on the cache's stored text
  logitcache train --student ./other --cache ./cache --loss uld --uld-lambda 1.5 --out ./uld --max-steps 500
  # train a teacher or an SFT baseline without a cache
  logitcache train --student ./tiny --data train.jsonl --loss sft --out ./teacher --epochs 3
  # SFT on a Parquet folder on S3, its columns named, a Qwen3 student's chats rendered without thinking
  logitcache train --student Qwen/Qwen3-0.6B --data s3://bucket/sft/ --messages-field conversation \\
      --chat-template-kwargs enable_thinking=false --loss sft --out ./sft --max-steps 1000
  # 2 processes (CPU: gloo; GPU: nccl); resume after preemption with the same command plus --resume
  torchrun --nproc-per-node 2 -m logitcache.pipeline train --student ./small --cache ./cache --loss kl --out ./kl \\
      --max-steps 1000 --resume
  # online BiLD on the same batches as a cached run: the teacher runs in the loop, full vocabulary
  logitcache train --student ./small --cache ./cache --online-teacher ./teacher --loss bild --out ./online --max-steps 500
  # mix two caches, 3:1 (each sequence drawn from A with probability 0.75), deterministic given --seed
  logitcache train --student ./small --cache s3://team/cache-a s3://team/cache-b --cache-weights 3 1 \\
      --storage-option endpoint_url=http://minio:9000 --loss kl --out ./mix --max-steps 1000
  # all options from a file (flags on the command line override it)
  logitcache train --config train.yaml

Total loss = ce_weight * CE + kd_weight * KD, each a mean over supervised tokens (default weights: the
loss's own, CE 1 and KD 1 unless listed below). The student's logits are sliced to its tokenizer's
vocabulary (padded logits widths such as 152064 vs 151665 tokens). Writes DIR/ (model, tokenizer),
DIR/checkpoint-*/ and DIR/logitcache_train.json."""


class _Caches(argparse.Action):
    """`--cache A B` and `--cache A --cache B` both give [A, B]; a list from --config is replaced, not
    extended, by caches on the command line."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        fresh = current is None or current is parser.get_default(self.dest)
        setattr(namespace, self.dest, list(values) if fresh else [*current, *values])


def _losses_help() -> str:
    """The losses section of --help, read from each loss's declaration."""
    lines = ["", "", "losses (--loss NAME; options as --loss-option KEY=VALUE, defaults shown; see docs/LOSSES.md):"]
    lines += [f"  {spec.describe()}" for spec in registry.LOSSES.values()]
    return "\n".join(lines)


def _key_value(text: str):
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help=HELP, description=HELP + ".", epilog=EPILOG + _losses_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--student", required=True, metavar="MODEL", help="student model: directory or hub id")
    g.add_argument("--cache", nargs="+", action=_Caches, metavar="CACHE",
                   help="teacher cache: directory or fsspec URL (s3://, gs://, hf://datasets/OWNER/NAME, ...). "
                   "Several (--cache A B, or --cache A --cache B; in YAML a list) are mixed: each training "
                   "sequence comes from cache i with probability w_i / sum(w), as datasets.interleave_datasets("
                   "probabilities=..., seed=--seed) draws; each cache repeats when drawn past its end; needs "
                   "--max-steps. Mixed caches share one teacher vocabulary, mode and K (or give --top-k)")
    g.add_argument("--cache-weights", nargs="+", type=float, metavar="W",
                   help="one weight per --cache, in order (normalized: 3 1 = 0.75 0.25; default equal); in YAML "
                   "a list. The draws and each cache's order are fixed by --seed, and --resume continues them "
                   "exactly")
    g.add_argument("--storage-option", dest="storage_options", action="append", metavar="KEY=VALUE",
                   help="fsspec option for the --cache, --data, --eval-data and --eval-cache URLs, repeatable "
                   "(e.g. endpoint_url=http://..., anon=true, token=...); in YAML a mapping. Credentials are otherwise read from the usual "
                   "environment (AWS_*, GOOGLE_*, HF_TOKEN)")
    g.add_argument("--loss", default="kl", metavar="NAME", choices=registry.names(),
                   help=f"{', '.join(registry.names())} (default: kl; each is described under 'losses' below)")
    g.add_argument("--out", "--output-dir", "--output_dir", dest="output_dir", required=True, metavar="DIR",
                   help="output directory (model, checkpoints, metrics)")
    g.add_argument("--data", metavar="D", help="what `precompute --data` takes: a .jsonl/.json/.parquet/.arrow file or "
                   "folder (local or any fsspec URL: s3://, gs://, hf://), a save_to_disk folder or a hub dataset id; "
                   "rows read by the field flags below, else by their 'messages' (a chat, through the student's chat "
                   "template; assistant turns supervised), 'prompt'/'response' or 'text' columns. The training data "
                   "of --loss sft without a cache, or the rows a student with another tokenizer re-tokenizes if the "
                   "cache stores no text (the same --split the cache was made from)")
    g.add_argument("--teacher", metavar="NAME", help="refuse a cache made by any other teacher")
    g.add_argument("--online-teacher", metavar="MODEL", help="online distillation, to compare with a cached run: run "
                   "this teacher (same tokenizer) on every batch and train on its full-vocabulary log-probs instead "
                   "of the cache's top-K; with --cache the batches are the cache's, else --data's")
    g.add_argument("--config", metavar="FILE.yaml", help="options as YAML (keys are option names)")

    g = p.add_argument_group("loss")
    g.add_argument("--temperature", type=float, metavar="T",
                   help="the LOSS's softening temperature (default: the loss's, listed below). "
                        "(`precompute --temperature` was the teacher's sampling temperature)")
    g.add_argument("--top-k", type=int, metavar="k",
                   help="how many of the K ids stored in the cache the LOSS uses: bild: its k (default 8); other "
                        "losses: the teacher's top-k of them (default all K). (`precompute --top-k` set K)")
    g.add_argument("--tail", choices=("bucket", "renorm"), help="kl/rkl/jsd/skl/srkl: the teacher mass outside the cache "
                   "as one tail class (default) or renormalized away")
    g.add_argument("--loss-option", dest="loss_options", action="append", type=_key_value, default=None,
                   metavar="KEY=VALUE", help="any other option of the loss, e.g. beta=0.5 (jsd), alpha=0.1 (skl), "
                   "gamma=1.5 (nkd); repeatable")
    g.add_argument("--ce-weight", type=float, metavar="a", help="weight of cross entropy on the labels (default: the "
                   "loss's; 1, bild 0.5 (the BiLD paper's recipe is 0; see docs/LOSSES.md))")
    g.add_argument("--kd-weight", type=float, metavar="b", help="weight of the distillation term (default: the loss's; "
                   "1, uld 1.5)")
    g.add_argument("--uld-lambda", type=float, metavar="λ", help="ULD's weight: total = CE + λ * ULD (default 1.5)")

    g = p.add_argument_group("schedule")
    g.add_argument("--max-steps", "--max_steps", type=int, metavar="N", help="optimizer steps (or give --epochs)")
    # Each option that mirrors a TrainingArguments field is stored under that field's name (its dest, the
    # TrainSettings field and the --print-config key); the short spellings stay as aliases.
    g.add_argument("--epochs", "--num-train-epochs", "--num_train_epochs", dest="num_train_epochs", type=int,
                   metavar="E", help="passes over the data (or give --max-steps)")
    g.add_argument("--per-device-train-batch-size", "--per_device_train_batch_size", "--batch-size",
                   dest="per_device_train_batch_size", type=int, default=8, metavar="B",
                   help="STUDENT TRAINING: sequences per device and micro-batch (default 8). "
                   "(`precompute --batch-size` is the teacher's inference batch)")
    g.add_argument("--gradient-accumulation-steps", "--gradient_accumulation_steps", "--grad-accum",
                   dest="gradient_accumulation_steps", type=int, default=1, metavar="G", help="micro-batches per optimizer step (default 1)")
    g.add_argument("--learning-rate", "--learning_rate", "--lr", dest="learning_rate", type=float, default=1e-4, metavar="LR",
                   help="peak learning rate (default 1e-4)")
    g.add_argument("--weight-decay", "--weight_decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--warmup", "--warmup-steps", "--warmup_steps", "--warmup-ratio", "--warmup_ratio",
                   dest="warmup_steps", type=float, default=0.0, help="linear warm-up: steps if >= 1, else a share "
                   "of all steps, as transformers' warmup_steps (default 0)")
    g.add_argument("--scheduler", "--lr-scheduler-type", "--lr_scheduler_type", dest="lr_scheduler_type",
                   default="cosine", help="transformers lr_scheduler_type (default cosine)")
    g.add_argument("--seed", type=int, default=0, metavar="S", help="data order and the Trainer's random state (default 0)")
    g.add_argument("--resume", "--resume-from-checkpoint", "--resume_from_checkpoint", dest="resume_from_checkpoint",
                   action="store_true", help="continue from the last checkpoint in --out, if any")

    g = p.add_argument_group("LoRA (peft): train low-rank adapters instead of every weight")
    g.add_argument("--lora-r", type=int, metavar="R", help="adapter rank; turns LoRA on")
    g.add_argument("--lora-alpha", type=float, metavar="A", help="adapter scale numerator (default 2 x rank)")
    g.add_argument("--lora-dropout", type=float, default=0.0, metavar="P", help="dropout on the adapters' input (default 0)")
    g.add_argument("--lora-target-modules", nargs="+", metavar="NAME",
                   help="module names to adapt, e.g. q_proj v_proj (default: all-linear, every linear layer but the head)")
    g.add_argument("--merge-lora", action="store_true",
                   help="save the student with the adapters merged into its weights (--out), the adapters in "
                   "--out/adapter; without it --out holds the adapters alone")

    g = p.add_argument_group("data and system")
    g.add_argument("--max-length", type=int, metavar="L", help="truncate sequences (default: the model's context)")
    g.add_argument("--num-workers", "--dataloader-num-workers", "--dataloader_num_workers",
                   dest="dataloader_num_workers", type=int, default=1, help="DataLoader workers per process (default 1); "
                   "resuming needs the same number")
    g.add_argument("--shuffle-window", type=int, default=2, metavar="SHARDS",
                   help="shards read and shuffled together per worker (default 2)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype to load the student in (default float32)")
    g.add_argument("--student-revision", metavar="REV", help="hub revision (branch, tag or commit) of --student")
    g.add_argument("--attn-implementation", metavar="NAME",
                   help="transformers attention: sdpa, eager, flash_attention_2, ... (default: transformers')")
    g.add_argument("--gradient-checkpointing", "--gradient_checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, about a third more compute")
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    g.add_argument("--pack", action="store_true",
                   help="padding-free batches: a micro-batch's sequences one after another in one row, positions "
                   "restarting at each (needs sdpa, eager or flash attention; the same loss, less compute)")
    g.add_argument("--chunk-size", type=int, help="positions per loss chunk (default: automatic)")
    g.add_argument("--fused-head", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the LM head inside the loss, a chunk of supervised rows at a time, so the full "
                   "(batch, length, vocabulary) logits are never built (default: on where the model allows it; "
                   "--no-fused-head uses the model's own logits)")
    g.add_argument("--save-steps", "--save_steps", type=int, default=500, help="checkpoint every N steps (default 500)")
    g.add_argument("--save-total-limit", "--save_total_limit", type=int, default=2, help="checkpoints to keep (default 2)")
    g.add_argument("--logging-steps", "--logging_steps", type=int, default=10, help="log every N steps (default 10)")
    g.add_argument("--report-to", "--report_to", default="none", help="tensorboard, wandb, ... (default none)")
    g.add_argument("--eval-data", metavar="D", help="held-out rows (what --data takes, read with its field flags and "
                   "--data-config, at --eval-split) evaluated after training (into logitcache_train.json), and every "
                   "--eval-steps while training")
    g.add_argument("--eval-split", metavar="SPLIT", help="split of --eval-data, e.g. test (default: train)")
    g.add_argument("--eval-cache", metavar="CACHE", help="held-out cache (the student's tokenizer) evaluated every "
                   "--eval-steps: adds teacher agreement")
    g.add_argument("--eval-steps", "--eval_steps", type=int, metavar="N", help="evaluate --eval-data/--eval-cache every N steps "
                   "(perplexity, accuracy, ECE, teacher agreement; logged like the loss, e.g. to TensorBoard)")
    g.add_argument("--deepspeed", metavar="JSON", help="DeepSpeed config (passed to transformers)")
    g.add_argument("--fsdp", metavar="SPEC", help="shard parameters, gradients and optimizer state over the ranks "
                   "(FSDP2, transformers' TrainingArguments.fsdp), e.g. 'full_shard auto_wrap'; also on CPU (gloo), "
                   "where accelerate alone would run DDP; the LM head then runs unfused (it is sharded)")
    add_progress_option(g)
    g.add_argument("--hf-arg", dest="hf_args", action="append", type=_key_value, default=None, metavar="KEY=VALUE",
                   help="any other transformers TrainingArguments field, e.g. max_grad_norm=0.5; repeatable")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the student's own modelling code")

    g = p.add_argument_group("how --data is read (as precompute reads it), and the student's chat template")
    add_student_data_options(g, data_flags="--data")
    return p


def _as_dict(value) -> dict:
    # From the command line: a list of (key, value); from --config YAML: a mapping.
    if value is None:
        return {}
    return dict(value.items() if isinstance(value, dict) else value)


def settings(args):
    """The command line as `TrainSettings`: each field is the option whose destination has its name."""
    from dataclasses import fields

    from logitcache.pipeline.commands.precompute import parse_storage_options
    from logitcache.stages.train.run import TrainSettings

    values = {f.name: getattr(args, f.name) for f in fields(TrainSettings)}
    return TrainSettings(**{**values, "storage_options": parse_storage_options(args.storage_options),
                            "progress": show_progress(args.progress),
                            "loss_options": _as_dict(args.loss_options), "hf_args": _as_dict(args.hf_args),
                            "chat_template_kwargs": chat_template_kwargs(args.chat_template_kwargs) or {}})


def check(args) -> None:
    """Every rule between options, with nothing loaded (`--print-config`)."""
    from logitcache.stages.train.run import decide

    decide(settings(args))


def execute(args) -> dict:
    """The command's work; returns what `logitcache_train.json` holds (`logitcache.pipeline.api.train`)."""
    from logitcache.stages.train.run import train

    return train(settings(args))


def run(args) -> int:
    result = execute(args)
    if result.get("stopped_by"):  # SIGTERM/SIGINT: a checkpoint was saved; exit as the signal would
        import signal

        return 128 + signal.Signals[result["stopped_by"]].value
    final = [h for h in result["log_history"] if "loss" in h]
    summary = f"train: {result['global_step']} steps -> {args.output_dir}"
    if final:
        summary += f"; last logged loss {final[-1]['loss']:.4f}"
    if "eval" in result:
        summary += f"; held-out accuracy {result['eval']['accuracy']:.4f}, perplexity {result['eval']['perplexity']:.2f}"
    print(summary)
    return 0
