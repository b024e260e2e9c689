"""`logitcache precompute`: run a teacher once over a dataset and write the logit cache (stage one)."""

import argparse
import signal

from logitcache.pipeline.options import add_chat_template_options, add_deprecated_alias, chat_template_kwargs
from logitcache.stages.precompute.engine_registry import ENGINES
from logitcache.storage.backends import BACKENDS

HELP = "run a teacher over a dataset once and cache its top-K (or sampled) log-probs"

DESCRIPTION = """\
Run a teacher over DATA once and write its sparse next-token distributions to a cache that
`logitcache train` streams. Rerunning the same command resumes: finished shards are skipped.
A killed run leaves nothing partial behind (the cache is unreadable until its index is written).
Rerunning it on a finished cache repairs it: shards that are missing or of the wrong size (with
--verify: whose sha256 differs) are rewritten, then the index.

Inputs (choose one kind):
  --text-field F                     plain text; every position is supervised
  --prompt-field P --response-field R
                                     only response tokens are supervised. --prompt-format plain
                                     (the default): prompt + response + EOS as raw text;
                                     --prompt-format chat: a user turn and an assistant turn through
                                     the teacher's chat template (what an instruct teacher expects)
  --messages-field M                 chat messages [{role, content, ...}, ...] rendered once with
                                     the teacher tokenizer's chat template; assistant turns (and
                                     their end-of-turn token) supervised. Every message key reaches
                                     the template (tool_calls, reasoning_content, ...); --tools-field
                                     names a column of tool schemas (a list, or JSON text)
  --chat-template FILE, --chat-template-kwargs KEY=VALUE
                                     render chats with another template file and/or template
                                     variables (e.g. enable_thinking=false); both are recorded
                                     in the index (docs/DATA.md)
Rows whose field is missing, not a string or empty are skipped and counted in the index
(--strict: stop with an error naming the row). Rows longer than --max-length tokens keep their
start; they are counted as truncated.

Targets: --top-k K (default 32) keeps the K most likely ids per position. --mode sample
--samples N draws N ids per position from the teacher at --temperature and keeps the distinct
ids with their counts and each row's draw normaliser (RS-KD; rskd's estimate is unbiased at its
--temperature 1 for any sampling temperature, and at T = the sampling temperature; deterministic
given --seed).
"""

