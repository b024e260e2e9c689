"""Storage benchmark: bytes per cached entry for each encoding and backend, and read throughput.

    .venv/bin/python benchmarks/bench_storage.py            # ~10-15 min on 2 CPU cores (trains a small model once)
    .venv/bin/python benchmarks/bench_storage.py --quick    # smaller model and cache, for a smoke run
    .venv/bin/python benchmarks/bench_storage.py --backends # only the side-by-side default-backend table (below)

--backends: the two backends side by side at K=32, for the lossless (precompute's default) and compact
encodings, on the model's ids and on uniformly random ids over 151,936: bytes/entry (the real rows once,
as in the size table), write throughput (`CacheWriter.write_shard` of ~500k positions tiled into ~128k-position
shards: encode + write + sha256, wall and CPU seconds) and read throughput (as below), the backends
interleaved in each of 3 rounds (median) so that load on a shared machine hits both alike; then a whole
`logitcache precompute --engine hf` of held-out files with the trained model, each backend, 3 rounds.

The values are log-probs from a real model's forward pass, not random numbers: a 4-layer, 256-wide
Llama with a 32k byte-level BPE vocabulary, trained briefly on this Python's standard-library source and
evaluated on held-out files. (No model hub is reachable here; the vocabulary size is reported because
id bytes grow with log2(V).) The trained model is kept in benchmarks/out/ and reused.

Read throughput: K=32 cache of ~1M positions (real rows, tiled), iterated in order by one thread,
touching every sequence's arrays, local disk (page cache warm after the first pass; both are printed).
"""

import argparse
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from logitcache.storage import CacheWriter, ShardData, open_cache

OUT = Path(__file__).parent / "out"


def stdlib_files(split: str) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    # held-out split by file: every 10th file
    return [p for i, p in enumerate(files) if (i % 10 == 0) == (split == "heldout")]


def read_texts(files, limit_bytes):
    texts, total = [], 0
    for p in files:
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        total += len(t)
        if total > limit_bytes:
            break
    return texts


