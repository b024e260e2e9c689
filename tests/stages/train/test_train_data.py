"""Stage two's data: alignment, splitting across ranks and workers, resume, collation, ULD alignment.

    .venv/bin/pytest tests/stages/train/test_train_data.py
"""

import json
import weakref

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from trainkit import world

from logitcache.stages.train.alignment import (IGNORE, CrossTokenizerTargets, SameTokenizerTargets, align_answers,
                                               encode_example, fold_out_of_vocab, keep_first_k, supervised_positions)
from logitcache.stages.train.collate import Collator
from logitcache.stages.train.data import CacheSource, RowsSource, ShardedStream
from logitcache.storage import open_cache
from logitcache.storage.errors import ConfigError, InvalidDataError


class ListSource:
    """Shards of consecutive integers; an item is its global number. Tracks resident shards."""

    def __init__(self, sizes):
        self.shard_sizes = list(sizes)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.identity = {"sizes": self.shard_sizes}
        self.live, self.peak = 0, 0

    def load(self, j):
        shard = _Shard(list(range(self.starts[j], self.starts[j + 1])))
        self.live += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(shard, self._freed)
        return shard

    def _freed(self):
        self.live -= 1

    def item(self, shard, s):
        return {"n": shard.values[s]}


class _Shard:
    def __init__(self, values):
        self.values = values


def _ids_only(seq):
    return {"row_index": seq["row_index"], "input_ids": seq["input_ids"], "labels": seq["input_ids"]}


def _numbers(stream):
    return [it["n"] for it in stream]


# ---- alignment -------------------------------------------------------------------------------------

def test_alignment_toy_labels_and_targets():
    """Row t predicts token t+1: the label sits at t+1 and the collated target of row t is input_ids[t+1]."""
    seq = {"row_index": 3, "input_ids": np.array([10, 11, 12, 13, 14]), "positions": np.array([3, 1]),
           "topk_ids": np.array([[14, 2], [12, 3]]), "topk_logprobs": np.log([[0.5, 0.25], [0.75, 0.125]]),
           "tail_mass": np.array([0.25, 0.125])}
    item = SameTokenizerTargets(vocab_size=20)(seq)
    assert item["labels"].tolist() == [IGNORE, IGNORE, 12, IGNORE, 14]
    assert item["kd_positions"].tolist() == [1, 3]                       # sorted; rows follow
    assert item["teacher_ids"].tolist() == [[12, 3], [14, 2]]
    batch = Collator(pad_id=0)([item])
    assert batch["rows"].tolist() == [1, 3]
    assert batch["next_ids"].tolist() == [12, 14]
    assert batch["teacher_ids"][:, 0].tolist() == batch["next_ids"].tolist()  # the toy teacher is right


def test_alignment_teacher_as_student_reproduces_the_cache():
    """The teacher's own HF logits, gathered at the collated rows, give back the cached log-probs."""
    from transformers import AutoModelForCausalLM

    w = world()
    model = AutoModelForCausalLM.from_pretrained(w.teacher, dtype=torch.float32).eval()
    cache = open_cache(str(w.cache))
    items = [SameTokenizerTargets(len(w.tokenizer))(cache[i]) for i in range(3)]
    batch = Collator(pad_id=w.tokenizer.pad_token_id)(items)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), -1)[batch["rows"]]
    got = logp.gather(1, batch["teacher_ids"])
    assert torch.allclose(got, batch["teacher_logprobs"], atol=1e-4)
    assert torch.equal(logp.argmax(-1), batch["teacher_ids"][:, 0])


def test_fold_out_of_vocab_moves_padded_columns_to_the_tail():
    rows = {"teacher_ids": np.array([[9, 3, 11], [12, 13, 14]]), "teacher_logprobs": np.log([[0.4, 0.3, 0.2], [0.5, 0.3, 0.1]]),
            "tail_mass": np.array([0.1, 0.1], dtype=np.float32)}
    kept = fold_out_of_vocab(rows, vocab_size=10)
    assert kept.tolist() == [True, False]
    assert rows["teacher_ids"][0].tolist() == [9, 3, -1]
    assert rows["tail_mass"][0] == pytest.approx(0.3)


