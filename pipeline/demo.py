"""The whole pipeline, end to end, on text that ships with Python: `make demo` (or `make demo QUICK=1`).

    python -m logitcache.pipeline.demo --out demo_out           # ~20 min on 2 CPU cores
    python -m logitcache.pipeline.demo --out demo_out --quick   # ~3 min

Recipe (every stage is a real `logitcache` command, run in this process and timed; its output, and that
of vLLM's engine process, goes to demo.log):
  1. corpus: function signature -> call pairs from the standard library, split by file (`corpus`, task
     "call": a task a small model becomes confident on, so the teacher's top-K holds most of its
     probability, as a fine-tuned LLM's does; the report gives the measured top-K mass).
  2. teacher: a tokenizer and a small Llama built from scratch, trained with `logitcache train --loss sft`.
  3. caches: `logitcache precompute --engine vllm` over the train split, top-K and sample mode (only the
     first checks the teacher's head against vLLM's logits); a top-K cache of the held-out split (for
     teacher-agreement metrics) with the hf engine. Then what a user runs next: `validate` the top-K
     cache, `inspect --json --plot` it (the report's mass figures and histogram), `convert` it to parquet.
  4. students: one smaller architecture trained from the same initial weights with sft, kl, bild and
     rskd (sampled targets); online bild (`train --online-teacher`: the teacher runs in the loop on
     full logits, on the cached bild student's batches); a student with its own tokenizer trained with uld;
     and the sft student tuned further with bild through LoRA adapters (`--lora-r 8 --merge-lora`) on
     packed rows (`--pack`) of the parquet copy, evaluated on the held-out cache while it trains (`--eval-steps`).
  5. eval: `logitcache eval --positions` on the held-out split; report.md (table, paired differences
     on the same positions) + PNG plots, printed at the end.
A rerun reuses every finished step (each leaves a marker file); delete a folder to redo that step.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["main", "PRESETS"]


@dataclass(frozen=True)
class Preset:
    max_train: int        # corpus rows
    max_heldout: int
    teacher_vocab: int
    student_vocab: int    # the cross-tokenizer student's own vocabulary
    teacher_width: int    # head_dim is 64 (vLLM's CPU attention), so width / 64 heads
    teacher_layers: int
    teacher_steps: int
    student_width: int
    student_layers: int
    student_steps: int
    batch_size: int = 16
    top_k: int = 32
    samples: int = 32
    task: str = "call"    # see `corpus`
    vllm_eager: bool = False  # no torch.compile in vLLM: for runs too short to earn the compile back


# Sized for 2 CPU cores: quick within ~3 minutes, full within ~20 (see benchmarks/RESULTS.md for measured times).
PRESETS = {
    "quick": Preset(max_train=600, max_heldout=100, teacher_vocab=768, student_vocab=512, teacher_width=128,
                    teacher_layers=2, teacher_steps=200, student_width=64, student_layers=1, student_steps=40),
    "full": Preset(max_train=6000, max_heldout=600, teacher_vocab=2048, student_vocab=1536, teacher_width=256,
                   teacher_layers=2, teacher_steps=1200, student_width=64, student_layers=1, student_steps=300),
    # The test suite's run (tests/pipeline/test_demo.py): every step and model of the recipe, on the least
    # work that still logs two bild coverage points per student and scores ~1,000 held-out positions.
    "smoke": Preset(max_train=160, max_heldout=40, teacher_vocab=512, student_vocab=384, teacher_width=128,
                    teacher_layers=1, teacher_steps=40, student_width=64, student_layers=1, student_steps=20,
                    vllm_eager=True),
}
STUDENT_LOSSES = ("sft", "kl", "bild", "rskd")  # same tokenizer as the teacher; plus online bild, and uld cross-tokenizer
ONLINE = "bild online"
LORA = "student sft + lora bild"  # the sft student, tuned further as a user tunes a small pretrained model


def cli(*args: str, log: Path) -> float:
    """Run one `logitcache` command in this process, its output (fd 1 and 2) appended to `log`.

    In-process rather than a subprocess: each fresh interpreter spends seconds importing torch and
    transformers, which is most of a small step's time here. Returns wall seconds.
    """
    from logitcache.pipeline.cli import main as logitcache

    print(f"$ logitcache {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ logitcache {' '.join(args)}\n")
        f.flush()
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            code = logitcache(list(args))
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
    if code != 0:
        sys.exit(f"demo: step failed (exit {code}); see {log}")
    return time.perf_counter() - t0


def step(out: Path, name: str, marker: str, run) -> float:
    """Run `run()` unless `out/marker` exists; remember its wall time in out/timings.json."""
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    if (out / marker).exists() and name in timings:
        print(f"[reuse] {name} ({timings[name]:.0f}s when built)")
        return timings[name]
    timings[name] = run()
    timings_path.write_text(json.dumps(timings, indent=1))
    return timings[name]


def build_model(path: Path, texts: list[str], *, vocab: int, width: int, layers: int, seed: int) -> None:
    """A tokenizer trained on `texts` and a randomly initialised Llama (head_dim 64, as vLLM's CPU attention needs)."""
    import torch

    from logitcache.pipeline.scratch import make_tiny_llama, train_tokenizer

    tok = train_tokenizer(texts, vocab, path)
    make_tiny_llama(path, tok, hidden_size=width, num_layers=layers, num_heads=width // 64,
                    intermediate_size=int(width * 8 / 3) // 8 * 8, tie_word_embeddings=True,
                    max_position_embeddings=512, head_std=0.02, seed=seed, dtype=torch.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run the whole logitcache pipeline on the standard library's text "
                                 "and write a report (markdown table + PNG plots).")
    ap.add_argument("--out", default="demo_out", help="working folder; finished steps in it are reused")
    ap.add_argument("--quick", action="store_true", help="a smaller corpus and fewer steps (~3 minutes)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="the sizes by name, overriding --quick: full (the "
                    "default), quick, or smoke (the test suite's: every step on the least work, numbers meaningless)")
    args = ap.parse_args(argv)
    name = args.preset or ("quick" if args.quick else "full")
    p = PRESETS[name]
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "preset.json"
    if stamp.exists() and json.loads(stamp.read_text()) != asdict(p):
        sys.exit(f"demo: {out} was built with other settings; delete it to rebuild")
    stamp.write_text(json.dumps(asdict(p), indent=1))
    log = out / "demo.log"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; plenty for these sequence lengths
    t_start = time.perf_counter()

    # 1. corpus
    from logitcache.pipeline.corpus import build_corpus

    counts = build_corpus(out / "corpus", max_train=p.max_train, max_heldout=p.max_heldout, task=p.task)
    train, heldout = str(out / "corpus" / "train.jsonl"), str(out / "corpus" / "heldout.jsonl")
    texts = [r["prompt"] + r["response"] for r in map(json.loads, open(train))]
    print(f"corpus: {counts['train']} train / {counts['heldout']} held-out prompt->response pairs")
    common = ["--batch-size", str(p.batch_size), "--logging-steps", "10", "--save-steps", "100000", "--seed", "0"]

    # 2. teacher from scratch
    step(out, "teacher init", "teacher_init/config.json", lambda: _timed(lambda: build_model(
        out / "teacher_init", texts, vocab=p.teacher_vocab, width=p.teacher_width, layers=p.teacher_layers, seed=0)))
    step(out, "teacher (sft)", "teacher/logitcache_train.json", lambda: cli(
        "train", "--student", str(out / "teacher_init"), "--loss", "sft", "--data", train, "--out", str(out / "teacher"),
        "--max-steps", str(p.teacher_steps), "--lr", "3e-3", "--warmup", "0.05", *common, log=log))

    # 3. caches
    pre = ["--teacher", str(out / "teacher"), "--prompt-field", "prompt", "--response-field", "response",
           "--backend", "zarr", "--encoding", "compact", "--no-progress"]
    vllm = ["--engine", "vllm", *(["--engine-arg", "enforce_eager=true"] if p.vllm_eager else [])]
    step(out, "cache top-K (vllm)", "cache_topk/index.json", lambda: cli(
        "precompute", *pre, "--data", train, "--out", str(out / "cache_topk"), *vllm, "--top-k", str(p.top_k),
        log=log))
    # The same teacher's head was just checked against vLLM's logits by the top-K cache's engine (its index
    # records `engine.head_check_max_diff`): checking it again would only cost another vLLM start-up.
    step(out, "cache sample (vllm)", "cache_sample/index.json", lambda: cli(
        "precompute", *pre, "--data", train, "--out", str(out / "cache_sample"), *vllm, "--mode", "sample",
        "--samples", str(p.samples), "--engine-arg", "verify_head=false", log=log))
    step(out, "cache held-out (hf)", "cache_heldout/index.json", lambda: cli(
        "precompute", *pre, "--data", heldout, "--out", str(out / "cache_heldout"), "--engine", "hf",
        "--top-k", str(p.top_k), log=log))

    # What a user does next with a cache: check it, look at it, convert it to the other backend (the LoRA
    # student below trains from the copy).
    def run_validate():
        t = cli("validate", str(out / "cache_topk"), log=log)
        (out / "validate_topk.txt").write_text(log.read_text().rstrip().rsplit("\n", 1)[-1] + "\n")  # its OK line
        return t
    step(out, "validate cache top-K", "validate_topk.txt", run_validate)
    for folder, plot in (("cache_topk", ["--plot", str(out / "topk_mass.png")]), ("cache_heldout", [])):
        def run_inspect(folder=folder, plot=plot):
            t = cli("inspect", str(out / folder), "--json", *plot, log=log)
            (out / f"inspect_{folder}.json").write_text(_last_json(log))
            return t
        step(out, f"inspect {folder}", f"inspect_{folder}.json", run_inspect)
    step(out, "convert top-K to parquet", "cache_topk_parquet/index.json", lambda: cli(
        "convert", str(out / "cache_topk"), str(out / "cache_topk_parquet"), "--backend", "parquet", log=log))

    # 4. students: one init, shared by every same-tokenizer loss, so only the loss differs
    step(out, "student init", "student_init/config.json", lambda: _timed(lambda: _student_init(
        out / "teacher", out / "student_init", width=p.student_width, layers=p.student_layers)))
    step(out, "xtok student init", "xtok_init/config.json", lambda: _timed(lambda: build_model(
        out / "xtok_init", texts, vocab=p.student_vocab, width=p.student_width, layers=p.student_layers, seed=1)))
    student = ["--max-steps", str(p.student_steps), "--lr", "2e-3", "--warmup", "0.05", *common]
    for loss in STUDENT_LOSSES:
        cache = out / ("cache_sample" if loss == "rskd" else "cache_topk")
        extra = ["--cache", str(cache)] if loss != "sft" else ["--data", train]
        step(out, f"student {loss}", f"student_{loss}/logitcache_train.json", lambda loss=loss, extra=extra: cli(
            "train", "--student", str(out / "student_init"), "--loss", loss, *extra,
            "--out", str(out / f"student_{loss}"), *student, log=log))
    # The same loss and batches as the cached bild student; the teacher runs in the loop on full logits.
    step(out, f"student {ONLINE}", "student_bild_online/logitcache_train.json", lambda: cli(
        "train", "--student", str(out / "student_init"), "--loss", "bild", "--cache", str(out / "cache_topk"),
        "--online-teacher", str(out / "teacher"), "--out", str(out / "student_bild_online"), *student, log=log))
    step(out, "student uld", "student_uld/logitcache_train.json", lambda: cli(
        "train", "--student", str(out / "xtok_init"), "--loss", "uld", "--cache", str(out / "cache_topk"),
        "--data", train, "--out", str(out / "student_uld"), *student, log=log))

    step(out, LORA, "student_lora/logitcache_train.json", lambda: cli(
        "train", "--student", str(out / "student_sft"), "--loss", "bild", "--cache", str(out / "cache_topk_parquet"),
        "--pack", "--lora-r", "8", "--merge-lora", "--eval-cache", str(out / "cache_heldout"),
        "--eval-steps", str(max(p.student_steps // 2, 1)), "--out", str(out / "student_lora"), *student, log=log))

    # 5. eval + report
    models = {"teacher": "teacher", **{f"student {loss}": f"student_{loss.replace(' ', '_')}"
                                       for loss in (*STUDENT_LOSSES, ONLINE, "uld")}, LORA: "student_lora"}
    for label, folder in models.items():
        same_tok = folder != "student_uld"
        def run_eval(folder=folder, same_tok=same_tok):
            t = cli("eval", "--model", str(out / folder), "--data", heldout,
                    *(["--cache", str(out / "cache_heldout")] if same_tok else []), "--json",
                    "--positions", str(out / folder / "positions.npz"), log=log)
            # the JSON is the last line of the command's output in the log
            (out / folder / "eval.json").write_text(_last_json(log))
            return t
        step(out, f"eval {label}", f"{folder}/eval.json", run_eval)

    from logitcache.pipeline.report import write_report

    table = write_report(out, models, p)
    print(f"\n{table}\nwall time {time.perf_counter() - t_start:.0f}s; report: {out / 'report.md'}")
    return 0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _student_init(teacher: Path, dst: Path, *, width: int, layers: int) -> None:
    """The same-tokenizer students' shared init: the teacher's tokenizer and a smaller random Llama."""
    import torch
    from transformers import AutoTokenizer

    from logitcache.pipeline.scratch import make_tiny_llama

    tok = AutoTokenizer.from_pretrained(teacher)
    make_tiny_llama(dst, tok, hidden_size=width, num_layers=layers, num_heads=width // 64,
                    intermediate_size=int(width * 8 / 3) // 8 * 8, tie_word_embeddings=True,
                    max_position_embeddings=512, head_std=0.02, seed=1, dtype=torch.float32)


def _last_json(log: Path) -> str:
    """The last JSON object printed into the log (eval --json prints one, possibly over several lines)."""
    text = log.read_text()
    start = text.rfind("\n{")
    return text[start + 1:] if start >= 0 else "{}"


if __name__ == "__main__":
    sys.exit(main())
