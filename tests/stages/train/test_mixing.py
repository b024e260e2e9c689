"""Mixing several caches by weight (`train --cache A B --cache-weights 3 1`): the draws, exact resume
(one process, DataLoader workers, two ranks), refusals of caches that cannot be mixed, and a real
training run whose realised mixture is counted from the sequences it trained on.

    .venv/bin/pytest tests/stages/train/test_mixing.py
    .venv/bin/pytest tests/stages/train/test_mixing.py -m "slow or not slow"     # with the two-process DDP run
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader
from trainkit import DDP_ENTRY, build_cache, text_rows, world

from logitcache.stages.train.collate import Collator
from logitcache.stages.train.data import ShardedStream
from logitcache.stages.train.mixing import BLOCK, MixedStream, mixture_probabilities
from logitcache.stages.train.run import TrainSettings, train
from logitcache.stages.train.sources import check_mixable
from logitcache.stages.train.trainer import KDTrainer
from logitcache.storage import open_cache
from logitcache.storage.errors import ConfigError

ENTRY = DDP_ENTRY


class NumberSource:
    """Shards of consecutive integers from `base`; an item is {"n": its number}."""

    def __init__(self, sizes, base):
        self.shard_sizes, self.base = list(sizes), base
        self.starts = base + np.concatenate([[0], np.cumsum(sizes)])
        self.identity = {"numbers from": base, "sizes": self.shard_sizes}

    def load(self, j):
        return list(range(self.starts[j], self.starts[j + 1]))

    def item(self, shard, s):
        return {"n": np.int64(shard[s]), "row_index": int(shard[s])}


def mixed(weights=(3, 1), *, seed=0, rank=0, world_size=1, sizes=((5, 7, 4, 8), (3, 3, 6))):
    streams = [ShardedStream(NumberSource(sz, base), seed=seed, window=2, epochs=None, rank=rank,
                             world_size=world_size) for sz, base in zip(sizes, (0, 1000))]
    return MixedStream(streams, weights=weights, seed=seed, names=["A", "B"])


def collate(items):
    return {"n": [int(it["n"]) for it in items], "stream": np.stack([it["stream"] for it in items])}


def take(stream, batches, *, batch_size=4, num_workers=0):
    """The first `batches` batches (lists of numbers), recording each as the training loop does."""
    out = []
    loader = DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    for batch in loader:
        stream.record(batch["stream"])
        out.append(batch["n"])
        if len(out) == batches:
            break
    return out


# ---- the draws ----------------------------------------------------------------------------------------

def test_draws_follow_the_weights_and_each_cache_keeps_its_own_order():
    stream = mixed((3, 1))
    numbers = [int(it["n"]) for _, it in zip(range(6000), stream)]
    from_a = [n for n in numbers if n < 1000]
    # Binomial(6000, 0.75): sd 33.5; 4 sd either way.
    assert abs(len(from_a) - 4500) < 4 * 33.5
    # Within the mixture each cache's items are its own endless stream, in that stream's order.
    for part, sub in ((from_a, stream.streams[0]), ([n for n in numbers if n >= 1000], stream.streams[1])):
        assert part == [int(it["n"]) for _, it in zip(range(len(part)), sub)]
    # A 24-sequence cache drawn ~4500 times went through ~187 epochs, every epoch a permutation.
    assert sorted(from_a[:24]) == list(range(24)) and from_a[:24] != from_a[24:48]


def test_draws_are_fixed_by_the_seed_and_zero_weight_is_never_drawn():
    first = [int(it["n"]) for _, it in zip(range(300), mixed(seed=4))]
    assert first == [int(it["n"]) for _, it in zip(range(300), mixed(seed=4))]
    assert first != [int(it["n"]) for _, it in zip(range(300), mixed(seed=5))]
    assert all(int(it["n"]) >= 1000 for _, it in zip(range(300), mixed((0, 2))))


def test_drawn_counts_match_the_draws_across_blocks():
    stream = mixed((1, 1))
    position = BLOCK + 37
    picks = np.concatenate([stream.draws(0, 0), stream.draws(0, 1)])[:position]
    assert stream.drawn(0, position).tolist() == np.bincount(picks, minlength=2).tolist()


@pytest.mark.parametrize("weights, match", [
    ((1,), "1 weight.*2 caches"), ((1, -1), "weight of B is -1"), ((0, 0), "all 0"), ((1, float("nan")), "finite"),
])
def test_bad_weights_are_refused(weights, match):
    with pytest.raises(ConfigError, match=match):
        mixture_probabilities(weights, 2, ["A", "B"])


# ---- resume ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_batches_of_an_uninterrupted_run(num_workers):
    uninterrupted = take(mixed(), 30, num_workers=num_workers)
    stream = mixed()
    first = take(stream, 11, num_workers=num_workers)
    state = json.loads(json.dumps(stream.state_dict()))
    assert sum(state["per_cache"].values()) == sum(state["consumed"]) == 44
    resumed = mixed()
    resumed.load_state_dict(state)
    rest = take(resumed, 19, num_workers=num_workers)
    assert first + rest == uninterrupted
    assert resumed.per_stream() == [sum(n < 1000 for b in uninterrupted for n in b),
                                    sum(n >= 1000 for b in uninterrupted for n in b)]


def test_resume_with_two_ranks_keeps_each_rank_on_its_own_span():
    for rank in range(2):
        uninterrupted = take(mixed(rank=rank, world_size=2), 12)
        stream = mixed(rank=rank, world_size=2)
        first = take(stream, 5)
        resumed = mixed(rank=rank, world_size=2)
        resumed.load_state_dict(json.loads(json.dumps(stream.state_dict())))
        assert first + take(resumed, 7) == uninterrupted
    a0 = {n for b in take(mixed(rank=0, world_size=2), 3) for n in b if n < 1000}
    a1 = {n for b in take(mixed(rank=1, world_size=2), 3) for n in b if n < 1000}
    assert not a0 & a1  # the first epoch of cache A is split between the ranks


def test_resume_refuses_other_weights_or_a_single_cache_position():
    state = mixed((3, 1)).state_dict()
    with pytest.raises(ConfigError, match="probabilities"):
        mixed((1, 1)).load_state_dict(state)
    single = ShardedStream(NumberSource([4, 4], 0), seed=0, rank=0, world_size=1).state_dict()
    with pytest.raises(ConfigError, match="not one of a mixture"):
        mixed().load_state_dict(single)


# ---- which caches mix ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def caches():
    """Caches of the world's teacher: B (other rows, K 8), K4 (K 4), SAMPLE (sample mode), OTHER (another
    vocabulary: the other student's tokenizer as teacher)."""
    from transformers import AutoTokenizer

    w = world()
    rows_b = text_rows(16, seed=11)
    other_tok = AutoTokenizer.from_pretrained(w.other_student)
    return {"B": build_cache(w.root / "mix_b", w.teacher, w.tokenizer, rows_b, per_shard=4),
            "K4": build_cache(w.root / "mix_k4", w.teacher, w.tokenizer, rows_b[:8], k=4),
            "SAMPLE": build_cache(w.root / "mix_sample", w.teacher, w.tokenizer, rows_b[:8], samples=8),
            "SAMPLE_HOT": build_cache(w.root / "mix_sample_hot", w.teacher, w.tokenizer, rows_b[:8], samples=8,
                                      temperature=2.0),
            "OTHER": build_cache(w.root / "mix_other", w.other_student, other_tok, text_rows(8, seed=12))}


