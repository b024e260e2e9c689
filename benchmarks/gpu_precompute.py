"""The hf engine on one GPU: bare forward vs unfused vs fused head + top-K, Qwen2 shapes.

    python benchmarks/gpu_precompute.py                    # one H100/H200, ~6 min (see below); a table + JSON
    python benchmarks/gpu_precompute.py --shapes 1.5b --tokens 2048 --seqs 2   # a quick look
    .venv/bin/python benchmarks/gpu_precompute.py --smoke      # CPU, a tiny body, V = 4,096: checks the script runs
    .venv/bin/python benchmarks/gpu_precompute.py --dry-run-cpu   # CPU: the GPU rows' code, interpreted

Where logitcache is not installed (the lent GPU machine: its python3 has torch and transformers,
nothing can be installed), from the checkout's root. pyproject.toml maps the folders pipeline/,
stages/ and storage/ to `logitcache.*` (a namespace with no folder of its own, so PYTHONPATH=.
does not do); a folder of links to them does:

    mkdir -p /tmp/lc/logitcache && ln -sfn "$PWD/pipeline" "$PWD/stages" "$PWD/storage" /tmp/lc/logitcache/
    PYTHONPATH=/tmp/lc python3 benchmarks/gpu_precompute.py

Prepared as a one-shot run for a lent GPU machine: PyTorch and transformers only (no vLLM, no
zarr, no downloads; tests/test_gpu_scripts.py runs `--smoke` that way, with those blocked). For
each shape (Qwen2-1.5B and Qwen2-7B configs, random bf16 weights, logits width `--vocab`, 151,936
by default) and `--seqs` x `--tokens` tokens (8 x 2048 by default), every position supervised,
it times:

- **bare forward**: `model(input_ids).logits`, the whole (tokens x V) logits in bf16; the limit.
- **hf engine, unfused**: the body, then our head a chunk of rows at a time, each chunk's fp32
  logits walked by `sparsify.topk_targets` (what the engine did before `fused_topk`).
- **hf engine, fused, torch tile fold**: the body, then `fused_topk_targets` (head tile ->
  online logsumexp -> running top-K with torch ops; no (rows x V) fp32 block).
- **hf engine, fused, Triton kernel**: the body, then `fused_topk_triton.triton_topk_targets`
  (the logits live only in registers), with its untuned default blocks; what the engine runs on
  CUDA by default (`fused_kernel="auto"`).
- **Triton sweep** (first shape only): the same with 4 other (BM, BN, splits, inserts) choices.
- **fused, torch.compile**: the torch fold with each tile's fold compiled (skipped with the
  reason if compilation fails).

Each is the median of `--repeats` timed runs after two warm-ups, with `torch.cuda.synchronize()`.
The ratio column is bare time / path time (goal >= 0.95). Every fused output is also checked
against the unfused output (top-K log-probs within bf16 noise) so a fast wrong kernel cannot pass.

Time on one H200, estimated (not measured: no GPU was lent when this was written): model set-up
~5 s (1.5B) and ~15 s (7B); ~40 timed or warm-up runs per shape at ~0.1 s (1.5B) and ~0.5 s (7B);
Triton compiles ~30-60 s each (6: one per shape, one per sweep row), torch.compile ~1-2 min per shape.
About 6 min in all. The optional rows (sweep, torch.compile) are skipped, and say so, once the run
has taken `--budget-s` (420 s), so the script ends within 8 minutes even if compiles are slow.

`--smoke` (CPU) runs the script's code paths at a tiny body and, for the Triton row, the kernel
under Triton's interpreter on a 256-id slice of the head (K = 8) (the interpreter is far too slow for
151,936 ids); it checks the code runs and agrees, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback

import torch

SHAPES = {
    # Qwen2-1.5B and Qwen2-7B (config.json of the released checkpoints), random weights.
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False),
}
VOCAB = 151_936  # Qwen2's logits width
SMOKE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, tie_word_embeddings=True)


class WrongResult(Exception):
    """A fused path's output differs from the unfused one beyond bf16 noise."""


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# (block_rows, block_vocab, splits, inserts) tried beside the defaults (64, 128, auto, 8) on the first
# shape; untuned guesses. inserts: the most candidates a subtile may have and still merge by insertion.
SWEEP = [(128, 128, None, 8), (64, 256, None, 8), (64, 128, 2, 8), (64, 128, None, 16)]


