"""`logitcache eval`: held-out perplexity, next-token accuracy, calibration, and agreement with a teacher."""

import argparse
import json

from logitcache.pipeline.options import (add_progress_option, add_student_data_options, chat_template_kwargs,
                                         show_progress)

HELP = "evaluate a model: perplexity and next-token accuracy on supervised tokens; with a cache, teacher agreement"

EPILOG = """\
examples:
  logitcache eval --model ./student --data heldout.jsonl
  logitcache eval --model ./student --data heldout.jsonl --cache ./heldout_cache --json
  # the test split of a Parquet dataset on S3, prompt/response columns named, through the chat template
  logitcache eval --model ./student --data s3://bucket/qa/ --split test --prompt-field question \\
      --response-field answer --prompt-format chat --storage-option endpoint_url=http://minio:9000
  # each position's scores, to compare two models on the same positions (paired standard errors)
  logitcache eval --model ./student --data heldout.jsonl --positions student_positions.npz

Metrics are pooled over supervised tokens (assistant turns of 'messages' chats, responses of prompt/response
rows, every token after the first of text rows, the cache's positions for a cache): nll, perplexity = exp(nll),
accuracy (top-1 == next token), ece (expected calibration error of the top-1 probability, 15 equal-width bins).
With --cache also teacher_agreement (student top-1 == teacher top-1), teacher_accuracy (teacher top-1 == next
token) and kd_loss (the KD term of --loss, default kl, over the cached rows: what `train --eval-cache` logs as
eval_cache_kd_loss); the cache must use the model's tokenizer. --positions writes each position's nll and
correct (and agree, with --cache) as arrays named data_nll, data_correct, cache_nll, ... in an .npz file (no
pickle), in the order of the data: models with one tokenizer, evaluated on the same data, get the same positions."""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help=HELP, description=HELP + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="M", help="model directory or hub id")
    p.add_argument("--config", metavar="FILE.yaml", help="options as YAML (keys are option names; flags win)")
    p.add_argument("--data", metavar="D", help="held-out rows: what `precompute --data` takes (a .jsonl/.json/.parquet/"
                   ".arrow file or folder, local or any fsspec URL; a save_to_disk folder; a hub dataset id), read by "
                   "the field flags below, else by their 'messages', 'prompt'/'response' or 'text' columns")
    p.add_argument("--cache", metavar="C", help="a cache of held-out sequences (same tokenizer as the model)")
    p.add_argument("--loss", default="kl", metavar="NAME", help="the loss whose KD term --cache reports as kd_loss "
                   "(default kl; give the training --loss to compare with its eval_cache_kd_loss)")
    p.add_argument("--temperature", type=float, help="the loss's temperature, as given to train (default: the loss's)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-sequences", type=int, help="evaluate at most this many sequences of each source")
    p.add_argument("--max-length", type=int, help="truncate sequences (default: the model's context)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--positions", metavar="FILE.npz", help="also write each position's scores (see below)")
    p.add_argument("--storage-option", dest="storage_options", action="append", metavar="KEY=VALUE",
                   help="fsspec option for --data/--cache URLs (s3://, gs://, hf://), repeatable (e.g. "
                   "endpoint_url=http://..., token=...); credentials are otherwise read from the usual environment")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own modelling code")
    g = p.add_argument_group("how --data is read (as precompute reads it), and the model's chat template")
    add_student_data_options(g, data_flags="--data")
    add_progress_option(p)
    return p


def _data_options(args):
    from logitcache.stages.train.sources import DataOptions

    names = ("text_field", "prompt_field", "response_field", "messages_field", "tools_field")
    return DataOptions(split=args.split, config_name=args.data_config, revision=args.data_revision,
                       streaming=args.streaming, max_rows=args.max_rows,
                       fields={n: getattr(args, n) for n in names if getattr(args, n)})


def check(args) -> None:
    """Every rule between options, with nothing loaded (`--print-config`)."""
    from logitcache.storage.errors import ConfigError
    from logitcache.storage.inputs import ChatOptions, InputSpec

    rows = _data_options(args)
    given = [f"--{n.replace('_', '-')}" for n in ("split", "data_config", "data_revision", "streaming", "max_rows")
             if getattr(args, n)] + [f"--{n.replace('_', '-')}" for n in rows.fields]
    if given and args.data is None:
        raise ConfigError(f"{', '.join(given)} describe how --data is read; give --data")
    # The file is read when the command runs; a stand-in says here that one is given.
    chat = ChatOptions("(file)" if args.chat_template else None, chat_template_kwargs(args.chat_template_kwargs) or {})
    if rows.fields:
        InputSpec.build(**rows.fields, prompt_format=args.prompt_format or "plain", max_length=None, chat=chat)


def execute(args) -> dict:
    """The command's work; returns the metrics (`logitcache.pipeline.api.evaluate`), after writing
    --positions if asked."""
    from logitcache.pipeline.commands.precompute import parse_storage_options
    from logitcache.stages.train.evaluate import evaluate
    from logitcache.stages.train.loss_settings import loss_settings

    check(args)
    plan = loss_settings(args.loss, temperature=args.temperature)  # an unknown loss fails here, before any load
    result = evaluate(args.model, data=args.data, cache=args.cache, batch_size=args.batch_size,
                      max_sequences=args.max_sequences, max_length=args.max_length, device=args.device,
                      trust_remote_code=args.trust_remote_code, per_position=args.positions is not None,
                      storage_options=parse_storage_options(args.storage_options), plan=plan,
                      rows=_data_options(args), chat_template=args.chat_template,
                      chat_template_kwargs=chat_template_kwargs(args.chat_template_kwargs),
                      prompt_format=args.prompt_format, progress=show_progress(args.progress))
    if args.positions is not None:
        import numpy as np

        arrays = {f"{part}_{name}": values for part in ("data", "cache") if part in result
                  for name, values in result[part].pop("per_position").items()}
        with open(args.positions, "wb") as f:
            np.savez(f, **arrays)
    return result


def run(args) -> int:
    result = execute(args)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"model {result['model']}")
    for part in ("data", "cache"):
        if part in result:
            r = result[part]
            line = (f"  {part:5s} {r['path']}: {r['sequences']} sequences, {r['positions']} tokens, "
                    f"perplexity {r['perplexity']:.3f}, accuracy {r['accuracy']:.4f}, ece {r['ece']:.4f}")
            if "teacher_agreement" in r:
                line += f", teacher agreement {r['teacher_agreement']:.4f} (teacher accuracy {r['teacher_accuracy']:.4f})"
            if "kd_loss" in r:
                line += f", kd_loss ({args.loss}) {r['kd_loss']:.4f}"
            print(line)
    return 0
