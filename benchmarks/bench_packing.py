"""Packing benchmark: training tokens per second, packed (padding-free) vs padded, on the demo's data.

    .venv/bin/python benchmarks/bench_packing.py            # ~5 min on one busy CPU core
    .venv/bin/python benchmarks/bench_packing.py --quick    # a smoke run

The demo's corpus (standard-library signature -> docstring pairs, `pipeline.corpus`) and the demo's
full-preset teacher shape (Llama, 2 layers x 256 wide, a 2,048-token BPE vocabulary, tied embeddings),
random weights; batches of 16 sequences in the stream's order. One optimizer step = `KDTrainer.compute_loss`
(`--loss sft`, the fused head) + backward + AdamW on the same 16 sequences, padded to the longest or
packed into one row (`Collator(pack=True)`: sdpa with position_ids restarting per sequence). Modes are
interleaved batch by batch; tokens/s counts real tokens only, on this process's CPU time (one thread),
which other jobs on a shared machine do not inflate. Writes benchmarks/out/packing.json.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "out"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows", type=int, default=1600, help="corpus rows (demo full preset: 6,000)")
    p.add_argument("--batches", type=int, default=12, help="timed batches per mode")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if a.quick:
        a.rows, a.batches = 200, 3
    torch.set_num_threads(a.threads)
    from logitcache.pipeline.corpus import build_corpus
    from logitcache.pipeline.demo import build_model
    from logitcache.stages.train.alignment import TextExample
    from logitcache.stages.train.collate import Collator
    from logitcache.stages.train.data import RowsSource, ShardedStream
    from logitcache.stages.train.loss_settings import loss_settings
    from logitcache.stages.train.student import load_student
    from logitcache.stages.train.trainer import KDTrainer, training_arguments

    work = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    build_corpus(work / "corpus", max_train=a.rows, max_heldout=10)
    data = work / "corpus" / "train.jsonl"
    texts = [r["prompt"] + r["response"] for r in map(json.loads, open(data))]
    build_model(work / "model", texts, vocab=2048, width=256, layers=2, seed=0)
    student = load_student(str(work / "model"))
    assert student.model.config._attn_implementation == "sdpa", student.model.config._attn_implementation
    from logitcache.storage.rows import load_rows

    source = RowsSource(load_rows(str(data))[0], name=str(data),
                        to_item=TextExample(student.tokenizer, max_length=512, where=str(data)))
    items = list(ShardedStream(source, seed=0, epochs=1, rank=0, world_size=1))
    batches = [items[i:i + a.batch_size] for i in range(0, len(items) - a.batch_size + 1, a.batch_size)]
    batches = batches[: a.batches + 1]
    collate = {"padded": Collator(pad_id=student.pad_id), "packed": Collator(pad_id=student.pad_id, pack=True)}
    trainer = KDTrainer(model=student.model, args=training_arguments(str(work / "out"), max_steps=1, report_to="none",
                                                                     use_cpu=True),
                        plan=loss_settings("sft"), vocab_size=student.vocab_size)
    opt = torch.optim.AdamW(student.model.parameters(), lr=1e-5)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        trainer.compute_loss(student.model, batch).backward()
        opt.step()

    cpu = {m: [] for m in collate}
    tokens, slots = 0, {m: 0 for m in collate}
    for m in collate:  # warm-up
        step(collate[m](batches[0]))
    for its in batches[1:]:
        tokens += sum(len(it["input_ids"]) for it in its)
        for m, c in collate.items():
            batch = c(its)
            slots[m] += batch["input_ids"].numel()
            t0 = time.process_time()
            step(batch)
            cpu[m].append(time.process_time() - t0)
    total = {m: sum(v) for m, v in cpu.items()}
    result = {"setup": {**vars(a), "sequences": len(items), "torch": torch.__version__, "threads": a.threads,
                        "model": "llama 2 x 256, vocab 2048, tied", "attention": "sdpa"},
              "tokens": tokens, "token_slots": slots, "padding_share": {m: 1 - tokens / s for m, s in slots.items()},
              "tokens_per_cpu_second": {m: tokens / t for m, t in total.items()},
              "median_step_cpu_s": {m: statistics.median(v) for m, v in cpu.items()},
              "packed_over_padded": total["padded"] / total["packed"]}
    OUT.mkdir(exist_ok=True)
    (OUT / "packing.json").write_text(json.dumps(result, indent=1))
    print(f"{len(batches) - 1} batches of {a.batch_size} demo sequences, {tokens} tokens; "
          f"padding {result['padding_share']['padded']:.0%} of the padded batches' slots")
    for m in collate:
        print(f"  {m:7s} {result['tokens_per_cpu_second'][m]:8.0f} tokens per CPU second   "
              f"median step {result['median_step_cpu_s'][m]:.3f} s")
    print(f"packed / padded throughput: {result['packed_over_padded']:.2f}x")
    if not a.quick:
        from results import record

        record("train.packing", values={"packed / padded": round(result["packed_over_padded"], 2)})


if __name__ == "__main__":
    main()
