"""BiLD's student-led estimate on a student from a real training run, against BiLD on the full logits.

    .venv/bin/python benchmarks/bench_bild_trained.py            # ~5 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_bild_trained.py --teacher-steps 200 --student-steps 40 --seed 0

The synthetic students of bench_fidelity.py are the teacher plus i.i.d. logit noise. Here teacher and
student are two small Llamas (2 layers, 128 wide, V = 4,096 byte-level BPE on standard-library source)
trained from different seeds for --teacher-steps and --student-steps: the student is an early,
genuinely different model, as at the start of distillation. On held-out source, K = 32, bild's k = 8,
T = 3, it compares two estimates of the teacher's log-prob at a student top-k id outside the cache:
"rank K" (the library: the row's smallest cached log-prob) and "even spread" (the tail mass spread
evenly over the V - K uncovered ids, the estimate before), each against the full-logits loss:
gradient cosine and value ratio. Writes benchmarks/out/bild_trained.json.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "support"))
import loss_reference  # noqa: E402
from bench_storage import read_texts, stdlib_files  # noqa: E402
from llm_tails import topk_cache  # noqa: E402

from logitcache.stages.train import losses  # noqa: E402


def train(tok, ids: np.ndarray, steps: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - 129, 8)
        x = torch.tensor(np.stack([ids[s:s + 128] for s in starts]))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def value_and_grad(fn, s):
    x = s.clone().requires_grad_()
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return float(value), grad


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-steps", type=int, default=200)
    ap.add_argument("--student-steps", type=int, default=40)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from logitcache.pipeline.scratch import train_tokenizer

    t0 = time.perf_counter()
    texts = read_texts(stdlib_files("train"), 2e6)
    tok = train_tokenizer(texts, 4096, tempfile.mkdtemp())
    ids = np.concatenate([tok(t)["input_ids"] for t in texts[:600]])
    teacher = train(tok, ids, args.teacher_steps, args.seed)
    student = train(tok, ids, args.student_steps, args.seed + 1)
    t_rows, s_rows, need = [], [], args.rows
    with torch.no_grad():
        for text in read_texts(stdlib_files("heldout"), 1e7):
            x = torch.tensor([tok(text)["input_ids"][:129]])
            if x.shape[1] < 64 or need <= 0:
                continue
            t_rows.append(teacher(input_ids=x).logits[0, 32::8][:need].double())
            s_rows.append(student(input_ids=x).logits[0, 32::8][:need].double())
            need -= t_rows[-1].shape[0]
    t, s = torch.cat(t_rows), torch.cat(s_rows)
    cache = topk_cache(t.float(), 32)
    cids, lp, tail = cache["ids"].long(), cache["logprobs"].double(), cache["tail_mass"].double()
    full_v, full_g = value_and_grad(lambda y: loss_reference.bild(y, t), s)
    metrics = {}
    got_v, got_g = value_and_grad(lambda y: losses.bild(y, cids, lp, metrics=metrics), s)
    spread = (tail / (t.shape[1] - 32)).log()
    flat = spread[:, None].expand(t.shape).scatter(1, cids, lp)
    old_v, old_g = value_and_grad(lambda y: loss_reference.bild(y, flat), s)

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    out = {"args": vars(args), "rows": t.shape[0], "vocab": t.shape[1], "top32_mass": float(lp.exp().sum(-1).mean()),
           "coverage": float(metrics["bild_coverage"]),
           "rank_k": {"cos": cos(got_g, full_g), "value_ratio": got_v / full_v},
           "even_spread": {"cos": cos(old_g, full_g), "value_ratio": old_v / full_v},
           "seconds": time.perf_counter() - t0}
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "bild_trained.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
