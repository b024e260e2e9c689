"""Fidelity benchmark: every cached loss against the same loss on the teacher's full logits.

    .venv/bin/python benchmarks/bench_fidelity.py                  # ~5-10 min on 2 CPU cores (64 rows a regime)
    .venv/bin/python benchmarks/bench_fidelity.py --quick          # K = 32 only, T = 1 and 2, 32 rows
    .venv/bin/python benchmarks/bench_fidelity.py --no-model       # synthetic regimes only
    .venv/bin/python benchmarks/bench_fidelity.py --rows 32 --model-vocab 4096 --model-steps 20   # what RESULTS.md holds
    .venv/bin/python benchmarks/bench_fidelity.py --rskd 20 --regimes zipf --rows 8   # rskd: N x tau, 20 seeds (~3 min)

Teachers: three LLM-like regimes over V = 151,936 from tests/support/llm_tails.py (zipf: a heavy Zipf tail;
peaked: a few favourites over a Gaussian bulk, like a fine-tuned model; flat: high entropy), plus
"model": the real next-token logits of the small Llama the storage benchmark trains
(bench_storage.train_model, kept in benchmarks/out/) on held-out standard-library source.
Students: the teacher's logits plus Gaussian noise, std 0.5 ("low") and 2.0 ("high"), and the teacher
itself ("self", for stationarity).

For each loss, K in {8, 16, 32, 64} and T in {1, 2, 3} (losses without a temperature: once):
- rel err: |L_cached - L_full| / |L_full|, where L_full is the same loss on the full logits: the plain
  formula of tests/support/loss_reference.py with the library loss's default options, which the
  library computes with a cache of the whole vocabulary (checked here on a few rows: `check_references`;
  a loss whose reference disagrees is computed with the library at K = V instead, about 20x slower).
  For rskd, whose cache is K samples at T = 1, L_full is the cross entropy against the full teacher.
- cos: cosine between the gradients w.r.t. the student logits (all rows and ids flattened).
- at teacher (K = 32): |grad L_cached(s = t)| / |grad L_full(s = noisy student, high)|, 0 for a loss whose
  teacher is a stationary point (every divergence should be; nkd and rskd are cross entropies).
- coverage: bild's share of the student's top-8 ids found in the cache; top-K mass: the teacher's mean.
Writes benchmarks/out/fidelity.json (every row) and prints the tables RESULTS.md holds.
"""

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
import loss_reference  # noqa: E402
from llm_tails import NOISE, REGIMES, VOCAB, student_logits, teacher_logits, topk_cache  # noqa: E402

from logitcache.stages.train import losses  # noqa: E402
from logitcache.stages.train.losses import registry  # noqa: E402

OUT = Path(__file__).parent / "out"
KS = (8, 16, 32, 64)
TS = (1.0, 2.0, 3.0)
# nkd and rskd are cross entropies (the teacher is not their stationary point).
NOT_DIVERGENCES = ("nkd", "rskd")


def loss_names() -> tuple[str, ...]:
    """Every declared loss with a teacher term, read from the registry (a new loss is measured too)."""
    return registry.kd_names()


def sample_only(name: str) -> bool:
    """The loss reads sample-mode caches only (rskd): it is measured on draws, not on a top-K cache."""
    return registry.get(name).modes == {registry.SAMPLE}


def takes(name: str, option: str) -> bool:
    import inspect

    return option in inspect.signature(getattr(losses, name)).parameters


def full_cache(t: torch.Tensor) -> dict:
    """A cache of the whole vocabulary: (rows, V) ids sorted by log-prob descending, no tail."""
    lp, ids = torch.log_softmax(t.double(), -1).float().sort(-1, descending=True)
    return {"ids": ids, "logprobs": lp, "tail_mass": torch.zeros(t.shape[0])}


def sample_rows(t: torch.Tensor, n: int, seed: int) -> dict:
    from llm_tails import sample_cache

    return sample_cache(t, n, seed=seed)


