"""Stage two on one GPU: SFT vs cached KL and BiLD, fused head + loss vs the model's logits; s/step and peak GiB.

    python benchmarks/gpu_train.py                    # one H200/H100: Qwen2.5-0.5B shape, 8 x 2,048 tokens, bf16
    python benchmarks/gpu_train.py --smoke            # any machine (CPU too): tiny shapes, checks the script runs

Where logitcache is not installed (the lent GPU machine), from the checkout's root, as for
gpu_precompute.py (see there why a folder of links):

    mkdir -p /tmp/lc/logitcache && ln -sfn "$PWD/pipeline" "$PWD/stages" "$PWD/storage" /tmp/lc/logitcache/
    PYTHONPATH=/tmp/lc python3 benchmarks/gpu_train.py --out $OUT/gpu_train.json

A prepared script for a lent GPU (about 4-7 minutes on an H100/H200, estimated; `--no-fsdp` 3-5;
needs torch and transformers, no vLLM or zarr, nothing downloaded; tests/test_gpu_scripts.py runs
`--smoke` with those blocked).
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
    fsdp_hf_sft, fsdp_kl   hf_sft and kl on a second copy of the student under FSDP2 (`fully_shard` on each
                    decoder layer and the root, one rank: what `--fsdp full_shard` runs, less the sharding)
    fsdp_kl_fused   kl through the fused head under FSDP2, by the calls `KDTrainer._fused_loss` makes
                    (`final_hidden`, `head_weights`, `fused_head_loss`). Tried at the warm-up; while the
                    fused head under FSDP does not exist (issue 25 item 1), it fails there and the row is
                    recorded under "skipped" with the error, and the other rows run.

Prints and writes `--out` (benchmarks/out/gpu_train.json): median s/step, peak GiB (torch.cuda.max_memory_allocated
over the mode's steps), and both relative to hf_sft; rows that could not run go under "skipped". The numbers to beat, from the issue: on an H100,
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
FSDP_MODES = {"fsdp_hf_sft": "hf_sft", "fsdp_kl": "kl+ce", "fsdp_kl_fused": "kl+ce_fused"}


def one_rank_fsdp(model, device: str):
    """`model` under FSDP2 on a one-rank process group (nccl on CUDA, gloo on CPU), as `--fsdp full_shard`
    wraps it: each decoder layer its own unit, then the root."""
    import os
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def fsdp_fused_step(student, opt, *, optimizer_step: bool = True):
    """kl + CE through the fused head on an FSDP2 model, by `KDTrainer._fused_loss`'s calls."""
    from logitcache.stages.train.batch_loss import final_hidden, fused_head_loss, head_weights
    from logitcache.stages.train.loss_settings import loss_settings

    def run(b):
        opt.zero_grad(set_to_none=optimizer_step)
        hidden = final_hidden(student, student, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]},
                              use_cache=False)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, b["rows"])
        weight, bias = head_weights(student, None)
        loss, _ = fused_head_loss(hidden, weight, bias, b, loss_settings("kl", ce_weight=1.0, kd_weight=1.0))
        loss.backward()
        if optimizer_step:
            opt.step()
        if b["input_ids"].is_cuda:
            torch.cuda.synchronize()

    return run


def gradient_mismatch(plain, sharded, plain_run, sharded_run, batch, tol: float = 2e-2) -> str | None:
    """Why one backward of `sharded_run` on the FSDP model does not give the plain model's gradients
    (the same weights, the same batch), or None when every parameter's agrees within `tol` (relative,
    bf16). A fused head that reads the sharded weight outside the forward can run and still be wrong."""
    plain_run(batch)
    sharded_run(batch)
    named = dict(sharded.named_parameters())
    for name, p in plain.named_parameters():
        q = named[name].grad
        if q is None:
            return f"{name} gets no gradient under FSDP"
        q = q.full_tensor() if hasattr(q, "full_tensor") else q
        err = (q.float() - p.grad.float()).norm() / p.grad.float().norm().clamp_min(1e-12)
        if not err <= tol:
            return f"{name}'s gradient differs from the unsharded model's by {float(err):.3g} (relative)"
    return None


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
    p.add_argument("--no-fsdp", action="store_true", help="leave out the FSDP2 rows")
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
    if not a.no_fsdp:  # the same weights (seed 1), wrapped; the fused row on a copy of its own, so that
        # its failure (while it does not exist) leaves no half-run FSDP state behind for the others.
        def wrapped():
            model = one_rank_fsdp(llama(vocab, hidden, layers, 1, dtype, device, attn_implementation="sdpa",
                                        **config).train(), device)
            return model, torch.optim.AdamW(model.parameters(), lr=1e-5)

        sharded, fsdp_opt = wrapped()
        runs.update({m: step_fn(FSDP_MODES[m], sharded, None, fsdp_opt) for m in ("fsdp_hf_sft", "fsdp_kl")})
        fused_model, fused_opt = wrapped()
        runs["fsdp_kl_fused"] = fsdp_fused_step(fused_model, fused_opt)
    skipped = {}
    if not a.no_fsdp:  # before any step, while the copies hold the same weights
        try:
            why = gradient_mismatch(student, fused_model, step_fn("kl+ce_fused", student, None, opt, optimizer_step=False),
                                    fsdp_fused_step(fused_model, fused_opt, optimizer_step=False), batches[0])
        except Exception as e:  # noqa: BLE001 (recorded below)
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if why is not None:
            skipped["fsdp_kl_fused"] = why
            del runs["fsdp_kl_fused"]
    for m, run in list(runs.items()):  # warm-up: kernels, allocator, AdamW state
        try:
            run(batches[0])
        except Exception as e:  # noqa: BLE001 (a row that cannot run yet is recorded, not fatal)
            if not m.startswith("fsdp_"):
                raise
            skipped[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            del runs[m]
    modes = list(runs)
    wall = {m: [] for m in modes}
    peak = {m: 0 for m in modes}
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
              "seconds_per_step": med, "peak_gib": gib, "skipped": skipped,
              "time_relative_to_hf_sft": {m: med[m] / med["hf_sft"] for m in modes},
              "peak_relative_to_hf_sft": {m: (gib[m] / gib["hf_sft"]) if gib["hf_sft"] else None for m in modes},
              "total_seconds": time.perf_counter() - started}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"{result['setup']['device']}: student {layers}x{hidden}, V = {vocab}, {a.batch}x{a.seq} tokens "
          f"({result['setup']['supervised_per_step']} supervised), bf16; median of {len(wall['hf_sft'])} steps")
    for m in modes:
        print(f"  {m:13s} {med[m]:8.4f} s/step  {med[m] / med['hf_sft']:5.2f}x hf_sft   peak {gib[m]:6.2f} GiB")
    for m, why in skipped.items():
        print(f"  {m:13s} not run: {why}")
    print(f"total {result['total_seconds']:.0f} s")
    if not a.no_fsdp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