EPILOG = """\
examples:
  logitcache precompute --teacher Qwen/Qwen2.5-1.5B-Instruct --data chats.jsonl \\
      --messages-field messages --out ./cache
  # the first 10,000 rows of a hub dataset, streamed (nothing else is downloaded)
  logitcache precompute --teacher ./teacher --data HuggingFaceFW/fineweb-edu --streaming --max-rows 10000 \\
      --text-field text --out s3://bucket/cache --encoding compact --max-length 2048
  # 10,000 rows of a large Parquet dataset on S3, without downloading it
  logitcache precompute --teacher ./teacher --data s3://bucket/corpus/ --streaming --max-rows 10000 \\
      --text-field text --out ./cache --storage-option endpoint_url=http://minio:9000
  # a large teacher on vLLM: 4 GPUs (tensor parallel), fp8 weights, 8k tokens, 85% of each GPU's memory
  logitcache precompute --teacher Qwen/Qwen2.5-72B-Instruct --data chats.jsonl --messages-field messages \\
      --out ./cache --engine vllm --engine-arg tensor_parallel_size=4 --engine-arg quantization=fp8 \\
      --engine-arg max_model_len=8192 --max-length 8192 --engine-arg gpu_memory_utilization=0.85
  # four independent jobs (e.g. a Slurm array) fill one cache, then one merge:
  logitcache precompute --config job.yaml --num-jobs 4 --job-index $SLURM_ARRAY_TASK_ID
  logitcache merge ./cache
  # every option can come from YAML (keys are the option names, e.g. `top_k: 32`);
  # options given on the command line override the file:
  logitcache precompute --config precompute.yaml
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("precompute", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file (command-line flags win)")

    g = p.add_argument_group("what to run")
    g.add_argument("--teacher", required=True, metavar="MODEL",
                   help="teacher model: a local Hugging Face model folder or a hub id")
    g.add_argument("--data", required=True, metavar="DATA",
                   help="a .jsonl/.json/.parquet/.arrow file or folder of them (local, or any fsspec URL: s3://, "
                        "gs://, hf://, https://), a datasets.save_to_disk folder, or a hub dataset id")
    g.add_argument("--out", required=True, metavar="CACHE", help="cache folder or fsspec URL (s3://, gs://, ...)")
    g.add_argument("--split", help="dataset split; slices work, e.g. 'train[:1000]' (default: train)")
    g.add_argument("--data-config", metavar="NAME", help="hub dataset configuration (subset) name")
    g.add_argument("--data-revision", metavar="REV", help="hub dataset revision (branch, tag or commit)")
    g.add_argument("--streaming", action="store_true",
                   help="read only the rows this cache needs, when the job needs them, instead of loading DATA "
                        "first: .parquet/.jsonl files (local or URL; Parquet reads only footers and the needed row "
                        "groups) or a hub dataset id (datasets' streaming=True; needs --max-rows or a row slice). "
                        "For a slice of a huge dataset: --streaming --max-rows 10000")
    g.add_argument("--max-rows", type=int, metavar="N",
                   help="use the first N rows of DATA (of the --split slice); part of the cache's fingerprint")
    g.add_argument("--storage-option", dest="storage_options", action="append", metavar="KEY=VALUE",
                   help="fsspec option for --data and --out URLs, repeatable (e.g. endpoint_url=..., anon=true); "
                        "credentials are otherwise read from the usual environment (AWS_*, GOOGLE_*, HF_TOKEN). "
                        "S3 bounds: connect_timeout=5, read_timeout=15 (seconds), attempts=3 (default)")
    g.add_argument("--revision", help="teacher revision (hub branch, tag or commit)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow the teacher's own modelling/tokenizer code to run (off by default)")

    g = p.add_argument_group("inputs")
    g.add_argument("--text-field", metavar="F", help="column with plain text")
    g.add_argument("--prompt-field", metavar="P", help="column with the prompt (not supervised)")
    g.add_argument("--response-field", metavar="R", help="column with the response (supervised)")
    g.add_argument("--messages-field", metavar="M", help="column with chat messages")
    g.add_argument("--tools-field", metavar="T", help="with --messages-field: column with the tool schemas "
                                                      "passed to the chat template as `tools`")
    g.add_argument("--prompt-format", choices=["plain", "chat"], default="plain",
                   help="with --prompt-field/--response-field: plain (default) tokenizes prompt + response + EOS "
                        "as raw text; chat renders them as a user and an assistant turn with the teacher's chat "
                        "template")
    add_chat_template_options(
        g, template_help="a Jinja chat template file (local path or URL) that replaces the teacher tokenizer's for "
        "--messages-field / --prompt-format chat (e.g. a model's released template its tokenizer lacks); its text is "
        "recorded in the cache's index and fingerprint",
        kwargs_help="a variable for the chat template, repeatable; the value is read as YAML/JSON (false, 3, "
        "text), e.g. Qwen3's enable_thinking=false; in YAML a mapping. Recorded in the cache's index and "
        "fingerprint (a rerun with other values is another cache)")
    g.add_argument("--max-length", type=int, metavar="L",
                   help="tokens kept per row, from the start (default: the teacher's context length)")
    g.add_argument("--strict", action="store_true",
                   help="stop at the first row that would be skipped, naming the row and field")

    g = p.add_argument_group("targets")
    g.add_argument("--mode", choices=["topk", "sample"], default="topk",
                   help="topk: the K most likely ids (default); sample: RS-KD sampled ids with counts")
    g.add_argument("--top-k", type=int, metavar="K",
                   help="ids STORED per position in topk mode (default 32); fixed for the cache. "
                        "(`train --top-k` is another thing: how many of the stored ids a loss uses)")
    g.add_argument("--samples", type=int, metavar="N", help="draws per position in sample mode (default 64)")
    g.add_argument("--temperature", type=float, metavar="T",
                   help="the teacher's SAMPLING temperature in sample mode (default 1.0); stored log-probs are "
                        "always at temperature 1. (`train --temperature` is the loss's softening temperature)")
    g.add_argument("--seed", type=int, default=0, help="sample-mode seed (default 0)")

    g = p.add_argument_group("cache storage")
    g.add_argument("--backend", choices=[*BACKENDS, "parquet"], default="parquet",
                   help="storage backend: parquet (alias: arrow; the default): a Parquet file per shard, and the "
                        "folder is a Hugging Face dataset (`datasets.load_dataset(CACHE)`, the Hub's viewer, "
                        "`logitcache push`); measured 3-11%% smaller than zarr, with ~30%% less CPU to write and reads as "
                        "fast (docs/FORMAT.md, 'Choosing a backend'). zarr: a Zarr v3 group per shard, read by zarr-python; "
                        "`logitcache convert` turns one into the other")
    add_deprecated_alias(g, "--format", "--backend", dest="backend", choices=[*BACKENDS, "parquet"])
    g.add_argument("--encoding", choices=["lossless", "float16", "compact"], default="lossless",
                   help="lossless: float32, exactly what the teacher computed (default; `logitcache convert` can "
                        "compact it later, not the reverse); compact: log-probs on a 1/32-nat grid, "
                        "about half the size, recommended for large runs; float16: half precision")
    g.add_argument("--rows-per-shard", type=int, default=1000, metavar="R",
                   help="dataset rows per storage shard (default 1000); the unit of resume and of work. "
                        "Fixed for a cache: changing it starts a different cache")

    g = p.add_argument_group("engine")
    g.add_argument("--engine", choices=list(ENGINES),
                   help=f"{'; '.join(f'{name}: {about}' for name, (_, about) in ENGINES.items())}. Default: vllm where "
                        f"vLLM and a GPU are present, else hf")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="teacher compute dtype (default auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--batch-size", type=int, default=64, metavar="B",
                   help="TEACHER INFERENCE: sequences handed to the engine per call (default 64); the engine packs "
                        "them into forward passes under --max-batch-tokens. (`train --batch-size` is the "
                        "student's micro-batch)")
    g.add_argument("--max-batch-tokens", type=int, metavar="N", help="engine token budget per forward pass")
    g.add_argument("--engine-arg", dest="engine_args", action="append", metavar="KEY=VALUE",
                   help="engine option, repeatable; in YAML a mapping `engine_args:`; part of the cache's "
                        "fingerprint (credentials excepted). vllm: vllm_path=pooling|logprobs (default pooling: "
                        "vLLM's hidden states and our head; logprobs: vLLM's own prompt log-probs, top-K only), and "
                        "any vllm.LLM setting, passed as given (a setting vLLM refuses stops the job before it "
                        "starts); the most used: "
                        "tensor_parallel_size=N (GPUs per teacher), gpu_memory_utilization=F (the share of each "
                        "GPU vLLM reserves; default 0.9, less the pooling path's head), max_model_len=L (longest "
                        "sequence; keep it >= --max-length, +1 on the logprobs path; default on CPU "
                        "--max-batch-tokens), quantization=METHOD (e.g. fp8; the targets are then the quantized "
                        "teacher's). hf and the vllm pooling path: fused_kernel=auto|triton|torch (the fused head + "
                        "top-K: the Triton kernel on a GPU or the torch tile fold). docs/SCALING.md has more")

    g = p.add_argument_group("several jobs or machines")
    g.add_argument("--num-jobs", type=int, default=1, metavar="N",
                   help="the number of independent jobs that fill this cache together (default 1). Job I writes "
                        "the storage shards s with s %% N == I. Run all N (any order, any machines), then "
                        "`logitcache merge CACHE` (the last job to finish also finalizes by itself)")
    g.add_argument("--job-index", type=int, default=0, metavar="I", help="this job's number, 0 <= I < N (default 0)")
    # The old names counted jobs while saying shards; kept so existing scripts run.
    add_deprecated_alias(g, "--num-shards", "--num-jobs", dest="num_jobs", type=int)
    add_deprecated_alias(g, "--shard-index", "--job-index", dest="job_index", type=int)
    g.add_argument("--ray", action="store_true",
                   help="run on Ray Data: one engine per actor (one per GPU, or one CPU actor without GPUs); "
                        "starts a local Ray cluster unless --ray-address is given")
    g.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (e.g. 'auto'); implies --ray")
    g.add_argument("--ray-actors", type=int, metavar="N", help="engine actors (default: one per GPU, or 1)")
    p.add_argument("--verify", action="store_true",
                   help="on a rerun, check the sha256 of every shard already written (reads them all) and rewrite "
                        "those that differ; without it only their presence and sizes are checked")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def parse_engine_args(values) -> dict:
    """`--engine-arg KEY=VALUE` strings (values read as YAML scalars) or a YAML mapping -> dict."""
    import yaml

    from logitcache.storage.errors import ConfigError

    if values is None:
        return {}
    if isinstance(values, dict):
        return dict(values)
    out = {}
    for item in values:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ConfigError(f"--engine-arg {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def backend_name(backend: str) -> str:
    """--backend as the index's backend name: "parquet" is the name users look for; storage calls it "arrow"."""
    return "arrow" if backend == "parquet" else backend