def _diff(a: dict, b: dict) -> float:
    return float(abs(a["topk_logprobs"] - b["topk_logprobs"]).max())


def bench_shape(name: str, args, started: float, sweep: bool) -> list[dict]:
    from transformers import AutoModelForCausalLM, Qwen2Config

    from logitcache.stages.precompute.engines.base import targets_from_hidden
    from logitcache.stages.precompute.targets import Targets
    from logitcache.stages.precompute.fused_topk import fused_topk_targets
    from logitcache.stages.precompute.head import head_from_model

    on_cpu = args.smoke or args.dry_run_cpu
    device = "cpu" if on_cpu else "cuda"
    config = Qwen2Config(vocab_size=args.vocab, max_position_embeddings=max(4096, args.tokens),
                         **(SMOKE if on_cpu else SHAPES[name]))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    head = head_from_model(model)
    ids = torch.randint(0, args.vocab, (args.seqs, args.tokens), device=device)
    next_ids = torch.roll(ids, -1, dims=1).reshape(-1)
    spec = Targets("topk", args.k)
    positions = args.seqs * args.tokens
    rows = []

    @torch.inference_mode()
    def bare():
        model(input_ids=ids, use_cache=False).logits

    @torch.inference_mode()
    def engine(fused: bool, compiled: bool = False, kernel: str = "torch", blocks: dict | None = None):
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state.reshape(positions, -1)
        if compiled:
            return fused_topk_targets(hidden, head, next_ids, args.k)
        if blocks is not None:
            from logitcache.stages.precompute.fused_topk_triton import triton_topk_targets

            return triton_topk_targets(hidden, head, next_ids, args.k, **blocks)
        return targets_from_hidden(hidden, head, next_ids, spec, fused=fused, fused_kernel=kernel)

    def checked(label: str, out: dict) -> float:
        err = _diff(unfused, out)
        if not err < 5e-2:  # bf16 logits: ties and rounding, not a wrong kernel
            raise WrongResult(f"top-K log-probs differ from unfused by {err:.3g}")
        return err

    def row(label: str, fn, repeats: int, warm: int = 2) -> bool:
        """Check `fn`'s output against unfused, then time it; a failure (a compile error, a wrong
        result) is recorded in the row and the other rows still run."""
        try:
            err = checked(label, fn())
            rows.append({"shape": name, "path": label, "max_abs_diff": err, "seconds": _timed(fn, repeats, warm)})
            return True
        except Exception as e:  # noqa: BLE001 - a one-shot run reports what failed and goes on
            traceback.print_exc()
            rows.append({"shape": name, "path": label, "seconds": None, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            return False

    bare_s = _timed(bare, args.repeats)
    rows.append({"shape": name, "path": "bare forward (limit)", "seconds": bare_s})
    unfused = engine(False)
    rows.append({"shape": name, "path": "hf engine, unfused", "seconds": _timed(lambda: engine(False), args.repeats)})
    row("hf engine, fused, torch tile fold", lambda: engine(True), args.repeats)
    if args.smoke:
        rows.append(_interpreter_smoke(model, head, spec))
    elif row("hf engine, fused, Triton kernel", lambda: engine(True, kernel="triton", blocks=None if device == "cuda"
                                                              else {}), args.repeats):  # the engines refuse CPU
        for bm, bn, splits, inserts in SWEEP if sweep else []:
            label = f"  Triton BM={bm} BN={bn} splits={splits or 'auto'} inserts={inserts}"
            if time.perf_counter() - started > args.budget_s:
                rows.append({"shape": name, "path": label, "seconds": None, "error": "skipped (--budget-s)"})
                continue
            blocks = {"block_rows": bm, "block_vocab": bn, "splits": splits, "inserts": inserts}
            row(label, lambda: engine(True, blocks=blocks), max(1, args.repeats - 2), warm=1)
    try:
        if args.no_compile:
            raise RuntimeError("skipped (--no-compile)")
        if time.perf_counter() - started > args.budget_s:
            raise RuntimeError("skipped (--budget-s)")
        import logitcache.stages.precompute.fused_topk as ft

        plain = ft._fold_chunk
        ft._fold_chunk = torch.compile(plain, dynamic=False)
        try:
            rows.append({"shape": name, "path": "hf engine, fused + torch.compile",
                         "seconds": _timed(lambda: engine(True, compiled=True), args.repeats)})
        finally:
            ft._fold_chunk = plain
    except Exception as e:  # noqa: BLE001 - report why compile did not get there, keep the other rows
        rows.append({"shape": name, "path": "hf engine, fused + torch.compile", "seconds": None,
                     "error": f"{type(e).__name__}: {str(e)[:200]}"})
    for r in rows:
        timed = r["seconds"] and not r.get("interpreted")  # the smoke's interpreter row: another size
        r["tokens_per_s"] = positions / r["seconds"] if timed else None
        r["of_bare"] = bare_s / r["seconds"] if timed else None
    del model, head
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def _interpreter_smoke(model, head, spec) -> dict:
    """The Triton row on CPU: the kernel under Triton's interpreter, 16 rows x a 256-id slice of
    the head, K = 8, checked against the unfused path on the same slice (tail and all)."""
    from logitcache.stages.precompute.engines.base import targets_from_hidden
    from logitcache.stages.precompute.targets import Targets
    from logitcache.stages.precompute.fused_topk_triton import triton_topk_targets
    from logitcache.stages.precompute.head import LMHead

    small = LMHead(weight=head.weight[:256], bias=None if head.bias is None else head.bias[:256],
                   hidden_scale=head.hidden_scale, logit_scale=head.logit_scale, softcap=head.softcap)
    with torch.inference_mode():
        hidden = model.base_model(input_ids=torch.arange(16)[None], use_cache=False).last_hidden_state[0]
    next_ids = torch.arange(16) * 15
    t0 = time.perf_counter()
    got = triton_topk_targets(hidden, small, next_ids, 8, block_rows=16, block_vocab=32, block_hidden=64, splits=2)
    seconds = time.perf_counter() - t0
    err = _diff(targets_from_hidden(hidden, small, next_ids, Targets("topk", 8), fused=False), got)
    if not err < 5e-2:
        raise WrongResult(f"smoke: the interpreted Triton kernel differs from unfused by {err}")
    return {"shape": "smoke", "path": "Triton kernel, interpreter, 16 x 256", "seconds": seconds, "max_abs_diff": err,
            "interpreted": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1.5b,7b", help="comma-separated: 1.5b, 7b")
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=VOCAB, help="logits width (default Qwen2's, 151,936)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row, after two warm-ups (default 3)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="after this many seconds, skip the optional rows (sweep, torch.compile); default 420")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, a tiny body, V = 4,096, 2 x 64 tokens, no torch.compile: does the script run")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="CPU, a tiny body, 1 x 16 tokens, --vocab 256, K = 8: every GPU row, the Triton ones "
                             "and the sweep under Triton's interpreter (~6 min here): does the GPU path's code run")
    args = parser.parse_args()
    if args.smoke or args.dry_run_cpu:
        # The Triton rows run the kernel under Triton's interpreter, which must be on before
        # triton is first imported (by transformers or by our kernel's module).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.smoke:
        # V = 4,096: a bf16 matmul 151,936 wide takes seconds on a CPU, and the smoke checks that it runs.
        args.shapes, args.vocab, args.seqs, args.tokens, args.repeats, args.no_compile = "1.5b", 4096, 2, 64, 1, True
    elif args.dry_run_cpu:
        args.shapes, args.seqs, args.tokens, args.repeats, args.no_compile = "1.5b", 1, 16, 1, True
        args.vocab, args.k = 256, 8
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_precompute.py needs a CUDA GPU (or --smoke / --dry-run-cpu on CPU)")
    import transformers

    name = "cpu" if args.smoke or args.dry_run_cpu else torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}")
    rows = []
    started = time.perf_counter()
    for i, name in enumerate(args.shapes.split(",")):
        new = bench_shape(name.strip(), args, started, sweep=i == 0)
        rows += new
        for row in new:
            secs = f"{row['seconds']:.3f}" if row["seconds"] else "-"
            tps = f"{row['tokens_per_s']:,.0f}" if row["tokens_per_s"] else row.get("error", "-")
            ratio = f"{row['of_bare']:.2f}" if row["of_bare"] else "-"
            print(f"{row['shape']:5s} {row['path']:44s} {secs:>8s} s {tps:>14s} tok/s {ratio:>5s}", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