def test_keep_first_k_adds_the_rest_to_the_tail():
    rows = {"teacher_ids": np.array([[1, 2, 3]]), "teacher_logprobs": np.log([[0.5, 0.25, 0.125]]),
            "tail_mass": np.array([0.125], dtype=np.float32)}
    keep_first_k(rows, 2)
    assert rows["teacher_ids"].tolist() == [[1, 2]]
    assert rows["tail_mass"][0] == pytest.approx(0.25)


# ---- cross-tokenizer (ULD) ---------------------------------------------------------------------------

def test_align_answers_from_the_first_answer_token_truncated_to_the_shorter():
    rows, pos = align_answers(np.arange(3, 8), np.array([7, 8, 9]))
    assert rows.tolist() == [0, 1, 2] and pos.tolist() == [7, 8, 9]
    rows, pos = align_answers(np.array([3, 4]), np.array([7, 8, 9]))
    assert rows.tolist() == [0, 1] and pos.tolist() == [7, 8]


def test_align_answers_turn_by_turn():
    """Three turns of 3 / 2 / 2 teacher tokens and 2 / 3 / 1 student tokens: each turn from its first token."""
    teacher = np.array([10, 11, 12, 20, 21, 30, 31])
    student = np.array([5, 6, 15, 16, 17, 25])
    rows, pos = align_answers(teacher, student)
    assert rows.tolist() == [0, 1, 3, 4, 5] and pos.tolist() == [5, 6, 15, 16, 25]
    rows, pos = align_answers(teacher, student[:2])  # a truncated student: the turns both sides have
    assert rows.tolist() == [0, 1] and pos.tolist() == [5, 6]


def test_cross_tokenizer_item_reencodes_the_stored_text():
    from transformers import AutoTokenizer

    w = world()
    other = AutoTokenizer.from_pretrained(w.other_student)
    seq = open_cache(str(w.cache))[0]
    item = CrossTokenizerTargets(other, fields=("prompt", "response"))(seq)
    ids, labels = encode_example(other, {"prompt": seq["prompt"], "response": seq["response"]})
    prompt_len = len(other(seq["prompt"])["input_ids"])
    assert item["input_ids"].tolist() == ids.tolist()
    n = min(len(seq["positions"]), int((labels != IGNORE).sum()))
    assert item["kd_positions"].tolist() == list(range(prompt_len - 1, prompt_len - 1 + n))
    assert np.array_equal(item["teacher_ids"], seq["topk_ids"][:n])
    batch = Collator(pad_id=0)([item])
    assert len(batch["kd_select"]) == n and batch["kd_select"].tolist() == list(range(n))


def test_cross_tokenizer_chat_pairs_assistant_spans_in_order():
    """A chat cache re-rendered with the student's own template: its assistant tokens pair with the teacher's."""
    from transformers import AutoTokenizer

    from logitcache.storage.inputs import encode_chat

    w = world()
    other = AutoTokenizer.from_pretrained(w.other_student)
    msgs = [{"role": "user", "content": "the teacher reads"}, {"role": "assistant", "content": "every token once"},
            {"role": "user", "content": "and keeps"}, {"role": "assistant", "content": "the few most likely"}]
    seq = {"row_index": 3, "messages": encode_chat(msgs), "positions": np.arange(10, 30, dtype=np.int32),
           "topk_ids": np.arange(40).reshape(20, 2), "topk_logprobs": np.full((20, 2), -1.0, np.float32),
           "tail_mass": np.zeros(20, np.float32)}
    item = CrossTokenizerTargets(other, fields=("messages",))(seq)
    supervised = other.decode(item["input_ids"][item["kd_positions"] + 1])
    assert supervised.startswith("every token once<|eos|>")
    n = len(item["kd_positions"])
    assert 0 < n <= 20 and np.array_equal(item["teacher_ids"], seq["topk_ids"][:n])
    with pytest.raises(ConfigError, match="messages"):
        CrossTokenizerTargets(None, fields=("messages", "extra"))


