"""Training-step benchmark: cached KD (BiLD k=8 from a K=32 cache; forward KL) vs plain SFT vs online KD.

    .venv/bin/python benchmarks/bench_train.py                 # ~10 min on one busy CPU core
    .venv/bin/python benchmarks/bench_train.py --quick         # smaller vocabulary and batch, a smoke run
    .venv/bin/python benchmarks/bench_train.py --fused         # V = 151,936: fused head + loss vs the model's logits
    .venv/bin/python benchmarks/bench_train.py --memory        # V = 151,936: peak memory of one step per mode
    .venv/bin/python benchmarks/bench_train.py --device cuda --vocab 151936 --hidden 896 --layers 24 \\
        --teacher-hidden 1536 --teacher-layers 28 --batch 4 --seq 1024 --dtype bfloat16   # Qwen2-0.5B / 1.5B shapes

One optimizer step = forward, loss, backward, AdamW step, on the same student and the same batches
for every mode (random weights; timings do not depend on them):

- sft:          cross entropy on the supervised rows (`trainer.loss_parts` with loss "sft").
- kl / bild:    the cached losses from a top-32 cache computed once from the teacher, KD term only
                (ce_weight 0) and CE + KD (weights 1, 1), through the same `loss_parts` training uses.
- online_kl:    the teacher in the loop: its forward pass (no grad) every step + CE + full-vocabulary
                forward KL at the supervised rows.
- hf_sft:       the model's own loss (`model(labels=...)`), for reference.
- ce_sft:       plain `F.cross_entropy` on the model's logits at the supervised rows, upcast to fp32.
- *_fused:      the same loss through `batch_loss.fused_head_loss`: the student's body to its final
                hidden states, then the LM head and the loss a chunk of supervised rows at a time
                (what `logitcache train` runs by default); the (B, T, V) logits are never built.

`--fused` times sft, ce_sft, hf_sft and kl+ce / bild+ce fused and unfused at the real vocabulary
width; `--memory` runs each of those modes' steps in a fresh process (glibc returning freed memory at
once) and records the peak RSS growth of one step after a warm-up step (AdamW state allocated), in
MiB and in units of one (tokens x V) fp32 logits tensor. Writes benchmarks/out/train_memory.json.

Modes are interleaved round by round and each is reported as the median over all rounds, so a load
change on a shared machine hits every mode alike. Both wall time and this process's CPU time per step
are recorded; on a shared CPU the ratios are taken on CPU time, which other jobs do not inflate
(on a GPU, use wall time). Writes benchmarks/out/train_steps.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from logitcache.stages.train.batch_loss import fused_head_loss, loss_parts, supervised_logits
from logitcache.stages.train.loss_settings import loss_settings

OUT = Path(__file__).parent / "out"


def llama(vocab: int, hidden: int, layers: int, seed: int, dtype, device, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), head_dim=64,
                                   max_position_embeddings=4096), **config})
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def make_batches(n: int, batch: int, seq: int, vocab: int, prompt: int, device) -> list[dict]:
    """Random token batches; the first `prompt` tokens of each sequence are unsupervised (as in prompt/response)."""
    out = []
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        pos = torch.arange(prompt - 1, seq - 1)
        rows = (torch.arange(batch)[:, None] * seq + pos[None]).reshape(-1)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "rows": rows.to(device), "next_ids": ids[:, pos + 1].reshape(-1).to(device)})
    return out


@torch.no_grad()
def add_random_cache(batches: list[dict], vocab: int, k: int, *, rows_per_chunk: int = 1024) -> None:
    """Top-k of a random long-tailed teacher (logits 3 * N(0, 1)) at the supervised rows: no teacher model needed."""
    g = torch.Generator(device=batches[0]["rows"].device).manual_seed(1)
    for b in batches:
        ids, lps = [], []
        for lo in range(0, len(b["rows"]), rows_per_chunk):
            n = min(rows_per_chunk, len(b["rows"]) - lo)
            t = torch.randn(n, vocab, generator=g, device=b["rows"].device).mul_(3).log_softmax(-1)
            lp, top = t.topk(k, dim=-1)
            ids.append(top)
            lps.append(lp)
        top, top_lp = torch.cat(ids), torch.cat(lps)
        b.update(teacher_ids=top, teacher_logprobs=top_lp, tail_mass=(1 - top_lp.exp().sum(-1)).clamp_min(0),
                 kd_select=torch.arange(len(b["rows"]), device=top.device))


@torch.no_grad()
def add_cache(batches: list[dict], teacher, k: int) -> None:
    """Top-k of the teacher's log-softmax at the supervised rows, as stage one stores it."""
    for b in batches:
        logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lp = torch.log_softmax(supervised_logits(logits, b["rows"], None).float(), -1)
        top_lp, top = lp.topk(k, dim=-1)
        b.update(teacher_ids=top, teacher_logprobs=top_lp, tail_mass=(1 - top_lp.exp().sum(-1)).clamp_min(0),
                 kd_select=torch.arange(len(b["rows"]), device=lp.device))


