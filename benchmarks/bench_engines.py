"""Positions per second of each teacher-engine path against its own limit, on the same tokens.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python benchmarks/bench_engines.py            # CPU, ~3 min
    python benchmarks/bench_engines.py --layers 4 --hidden 256 --vocab 4096 --seqs 64 --seq-len 512 --k 32

Every position of every sequence is supervised. The limits are what a path cannot beat:
- hf: the bare transformers forward in the same length batches, logits at every position
  (`model(input_ids).logits`), no log-softmax, no top-K.
- vllm: vLLM's prefill of the same prompts without logprobs (`max_tokens=1`), plus this
  process's LM head (a matmul) at every position.
The ratio is limit time / path time: the fraction of the limit the path captures.

The model is a random Llama (scratch.py) whose logits width is padded to `--vocab`; only the
width matters for cost. Each timing is the best of `--repeats` after a warm-up run.
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
    prompts = [{"prompt_token_ids": list(r.token_ids)} for r in requests]
    plain = SamplingParams(max_tokens=1, detokenize=False)
    prefill = _best(lambda: engine.llm.generate(prompts, plain, use_tqdm=False), args.repeats)
    rows.append(("vllm logprobs path", _best(lambda: engine.run(requests), args.repeats)))
    engine.close()
    return [(f"vllm limit: prefill {prefill:.2f} s + head everywhere {head:.2f} s", prefill + head)] + rows


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
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