def test_cross_tokenizer_refuses_plain_text_caches():
    """Token-index pairing of two tokenizations of a whole document drifts: refused, naming the way out."""
    with pytest.raises(ConfigError, match="prompt/response or chat cache.*plain 'text'"):
        CrossTokenizerTargets(None, fields=("text",))


# ---- splitting, shuffling, memory -------------------------------------------------------------------

def test_two_ranks_two_workers_no_duplicate_no_miss():
    w = world()
    source = CacheSource(str(w.cache), to_item=_ids_only)
    seen = []
    for rank in range(2):
        stream = ShardedStream(source, seed=5, epochs=1, rank=rank, world_size=2)
        loader = DataLoader(stream, batch_size=2, num_workers=2, collate_fn=Collator(pad_id=0))
        mine = [r for batch in loader for r in batch["row_index"].tolist()]
        assert len(mine) == 12
        seen.append(mine)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(24))


def test_uneven_split_gives_every_rank_the_same_count_and_varies_by_epoch():
    source = ListSource([5, 3, 7, 1, 6])  # 22 sequences over 3 ranks: 7 each, 1 left out per epoch
    per_epoch = []
    for epoch in range(2):
        got = []
        for rank in range(3):
            stream = ShardedStream(source, seed=1, epochs=epoch + 1, rank=rank, world_size=3)
            numbers = _numbers(stream)[7 * epoch:]
            assert len(numbers) == 7
            got += numbers
        assert len(set(got)) == 21
        per_epoch.append(got)
    assert per_epoch[0] != per_epoch[1]


def test_shuffle_depends_on_seed_and_keeps_at_most_window_shards_resident():
    a = ListSource([10] * 6)
    first = _numbers(ShardedStream(a, seed=0, epochs=1, window=2, rank=0, world_size=1))
    assert sorted(first) == list(range(60)) and first != list(range(60))
    assert a.peak <= 2
    again = _numbers(ShardedStream(ListSource([10] * 6), seed=0, epochs=1, rank=0, world_size=1))
    other = _numbers(ShardedStream(ListSource([10] * 6), seed=1, epochs=1, rank=0, world_size=1))
    assert first == again and first != other
    plain = _numbers(ShardedStream(ListSource([10] * 6), shuffle=False, epochs=1, rank=0, world_size=1))
    assert plain == list(range(60))


def test_keys_reference_matches_iteration():
    stream = ShardedStream(ListSource([4, 9, 2, 7]), seed=3, epochs=2, rank=1, world_size=2)
    source = stream.source
    expected = [int(source.starts[j] + s) for j, s in stream.keys(0, 1)]
    assert expected == _numbers(stream)


def test_too_few_sequences_for_the_ranks_is_refused():
    with pytest.raises(ConfigError, match="cannot be split"):
        ShardedStream(ListSource([1]), rank=0, world_size=2)