def parse_storage_options(values) -> dict | None:
    """`--storage-option KEY=VALUE` strings or a YAML mapping -> fsspec options (None when none given).

    `endpoint_url` goes where s3fs reads it (client_kwargs), so `--storage-option endpoint_url=http://...`
    works as users expect.
    """
    options = parse_engine_args(values)
    if not options:
        return None
    if "endpoint_url" in options:
        options.setdefault("client_kwargs", {})["endpoint_url"] = options.pop("endpoint_url")
    return options


def settings(args):
    """The command line as `PrecomputeSettings`: each of its fields is the option of the same name, but for
    the engine's four (`EngineSpec`), --backend's alias and the parsed storage options and template variables."""
    from dataclasses import fields

    from logitcache.stages.precompute.settings import EngineSpec, PrecomputeSettings

    given = {"engine": EngineSpec(name=args.engine, dtype=args.dtype, max_batch_tokens=args.max_batch_tokens,
                                  options=parse_engine_args(args.engine_args)),
             "backend": backend_name(args.backend), "storage_options": parse_storage_options(args.storage_options),
             "chat_template_kwargs": chat_template_kwargs(args.chat_template_kwargs)}
    return PrecomputeSettings(**{f.name: given[f.name] if f.name in given else getattr(args, f.name)
                                 for f in fields(PrecomputeSettings)})


def check(args) -> None:
    """Every rule between options, with nothing loaded (`--print-config`): the targets, the jobs."""
    from logitcache.storage.inputs import ChatOptions, InputSpec

    settings(args).check()
    # The file is read when the command runs; here a stand-in says that one is given.
    chat = ChatOptions("(file)" if args.chat_template else None, chat_template_kwargs(args.chat_template_kwargs) or {})
    InputSpec.build(text_field=args.text_field, prompt_field=args.prompt_field, response_field=args.response_field,
                    messages_field=args.messages_field, tools_field=args.tools_field, prompt_format=args.prompt_format,
                    max_length=args.max_length, chat=chat)


def execute(args):
    """The command's work; returns the `PrecomputeResult` (`logitcache.pipeline.api.precompute`)."""
    from logitcache.stages.precompute.run import precompute

    return precompute(settings(args))


def run(args) -> int:
    result = execute(args)
    if result.stopped_by:
        return 128 + signal.Signals[result.stopped_by].value
    return 0