@pytest.mark.parametrize("other, keep_k, match", [
    ("OTHER", None, r"teachers' token ids differ \(\d+ vs \d+ token ids\)"),
    ("SAMPLE", None, "is a topk-mode cache and .* a sample-mode cache"),
    ("K4", None, "stores K = 8 ids per position and .* K = 4; a batch holds one K; give --top-k 4"),
])
def test_caches_that_cannot_be_mixed_are_refused_naming_both(caches, other, keep_k, match):
    w = world()
    a, b = str(w.cache), str(caches[other])
    with pytest.raises(ConfigError, match=match) as e:
        check_mixable({a: open_cache(a).index, b: open_cache(b).index}, keep_k=keep_k)
    assert f"--cache {a} and --cache {b} cannot be mixed" in str(e.value)


def test_sample_caches_drawn_at_other_temperatures_are_refused(caches):
    """The loss corrects for one sampling temperature: two sample caches must share it."""
    a, b = str(caches["SAMPLE"]), str(caches["SAMPLE_HOT"])
    with pytest.raises(ConfigError, match=f"{a} was sampled at temperature 1.0 and {b} at 2.0"):
        check_mixable({a: open_cache(a).index, b: open_cache(b).index}, keep_k=None)
    check_mixable({a: open_cache(a).index, a + "/": open_cache(a).index}, keep_k=None)  # one temperature: mixes