# ---- resume ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_sees_no_duplicate_or_missing_sequence(num_workers):
    w = world()

    def make():
        source = CacheSource(str(w.cache), to_item=SameTokenizerTargets(len(w.tokenizer)))
        return ShardedStream(source, seed=7, epochs=2, rank=0, world_size=1)

    collate = Collator(pad_id=0)
    stream = make()
    first = []
    for i, batch in enumerate(DataLoader(stream, batch_size=3, num_workers=num_workers, collate_fn=collate)):
        stream.record(batch["stream"])
        first += batch["row_index"].tolist()
        if i == 10:  # mid-way through the second epoch (8 batches an epoch)
            break
    state = json.loads(json.dumps(stream.state_dict()))
    assert state["consumed"] and sum(state["consumed"]) == len(first)

    resumed = make()
    resumed.load_state_dict(state)
    rest = []
    for batch in DataLoader(resumed, batch_size=3, num_workers=num_workers, collate_fn=collate):
        resumed.record(batch["stream"])
        rest += batch["row_index"].tolist()
    assert resumed.consumed() == 48 and resumed.epoch_progress() == 2.0
    everything = first + rest
    assert sorted(everything) == sorted(list(range(24)) * 2)
    # No sequence repeats within an epoch, and the epoch boundary is where the uninterrupted run has it.
    uninterrupted = [r for b in DataLoader(make(), batch_size=3, num_workers=num_workers, collate_fn=collate)
                     for r in b["row_index"].tolist()]
    assert sorted(everything) == sorted(uninterrupted)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_read_ahead_gives_each_worker_the_uninterrupted_items(num_workers):
    """The cache's shards are fetched ahead of their windows (the default); a resume mid-window hands
    every worker exactly the items, in order and in content, that the uninterrupted run has from there."""
    w = world()

    def make():
        source = CacheSource(str(w.cache), to_item=SameTokenizerTargets(len(w.tokenizer)))
        return ShardedStream(source, seed=4, window=3, epochs=2, rank=0, world_size=1)

    def per_worker(loader, stream, stop=None):
        got = {}
        for i, batch in enumerate(loader):
            stream.record(batch["stream"])
            worker = int(batch["stream"][0, 0])
            item_of_row = batch["rows"][batch["kd_select"]] // batch["input_ids"].shape[1]  # rows are b * T + t
            for b, row in enumerate(batch["row_index"].tolist()):
                got.setdefault(worker, []).append((row, batch["teacher_logprobs"][item_of_row == b].sum().item()))
            if stop is not None and i == stop:
                break
        return got

    def loader(stream):
        return DataLoader(stream, batch_size=2, num_workers=num_workers, collate_fn=Collator(pad_id=0))

    reference = per_worker(loader(make()), make())
    stream = make()
    first = per_worker(loader(stream), stream, stop=8)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(stream.state_dict())))
    rest = per_worker(loader(resumed), resumed)
    assert sorted(reference) == sorted(rest)
    for worker, items in reference.items():
        assert first.get(worker, []) + rest[worker] == items


def test_resume_refuses_another_layout():
    stream = ShardedStream(ListSource([4, 4]), seed=0, rank=0, world_size=1)
    state = stream.state_dict()
    with pytest.raises(ConfigError, match="seed"):
        ShardedStream(ListSource([4, 4]), seed=1, rank=0, world_size=1).load_state_dict(state)
    state = {**state, "num_workers": 2, "consumed": [1, 1]}
    resumed = ShardedStream(ListSource([4, 4]), seed=0, rank=0, world_size=1)
    resumed.load_state_dict(state)
    with pytest.raises(ConfigError, match="2 DataLoader worker"):
        next(iter(resumed))


# ---- text without a cache, collation ------------------------------------------------------------------

def test_rows_source_and_response_only_labels(tmp_path):
    from logitcache.stages.train.alignment import TextExample
    from logitcache.storage.rows import load_rows

    w = world()
    rows, _ = load_rows(str(w.train))
    source = RowsSource(rows, name=str(w.train), to_item=TextExample(w.tokenizer), rows_per_shard=5)
    assert source.shard_sizes == [5, 5, 5, 5, 4]
    items = list(ShardedStream(source, shuffle=False, epochs=1, rank=0, world_size=1))
    assert [it["row_index"] for it in items] == list(range(24))
    first = items[0]
    prompt_len = len(w.tokenizer(w.rows[0]["prompt"])["input_ids"])
    assert (first["labels"][:prompt_len] == IGNORE).all()
    assert first["labels"][-1] == w.tokenizer.eos_token_id
    assert supervised_positions(first["labels"])[0] == prompt_len - 1


