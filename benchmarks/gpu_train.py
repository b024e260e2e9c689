"""Stage two on one GPU: SFT vs cached KL and BiLD, fused head + loss vs the model's logits; s/step and peak GiB.

    python benchmarks/gpu_train.py                    # one H200/H100: Qwen2.5-0.5B shape, 8 x 2,048 tokens, bf16
    python benchmarks/gpu_train.py --smoke            # any machine (CPU too): tiny shapes, checks the script runs

Where logitcache is not installed (the lent GPU machine), from the checkout's root, as for
gpu_precompute.py (see there why a folder of links):

    mkdir -p /tmp/lc/logitcache && ln -sfn "$PWD/pipeline" "$PWD/stages" "$PWD/storage" /tmp/lc/logitcache/
    PYTHONPATH=/tmp/lc python3 benchmarks/gpu_train.py --out $OUT/gpu_train.json

A prepared script for a lent GPU (about 3-5 minutes on an H100/H200; needs torch and transformers,
no vLLM or zarr, nothing downloaded; tests/test_gpu_scripts.py runs `--smoke` with those blocked).
The student has Qwen2.5-0.5B's shape (24 layers, hidden 896,
14 heads with 2 KV heads, MLP 4,864, tied embeddings, V = 151,936) with random weights, in bf16,
SDPA attention; a batch is 8 sequences of 2,048 random tokens whose last 1,536 are supervised. The
cache is the top-32 of a random long-tailed teacher at every supervised position (timings do not
depend on its values). One optimizer step = forward, loss, backward, AdamW step.

Modes, interleaved round by round on the same batches:
    hf_sft          the model's own loss (`model(labels=...)`: F.cross_entropy on its logits)
    ce_sft          F.cross_entropy on the model's logits at the supervised rows (upcast to fp32)
    kl, bild        cached forward KL / BiLD k=8 + CE, through `loss_parts` on the model's logits
    kl_fused, bild_fused   the same through `fused_head_loss` (the (B, T, V) logits never exist)
    sft_fused       our CE alone through the fused head

Prints and writes `--out` (benchmarks/out/gpu_train.json): median s/step, peak GiB (torch.cuda.max_memory_allocated
over the mode's steps), and both relative to hf_sft. The numbers to beat, from the issue: on an H100,
naive cached BiLD took 1.70x the SFT step and cached KL 1.27x.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import add_random_cache, llama, make_batches, step_fn  # noqa: E402

OUT = Path(__file__).parent / "out"
QWEN25_05B = dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                  rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768)
# bench_train's names for the loss of each mode.
MODES = {"hf_sft": "hf_sft", "ce_sft": "ce_sft", "sft_fused": "sft_fused", "kl": "kl+ce", "kl_fused": "kl+ce_fused",
         "bild": "bild+ce", "bild_fused": "bild+ce_fused"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device there is")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--prompt", type=int, default=512, help="unsupervised tokens at the start of each sequence")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    p.add_argument("--out", type=Path, default=OUT / "gpu_train.json", help="where the JSON result goes")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = dict(QWEN25_05B)
    if a.smoke:
        config.update(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
        a.batch, a.seq, a.prompt, a.rounds, a.steps = 2, 64, 16, 1, 1
    elif device != "cuda":
        sys.exit("gpu_train.py: no CUDA device; run with --smoke to check the script on CPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16
    started = time.perf_counter()
    vocab = config.pop("vocab_size")
    hidden, layers = config.pop("hidden_size"), config.pop("num_hidden_layers")
    student = llama(vocab, hidden, layers, 1, dtype, device, attn_implementation="sdpa", **config).train()
    batches = make_batches(a.steps, a.batch, a.seq, vocab, a.prompt, device)
    add_random_cache(batches, vocab, a.k)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    runs = {m: step_fn(name, student, None, opt) for m, name in MODES.items()}
    for run in runs.values():  # warm-up: kernels, allocator, AdamW state
        run(batches[0])
    wall = {m: [] for m in MODES}
    peak = {m: 0 for m in MODES}
    for _ in range(a.rounds):
        for m, run in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            for b in batches:
                t0 = time.perf_counter()
                run(b)  # synchronizes at its end on CUDA
                wall[m].append(time.perf_counter() - t0)
            if device == "cuda":
                peak[m] = max(peak[m], torch.cuda.max_memory_allocated())
    med = {m: statistics.median(v) for m, v in wall.items()}
    gib = {m: v / 2**30 for m, v in peak.items()}
    result = {"setup": {**vars(a), "device": torch.cuda.get_device_name() if device == "cuda" else platform.machine(),
                        "torch": torch.__version__, "vocab": vocab, "hidden": hidden, "layers": layers,
                        "supervised_per_step": len(batches[0]["rows"]), "dtype": str(dtype)},
              "seconds_per_step": med, "peak_gib": gib,
              "time_relative_to_hf_sft": {m: med[m] / med["hf_sft"] for m in MODES},
              "peak_relative_to_hf_sft": {m: (gib[m] / gib["hf_sft"]) if gib["hf_sft"] else None for m in MODES},
              "total_seconds": time.perf_counter() - started}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"{result['setup']['device']}: student {layers}x{hidden}, V = {vocab}, {a.batch}x{a.seq} tokens "
          f"({result['setup']['supervised_per_step']} supervised), bf16; median of {len(wall['hf_sft'])} steps")
    for m in MODES:
        print(f"  {m:11s} {med[m]:8.4f} s/step  {med[m] / med['hf_sft']:5.2f}x hf_sft   peak {gib[m]:6.2f} GiB")
    print(f"total {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