def train_model(vocab: int, steps: int, quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from logitcache.pipeline.scratch import train_tokenizer

    mdir = OUT / f"model-v{vocab}-s{steps}"
    tok_texts = read_texts(stdlib_files("train"), 4e6 if quick else 12e6)
    if (mdir / "model.safetensors").exists():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(mdir), LlamaForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    tok = train_tokenizer(tok_texts, vocab, mdir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = np.concatenate([tok(t)["input_ids"] for t in tok_texts[:2000]])
    seq, batch = 256, 8
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(0)
    t0 = time.time()
    for step in range(steps):
        starts = rng.integers(0, len(ids) - seq - 1, batch)
        x = torch.tensor(np.stack([ids[s:s + seq] for s in starts]), dtype=torch.long)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step(), opt.zero_grad(), sched.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"  train step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)", flush=True)
    model.save_pretrained(mdir)
    return tok, model


@torch.no_grad()
def teacher_sequences(tok, model, k_max: int, n_tokens: int) -> list[dict]:
    """Real top-k_max targets from the model's forward pass over held-out stdlib files."""
    seqs, total, row = [], 0, 0
    for text in read_texts(stdlib_files("heldout"), 1e9):
        ids = tok(text)["input_ids"][:512]
        if len(ids) < 16:
            continue
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        pos = np.arange(len(ids) - 1)
        top_lp, top_ids = logp[:-1].topk(k_max, dim=-1)
        seqs.append({"row_index": row, "input_ids": np.array(ids), "positions": pos,
                     "topk_ids": top_ids.numpy(), "topk_logprobs": top_lp.numpy(),
                     "target_logprob": logp[pos, ids[1:]].numpy(),
                     "full_tail": None})
        row += 1
        total += len(ids)
        if total >= n_tokens:
            break
    return seqs


def at_k(seqs, k):
    out = []
    for s in seqs:
        lp = s["topk_logprobs"][:, :k]
        out.append({**{f: s[f] for f in ("row_index", "input_ids", "positions", "target_logprob")},
                    "topk_ids": s["topk_ids"][:, :k], "topk_logprobs": lp,
                    "tail_mass": (-np.expm1(np.logaddexp.reduce(lp.astype(np.float64), axis=1))).astype(np.float32)})
    return out


def random_ids(seqs, vocab, seed=0):
    """Worst case for ids: the same values, ids drawn uniformly from `vocab` (no structure to compress)."""
    rng = np.random.default_rng(seed)
    return [{**s, "topk_ids": rng.integers(0, vocab, s["topk_ids"].shape), "input_ids": rng.integers(0, vocab, s["input_ids"].shape),
             "target_logprob": s["target_logprob"]} for s in seqs]


def size_table(seqs, vocab, ks=(8, 32, 64), label="model ids"):
    rows = []
    for k in ks:
        data = at_k(seqs, k)
        shard = ShardData.from_sequences(data)
        for backend in ("arrow", "zarr"):
            for enc in ("lossless", "float16", "compact"):
                with tempfile.TemporaryDirectory() as d:
                    w = CacheWriter(d, backend=backend, encoding=enc, vocab_size=vocab, fingerprint="b")
                    entry = w.write_shard(0, shard)
                    w.finalize(meta(k, vocab))
                    c = open_cache(d)
                    err = max(float(np.abs(c[i]["topk_logprobs"] - data[i]["topk_logprobs"]).max()) for i in range(len(c)))
                entries = shard.num_positions * k
                rows.append({"ids": label, "k": k, "backend": backend, "encoding": enc, "bytes_per_entry": entry["bytes"] / entries,
                             "bytes_per_position": entry["bytes"] / shard.num_positions, "max_abs_err": err})
    return rows


def meta(k, vocab):
    return {"teacher": {"name_or_path": "bench"}, "tokenizer": {"vocab_size": vocab, "logits_width": vocab, "fingerprint": "0" * 64},
            "dataset": {}, "inputs": {"kind": "text"}, "sparsification": {"mode": "topk", "k": k}, "engine": {}}


def read_throughput(seqs, vocab, backend, encoding, target_positions, verify):
    data = at_k(seqs, 32)
    per_copy = sum(len(s["positions"]) for s in data)
    copies = max(1, target_positions // per_copy)
    d = tempfile.mkdtemp(dir=OUT)
    w = CacheWriter(d, backend=backend, encoding=encoding, vocab_size=vocab, fingerprint="b")
    shards_per = max(1, -(-131072 // per_copy))  # ~128k positions a shard, like a stage-one shard
    sid = 0
    for start in range(0, copies, shards_per):
        batch = [dict(s, row_index=(c * len(data) + s["row_index"])) for c in range(start, min(copies, start + shards_per)) for s in data]
        w.write_shard(sid, ShardData.from_sequences(batch))
        sid += 1
    w.finalize(meta(32, vocab))
    results = []
    for attempt in ("cold-ish", "warm"):
        cache = open_cache(d, verify=verify)
        t0 = time.perf_counter()
        n = 0
        for seq in cache:
            n += seq["topk_ids"].shape[0]
            seq["topk_logprobs"].shape  # noqa: B018 (touch)
        dt = time.perf_counter() - t0
        results.append((attempt, n / dt))
    return n, results


def backend_rounds(seqs, vocab, label, encoding, target_positions, rounds=3):
    """Write then read the same K=32 cache with each backend, interleaved; the median of `rounds` per backend."""
    import resource
    import shutil

    data = at_k(seqs, 32)
    per_copy = sum(len(s["positions"]) for s in data)
    copies = max(1, target_positions // per_copy)
    shards_per = max(1, -(-131072 // per_copy))
    shards = [ShardData.from_sequences([dict(s, row_index=c * len(data) + s["row_index"])
                                        for c in range(start, min(copies, start + shards_per)) for s in data])
              for start in range(0, copies, shards_per)]
    npos = sum(sh.num_positions for sh in shards)
    out = {b: {"write": [], "write_cpu": [], "read": [], "bytes": None} for b in ("arrow", "zarr")}
    for r in range(rounds):
        for backend in (("arrow", "zarr") if r % 2 == 0 else ("zarr", "arrow")):
            d = tempfile.mkdtemp(dir=OUT)
            w = CacheWriter(d, backend=backend, encoding=encoding, vocab_size=vocab, fingerprint="b")
            cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for i, sh in enumerate(shards):
                w.write_shard(i, sh)
            w.finalize(meta(32, vocab))
            dt, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
            t0 = time.perf_counter()
            n = sum(seq["topk_ids"].shape[0] + 0 * seq["topk_logprobs"].shape[0] for seq in open_cache(d))
            assert n == npos
            out[backend]["read"].append(npos / (time.perf_counter() - t0))
            out[backend]["write"].append(npos / dt)
            out[backend]["write_cpu"].append(npos / cpu)
            shutil.rmtree(d)
    for backend in out:  # size of the real rows once: tiled copies would compress against each other
        with tempfile.TemporaryDirectory(dir=OUT) as d:
            one = ShardData.from_sequences(data)
            entry = CacheWriter(d, backend=backend, encoding=encoding, vocab_size=vocab, fingerprint="b").write_shard(0, one)
        out[backend]["bytes"] = entry["bytes"] / (one.num_positions * 32)
    med = lambda v: float(np.median(v))  # noqa: E731
    return [{"ids": label, "encoding": encoding, "backend": b, "positions": npos, "bytes_per_entry": v["bytes"],
             "write_pos_s": med(v["write"]), "write_pos_cpu_s": med(v["write_cpu"]), "read_pos_s": med(v["read"])}
            for b, v in out.items()]


def backends_table(seqs, vocab, target):
    rows = []
    for label, s, v in (("model", seqs, vocab), ("uniform random / 151,936", random_ids(seqs, 151_936), 151_936)):
        for enc in ("lossless", "compact"):
            rows += backend_rounds(s, v, label, enc, target)
    print("\n| ids | encoding | backend | positions | bytes/entry | write pos/s (wall) | write pos/CPU-s | "
          "read pos/s (verify on) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ids']} | {r['encoding']} | {r['backend']} | {r['positions']} | {r['bytes_per_entry']:.2f} | "
              f"{r['write_pos_s'] / 1e6:.2f}M | {r['write_pos_cpu_s'] / 1e6:.2f}M | {r['read_pos_s'] / 1e6:.2f}M |",
              flush=True)
    json.dump(rows, open(OUT / "storage_backends.json", "w"), indent=1)


def whole_precompute(model_dir, texts, rounds=3):
    """`logitcache precompute --engine hf` of the held-out texts with each backend (K=32; lossless, the
    default, and compact), interleaved; wall and CPU seconds of the command in this process, median."""
    import resource
    import shutil

    from logitcache.pipeline.cli import main as cli

    data = OUT / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    times = {}
    warm = tempfile.mkdtemp(dir=OUT)  # imports and the first model load are not either backend's
    assert cli(["precompute", "--teacher", str(model_dir), "--data", str(data), "--out", f"{warm}/c", "--engine", "hf",
                "--text-field", "text", "--top-k", "32", "--max-rows", "2", "--no-progress"]) == 0
    shutil.rmtree(warm)
    for r in range(rounds):
        for enc in ("lossless", "compact"):
            for backend in (("parquet", "zarr") if r % 2 == 0 else ("zarr", "parquet")):
                out = tempfile.mkdtemp(dir=OUT)
                shutil.rmtree(out)
                cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                assert cli(["precompute", "--teacher", str(model_dir), "--data", str(data), "--out", out,
                            "--engine", "hf", "--text-field", "text", "--top-k", "32", "--max-length", "512",
                            "--backend", backend, "--encoding", enc, "--no-progress"]) == 0
                dt, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
                cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
                size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
                times.setdefault((enc, backend), []).append((dt, cpu, size))
                shutil.rmtree(out)
    print(f"\nwhole `precompute --engine hf`, K=32, {len(texts)} held-out files (first 512 tokens each):")
    print("| encoding | backend | wall s | CPU s | cache bytes |")
    print("|---|---|---|---|---|")
    for (enc, backend), v in times.items():
        print(f"| {enc} | {backend} | {np.median([x[0] for x in v]):.1f} | {np.median([x[1] for x in v]):.1f} | "
              f"{v[0][2]:,} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--backends", action="store_true", help="only the side-by-side backend table at K=32")
    args = ap.parse_args()
    torch.set_num_threads(2)
    OUT.mkdir(exist_ok=True)
    if args.quick:
        args.vocab, args.steps = 4096, 20
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, torch {torch.__version__}")
    tok, model = train_model(args.vocab, args.steps, args.quick)
    vocab = model.config.vocab_size
    seqs = teacher_sequences(tok, model, 64, 5_000 if args.quick else 30_000)
    npos = sum(len(s["positions"]) for s in seqs)
    top8 = np.mean([np.exp(s["topk_logprobs"][:, :8]).sum(1).mean() for s in seqs])
    print(f"\nmodel: vocab {vocab}, {npos} held-out positions, mean top-8 mass {top8:.3f}, "
          f"mean top-1 prob {np.mean([np.exp(s['topk_logprobs'][:, 0]).mean() for s in seqs]):.3f}")
    if args.backends:
        torch.set_num_threads(1)
        backends_table(seqs, vocab, 200_000 if args.quick else 500_000)
        texts = [t for t in read_texts(stdlib_files("heldout"), 1e9) if len(t) >= 200][:40 if args.quick else 120]
        return whole_precompute(OUT / f"model-v{args.vocab}-s{args.steps}", texts)
    rows = size_table(seqs, vocab)
    rows += size_table(random_ids(seqs, 151_936), 151_936, ks=(32,), label="uniform random over 151,936")
    print("\n| ids | K | backend | encoding | bytes/entry | bytes/position | max abs error (nats) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ids']} | {r['k']} | {r['backend']} | {r['encoding']} | {r['bytes_per_entry']:.2f} | "
              f"{r['bytes_per_position']:.1f} | {r['max_abs_err']:.4f} |")
    torch.set_num_threads(1)
    target = 200_000 if args.quick else 1_000_000
    print("\nread throughput, K=32, one thread, local disk:")
    print("| backend | encoding | verify sha256 | positions | pass | positions/s |")
    print("|---|---|---|---|---|---|")
    first_pass = {}
    for backend in ("zarr", "arrow"):
        for verify in (True, False):
            n, res = read_throughput(seqs, vocab, backend, "compact", target, verify)
            for attempt, rate in res:
                print(f"| {backend} | compact | {verify} | {n} | {attempt} | {rate / 1e6:.2f}M |", flush=True)
            if verify:
                first_pass[backend] = round(res[0][1] / 1e6, 2)
    json.dump(rows, open(OUT / "storage_sizes.json", "w"), indent=1)
    if not args.quick:
        record_figures(rows, first_pass)


def record_figures(rows, first_pass):
    """This run's headline figures into benchmarks/results.json (see results.py)."""
    from results import record

    def compact32(ids):
        return {r["backend"]: round(r["bytes_per_entry"], 2) for r in rows
                if r["k"] == 32 and r["encoding"] == "compact" and r["ids"] == ids}

    for id, ids in (("storage.compact_k32.model_ids", "model ids"),
                    ("storage.compact_k32.uniform_ids", "uniform random over 151,936")):
        values = compact32(ids)
        record(id, values=values, met=max(values.values()) <= 3)
    worst = max(r["max_abs_err"] for r in rows if r["encoding"] == "compact")
    record("storage.compact.max_error", values={"max abs error": round(worst, 4)}, met=worst <= 0.02)
    record("storage.read_k32", values=first_pass, met=min(first_pass.values()) >= 1)
    record("storage.sizes", values={f"{r['ids']}, K = {r['k']}, {r['backend']}, {r['encoding']}": {
        "B/entry": round(r["bytes_per_entry"], 2), "B/position": round(r["bytes_per_position"], 1),
        "max abs error (nats)": round(r["max_abs_err"], 4)} for r in rows})


if __name__ == "__main__":
    main()
