"""The tail bucket at T != 1: the student's tail shape (the library) against a flat tail, by measurement.

    .venv/bin/python benchmarks/bench_tail_bucket.py                  # ~1 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_tail_bucket.py --seeds 0,1,2 --rows 12 --k 32

At T != 1 the K + 1 grouped classes need the teacher's tempered tail weight sum_{i in tail} p_i^(1/T),
which a top-K cache does not hold. Two guesses, each inside the same KL over the K + 1 classes:
"student shape" (the library, `tails.kd_classes`): the teacher's tail has the student's shape, scaled to the
stored tail mass; "flat": the tail mass spread evenly over the V - K uncovered ids. Yardstick: KL over the
exact grouped classes at T, from the teacher's full logits (tests/support/loss_reference.grouped_kl).
Teachers: tests/support/llm_tails.py (V = 151,936); students: teacher + noise 0.5 ("near") and 2 ("far"); T = 2.
Prints the gradient cosine against the yardstick and the gradient left at student = teacher (relative to
the far student's), per regime, student and seed; writes benchmarks/out/tail_bucket.json.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))
import llm_tails  # noqa: E402
import loss_reference as ref  # noqa: E402

from logitcache.stages.train import losses  # noqa: E402


def flat_tail_kl(s, ids, lp, tail, temperature):
    """KL over the K + 1 classes at T, the teacher's tail weight from a flat tail: (V - K) * (tail / (V - K))^(1/T)."""
    v, k = s.shape[1], ids.shape[1]
    t_tail = tail.log() / temperature + (1 - 1 / temperature) * math.log(v - k)
    lt = torch.cat([lp / temperature, t_tail[:, None]], 1).log_softmax(-1)
    s_t = s / temperature
    s_tail = s_t.scatter(1, ids, -math.inf).logsumexp(-1)
    ls = torch.cat([s_t.gather(1, ids), s_tail[:, None]], 1) - s_t.logsumexp(-1, keepdim=True)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def grad(fn, s):
    x = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(x), x)
    return g


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=2.0)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    temperature, rows = args.temperature, []
    for seed in (int(x) for x in args.seeds.split(",")):
        for regime in llm_tails.REGIMES:
            t = llm_tails.teacher_logits(regime, args.rows, seed=seed).double()
            cache = llm_tails.topk_cache(t.float(), args.k)
            ids, lp, tail = cache["ids"].long(), cache["logprobs"].double(), cache["tail_mass"].double()
            guesses = {"student shape": lambda x: losses.kl(x, ids, lp, tail_mass=tail, temperature=temperature),
                       "flat": lambda x: flat_tail_kl(x, ids, lp, tail, temperature)}
            far = llm_tails.student_logits(t.float(), "high", seed=seed).double()
            scale = grad(lambda x: ref.grouped_kl(x, t, ids, temperature), far).norm()
            for level in ("low", "high"):
                s = llm_tails.student_logits(t.float(), level, seed=seed).double()
                want = grad(lambda x: ref.grouped_kl(x, t, ids, temperature), s)
                for name, fn in guesses.items():
                    rows.append({"seed": seed, "regime": regime, "student": level, "tail": name,
                                 "cos": F.cosine_similarity(grad(fn, s).flatten(), want.flatten(), dim=0).item(),
                                 "at_teacher": (grad(fn, t).norm() / scale).item()})
    print(f"T = {temperature}, K = {args.k}, {args.rows} rows; cos vs KL over the exact grouped classes "
          f"(min-max over seeds {args.seeds}) · |grad at student = teacher| / |grad at the far student|")
    print("| regime | student | student shape: cos | flat: cos | student shape: at teacher | flat: at teacher |")
    print("|---|---|---|---|---|---|")
    for regime in llm_tails.REGIMES:
        for level, label in (("low", "near (0.5)"), ("high", "far (2)")):
            cells = []
            for field in ("cos", "at_teacher"):
                for name in ("student shape", "flat"):
                    v = [r[field] for r in rows if (r["regime"], r["student"], r["tail"]) == (regime, level, name)]
                    cells.append(f"{min(v):.3f}–{max(v):.3f}" if field == "cos" else f"{max(v):.1e}")
            print(f"| {regime} | {label} | " + " | ".join(cells) + " |")
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "tail_bucket.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