def test_text_example_reads_chats_with_assistant_only_labels():
    """`train --data` / `--eval-data` / `eval --data` rows may be chats: assistant turns are the labels."""
    from logitcache.stages.train.alignment import TextExample

    w = world()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the teacher"},
            {"role": "assistant", "content": "reads every token"}, {"role": "user", "content": "and then"},
            {"role": "assistant", "content": "keeps the few"}]
    item = TextExample(w.tokenizer)({"messages": msgs, "row_index": 4})
    assert item["input_ids"].tolist() == w.tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False)
    labelled = w.tokenizer.decode(item["input_ids"][item["labels"] != IGNORE])
    assert labelled == "reads every token<|eos|>\nkeeps the few<|eos|>\n"
    with pytest.raises(InvalidDataError, match="row 5: needs a 'messages' list"):
        TextExample(w.tokenizer)({"question": "?", "row_index": 5})


def test_collator_pads_and_packs_rows():
    items = [{"input_ids": np.array([1, 2, 3]), "labels": np.array([IGNORE, 2, 3]), "row_index": 0,
              "kd_positions": np.array([1]), "teacher_ids": np.array([[3, 4]]), "teacher_logprobs": np.zeros((1, 2), np.float32),
              "tail_mass": np.zeros(1, np.float32)},
             {"input_ids": np.array([5, 6]), "labels": np.array([IGNORE, 6]), "row_index": 1,
              "kd_positions": np.array([0]), "teacher_ids": np.array([[6, 7]]), "teacher_logprobs": np.zeros((1, 2), np.float32),
              "tail_mass": np.zeros(1, np.float32)}]
    batch = Collator(pad_id=9)(items)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 6, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, 6, IGNORE]]
    assert batch["rows"].tolist() == [0, 1, 3]            # b * T + t
    assert batch["next_ids"].tolist() == [2, 3, 6]
    assert batch["kd_select"].tolist() == [1, 2]
    assert batch["teacher_ids"].tolist() == [[3, 4], [6, 7]]


def test_streams_a_cache_from_an_fsspec_url():
    import fsspec

    w = world()
    fs = fsspec.filesystem("memory")
    fs.put(str(w.cache), "/train-data-cache", recursive=True)
    source = CacheSource("memory://train-data-cache", to_item=SameTokenizerTargets(len(w.tokenizer)))
    rows = [it["row_index"] for it in ShardedStream(source, seed=2, epochs=1, rank=0, world_size=1)]
    assert sorted(rows) == list(range(24))


def test_check_rendering_refuses_options_a_cache_cannot_take():
    """Given chat options must be the recorded ones where the cached ids are used as they are; --prompt-format
    must be the cache's for any student (it decided the supervised positions)."""
    from logitcache.stages.train.sources import Reader, check_rendering
    from logitcache.storage.errors import ConfigError
    from logitcache.storage.inputs import ChatOptions

    chat = {"inputs": {"kind": "chat", "chat_template_kwargs": {"enable_thinking": False}}}
    old = {"inputs": {"kind": "prompt_response", "prompt_format": "chat"}}  # a cache made before chat options
    reader = lambda **kw: Reader("s", None, 8, None, **kw)  # noqa: E731
    for index in (chat, old):
        check_rendering(index, reader(), cache="c", same_tokenizer=True)  # nothing given: the cache's own
    check_rendering(chat, reader(chat=ChatOptions(kwargs={"enable_thinking": False})), cache="c", same_tokenizer=True)
    check_rendering(chat, reader(chat=ChatOptions("{{ x }}", {"enable_thinking": True})), cache="c",
                    same_tokenizer=False)  # re-rendered: given options apply
    with pytest.raises(ConfigError, match=r"enable_thinking=True \(the cache: False\)"):
        check_rendering(chat, reader(chat=ChatOptions(kwargs={"enable_thinking": True})), cache="c",
                        same_tokenizer=True)
    with pytest.raises(ConfigError, match=r"--chat-template \(the cache: the tokenizer's own template\), "
                                          r"enable_thinking=False \(the cache: not set\)"):
        check_rendering(old, reader(chat=ChatOptions("{{ x }}", {"enable_thinking": False})), cache="c",
                        same_tokenizer=True)
    with pytest.raises(ConfigError, match="--prompt-format plain: the cache c was written with --prompt-format chat"):
        check_rendering(old, reader(prompt_format="plain"), cache="c", same_tokenizer=False)
