"""Test helpers for stage two: tiny tokenizers, models, text rows and caches from a real teacher forward pass.

`world()` builds everything once per test process (tests of several files share it) under a
temporary folder removed at exit; so does `ddp_run()`, the one plain two-rank DDP torchrun run
that the DDP test and the FSDP test's baseline both read. Caches are written with storage's `CacheWriter` from the tiny
teacher's own logits (top-K of its log-softmax), the way stage one computes them, so these tests
do not depend on the precompute stage.
"""

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from logitcache.stages.train.alignment import encode_example, supervised_positions
from logitcache.storage import CacheWriter, ShardData
from logitcache.storage.fingerprint import tokenizer_identity


def text_rows(n: int, seed: int) -> list[dict]:
    """Prompt/response rows of toy words; the response repeats a pattern so a tiny model can learn it."""
    from logitcache.pipeline.scratch import toy_corpus

    lines = toy_corpus(num_lines=n, seed=seed)
    rows = []
    for i, line in enumerate(lines):
        words = line.split()
        rows.append({"prompt": " ".join(words[:4]), "response": " ".join(words[4:14])})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@torch.no_grad()
def teacher_targets(model, ids: np.ndarray, positions: np.ndarray, *, k: int, samples: int | None = None,
                    rng=None, temperature: float = 1.0) -> dict:
    """The cache fields of one sequence from the model's own logits (top-K, or sample mode with `samples`
    draws at `temperature`)."""
    logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0].float()
    logp = torch.log_softmax(logits, -1)[torch.as_tensor(positions)]
    target = logp.gather(1, torch.as_tensor(ids[positions + 1])[:, None])[:, 0]
    if samples is None:
        lp, top = logp.topk(k, dim=-1)
        out_ids, out_lp, counts = top.numpy(), lp.numpy(), None
    else:
        width = samples
        out_ids = np.full((len(positions), width), -1, dtype=np.int64)
        out_lp = np.zeros((len(positions), width), dtype=np.float32)
        counts = np.zeros((len(positions), width), dtype=np.uint16)
        for r in range(len(positions)):
            draw_p = torch.softmax(logp[r].double() / temperature, -1).numpy()
            draws = rng.choice(logp.shape[1], size=samples, p=draw_p / draw_p.sum())
            uniq, cnt = np.unique(draws, return_counts=True)
            order = np.argsort(-logp[r, uniq].numpy(), kind="stable")
            uniq, cnt = uniq[order], cnt[order]
            out_ids[r, :len(uniq)], out_lp[r, :len(uniq)], counts[r, :len(uniq)] = uniq, logp[r, uniq].numpy(), cnt
    valid = out_ids >= 0
    tail = np.clip(1.0 - np.where(valid, np.exp(out_lp), 0.0).sum(1), 0.0, 1.0)
    seq = {"topk_ids": out_ids, "topk_logprobs": out_lp.astype(np.float32),
           "target_logprob": target.numpy().astype(np.float32), "tail_mass": tail.astype(np.float32)}
    if counts is not None:
        seq["sample_counts"] = counts
    return seq


