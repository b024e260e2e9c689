"""Training-step benchmark: cached KD (BiLD k=8 from a K=32 cache; forward KL) vs plain SFT vs online KD.

    .venv/bin/python benchmarks/bench_train.py                 # ~10 min on one busy CPU core
    .venv/bin/python benchmarks/bench_train.py --quick         # smaller vocabulary and batch, a smoke run
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

Modes are interleaved round by round and each is reported as the median over all rounds, so a load
change on a shared machine hits every mode alike. Both wall time and this process's CPU time per step
are recorded; on a shared CPU the ratios are taken on CPU time, which other jobs do not inflate
(on a GPU, use wall time). Writes benchmarks/out/train_steps.json.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from logitcache.stages.train.trainer import loss_parts, supervised_logits

OUT = Path(__file__).parent / "out"


def llama(vocab: int, hidden: int, layers: int, seed: int, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), head_dim=64, max_position_embeddings=4096)
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
                    "rows": rows.to(device), "targets": ids[:, pos + 1].reshape(-1).to(device)})
    return out


@torch.no_grad()
def add_cache(batches: list[dict], teacher, k: int) -> None:
    """Top-k of the teacher's log-softmax at the supervised rows, as stage one stores it."""
    for b in batches:
        logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lp = torch.log_softmax(supervised_logits(logits, b["rows"], None).float(), -1)
        top_lp, top = lp.topk(k, dim=-1)
        b.update(teacher_ids=top, teacher_logprobs=top_lp, tail_mass=(1 - top_lp.exp().sum(-1)).clamp_min(0),
                 kd_select=torch.arange(len(b["rows"]), device=lp.device))


def step_fn(mode: str, student, teacher, opt):
    """One optimizer step of `mode` on a batch."""
    kinds = {"sft": ("sft", {}, 1.0, 0.0), "kl": ("kl", {}, 0.0, 1.0), "kl+ce": ("kl", {}, 1.0, 1.0),
             "bild": ("bild", {"top_k": 8}, 0.0, 1.0), "bild+ce": ("bild", {"top_k": 8}, 1.0, 1.0)}

    def run(b):
        opt.zero_grad(set_to_none=True)
        if mode == "hf_sft":
            labels = torch.full_like(b["input_ids"], -100)
            labels.view(-1)[b["rows"] + 1] = b["targets"]
            loss = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
        elif mode == "online_kl":
            with torch.no_grad():
                t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                t_lp = torch.log_softmax(supervised_logits(t_logits, b["rows"], None).float(), -1)
            s = supervised_logits(student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["rows"], None)
            s_lp = torch.log_softmax(s.float(), -1)
            kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1).mean()
            loss = torch.nn.functional.cross_entropy(s.float(), b["targets"]) + kl
        else:
            name, options, ce_w, kd_w = kinds[mode]
            s = supervised_logits(student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["rows"], None)
            loss, _ = loss_parts(s, b, loss=name, options=options, ce_weight=ce_w, kd_weight=kd_w)
        loss.backward()
        opt.step()
        if b["input_ids"].is_cuda:
            torch.cuda.synchronize()

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
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
    if a.quick:
        a.vocab, a.seq, a.rounds, a.steps = 8192, 128, 3, 2
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    student = llama(a.vocab, a.hidden, a.layers, 1, dtype, a.device).train()
    teacher = llama(a.vocab, a.teacher_hidden, a.teacher_layers, 0, dtype, a.device).eval()
    batches = make_batches(a.steps, a.batch, a.seq, a.vocab, a.prompt, a.device)
    add_cache(batches, teacher, a.k)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    modes = ["sft", "hf_sft", "kl", "kl+ce", "bild", "bild+ce", "online_kl"]
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
              "relative_to_sft": {m: med[m] / med["sft"] for m in modes},
              "relative_to_online_kl": {m: med[m] / med["online_kl"] for m in modes}}
    OUT.mkdir(exist_ok=True)
    (OUT / "train_steps.json").write_text(json.dumps(result, indent=1))
    print(f"student {a.layers}x{a.hidden}, teacher {a.teacher_layers}x{a.teacher_hidden}, vocab {a.vocab}, "
          f"{a.batch}x{a.seq} tokens ({n_rows} supervised), K={a.k}, {a.device} {a.dtype}, "
          f"{torch.get_num_threads()} threads; median of {len(wall['sft'])} steps ({result['clock']})")
    for m in modes:
        print(f"  {m:10s} {med[m]:8.4f} s/step   {med[m] / med['sft']:5.2f}x sft   "
              f"{med[m] / med['online_kl']:5.2f}x online   (min {best[m]:.3f} s = {best[m] / best['sft']:5.2f}x sft; "
              f"wall {med_wall[m]:.3f} s)")


if __name__ == "__main__":
    main()
