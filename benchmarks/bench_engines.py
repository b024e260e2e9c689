"""Positions per second of each teacher-engine path against its own limit, on the same tokens.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python benchmarks/bench_engines.py            # CPU, ~3 min
    python benchmarks/bench_engines.py --layers 4 --hidden 256 --vocab 4096 --seqs 64 --seq-len 512 --k 32

Every position of every sequence is supervised. The limits are what a path cannot beat:
- hf: the bare transformers forward in the same length batches, logits at every position
  (`model(input_ids).logits`), no log-softmax, no top-K.
- vllm: vLLM's prefill of the same prompts without logprobs (`max_tokens=1`) from `vllm.LLM` built
  as its documentation does (model, dtype, max_model_len, eager, no prefix cache; nothing of ours),
  plus this process's LM head (a bf16 matmul) at every position.
The ratio is limit time / path time: the fraction of the limit the path captures.

The model is a random Llama (scratch.py) whose logits width is padded to `--vocab`; only the
width matters for cost. Each timing is the best of `--repeats` after a warm-up run.

Whole jobs, as a user runs them (`--whole-job TEXTS.jsonl`, one {"text": ...} per line):

    .venv/bin/python benchmarks/bench_engines.py --whole-job texts.jsonl --vocab 151680 --job-rows 120

times `logitcache precompute --engine hf` (fused head, and `fused_head=false`) against a bare job
over the same texts: a process that loads the model, tokenizes the texts and runs the forward
pass with logits in the same length batches, nothing else. Each is run over `--job-rows` texts
and over a quarter of them, interleaved, and the start-up is subtracted: ratio = (bare big -
bare small) / (job big - job small).

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python benchmarks/bench_engines.py --whole-job texts.jsonl --job-engine vllm

does the same for `precompute --engine vllm` (no `--max-batch-tokens`), its default path and each
path by name, against vLLM as its documentation runs it (`bare_vllm_job`: `vllm.LLM` with only the
model, dtype, max_model_len, eager or compiled and no prefix cache set; `generate(texts,
max_tokens=1)`) plus the LM head as a bf16 matmul at every position; nothing of ours.
The pooling job's start-up includes its head check's short-lived second engine; the small job
pays it too, so the subtraction removes it. `--jobs 'vllm logprobs path'` runs one variant (beside
the bare job); `--job-engine-arg enforce_eager=true` gives every job that engine option, and the
bare one eager mode (the only engine argument it reads).

    .venv/bin/python benchmarks/bench_engines.py --whole-job texts.jsonl --job-own-work --job-rows 619
    .venv/bin/python benchmarks/bench_engines.py --whole-job texts.jsonl --path-error --head-scale 10

time the job's own work per position with the teacher replaced by replayed rows (one core), and
measure each vLLM path's log-probs against an fp32 transformers forward.

    .venv/bin/python benchmarks/bench_engines.py --head-widths 256,1536,3584 --vocab 151680 --micro-rows 512

times the fused head against the head matmul alone at several hidden sizes (1 thread, CPU time):
what the fold adds per logit does not grow with H, the matmul does.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, kernel selection, lazy init
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _model(out_dir: str, layers: int, hidden: int, vocab: int) -> str:
    from logitcache.pipeline.scratch import make_tiny_llama, toy_corpus, train_tokenizer

    tok = train_tokenizer(toy_corpus(), 600, out_dir)
    make_tiny_llama(out_dir, tok, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64, pad_vocab_to=vocab)
    return out_dir


def bench_hf(model: str, requests, args) -> list[tuple[str, float]]:
    from logitcache.stages.precompute.engines import build_engine
    from logitcache.stages.precompute.engines.hf import length_batches

    engine = build_engine("hf", model, k=args.k, max_batch_tokens=args.batch_tokens)
    batches = length_batches([len(r.token_ids) for r in requests], args.batch_tokens)

    @torch.inference_mode()
    def bare_forward():
        for batch in batches:
            ids = torch.tensor([requests[i].token_ids for i in batch])  # equal lengths: no padding
            engine.model(input_ids=ids, use_cache=False).logits

    limit = _best(bare_forward, args.repeats)
    path = _best(lambda: engine.run(requests), args.repeats)
    engine.close()
    return [("hf limit: forward + logits everywhere", limit), ("hf engine", path)]


def bench_vllm(model: str, requests, args) -> list[tuple[str, float]]:
    from vllm import SamplingParams

    from logitcache.stages.precompute.engines import build_engine

    common = dict(k=args.k, max_batch_tokens=args.batch_tokens, max_model_len=args.seq_len + 1, enforce_eager=True)
    rows = []
    engine = build_engine("vllm", model, vllm_path="pooling", **common)
    rows.append(("vllm pooling path", _best(lambda: engine.run(requests), args.repeats)))
    hidden = torch.randn(sum(len(r.positions) for r in requests), engine.head.weight.shape[1])

    def head_everywhere():
        for lo in range(0, len(hidden), 4096):
            engine.head(hidden[lo : lo + 4096])

    head = _best(head_everywhere, args.repeats)
    engine.close()

    engine = build_engine("vllm", model, vllm_path="logprobs", **common)
    rows.append(("vllm logprobs path", _best(lambda: engine.run(requests), args.repeats)))
    engine.close()
    # The limit: vLLM as its documentation builds it, only what must match set (no settings of ours).
    from vllm import LLM

    llm = LLM(model=model, dtype="bfloat16", max_model_len=args.seq_len + 1, enforce_eager=True,
              enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": list(r.token_ids)} for r in requests]
    plain = SamplingParams(max_tokens=1, detokenize=False)
    prefill = _best(lambda: llm.generate(prompts, plain, use_tqdm=False), args.repeats)
    llm.llm_engine.engine_core.shutdown()
    return [(f"vllm limit: vLLM's prefill {prefill:.2f} s + head everywhere {head:.2f} s", prefill + head)] + rows


def bare_job(model: str, data: str, rows: int, batch_tokens: int) -> None:
    """The whole-job limit: load, tokenize, forward with logits at every position; nothing else."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitcache.stages.precompute.engines.hf import length_batches

    tok = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with open(data) as f:
        texts = [json.loads(line)["text"] for line in f][:rows]
    ids = [tok(t)["input_ids"] for t in texts]
    with torch.inference_mode():
        for batch in length_batches([len(x) for x in ids], batch_tokens):
            longest = len(ids[batch[0]])
            input_ids = torch.zeros((len(batch), longest), dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for b, i in enumerate(batch):
                input_ids[b, : len(ids[i])], mask[b, : len(ids[i])] = torch.tensor(ids[i]), 1
            net(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def bare_vllm_job(model: str, data: str, enforce_eager: bool) -> None:
    """The vLLM whole-job limit: vLLM as its documentation runs it, plus the LM head; nothing of ours.

    `vllm.LLM(model, dtype, max_model_len, enforce_eager, enable_prefix_caching=False)` with vLLM's
    defaults for everything else, `generate(texts, SamplingParams(max_tokens=1))` (vLLM tokenizes),
    then the LM head as a bf16 matmul at every prompt position in 4,096-row chunks. Only what must
    match the job is set: the model, its dtype, the longest request (the model's limit, which the
    job's default `max_model_len` is here too), eager or compiled, and no prefix cache (the job
    sees each sequence once).
    """
    import json

    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    config = AutoConfig.from_pretrained(model)
    llm = LLM(model=model, dtype="bfloat16", max_model_len=config.max_position_embeddings,
              enforce_eager=enforce_eager, enable_prefix_caching=False)
    with open(data) as f:
        texts = [json.loads(line)["text"] for line in f]
    outs = llm.generate(texts, SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
    positions = sum(len(o.prompt_token_ids) - 1 for o in outs)
    weight = torch.randn(config.vocab_size, config.hidden_size, dtype=torch.bfloat16)
    hidden = torch.randn(4096, config.hidden_size, dtype=torch.bfloat16)
    for lo in range(0, positions, 4096):
        hidden[: min(4096, positions - lo)] @ weight.T
    print(json.dumps({"positions": positions}))


def bench_whole_job(model: str, args) -> None:
    """Whole `precompute --engine hf` processes against bare jobs; see the module docstring."""
    import json
    import subprocess
    import sys

    with open(args.whole_job) as f:
        lines = f.readlines()
    lines = (lines * -(-args.job_rows // len(lines)))[: args.job_rows]  # repeated to --job-rows if short
    sizes = {"small": max(1, len(lines) // 4), "big": len(lines)}
    with tempfile.TemporaryDirectory() as tmp:
        data = {}
        for name, n in sizes.items():
            data[name] = os.path.join(tmp, f"{name}.jsonl")
            with open(data[name], "w") as f:
                f.writelines(lines[:n])
        py, here = sys.executable, os.path.abspath(__file__)

        engine_args = [a for kv in args.job_engine_arg for a in ("--engine-arg", kv)]

        def precompute(size: str, engine: str, *extra: str) -> list[str]:
            return [py, "-m", "logitcache.pipeline", "precompute", "--teacher", model, "--data", data[size],
                    "--text-field", "text", "--engine", engine, "--no-progress",
                    # vLLM jobs as a user runs them: its own batch size (the engine's default)
                    *(["--max-batch-tokens", str(args.batch_tokens)] if engine == "hf" else []), "--top-k", str(args.k), "--out", os.path.join(tmp, "cache"), *engine_args,
                    *extra]

        bare = [py, here, "--model", model, "--batch-tokens", str(args.batch_tokens),
                *[a for kv in args.job_engine_arg for a in ("--job-engine-arg", kv)]]
        if args.job_engine == "hf":
            jobs = {
                "bare": lambda size: bare + ["--bare-job", data[size]],
                "hf engine, fused head": lambda size: precompute(size, "hf"),
                "hf engine, unfused head": lambda size: precompute(size, "hf", "--engine-arg", "fused_head=false"),
            }
        else:
            jobs = {
                "bare": lambda size: bare + ["--bare-vllm-job", data[size]],
                "vllm default": lambda size: precompute(size, "vllm"),
                "vllm pooling path": lambda size: precompute(size, "vllm", "--engine-arg", "vllm_path=pooling"),
                "vllm logprobs path": lambda size: precompute(size, "vllm", "--engine-arg", "vllm_path=logprobs"),
            }
        if args.jobs:
            wanted = {"bare", *args.jobs}
            unknown = wanted - set(jobs)
            if unknown:
                raise SystemExit(f"--jobs: unknown {sorted(unknown)}; expected some of {sorted(jobs)}")
            jobs = {name: cmd for name, cmd in jobs.items() if name in wanted}
        times = {(name, size): [] for name in jobs for size in sizes}
        for _ in range(args.repeats):
            for size in sizes:
                for name, cmd in jobs.items():  # interleaved: load drifts hit every variant alike
                    subprocess.run(["rm", "-rf", os.path.join(tmp, "cache")], check=True)
                    t0 = time.perf_counter()
                    done = subprocess.run(cmd(size), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    if done.returncode:
                        raise SystemExit(f"{name} ({size}) failed:\n{done.stderr[-3000:]}")
                    times[name, size].append(time.perf_counter() - t0)
                    print(f"  {name} ({size}): {times[name, size][-1]:.1f} s", flush=True)
    net = {name: min(times[name, "big"]) - min(times[name, "small"]) for name in jobs}
    print(f"\nwhole jobs: {sizes['big']} vs {sizes['small']} texts, logits width {args.vocab}, k={args.k}")
    print(f"{'job':28s} {'big s':>8s} {'small s':>8s} {'net s':>8s} {'of bare':>8s}   all runs")
    for name in jobs:
        runs = " ".join(f"{t:.1f}" for t in times[name, "big"] + times[name, "small"])
        print(f"{name:28s} {min(times[name, 'big']):8.1f} {min(times[name, 'small']):8.1f} {net[name]:8.1f} "
              f"{net['bare'] / net[name]:8.2f}   {runs}")
    print(json.dumps({"net_seconds": net}))
    from results import record

    ratios = {name: round(net["bare"] / net[name], 2) for name in jobs if name != "bare"}
    if args.job_engine == "hf":
        default, goal = "hf engine, fused head", 0.95 if args.vocab <= 4096 else 0.9
        record(f"precompute.hf.whole_job.h{args.hidden}.v{args.vocab}", values=ratios, goal=f"≥ {goal}",
               met=ratios[default] >= goal if default in ratios else None, area="stage one", unit="× the bare job",
               what=f"`precompute --engine hf`, whole job, {args.layers}-layer {args.hidden}-wide teacher, "
                    f"V = {args.vocab:,}, × a bare transformers forward job")
    else:
        eager = "enforce_eager=true" in args.job_engine_arg
        default = "vllm default" if "vllm default" in ratios else "vllm pooling path"
        record(f"precompute.vllm.whole_job.{'eager' if eager else 'compiled'}", values=ratios,
               met=ratios[default] >= 0.8 if default in ratios else None)


def bench_path_error(model: str, args) -> None:
    """Each vLLM path's log-probs against an fp32 transformers forward of the same teacher.

    Over the first `--error-rows` texts of `--whole-job`, every position: the next token's log-prob
    (`target_logprob`) and the top-K log-probs at the ids each path chose, each against the fp32
    log-softmax at the same id. `--head-scale` multiplies the LM head's weight (a random teacher's
    logits are a few nats; a trained one's reach tens, where bf16 rounding of the logits grows).
    """
    import json

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitcache.stages.precompute.engines import Request, build_engine

    if args.head_scale != 1.0:
        weights = load_file(os.path.join(model, "model.safetensors"))
        weights["lm_head.weight"] = (weights["lm_head.weight"].float() * args.head_scale).to(torch.bfloat16)
        save_file(weights, os.path.join(model, "model.safetensors"), metadata={"format": "pt"})
    tok = AutoTokenizer.from_pretrained(model)
    with open(args.whole_job) as f:
        texts = [json.loads(line)["text"] for line in f][: args.error_rows]
    requests = [Request(token_ids=ids, positions=np.arange(len(ids) - 1))
                for ids in (tok(t)["input_ids"] for t in texts) if len(ids) >= 2]
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.inference_mode():
        exact = [net(torch.tensor([r.token_ids])).logits[0, :-1].float().log_softmax(-1) for r in requests]
    biggest = max(float(e.max() - e.min()) for e in exact)
    print(f"{len(requests)} texts, {sum(len(r.positions) for r in requests)} positions, k={args.k}; "
          f"largest logit spread in a row {biggest:.1f} nats (fp32)")
    errors = {}
    print(f"{'path':28s} {'target |err| mean':>18s} {'p99':>7s} {'max':>7s} {'top-K |err| mean':>17s} {'max':>7s}")
    for path in ("pooling", "logprobs"):
        engine = build_engine("vllm", model, vllm_path=path, k=args.k, enforce_eager=True)
        rows = engine.run(requests)
        engine.close()
        target, topk = [], []
        for r, e, row in zip(requests, exact, rows):
            nxt = torch.tensor(r.token_ids[1:])
            target.append(np.abs(row["target_logprob"] - e[torch.arange(len(nxt)), nxt].numpy()))
            ids = torch.from_numpy(row["topk_ids"].astype(np.int64))
            topk.append(np.abs(row["topk_logprobs"] - e.gather(1, ids).numpy()).ravel())
        target, topk = np.concatenate(target), np.concatenate(topk)
        print(f"{path:28s} {target.mean():18.4f} {np.quantile(target, 0.99):7.3f} {target.max():7.3f} "
              f"{topk.mean():17.4f} {topk.max():7.3f}", flush=True)
        errors[path] = round(float(target.mean()), 3)
    from results import record

    record("precompute.vllm.path_error", values=errors)


def bench_vllm_contention(model: str, args) -> None:
    """Does our head + top-K slow vLLM's worker? One pooling engine (no head check), in this process:
    `llm.encode` of `--seqs` x `--seq-len` random tokens alone, `engine.run` of the same, the head and
    the fused top-K alone, and `llm.encode` again while a thread loops the head + top-K beside it."""
    import resource
    import threading

    from logitcache.stages.precompute.engines import Request, build_engine
    from logitcache.stages.precompute.engines.base import targets_from_hidden

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    rng = np.random.default_rng(0)
    requests = [Request(token_ids=rng.integers(0, 600, args.seq_len).tolist(), positions=np.arange(args.seq_len - 1))
                for _ in range(args.seqs)]
    kwargs = {kv.split("=")[0]: kv.split("=")[1] == "true" for kv in args.job_engine_arg if kv.startswith("enforce")}
    engine = build_engine("vllm", model, vllm_path="pooling", k=args.k, verify_head=False, max_model_len=2048, **kwargs)
    prompts = [{"prompt_token_ids": r.token_ids} for r in requests]
    hidden = torch.randn(4096, engine.head.weight.shape[1], dtype=engine.head.weight.dtype)
    next_ids = torch.randint(0, engine.logits_width, (4096,))
    positions = args.seqs * (args.seq_len - 1)
    encode = lambda: engine.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)  # noqa: E731
    fused = lambda: [targets_from_hidden(hidden, engine.head, next_ids, engine.spec, fused=True)  # noqa: E731
                     for _ in range(0, positions, 4096)]
    stop = threading.Event()

    def beside():
        while not stop.is_set():
            targets_from_hidden(hidden, engine.head, next_ids, engine.spec, fused=True)

    def with_head_beside():
        thread = threading.Thread(target=beside)
        thread.start()
        try:
            encode()
        finally:
            stop.set()
            thread.join()

    engine.llm.encode(prompts[:8], pooling_task="token_embed", use_tqdm=False)  # warm-up
    print(f"{positions} positions; this process's torch threads: {torch.get_num_threads()}")
    for name, fn in (("llm.encode alone", encode), ("engine.run (encode + head + top-K, overlapped)",
                     lambda: engine.run(requests)), ("head + fused top-K alone", fused),
                     ("llm.encode with head + top-K looping beside it", with_head_beside)):
        w, c = time.perf_counter(), cpu()
        fn()
        print(f"{name:50s} {time.perf_counter() - w:7.2f} s wall  {cpu() - c:6.2f} s CPU in this process", flush=True)
    engine.close()


class ReplayEngine:
    """Real teacher rows, replayed: the job's own work without the teacher's (see `bench_job_own_work`).

    Rows come from the hf engine on the test teacher over `pool` requests; each later request gets
    consecutive rows from that pool (wrapping), so shards hold a real teacher's ids and log-probs
    (what compression sees) at a cost of a slice per request.
    """

    name = "hf"  # what wrote the rows; the cache says so
    version = "replay"

    def __init__(self, model: str, pool, k: int):
        from logitcache.stages.precompute.engines import build_engine

        engine = build_engine("hf", model, k=k)
        rows = engine.run(pool)
        self.logits_width = engine.logits_width
        engine.close()
        self.rows = {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}
        self.total = len(self.rows["topk_ids"])
        self.at = 0

    def run(self, requests):
        out = []
        for r in requests:
            n = len(r.positions)
            idx = (self.at + np.arange(n)) % self.total
            self.at = (self.at + n) % self.total
            out.append({name: col[idx] for name, col in self.rows.items()})
        return out

    def close(self) -> None:
        pass


def bench_job_own_work(model: str, args) -> None:
    """Everything a job does but the teacher's forward, head and top-K, in positions/s of one core.

    `precompute` (in this process, one torch thread, pinned to one core) over `--job-rows` texts and
    4x as many, with `ReplayEngine` in place of the teacher: tokenization, row encoding, batching,
    shard assembly, compression, checksums, writes and the index, at K = `--k`. Start-up is
    subtracted (big minus small); CPU seconds (getrusage, every thread) beside wall seconds.
    """
    import json
    import resource

    from logitcache.stages.precompute.engines import Request
    from logitcache.stages.precompute.run import EngineSpec, PrecomputeSettings, precompute

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    with open(args.whole_job) as f:
        lines = f.readlines()[: args.job_rows]
    rng = np.random.default_rng(0)
    pool = [Request(token_ids=rng.integers(0, 600, 400).tolist(), positions=np.arange(399)) for _ in range(16)]
    replay = ReplayEngine(model, pool, args.k)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = {}
        for name, copies in (("small", 1), ("big", 4)):
            data[name] = os.path.join(tmp, f"{name}.jsonl")
            with open(data[name], "w") as f:
                f.writelines(lines * copies)
        runs = [("small", "warm-up")] + [(name, r) for r in range(args.repeats) for name in ("small", "big")]
        for backend in args.job_backends.split(","):
            for name, r in runs:
                out = os.path.join(tmp, f"cache-{name}-{backend}-{r}")
                cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                precompute(PrecomputeSettings(teacher=model, data=data[name], out=out, engine=EngineSpec.of(replay),
                                              backend=backend, text_field="text", top_k=args.k, progress=False))
                wall = time.perf_counter() - t0
                cpu1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
                positions = sum(e["positions"] for e in json.load(open(os.path.join(out, "index.json")))["shards"])
                print(f"  {backend} {name} ({r}): {positions} positions, {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
                if r != "warm-up":
                    best = results.get((name, backend))
                    results[name, backend] = min(best, (wall, cpu, positions)) if best else (wall, cpu, positions)
    print(f"\njob's own work at K={args.k}, one core, start-up subtracted (big - small):")
    for backend in args.job_backends.split(","):
        (wb, cb, pb), (ws, cs, ps) = results["big", backend], results["small", backend]
        print(f"{backend:6s} {(pb - ps) / (wb - ws):10,.0f} positions/s wall   {(pb - ps) / (cb - cs):10,.0f} per CPU second")
    from results import record

    per_cpu = {}
    for backend in args.job_backends.split(","):
        (wb, cb, pb), (ws, cs, ps) = results["big", backend], results["small", backend]
        per_cpu[backend] = round((pb - ps) / (cb - cs))
    record("precompute.own_work", values=per_cpu, met=min(per_cpu.values()) >= 200_000)


def bench_topk_micro(args) -> None:
    """Fused vs unfused head + top-K in this process, at 1 and at 2 torch threads, interleaved rounds.

    Each path is timed in wall time and in CPU time (`time.process_time`). At 1 thread CPU time
    is the trustworthy figure: other jobs on a shared machine stretch wall time unevenly, the
    CPU a single-threaded computation needs much less. At 2 threads wall time is what a job
    pays (CPU time counts both cores, and spinning OpenMP threads too); the baseline is the head
    matmul alone at the same thread count, the part a bare forward also pays.
    "fused, torch threads per op" is the fused pass with `workers=1`: every chunk on the calling
    thread, each small op split over torch's threads (the behaviour before `_fold_on_workers`).
    """
    from logitcache.stages.precompute.engines.base import targets_from_hidden
    from logitcache.stages.precompute.targets import Targets
    from logitcache.stages.precompute.fused_topk import fused_topk_targets
    from logitcache.storage.head import LMHead

    gen = torch.Generator().manual_seed(0)
    rows = args.micro_rows
    for dtype in (torch.float32, torch.bfloat16):
        head = LMHead(weight=(torch.randn(args.vocab, args.hidden, generator=gen) * 0.15).to(dtype))
        hidden = torch.randn(rows, args.hidden, generator=gen).to(dtype)
        next_ids = torch.randint(0, args.vocab, (rows,), generator=gen)
        spec = Targets("topk", args.k)
        paths = {
            "head matmul only": lambda: [head(hidden[lo:lo + 256]) for lo in range(0, rows, 256)],
            "unfused (head chunk, then topk_targets)": lambda: targets_from_hidden(
                hidden, head, next_ids, spec, fused=False),
            "fused, torch threads per op": lambda: fused_topk_targets(hidden, head, next_ids, args.k, workers=1),
            "fused (default: one worker per thread)": lambda: targets_from_hidden(
                hidden, head, next_ids, spec, fused=True),
        }
        runs = [(threads, name) for threads in (1, 2) for name in paths
                if not (threads == 1 and name.startswith("fused, torch threads"))]  # same as default at 1
        times = {run: [] for run in runs}
        for threads, name in runs:  # warm-up
            torch.set_num_threads(threads)
            paths[name]()
        for _ in range(args.repeats):
            for threads, name in runs:
                torch.set_num_threads(threads)
                w0, c0 = time.perf_counter(), time.process_time()
                paths[name]()
                times[threads, name].append((time.perf_counter() - w0, time.process_time() - c0))
        print(f"\n{rows} rows x H {args.hidden} x V {args.vocab}, k={args.k}, {dtype}; seconds per round "
              f"(wall / CPU); head/path: head matmul time at the same thread count / path time, best rounds "
              f"(1 thread: CPU time; 2 threads: wall time)")
        for threads, name in runs:
            pick = 1 if threads == 1 else 0
            base = min(t[pick] for t in times[threads, "head matmul only"])
            rounds = " ".join(f"{w:6.2f}/{c:5.2f}" for w, c in times[threads, name])
            print(f"{threads} thr  {name:40s} {rounds}   head/path {base / min(t[pick] for t in times[threads, name]):.2f}")


def bench_head_widths(args) -> None:
    """The fused head against the head matmul alone at several hidden sizes: 1 torch thread, CPU time.

    The test teacher is 256 wide. A real teacher is 1,536 (Qwen2-1.5B) to 3,584 (Qwen2-7B) or
    more, and the head's matmul costs 2 H flops per logit while the fused fold's work per logit
    (compare, exp, sum) does not grow with H. So how much the fold adds depends on H; this measures
    it at each width in `--head-widths`, `--micro-rows` rows, V = `--vocab`, rounds interleaved (the
    first round is a warm-up and is not counted). The baseline is one (rows x V) matmul, what a
    bare forward's `lm_head` does.
    """
    from logitcache.stages.precompute.engines.base import targets_from_hidden
    from logitcache.stages.precompute.targets import Targets
    from logitcache.stages.precompute.fused_topk import fused_topk_targets
    from logitcache.storage.head import LMHead

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows, spec = args.micro_rows, Targets("topk", args.k)
    print(f"{rows} rows x V {args.vocab}, k={args.k}, fp32, 1 torch thread; CPU seconds per round; "
          f"ratio = one-matmul time / path time, best counted rounds")
    fused = {}
    for width in (int(h) for h in args.head_widths.split(",")):
        head = LMHead(weight=torch.randn(args.vocab, width, generator=gen) * (2.5 / width ** 0.5))
        hidden = torch.randn(rows, width, generator=gen)
        next_ids = torch.randint(0, args.vocab, (rows,), generator=gen)
        paths = {
            "head matmul, one (rows x V)": lambda: head(hidden),
            "head matmul, 256-row chunks": lambda: [head(hidden[lo:lo + 256]) for lo in range(0, rows, 256)],
            "unfused (head chunk, then topk_targets)": lambda: targets_from_hidden(
                hidden, head, next_ids, spec, fused=False),
            "fused": lambda: fused_topk_targets(hidden, head, next_ids, args.k),
        }
        times = {name: [] for name in paths}
        for _ in range(args.repeats + 1):
            for name, path in paths.items():
                c0 = time.process_time()
                path()
                times[name].append(time.process_time() - c0)
        base = min(times["head matmul, one (rows x V)"][1:])
        for name, t in times.items():
            rounds = " ".join(f"{x:6.2f}" for x in t[1:])
            print(f"H {width:5d}  {name:42s} {rounds}   {base / min(t[1:]):.2f}", flush=True)
        fused[f"H = {width:,}"] = round(base / min(times["fused"][1:]), 2)
    from results import record

    record("precompute.fused_head.widths", values=fused,
           what=f"fused head + top-K against one head matmul, by hidden size H (V = {args.vocab:,}, {rows} rows, "
                "fp32, 1 thread, CPU time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--whole-job", metavar="TEXTS.jsonl", help="time whole precompute jobs over these texts")
    parser.add_argument("--job-rows", type=int, default=120, help="texts in the big whole job (small: a quarter)")
    parser.add_argument("--job-engine", choices=("hf", "vllm"), default="hf", help="engine of the whole jobs")
    parser.add_argument("--jobs", action="append", metavar="NAME",
                        help="a whole-job variant to run beside the bare job, once per variant (names hold "
                        "commas, so repeat the flag); default: all of the engine's, e.g. 'vllm logprobs path'")
    parser.add_argument("--job-engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an --engine-arg for every whole job, the bare vLLM job included (e.g. enforce_eager=true)")
    parser.add_argument("--vllm-contention", action="store_true",
                        help="vLLM's encode alone and with our head + top-K running beside it (one engine)")
    parser.add_argument("--path-error", action="store_true",
                        help="with --whole-job: each vLLM path's log-probs against an fp32 transformers forward")
    parser.add_argument("--error-rows", type=int, default=100, help="texts for --path-error")
    parser.add_argument("--head-scale", type=float, default=1.0, help="--path-error: scale the LM head's weight")
    parser.add_argument("--job-own-work", action="store_true",
                        help="with --whole-job: the job's own work per position, the teacher replaced by replayed rows")
    parser.add_argument("--job-backends", default="zarr,arrow", help="backends for --job-own-work")
    parser.add_argument("--topk-micro", action="store_true",
                        help="fused vs unfused head + top-K in-process, at 1 and 2 torch threads (wall and CPU time)")
    parser.add_argument("--micro-rows", type=int, default=1024, help="rows for --topk-micro and --head-widths")
    parser.add_argument("--head-widths", metavar="H,H,...",
                        help="the fused head vs the head matmul alone at these hidden sizes (1 thread, CPU time)")
    parser.add_argument("--model", help=argparse.SUPPRESS)  # --bare-job's model (internal)
    parser.add_argument("--bare-job", metavar="TEXTS.jsonl", help=argparse.SUPPRESS)
    parser.add_argument("--bare-vllm-job", metavar="TEXTS.jsonl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.bare_job:
        bare_job(args.model, args.bare_job, 1 << 30, args.batch_tokens)
        return
    if args.bare_vllm_job:
        bare_vllm_job(args.model, args.bare_vllm_job, "enforce_eager=true" in args.job_engine_arg)
        return
    if args.topk_micro:
        bench_topk_micro(args)
        return
    if args.vllm_contention:
        with tempfile.TemporaryDirectory() as tmp:
            bench_vllm_contention(_model(tmp, args.layers, args.hidden, args.vocab), args)
        return
    if args.head_widths:
        bench_head_widths(args)
        return
    if args.whole_job:
        with tempfile.TemporaryDirectory() as tmp:
            if args.job_own_work:
                bench_job_own_work(_model(tmp, args.layers, args.hidden, args.vocab), args)
                return
            if args.path_error:
                bench_path_error(_model(tmp, args.layers, args.hidden, args.vocab), args)
                return
            bench_whole_job(_model(tmp, args.layers, args.hidden, args.vocab), args)
        return

    from logitcache.stages.precompute.engines import Request

    rng = np.random.default_rng(0)
    requests = [
        Request(token_ids=rng.integers(0, 600, args.seq_len).tolist(), positions=np.arange(args.seq_len - 1))
        for _ in range(args.seqs)
    ]
    positions = args.seqs * (args.seq_len - 1)
    with tempfile.TemporaryDirectory() as tmp:
        model = _model(tmp, args.layers, args.hidden, args.vocab)
        results = []
        if "hf" in args.engines:
            results.append(bench_hf(model, requests, args))
        if "vllm" in args.engines:
            results.append(bench_vllm(model, requests, args))
    print(
        f"\n{args.layers} layers x {args.hidden} wide, logits width {args.vocab}, {args.seqs} x {args.seq_len} tokens, "
        f"k={args.k}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(f"{'path':58s} {'seconds':>8s} {'positions/s':>12s} {'of limit':>9s}")
    for (limit_name, limit), *paths in results:
        print(f"{limit_name:58s} {limit:8.2f} {positions / limit:12.0f} {'1.00':>9s}")
        for name, seconds in paths:
            print(f"{name:58s} {seconds:8.2f} {positions / seconds:12.0f} {limit / seconds:9.2f}")


if __name__ == "__main__":
    main()