def test_rskd_reads_the_sampling_temperature_from_the_index(caches, tmp_path):
    """The trainer passes the index's sparsification.temperature to rskd, for one cache and for a mixture."""
    w = world()
    hot = str(caches["SAMPLE_HOT"])
    for name, cache in (("one", hot), ("mix", [hot, str(caches["SAMPLE_HOT"]) + "/"])):
        out = tmp_path / name
        result = train(TrainSettings(student=str(w.student), cache=cache, output_dir=str(out), loss="rskd", max_steps=1,
                                     per_device_train_batch_size=2, dataloader_num_workers=0))
        assert result["loss"]["options"]["sample_temperature"] == 2.0, name


def test_uld_refuses_a_sample_mode_cache_before_training(caches, tmp_path):
    """Sorted sampled ids are not the teacher's top ranks: on a zipf teacher with 64 draws uld was 0.27 at
    student = teacher (0 on a top-64 cache). Refused before training, in one line naming the mode."""
    w = world()
    with pytest.raises(ConfigError, match=r"--loss uld needs a topk-mode cache .*; .* is a sample-mode cache") as e:
        train(TrainSettings(student=str(w.other_student), cache=str(caches["SAMPLE"]), output_dir=str(tmp_path / "x"),
                            loss="uld", max_steps=1, dataloader_num_workers=0))
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_eval_rskd_reads_the_sampling_temperature_of_the_cache_it_evaluates(caches):
    """`eval --loss rskd` on a cache drawn at tau = 2 (one without sample_logz, where tau is read): its
    kd_loss is rskd at tau = 2, not at the default 1 it assumed before."""
    from logitcache.stages.train.alignment import SameTokenizerTargets
    from logitcache.stages.train.data import CacheSource
    from logitcache.stages.train.evaluate import evaluate, evaluate_source, kd_term
    from logitcache.stages.train.loss_settings import loss_settings
    from logitcache.stages.train.student import load_student

    w = world()
    hot = str(caches["SAMPLE_HOT"])
    got = evaluate(str(w.student), cache=hot, plan=loss_settings("rskd"), device="cpu")["cache"]["kd_loss"]
    student = load_student(str(w.student), dtype=None, device="cpu")
    source = CacheSource(hot, to_item=SameTokenizerTargets(student.vocab_size))

    def kd(tau):
        return evaluate_source(student.model, source, pad_id=student.pad_id, vocab_size=student.vocab_size,
                               kd=kd_term(loss_settings("rskd").reading(tau)))["kd_loss"]

    assert got == pytest.approx(kd(2.0), rel=1e-6) and abs(got - kd(1.0)) > 1e-3 * abs(got)


def test_eval_cache_while_training_reads_its_own_sampling_temperature(caches, tmp_path, capsys):
    """rskd trained on a cache drawn at tau = 1 and evaluated every step on one drawn at tau = 2 (both without
    sample_logz, where tau is read): eval_cache_kd_loss is `logitcache eval --loss rskd` on that checkpoint,
    which reads tau = 2, and not rskd at the training cache's tau = 1 (what it logged before)."""
    from logitcache.pipeline.cli import main
    from logitcache.stages.train.alignment import SameTokenizerTargets
    from logitcache.stages.train.data import CacheSource
    from logitcache.stages.train.evaluate import evaluate_source, kd_term
    from logitcache.stages.train.loss_settings import loss_settings
    from logitcache.stages.train.student import load_student

    w = world()
    hot, out = str(caches["SAMPLE_HOT"]), tmp_path / "out"
    result = train(TrainSettings(student=str(w.student), cache=str(caches["SAMPLE"]), output_dir=str(out),
                                 loss="rskd", max_steps=1, per_device_train_batch_size=2, dataloader_num_workers=0,
                                 save_steps=1, eval_steps=1, eval_cache=hot))
    assert result["loss"]["options"]["sample_temperature"] == 1.0
    logged = next(h["eval_cache_kd_loss"] for h in result["log_history"] if "eval_cache_kd_loss" in h)
    capsys.readouterr()
    checkpoint = str(out / "checkpoint-1")
    assert main(["eval", "--model", checkpoint, "--cache", hot, "--loss", "rskd", "--batch-size", "2",
                 "--device", "cpu", "--json"]) == 0
    assert logged == pytest.approx(json.loads(capsys.readouterr().out)["cache"]["kd_loss"], rel=1e-6)
    student = load_student(checkpoint, dtype=None, device="cpu")
    at_train_tau = evaluate_source(student.model, CacheSource(hot, to_item=SameTokenizerTargets(student.vocab_size)),
                                   pad_id=student.pad_id, vocab_size=student.vocab_size, batch_size=2,
                                   kd=kd_term(loss_settings("rskd").reading(1.0)))["kd_loss"]
    assert abs(logged - at_train_tau) > 1e-3 * abs(logged)