def reference_fn(name: str):
    """(s, t, options) -> 0-dim loss on full (rows, V) logits, with the library loss's default options; or None."""
    import inspect

    fn = loss_reference.REFERENCES.get(name)
    if fn is None:
        return None
    lib = inspect.signature(getattr(losses, name)).parameters
    ref_params = inspect.signature(fn).parameters
    defaults = {k: p.default for k, p in lib.items() if k in ref_params and k not in ("s", "t")
                and p.default is not p.empty}

    def run(s, t, options):
        return fn(s, t, **{**defaults, **{k: v for k, v in options.items() if k in ref_params}})

    return run


def full_value_and_grad(name: str, s: torch.Tensor, t: torch.Tensor, options: dict, *, plain: bool):
    """The loss on the full logits: the plain reference, or the library with a whole-vocabulary cache."""
    if not plain and not sample_only(name):
        return value_and_grad(name, s, full_cache(t), options)[:2]
    s = s.detach().clone().requires_grad_(True)
    value = reference_fn(name)(s, t, options)
    (grad,) = torch.autograd.grad(value, s)
    return float(value.detach()), grad


def check_references(t: torch.Tensor, ts) -> dict[str, bool]:
    """For each loss, whether its plain reference equals the library at K = V on these rows (value and grad)."""
    s = student_logits(t, "high")
    ok = {}
    for name in loss_names():
        if sample_only(name):
            ok[name] = reference_fn(name) is not None  # no cache of the whole vocabulary to compare with
            continue
        if reference_fn(name) is None:
            ok[name] = False
            continue
        good = True
        for temperature in temperatures(name, ts):
            opts = options_for(name, temperature)
            v_lib, g_lib = full_value_and_grad(name, s, t, opts, plain=False)
            v_ref, g_ref = full_value_and_grad(name, s, t, opts, plain=True)
            good &= abs(v_lib - v_ref) <= 1e-4 * max(1.0, abs(v_ref)) and cosine(g_lib, g_ref) > 0.99999
        ok[name] = bool(good)
    return ok


def value_and_grad(name: str, s: torch.Tensor, cache: dict, options: dict) -> tuple[float, torch.Tensor, dict]:
    s = s.detach().clone().requires_grad_(True)
    metrics: dict = {}
    extra = {keyword: cache[keyword] for keyword in registry.get(name).inputs() if keyword in cache}
    value = getattr(losses, name)(s, cache["ids"], cache["logprobs"], tail_mass=cache["tail_mass"], metrics=metrics,
                                  **extra, **options)
    (grad,) = torch.autograd.grad(value, s)
    return float(value.detach()), grad, {k: float(v) for k, v in metrics.items()}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denom = a.norm() * b.norm()
    return float(a @ b / denom) if denom > 0 else float("nan")


def options_for(name: str, temperature: float | None) -> dict:
    return {} if temperature is None else {"temperature": temperature}


def temperatures(name: str, ts) -> tuple:
    # rskd's samples are drawn at T = 1 (stage one's default); its T is measured at 1 only.
    if sample_only(name):
        return (1.0,)
    return tuple(ts) if takes(name, "temperature") else (None,)