def step_fn(mode: str, student, teacher, opt, *, optimizer_step: bool = True, chunk_size: int | None = None):
    """One optimizer step of `mode` on a batch (without `optimizer_step`: forward and backward into
    the existing, zeroed .grad buffers, i.e. the loss step alone)."""
    kinds = {"sft": loss_settings("sft"), "kl": loss_settings("kl", ce_weight=0.0), "kl+ce": loss_settings("kl"),
             "bild": loss_settings("bild", top_k=8), "bild+ce": loss_settings("bild", top_k=8, ce_weight=1.0)}

    def run(b):
        opt.zero_grad(set_to_none=optimizer_step)
        if mode.endswith("_fused"):
            hidden = student.get_decoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, b["rows"])
            head = student.get_output_embeddings()
            loss, _ = fused_head_loss(hidden, head.weight, head.bias, b, kinds[mode[: -len("_fused")]],
                                      chunk_size=chunk_size)
        elif mode == "ce_sft":
            s = supervised_logits(student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["rows"], None)
            loss = torch.nn.functional.cross_entropy(s.float(), b["next_ids"])
        elif mode == "hf_sft":
            labels = torch.full_like(b["input_ids"], -100)
            labels.view(-1)[b["rows"] + 1] = b["next_ids"]
            loss = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
        elif mode == "online_kl":
            with torch.no_grad():
                t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                t_lp = torch.log_softmax(supervised_logits(t_logits, b["rows"], None).float(), -1)
            s = supervised_logits(student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["rows"], None)
            s_lp = torch.log_softmax(s.float(), -1)
            kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1).mean()
            loss = torch.nn.functional.cross_entropy(s.float(), b["next_ids"]) + kl
        else:
            s = supervised_logits(student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["rows"], None)
            loss, _ = loss_parts(s, b, kinds[mode])
        loss.backward()
        if optimizer_step:
            opt.step()
        if b["input_ids"].is_cuda:
            torch.cuda.synchronize()

    return run


FUSED_MODES = ["ce_sft", "hf_sft", "sft", "sft_fused", "kl+ce", "kl+ce_fused", "bild+ce", "bild+ce_fused"]


def memory_one(a) -> dict:
    """One mode's peak RSS growth over one step, after a warm-up step; run in a fresh process."""
    torch.set_num_threads(a.threads)
    student = llama(a.vocab, a.hidden, a.layers, 1, getattr(torch, a.dtype), "cpu", tie_word_embeddings=True).train()
    batches = make_batches(1, a.batch, a.seq, a.vocab, a.prompt, "cpu")
    add_random_cache(batches, a.vocab, a.k)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    step_fn(a.memory_one, student, None, opt)(batches[0])  # AdamW state and .grad buffers exist from here on
    run = step_fn(a.memory_one, student, None, opt, optimizer_step=a.memory_scope == "step", chunk_size=a.chunk_size)
    run(batches[0])
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = _status_bytes("VmRSS")
    run(batches[0])
    return {"mode": a.memory_one, "peak_growth": _status_bytes("VmHWM") - before}


def _status_bytes(field: str) -> int:
    return int(Path("/proc/self/status").read_text().split(field + ":")[1].split()[0]) * 1024