def build_cache(root: Path, teacher_dir: Path, tokenizer, rows: list[dict], *, k: int = 8, per_shard: int = 6,
                backend: str = "arrow", samples: int | None = None, teacher_name: str | None = None,
                store_text: bool = True, temperature: float = 1.0) -> Path:
    """A finished cache of `rows` (prompt/response) with targets from the teacher at `teacher_dir`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    width = model.get_output_embeddings().weight.shape[0]
    mode = "topk" if samples is None else "sample"
    fields = ("prompt", "response") if store_text else ()
    writer = CacheWriter(str(root), backend=backend, encoding="lossless", vocab_size=width,
                         fingerprint=f"test-{root.name}", text_fields=fields)
    rng = np.random.default_rng(0)
    for j, lo in enumerate(range(0, len(rows), per_shard)):
        seqs = []
        for i in range(lo, min(lo + per_shard, len(rows))):
            ids, labels = encode_example(tokenizer, rows[i])
            pos = supervised_positions(labels)
            seqs.append({"row_index": i, "input_ids": ids, "positions": pos,
                         **teacher_targets(model, ids, pos, k=k, samples=samples, rng=rng, temperature=temperature),
                         **{f: rows[i][f] for f in fields}})
        writer.write_shard(j, ShardData.from_sequences(seqs, text_fields=fields), extra={"rows": [lo, lo + len(seqs)]})
    writer.finalize({
        "teacher": {"name_or_path": teacher_name or str(teacher_dir), "revision": None, "config_hash": "test"},
        "tokenizer": {**tokenizer_identity(tokenizer), "logits_width": width},
        "dataset": {"name": "toy", "fingerprint": "toy"},
        "inputs": {"kind": "prompt_response", "columns": {"prompt": "prompt", "response": "response"},
                   "stored_fields": list(fields), "max_length": 256},
        "sparsification": {"mode": mode, "k": k if samples is None else samples, "temperature": temperature},
        "engine": {"name": "test"},
    })
    return root


@dataclass
class World:
    root: Path
    teacher: Path          # tokenizer A, 2 layers
    student: Path          # tokenizer A, 1 layer, another seed
    padded_student: Path   # tokenizer A, logits padded by 13 columns
    other_student: Path    # tokenizer B (another vocabulary)
    train: Path            # train.jsonl (prompt/response)
    heldout: Path          # heldout.jsonl
    cache: Path            # top-K cache, K=8, 4 shards x 6 sequences
    tokenizer: object
    rows: list


@functools.cache
def world() -> World:
    from logitcache.pipeline.scratch import make_tiny_llama, toy_corpus, train_tokenizer

    root = Path(tempfile.mkdtemp(prefix="logitcache-train-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    tok = train_tokenizer(toy_corpus(), 320, root / "tok_a")
    tok_b = train_tokenizer(toy_corpus(seed=1), 300, root / "tok_b")
    small = dict(hidden_size=64, num_heads=2, dtype=torch.float32)
    teacher = make_tiny_llama(root / "teacher", tok, num_layers=2, seed=0, **small)
    student = make_tiny_llama(root / "student", tok, num_layers=1, seed=1, **small)
    padded = make_tiny_llama(root / "padded_student", tok, num_layers=1, seed=1, pad_vocab_to=len(tok) + 13, **small)
    other = make_tiny_llama(root / "other_student", tok_b, num_layers=1, seed=2, **small)
    rows = text_rows(24, seed=3)
    train = write_jsonl(root / "train.jsonl", rows)
    heldout = write_jsonl(root / "heldout.jsonl", text_rows(8, seed=4))
    cache = build_cache(root / "cache", teacher, tok, rows)
    return World(root, teacher, student, padded, other, train, heldout, cache, tok, rows)


SUPPORT = Path(__file__).parent  # tests/support: a child process puts it on sys.path to import these helpers
DDP_ENTRY = SUPPORT / "ddp_entry.py"


def torchrun_train(out: Path, *extra: str) -> dict:
    """`logitcache train` on two CPU ranks under torchrun (ddp_entry.py): 4 steps of 2 sequences per
    rank on the world's cache, checkpoints at steps 2 and 4, evaluation on the cache at step 4.

    Returns logitcache_train.json plus "rows" (each rank's trained row indices, in order) and "wrapper"
    (the class of the model each rank's steps ran: DDP, or FSDP2's FSDP<Model>).
    """
    w = world()
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", str(DDP_ENTRY), "train",
           "--student", str(w.student), "--cache", str(w.cache), "--loss", "kl", "--out", str(out),
           "--max-steps", "4", "--batch-size", "2", "--num-workers", "1", "--logging-steps", "1",
           "--save-steps", "2", "--save-total-limit", "5", "--lr", "1e-2", "--eval-cache", str(w.cache),
           "--eval-steps", "4", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    # A rank's one-line error can sit far above the other rank's traceback: show those lines first.
    errors = [line for line in proc.stderr.splitlines() if "logitcache train: error:" in line or "train: error" in line]
    assert proc.returncode == 0, "\n".join(errors) + "\n" + proc.stderr[-3000:]
    result = json.loads((out / "logitcache_train.json").read_text())
    result["rows"] = [json.loads((out / f"rows_rank{r}.json").read_text()) for r in range(2)]
    result["wrapper"] = [(out / f"wrapper_rank{r}.txt").read_text() for r in range(2)]
    return result


@functools.cache
def ddp_run() -> tuple[Path, dict]:
    """(out folder, result) of one plain DDP `torchrun_train`, run once per test process: a torchrun
    launch costs ~30 CPU s (two ranks importing torch and transformers), and the DDP test's claims
    (disjoint data, each rank's position in the checkpoint) and the FSDP test's baseline read the same run.
    Read it, never write to it."""
    out = world().root / "ddp"
    shutil.rmtree(out, ignore_errors=True)  # a failed earlier try
    return out, torchrun_train(out)