def model_teacher(rows: int, vocab: int, steps: int) -> torch.Tensor:
    """(rows, V_model) next-token logits of bench_storage's trained model on held-out stdlib source."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_storage import read_texts, stdlib_files, train_model

    tok, model = train_model(vocab, steps, vocab < 32768)
    model.eval()
    out, need = [], rows
    with torch.no_grad():
        for text in read_texts(stdlib_files("heldout"), 1e7):
            ids = tok(text)["input_ids"][:256]
            if len(ids) < 64:
                continue
            logits = model(input_ids=torch.tensor([ids])).logits[0, 32:-1].float()
            # Every 4th position: fewer neighbours from one file.
            take = logits[::4][:need]
            out.append(take)
            need -= take.shape[0]
            if need <= 0:
                break
    return torch.cat(out)


def run_regime(regime: str, t: torch.Tensor, ks, ts, *, seed: int, plain: dict[str, bool], names=None) -> list[dict]:
    """The rows of every loss in `names` (default: `loss_names()`) on teacher logits `t` (rows, V)."""
    rows_out = []
    students = {"self": t, **{level: student_logits(t, level, seed=seed) for level in NOISE}}
    mass = {k: float(torch.log_softmax(t.double(), -1).topk(k, -1).values.exp().sum(-1).mean()) for k in ks}
    caches = {k: topk_cache(t, k) for k in ks}
    samples = {k: sample_rows(t, k, seed) for k in ks}
    for name in names or loss_names():
        for temperature in temperatures(name, ts):
            opts = options_for(name, temperature)
            # At student = teacher the full divergence's gradient is 0; only the noisy students need the reference.
            ref = {lvl: full_value_and_grad(name, s, t, opts, plain=plain[name])
                   for lvl, s in students.items() if lvl != "self"}
            scale = float(ref["high"][1].norm())
            for k in ks:
                cache = samples[k] if sample_only(name) else caches[k]
                for level, s in students.items():
                    if level == "self" and k != 32 and 32 in ks:
                        continue  # stationarity is the K = 32 goal; the other K only for the noisy students
                    t0 = time.perf_counter()
                    value, grad, metrics = value_and_grad(name, s, cache, opts)
                    row = {"regime": regime, "loss": name, "k": k, "T": temperature, "student": level,
                           "value": value, "topk_mass": mass[k],
                           "coverage": metrics.get("bild_coverage"), "seconds": time.perf_counter() - t0}
                    if level == "self":
                        row["at_teacher"] = float(grad.norm()) / scale if scale > 0 else float("nan")
                    else:
                        ref_value, ref_grad = ref[level]
                        row["full_value"] = ref_value
                        row["rel_err"] = abs(value - ref_value) / max(abs(ref_value), 1e-12)
                        row["cos"] = cosine(grad, ref_grad)
                    rows_out.append(row)
        print(f"  {regime:7s} {name:8s} done", flush=True)
    return rows_out


def _order(name: str) -> int:
    names = loss_names()
    return names.index(name) if name in names else len(names)


def _fmt(x, spec=".3f"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _worst_cos(rows, **where) -> float | None:
    sel = [r["cos"] for r in rows if "cos" in r and all(r[k] == v for k, v in where.items())]
    sel = [c for c in sel if not math.isnan(c)]
    return min(sel) if sel else None


def _cos_cell(c) -> str:
    return "–" if c is None else (f"**{c:.3f}**" if c < 0.99 else f"{c:.3f}")


def tables(rows: list[dict], regimes, ks, goal_k: int = 32) -> str:
    """Markdown: (1) gradient cosine at K = goal_k per loss, regime and T (worst noisy student);
    (2) value error and the gradient left at the teacher; (3) cosine at T = 1 by K; (4) mass and coverage."""
    ts = sorted({r["T"] for r in rows if r["T"] is not None})
    out = [f"Gradient cosine against the full-logits loss at K = {goal_k}, worst of the two noisy students, for "
           f"T = {' / '.join(f'{t:g}' for t in ts)} (one value: the loss has no T). **Bold**: below the 0.99 goal.", "",
           "| loss | " + " | ".join(regimes) + " |", "|---|" + "---|" * len(regimes)]
    for name in sorted({r['loss'] for r in rows}, key=_order):
        cells = []
        for regime in regimes:
            temps = sorted({r["T"] for r in rows if r["loss"] == name and r["regime"] == regime}, key=lambda t: t or 0)
            cells.append(" / ".join(_cos_cell(_worst_cos(rows, loss=name, regime=regime, k=goal_k, T=t)) for t in temps)
                         or "–")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", f"At K = {goal_k}: the value's relative error (worst over the noisy students and T) · |∇ at student = "
            f"teacher| / |∇ of the full loss at the high-noise student| (worst over T; 0: the teacher is a stationary "
            f"point; **bold**: above 0.01 for a divergence; nkd and rskd are cross entropies).", "",
            "| loss | " + " | ".join(regimes) + " |", "|---|" + "---|" * len(regimes)]
    for name in sorted({r['loss'] for r in rows}, key=_order):
        cells = []
        for regime in regimes:
            sel = [r for r in rows if r["loss"] == name and r["regime"] == regime and r["k"] == goal_k]
            errs = [r["rel_err"] for r in sel if "rel_err" in r]
            at = [r["at_teacher"] for r in sel if "at_teacher" in r]
            if not errs:
                cells.append("–")
                continue
            stat = max(at) if at else float("nan")
            st = f"**{stat:.3f}**" if name not in NOT_DIVERGENCES and stat > 0.01 else f"{stat:.3f}"
            cells.append(f"{max(errs):.3f} · {st}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", f"Gradient cosine at T = 1 by K, worst over the noisy students, per regime ({' / '.join(regimes)}):",
            "", "| loss | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name in sorted({r['loss'] for r in rows}, key=_order):
        cells = []
        for k in ks:
            per = [_worst_cos(rows, loss=name, regime=regime, k=k, T=1.0) for regime in regimes]
            if all(c is None for c in per):
                per = [_worst_cos(rows, loss=name, regime=regime, k=k) for regime in regimes]
            cells.append(" / ".join("–" if c is None else f"{c:.3f}" for c in per))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "The teacher's top-K mass (mean over rows) · bild's coverage of the student's top-8 (worst student):",
            "", "| regime | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for regime in regimes:
        cells = []
        for k in ks:
            sel = [r for r in rows if r["regime"] == regime and r["k"] == k]
            cov = [r["coverage"] for r in sel if r["loss"] == "bild" and r["coverage"] is not None and r["student"] != "self"]
            cells.append(f"{sel[0]['topk_mass']:.3f} · {_fmt(min(cov)) if cov else '–'}" if sel else "–")
        out.append(f"| {regime} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def rskd_sweep(regime: str, t: torch.Tensor, ns=(8, 32, 128), taus=(0.7, 1.0, 2.0), seeds: int = 20) -> list[dict]:
    """rskd at T = 1 against the full cross entropy, per draw count N and sampling temperature tau, over
    `seeds` independent caches: the value's relative bias (mean over seeds, with its standard error) and
    the gradient cosine (mean and standard deviation over seeds), for the weights read from the stored
    normaliser ("known") and for the self-normalised weights of caches without it ("self-norm.")."""
    from llm_tails import sample_cache

    ref_value, ref_grad = full_value_and_grad("rskd", student_logits(t, "high"), t, {}, plain=True)
    s = student_logits(t, "high")
    out = []
    for n in ns:
        for tau in taus:
            got = {"known": [], "self-norm.": []}
            for seed in range(seeds):
                cache = sample_cache(t, n, temperature=tau, seed=seed)
                for estimator, keys in (("known", ("counts", "draw_logprobs")), ("self-norm.", ("counts",))):
                    opts = {"sample_temperature": tau} if estimator == "self-norm." else {}
                    value, grad, _ = value_and_grad("rskd", s, {**{k: v for k, v in cache.items()
                                                                  if k not in ("counts", "draw_logprobs")},
                                                                **{k: cache[k] for k in keys}}, opts)
                    got[estimator].append(((value - ref_value) / ref_value, cosine(grad, ref_grad)))
            for estimator, pairs in got.items():
                rel, cos = (np.array(x) for x in zip(*pairs))
                out.append({"regime": regime, "N": n, "tau": tau, "estimator": estimator, "seeds": seeds,
                            "bias": float(rel.mean()), "bias_se": float(rel.std(ddof=1) / np.sqrt(len(rel))),
                            "cos": float(cos.mean()), "cos_sd": float(cos.std(ddof=1))})
        print(f"  rskd N = {n} done", flush=True)
    return out


def rskd_table(rows: list[dict]) -> str:
    """Markdown: rskd's relative bias (± s.e.) and gradient cosine (± s.d.) per N, tau and estimator."""
    out = ["rskd at T = 1 against the full cross entropy: relative bias of the value, mean ± standard error "
           "over seeds · gradient cosine, mean ± s.d. over seeds. known: the weights from the stored "
           "normaliser (sample_logz); self-norm.: caches without it.", "",
           "| N | τ | known: bias | known: cos | self-norm.: bias | self-norm.: cos |", "|---|---|---|---|---|---|"]
    for n in sorted({r["N"] for r in rows}):
        for tau in sorted({r["tau"] for r in rows}):
            cell = {r["estimator"]: r for r in rows if r["N"] == n and r["tau"] == tau}
            out.append(f"| {n} | {tau:g} | " + " | ".join(
                f"{100 * cell[e]['bias']:+.1f} % ± {100 * cell[e]['bias_se']:.1f} | "
                f"{cell[e]['cos']:.3f} ± {cell[e]['cos_sd']:.3f}" for e in ("known", "self-norm.")) + " |")
    return "\n".join(out)