@pytest.mark.parametrize("train_cache, loss, eval_cache, mode", [("SAMPLE", "rskd", "TOPK", "topk"),
                                                                ("TOPK", "bild", "SAMPLE", "sample")])
def test_an_eval_cache_the_loss_cannot_read_is_refused_before_training(caches, tmp_path, train_cache, loss,
                                                                       eval_cache, mode):
    """Before, training ran and logged no kd_loss (rskd, a cache without draw counts) or bild's loss on sampled
    ids, which are not the teacher's top ranks; now it is refused before training, naming the flag."""
    w = world()
    paths = {**caches, "TOPK": w.cache}
    with pytest.raises(ConfigError, match=f"--loss {loss} needs .*; --eval-cache .* is a {mode}-mode cache"):
        train(TrainSettings(student=str(w.student), cache=str(paths[train_cache]), output_dir=str(tmp_path / "x"),
                            loss=loss, max_steps=1, dataloader_num_workers=0, eval_steps=1,
                            eval_cache=str(paths[eval_cache])))
    assert not (tmp_path / "x").exists()


def test_same_vocabulary_other_blocks_are_named(caches):
    w = world()
    index = open_cache(str(w.cache)).index
    changed = json.loads(json.dumps(index))
    changed["tokenizer"]["vocab_blocks"][0] = "0" * 16
    with pytest.raises(ConfigError, match=r"ids 0\.\.\d+ do not all mean the same tokens"):
        check_mixable({"a": index, "b": changed}, keep_k=None)
    check_mixable({"a": index, "k4": open_cache(str(caches["K4"])).index}, keep_k=4)  # --top-k 4 cuts both


# ---- training runs ----------------------------------------------------------------------------------------

def settings(tmp_path, caches, **kw):
    w = world()
    base = dict(student=str(w.student), cache=[str(w.cache), str(caches["B"])], cache_weights=[3, 1],
                output_dir=str(tmp_path / "out"), max_steps=40, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=10, dataloader_num_workers=0,
                save_steps=1000)
    return TrainSettings(**{**base, **kw})


def recorder(monkeypatch):
    seen = []
    step = KDTrainer.training_step

    def recording(self, model, inputs, num_items_in_batch=None):
        seen.append([tuple(row[row != 0].tolist()) for row in inputs["input_ids"]])  # padding is id 0
        return step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(KDTrainer, "training_step", recording)
    return seen


def sequences(url):
    cache = open_cache(url)
    return {tuple(int(t) for t in cache[i]["input_ids"] if t != 0) for i in range(len(cache))}


def test_training_realises_the_mixture_it_was_given(tmp_path, caches, monkeypatch):
    w = world()
    seen = recorder(monkeypatch)
    result = train(settings(tmp_path, caches))
    a, b = sequences(str(w.cache)), sequences(str(caches["B"]))
    assert not a & b
    trained = [s for batch in seen for s in batch]
    from_a, from_b = sum(s in a for s in trained), sum(s in b for s in trained)
    assert from_a + from_b == len(trained) == 160
    assert abs(from_a - 120) < 4 * 5.48  # Binomial(160, 0.75): sd 5.48
    assert result["cache"]["sequences_per_cache"] == {str(w.cache): from_a, str(caches["B"]): from_b}
    assert [m["probability"] for m in result["cache"]["mixture"]] == [0.75, 0.25]
    assert result["global_step"] == 40


def test_training_resumes_the_mixture_exactly(tmp_path, caches, monkeypatch):
    import shutil

    seen = recorder(monkeypatch)
    common = dict(max_steps=7, per_device_train_batch_size=3, dataloader_num_workers=2, save_steps=3, save_total_limit=None)
    train(settings(tmp_path, caches, **common))
    uninterrupted = seen[:]
    out = tmp_path / "out"
    for later in ("checkpoint-6", "checkpoint-7"):
        shutil.rmtree(out / later)
    seen.clear()
    result = train(settings(tmp_path, caches, resume_from_checkpoint=True, **common))
    assert result["global_step"] == 7
    assert seen == uninterrupted[3:]  # the same batches, in the same order
    state = json.loads((out / "logitcache_data_rank0.json").read_text())
    assert sum(state["per_cache"].values()) == 21 and state["num_workers"] == 2


