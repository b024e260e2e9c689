"""Cross-tokenizer ULD on a multi-turn chat: teacher and student answers paired turn by turn, on two real vocabularies.

    .venv/bin/python -m pytest tests/stages/train/test_uld_turns.py -q -m slow     # ~30 s on 2 cores (tokenizer conversion)

Teacher: Qwen2.5-Instruct's tokenizer (151,665 ids); student: the Qwen3.5/3.6 BPE (248,077 ids), which
splits the first answer into another number of tokens. Pairing by index over the joined answers (what
`align_answers` did) shifted every pair of the second and third turns by that difference.
"""

import numpy as np
import pytest
from realtok import qwen35_tokenizer, qwen_tokenizer

from logitcache.stages.train.alignment import CrossTokenizerTargets, encode_example, supervised_positions

pytestmark = pytest.mark.slow

CHAT = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "How do I get to the Tokyo Tower?"},
    {"role": "assistant",
     "content": "Take the Straßenbahn-like Toei line to Akabanebashi; 東京タワー is a short walk."},
    {"role": "user", "content": "And the fare?"},
    {"role": "assistant", "content": "About 220 yen."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "Enjoy the view."},
]


def turns(positions):
    """Runs of consecutive supervised positions: one per assistant turn."""
    return np.split(np.arange(len(positions)), np.flatnonzero(np.diff(positions) > 1) + 1)


def test_three_turn_chat_pairs_each_answer_from_its_first_token():
    teacher, student = qwen_tokenizer("qwen2.5-instruct"), qwen35_tokenizer()
    assert len(teacher) != len(student)
    row = {"messages": CHAT}
    t_ids, t_labels = encode_example(teacher, row)
    t_pos = supervised_positions(t_labels)
    # A cache row per teacher position; its first "cached id" records which position it is.
    seq = {"row_index": 0, "messages": CHAT, "positions": t_pos, "topk_ids": t_pos[:, None].astype(np.int32),
           "topk_logprobs": np.zeros((len(t_pos), 1), np.float32), "tail_mass": np.ones(len(t_pos), np.float32)}
    item = CrossTokenizerTargets(student, fields=("messages",))(seq)
    s_ids = item["input_ids"]
    s_pos = supervised_positions(item["labels"])
    t_turns, s_turns = turns(t_pos), turns(s_pos)
    assert len(t_turns) == len(s_turns) == 3
    t_len = [len(turn) for turn in t_turns]
    s_len = [len(turn) for turn in s_turns]
    assert t_len[0] != s_len[0], (t_len, s_len)  # the first answer is split differently: a drift to undo

    def text(tok, ids, positions):
        return tok.decode(ids[np.asarray(positions) + 1])

    answers = [m["content"] for m in CHAT if m["role"] == "assistant"]
    pairs = list(zip(item["teacher_ids"][:, 0].tolist(), item["kd_positions"].tolist()))
    assert len(pairs) == sum(min(a, b) for a, b in zip(t_len, s_len))
    start = 0
    for j, (t_turn, s_turn) in enumerate(zip(t_turns, s_turns)):
        turn = pairs[start:start + min(len(t_turn), len(s_turn))]
        start += len(turn)
        t_text = text(teacher, t_ids, [p for p, _ in turn])
        s_text = text(student, s_ids, [p for _, p in turn])
        # Each side's paired tokens are this turn's answer, from its first token on.
        assert (answers[j] + "<|im_end|>\n").startswith(t_text) and t_text, (j, t_text)
        assert (answers[j] + "<|im_end|>\n").startswith(s_text) and s_text, (j, s_text)
        # ... and the first pair is the answer's first token on both sides.
        first_t, first_s = text(teacher, t_ids, [turn[0][0]]), text(student, s_ids, [turn[0][1]])
        assert answers[j].startswith(first_t) and answers[j].startswith(first_s), (j, first_t, first_s)