DOC_LOSSES = ("bild", "kl", "rkl", "topk_kl", "uld")


def doc_table(seeds, rows: int = 12, k: int = 32) -> str:
    """docs/LOSSES.md's table: per loss, regime and student (noise 0.5 / 2), the gradient cosine and the
    value over the full one (cached / full), min-max over `seeds` (teacher, student and draws per seed)."""
    results = []
    for seed in seeds:
        for regime in REGIMES:
            t = teacher_logits(regime, rows, seed=seed)
            plain = {name: reference_fn(name) is not None for name in DOC_LOSSES}
            results += run_regime(regime, t, (k,), (1.0,), seed=seed, plain=plain, names=DOC_LOSSES)
    out = [f"K = {k}, T = 1, {rows} rows, seeds {','.join(map(str, seeds))}: cos · value ratio, noise 0.5 / 2, "
           "min-max over the seeds", "", "| loss | " + " | ".join(REGIMES) + " |", "|---|---|---|---|"]

    def span(values, spec):
        lo, hi = min(values), max(values)
        return f"{lo:{spec}}" if f"{lo:{spec}}" == f"{hi:{spec}}" else f"{lo:{spec}}–{hi:{spec}}"

    for name in DOC_LOSSES:
        cells = []
        for regime in REGIMES:
            parts = []
            for level in NOISE:
                sel = [r for r in results if (r["loss"], r["regime"], r["student"]) == (name, regime, level)]
                cos = span([r["cos"] for r in sel], ".3f")
                ratio = span([r["value"] / r["full_value"] for r in sel], ".2f")
                parts.append(f"cos {cos}, value {ratio}×")
            cells.append(" / ".join(parts))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="positions per regime (default 64)")
    ap.add_argument("--quick", action="store_true", help="K = 32, T in {1, 2}, 32 rows, the quick storage model")
    ap.add_argument("--regimes", default=",".join((*REGIMES, "model")),
                    help="comma-separated teachers to run (default: zipf,peaked,flat,model); each writes "
                    "out/fidelity-REGIME.json, so two processes can split them")
    ap.add_argument("--report", action="store_true", help="only print the tables from the out/fidelity-*.json files")
    ap.add_argument("--model-vocab", type=int, default=32768, help="the storage benchmark's model: its vocabulary "
                    "(default 32768; its --quick model: 4096)")
    ap.add_argument("--model-steps", type=int, default=150, help="... and training steps (default 150; --quick: 20)")
    ap.add_argument("--ks", default=",".join(map(str, KS)), help="comma-separated K (default 8,16,32,64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rskd", type=int, default=0, metavar="SEEDS",
                    help="only rskd's sweep over N in {8, 32, 128} and tau in {0.7, 1, 2}, SEEDS caches each, on "
                    "--regimes' synthetic teachers (writes out/rskd-fidelity.json)")
    ap.add_argument("--doc", default="", metavar="SEEDS",
                    help="only docs/LOSSES.md's table: K = 32, T = 1, 12 rows, bild/kl/rkl/topk_kl/uld on the "
                    "synthetic teachers, min-max over the comma-separated seeds")
    args = ap.parse_args()
    if args.report:
        report()
        return
    if args.doc:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        print(doc_table([int(x) for x in args.doc.split(",")]))
        return
    if args.rskd:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        rows = []
        for regime in [r for r in args.regimes.split(",") if r in REGIMES]:
            rows += rskd_sweep(regime, teacher_logits(regime, args.rows, seed=args.seed), seeds=args.rskd)
            print(rskd_table([r for r in rows if r["regime"] == regime]), flush=True)
        OUT.mkdir(exist_ok=True)
        (OUT / "rskd-fidelity.json").write_text(json.dumps({"rows": args.rows, "seed": args.seed, "results": rows},
                                                           indent=1))
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ks = tuple(int(k) for k in args.ks.split(",") if k)
    ks, ts, rows = (ks, TS, args.rows) if not args.quick else ((32,), (1.0, 2.0), min(args.rows, 32))
    if args.quick:
        args.model_vocab, args.model_steps = 4096, 20
    regimes = [r for r in args.regimes.split(",") if r]
    unknown = set(regimes) - {*REGIMES, "model"}
    if unknown:
        ap.error(f"--regimes: unknown {sorted(unknown)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; rows {rows}, K {ks}, T {ts}")
    t_start = time.perf_counter()
    plain = check_references(teacher_logits("zipf", 4, seed=args.seed), ts)
    print("plain reference = library at K = V:", ", ".join(f"{k} {'yes' if v else 'NO (library at K = V)'}"
                                                           for k, v in plain.items()), flush=True)
    OUT.mkdir(exist_ok=True)
    for regime in regimes:
        if regime == "model":
            t = model_teacher(rows, args.model_vocab, args.model_steps)
        else:
            t = teacher_logits(regime, rows, seed=args.seed)
        print(f"{regime}: V = {t.shape[1]}, rows = {t.shape[0]}", flush=True)
        t0 = time.perf_counter()
        results = run_regime(regime, t, ks, ts, seed=args.seed, plain=plain)
        (OUT / f"fidelity-{regime}.json").write_text(json.dumps({
            "regime": regime, "vocab": t.shape[1], "rows": rows, "ks": ks, "ts": ts, "plain_reference": plain,
            "seconds": time.perf_counter() - t0, "results": results}, indent=1))
        print(tables(results, [regime], ks, goal_k=32 if 32 in ks else ks[-1]), flush=True)
    print(f"\nwall {time.perf_counter() - t_start:.0f}s")


def report() -> None:
    """The tables over every out/fidelity-*.json, regimes in the usual order."""
    order = {r: i for i, r in enumerate((*REGIMES, "model"))}
    runs = sorted((json.loads(p.read_text()) for p in OUT.glob("fidelity-*.json")), key=lambda r: order[r["regime"]])
    rows = [row for run in runs for row in run["results"]]
    ks = runs[0]["ks"]
    for run in runs:
        print(f"{run['regime']}: V = {run['vocab']}, {run['rows']} rows, K {run['ks']}, T {run['ts']}, "
              f"{run['seconds']:.0f} s")
    print()
    print(tables(rows, [run["regime"] for run in runs], ks, goal_k=32 if 32 in ks else ks[-1]))


if __name__ == "__main__":
    main()