def test_training_refusals(tmp_path, caches):
    w = world()
    with pytest.raises(ConfigError, match="--epochs is not defined for a mixture"):
        train(settings(tmp_path, caches, max_steps=None, num_train_epochs=1))
    with pytest.raises(ConfigError, match="K = 8 .* K = 4"):
        train(settings(tmp_path, caches, cache=[str(w.cache), str(caches["K4"])]))
    with pytest.raises(ConfigError, match="several caches"):
        train(settings(tmp_path, caches, cache=str(w.cache)))
    with pytest.raises(ConfigError, match="trains from one cache at a time"):
        train(settings(tmp_path, caches, student=str(w.other_student), loss="uld", cache_weights=None))


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # torchrun's default rendezvous port: one run at a time
def test_ddp_two_processes_mix_and_resume(tmp_path, caches):
    """torchrun, 2 ranks, 2 caches: stopped at a checkpoint and resumed, each rank trains on the batches
    of an uninterrupted run."""
    import shutil

    w = world()
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def run(out, *extra):
        cmd = [str(torchrun), "--nproc-per-node", "2", str(ENTRY), "train", "--student", str(w.student), "--cache",
               str(w.cache), str(caches["B"]), "--cache-weights", "3", "1", "--loss", "kl", "--out", str(out),
               "--max-steps", "4", "--batch-size", "2", "--num-workers", "1", "--save-steps", "2", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads((out / f"rows_rank{r}.json").read_text()) for r in range(2)]

    whole = run(tmp_path / "whole")
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "whole", part)
    shutil.rmtree(part / "checkpoint-4")
    resumed = run(part, "--resume")
    for r in range(2):
        assert len(whole[r]) == 8 and resumed[r] == whole[r][4:]
    state = json.loads((part / "logitcache_data_rank1.json").read_text())
    assert state["rank"] == 1 and sum(state["per_cache"].values()) == 8
    # Rank 0 drew from cache B before the stop and again after it: B's position was resumed, not restarted.
    b = str(caches["B"])
    at_stop = json.loads((part / "checkpoint-2" / "logitcache_data_rank0.json").read_text())
    at_end = json.loads((part / "logitcache_data_rank0.json").read_text())
    assert at_stop["per_cache"][b] == 1 and at_end["per_cache"][b] == 2


# ---- the command line and YAML -----------------------------------------------------------------------------

def test_cache_lists_from_flags_and_yaml(tmp_path):
    import yaml

    from logitcache.pipeline.cli import _parse_with_config, build_parser
    from logitcache.pipeline.options import check_options

    def parse(*argv):
        parser = build_parser()
        args, from_config = _parse_with_config(parser, ["train", "--student", "o/m", "--out", str(tmp_path), *argv])
        check_options("train", parser._subparsers._group_actions[0].choices["train"], args, from_config)
        return args

    assert parse("--cache", "a", "b", "--cache-weights", "3", "1").cache == ["a", "b"]
    args = parse("--cache", "a", "--cache", "b")
    assert args.cache == ["a", "b"] and args.cache_weights is None
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"cache": ["s3://x/a", "hf://datasets/o/b"], "cache_weights": [0.7, 0.3],
                                      "storage_options": {"anon": True}}))
    args = parse("--config", str(config))
    assert (args.cache, args.cache_weights, args.storage_options) == (["s3://x/a", "hf://datasets/o/b"], [0.7, 0.3],
                                                                      {"anon": True})
    assert parse("--config", str(config), "--cache", "c").cache == ["c"]  # the command line replaces the list
    config.write_text(yaml.safe_dump({"cache": ["a", "b"], "cache_weights": [1, -1]}))
    with pytest.raises(ConfigError, match=r"--cache-weights -1 \(from --config\): must be >= 0"):
        parse("--config", str(config))
    with pytest.raises(ConfigError, match=r"--cache-weights x \(from --config\): expected a number"):
        config.write_text(yaml.safe_dump({"cache": ["a", "b"], "cache_weights": ["x", 1]}))
        parse("--config", str(config))
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="--cache .*afile: is a file"):
        parse("--cache", "a", str(tmp_path / "afile"))