def memory_main(a) -> None:
    """Every mode's `memory_one` in its own process, with glibc handing freed memory back at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = {}
    modes = a.memory_modes.split(",") if a.memory_modes else FUSED_MODES
    for mode in modes:
        args = [sys.executable, __file__, "--memory-one", mode, "--vocab", str(a.vocab), "--hidden", str(a.hidden),
                "--layers", str(a.layers), "--batch", str(a.batch), "--seq", str(a.seq), "--prompt", str(a.prompt),
                "--k", str(a.k), "--dtype", a.dtype, "--threads", str(a.threads), "--memory-scope", a.memory_scope]
        if a.chunk_size:
            args += ["--chunk-size", str(a.chunk_size)]
        proc = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_growth"]
    tokens = a.batch * a.seq
    logits = tokens * a.vocab * 4
    result = {"setup": {**vars(a), "torch": torch.__version__}, "logits_fp32_bytes": logits,
              "peak_growth_mib": {m: v / 2**20 for m, v in out.items()},
              "peak_in_logits_units": {m: v / logits for m, v in out.items()},
              "relative_to_ce_sft": {m: v / out["ce_sft"] for m, v in out.items()}}
    OUT.mkdir(exist_ok=True)
    (OUT / f"train_memory_{a.memory_scope}.json").write_text(json.dumps(result, indent=1))
    print(f"peak RSS growth of one {a.memory_scope} step (fused chunk {a.chunk_size or 'auto'}): student {a.layers}x{a.hidden}, vocab {a.vocab}, {a.batch}x{a.seq} tokens, "
          f"{a.dtype}; one (tokens x V) fp32 logits = {logits / 2**20:.0f} MiB")
    for m in modes:
        print(f"  {m:14s} {out[m] / 2**20:8.0f} MiB  {out[m] / logits:5.2f} logits  {out[m] / out['ce_sft']:5.2f}x ce_sft")
    fused = {f"{m.replace('+ce', ' + CE')[:-6]} fused": round(out[m] / out["ce_sft"], 2)
             for m in ("kl+ce_fused", "bild+ce_fused") if m in out}
    if fused and "ce_sft" in out and not a.quick:
        from results import record

        scope = "one optimizer step" if a.memory_scope == "step" else "forward + backward alone"
        record("train.fused.memory" + ("" if a.memory_scope == "step" else ".loss_scope"), values=fused,
               met=max(fused.values()) <= 1.0,
               what=f"peak memory of {scope}, fused head + loss, V = {a.vocab:,}, × `F.cross_entropy` SFT")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--fused", action="store_true", help="time the fused head + loss at V = 151,936 (no online teacher)")
    p.add_argument("--memory", action="store_true", help="peak memory of one step per mode at V = 151,936")
    p.add_argument("--memory-one", metavar="MODE", help=argparse.SUPPRESS)
    p.add_argument("--memory-scope", choices=("step", "loss"), default="step",
                   help="--memory: the whole optimizer step, or the loss step alone (forward + backward into "
                   "existing .grad buffers)")
    p.add_argument("--memory-modes", help="--memory: comma-separated modes (default: all fused comparisons)")
    p.add_argument("--chunk-size", type=int, help="rows per chunk of the fused head + loss (default: automatic)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt", type=int, default=32, help="unsupervised tokens at the start of each sequence")
    p.add_argument("--k", type=int, default=32, help="cached ids per position")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no OpenMP spin-waits in CPU time)")
    a = p.parse_args()
    if a.memory_one:
        print(json.dumps(memory_one(a)))
        return
    if a.quick:
        a.vocab, a.seq, a.rounds, a.steps = 8192, 128, 3, 2
    if (a.fused or a.memory) and "--vocab" not in sys.argv:
        a.vocab = 151_936
    if a.memory:
        memory_main(a)
        return
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    student = llama(a.vocab, a.hidden, a.layers, 1, dtype, a.device, tie_word_embeddings=a.fused).train()
    batches = make_batches(a.steps, a.batch, a.seq, a.vocab, a.prompt, a.device)
    if a.fused:
        teacher = None
        add_random_cache(batches, a.vocab, a.k)
        modes = FUSED_MODES
    else:
        teacher = llama(a.vocab, a.teacher_hidden, a.teacher_layers, 0, dtype, a.device).eval()
        add_cache(batches, teacher, a.k)
        modes = ["sft", "hf_sft", "kl", "kl+ce", "bild", "bild+ce", "online_kl"]
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    wall = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    for m in modes:  # warm-up: allocator, AdamW state
        step_fn(m, student, teacher, opt)(batches[0])
    for _ in range(a.rounds):
        for m in modes:
            run = step_fn(m, student, teacher, opt)
            for b in batches:
                w0, c0 = time.perf_counter(), time.process_time()
                run(b)
                wall[m].append(time.perf_counter() - w0)
                cpu[m].append(time.process_time() - c0)
    timing = cpu if a.device == "cpu" else wall
    med = {m: statistics.median(v) for m, v in timing.items()}
    best = {m: min(v) for m, v in timing.items()}
    med_wall = {m: statistics.median(v) for m, v in wall.items()}
    n_rows = len(batches[0]["rows"])
    result = {"setup": {**vars(a), "positions_per_step": n_rows, "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()},
              "clock": "process cpu time" if a.device == "cpu" else "wall",
              "seconds_per_step": med, "min_seconds_per_step": best, "wall_seconds_per_step": med_wall,
              "relative_to_sft_min": {m: best[m] / best["sft"] for m in modes},
              "relative_to_sft": {m: med[m] / med["sft"] for m in modes}}
    base = "ce_sft" if a.fused else "online_kl"
    result[f"relative_to_{base}"] = {m: med[m] / med[base] for m in modes}
    OUT.mkdir(exist_ok=True)
    (OUT / ("train_steps_fused.json" if a.fused else "train_steps.json")).write_text(json.dumps(result, indent=1))
    print(f"student {a.layers}x{a.hidden}, teacher {'(cache only)' if a.fused else a.teacher_layers}x{a.teacher_hidden}, vocab {a.vocab}, "
          f"{a.batch}x{a.seq} tokens ({n_rows} supervised), K={a.k}, {a.device} {a.dtype}, "
          f"{torch.get_num_threads()} threads; median of {len(wall['sft'])} steps ({result['clock']})")
    for m in modes:
        print(f"  {m:14s} {med[m]:8.4f} s/step   {med[m] / med['sft']:5.2f}x sft   "
              f"{med[m] / med[base]:5.2f}x {base}   (min {best[m]:.3f} s = {best[m] / best['sft']:5.2f}x sft; "
              f"wall {med_wall[m]:.3f} s)")
    if a.device == "cpu" and not a.quick:
        from results import record

        rel = result["relative_to_sft"]
        if a.fused:
            values = {"kl + CE fused": round(rel["kl+ce_fused"] / rel["ce_sft"], 2),
                      "bild + CE fused": round(rel["bild+ce_fused"] / rel["ce_sft"], 2)}
            record("train.fused.time", values=values, met=max(values.values()) <= 1.05,
                   what=f"time per step, fused head + loss, V = {a.vocab:,}, × `F.cross_entropy` SFT "
                        f"(CPU time, {a.threads} thread{'s' if a.threads > 1 else ''})")
        else:
            values = {"kl + CE": round(rel["kl+ce"], 2), "bild + CE": round(rel["bild+ce"], 2)}
            setup = f"{a.layers} × {a.hidden} student, V = {a.vocab:,}, K = {a.k}; CPU time, {a.threads} thread"
            record("train.step.cached", values=values, met=max(values.values()) <= 1.10,
                   what=f"training step, cached KD + label CE, × plain SFT ({setup}{'s' if a.threads > 1 else ''})")
            record("train.step.online", values={"online KL + CE": round(rel["online_kl"], 2)},
                   what=f"training step, online KD ({a.teacher_layers} × {a.teacher_hidden} teacher in the loop) + CE, "
                        "× plain SFT")


if __name__ == "__main__":
    main()
