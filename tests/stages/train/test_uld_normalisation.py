"""ULD's normalisation: the mean over answer tokens (here) against the mean over sequences (llm-recipes).

    .venv/bin/python -m pytest tests/stages/train/test_uld_normalisation.py -q

The ULD paper's code (llm-recipes, models/distillation_model.py) averages the L1 distance over each
sequence's aligned answer tokens, then over the sequences of the batch: every sequence weighs the same.
Stage two averages over all teacher rows of the batch (every answer token weighs the same), like its
other losses and the label cross entropy. The two are one loss when every sequence has as many aligned
rows; otherwise a long answer counts more here. Measured on the test world's 8 prompt/response
sequences (18-34 aligned answer tokens, a student with another tokenizer): value 0.1115 against
0.1098 (1.5 %), gradient cosine 0.977 between the two.
"""

import pytest
import torch
from trainkit import world

from logitcache.stages.train import losses
from logitcache.stages.train.alignment import CrossTokenizerTargets
from logitcache.stages.train.batch_loss import supervised_logits
from logitcache.stages.train.collate import Collator
from logitcache.storage import open_cache


def _batch(keep: int | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    w = world()
    tok = AutoTokenizer.from_pretrained(w.other_student)
    cache = open_cache(str(w.cache))
    items = [CrossTokenizerTargets(tok, fields=("prompt", "response"))(cache[i]) for i in range(8)]
    if keep is not None:  # every sequence cut to its first `keep` aligned rows
        items = [{**it, "kd_positions": it["kd_positions"][:keep],
                  **{k: it[k][:keep] for k in ("teacher_ids", "teacher_logprobs", "tail_mass")}} for it in items]
    b = Collator(pad_id=tok.pad_token_id or 0)(items)
    model = AutoModelForCausalLM.from_pretrained(w.other_student, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    s = supervised_logits(logits, b["rows"], len(tok))
    return s, b, b["rows"][b["kd_select"]] // b["input_ids"].shape[1]


def _both(s, b, seq):
    sel = b["kd_select"]
    cached = (b["teacher_ids"], b["teacher_logprobs"])

    def token_mean(x):
        return losses.uld(x[sel], *cached, tail_mass=b["tail_mass"])

    def sequence_mean(x):
        return torch.stack([losses.uld(x[sel][seq == q], *(c[seq == q] for c in cached),
                                       tail_mass=b["tail_mass"][seq == q]) for q in seq.unique()]).mean()

    out = []
    for fn in (token_mean, sequence_mean):
        x = s.clone().requires_grad_()
        value = fn(x)
        out += [value.detach(), torch.autograd.grad(value, x)[0]]
    return out


def test_token_mean_is_the_sequence_mean_for_equal_answer_lengths():
    s, b, seq = _batch(keep=16)
    assert torch.bincount(seq).tolist() == [16] * 8
    v_tok, g_tok, v_seq, g_seq = _both(s, b, seq)
    torch.testing.assert_close(v_tok, v_seq)
    torch.testing.assert_close(g_tok, g_seq)


def test_token_mean_and_sequence_mean_differ_with_the_answer_lengths():
    s, b, seq = _batch()
    assert len(set(torch.bincount(seq).tolist())) > 1
    v_tok, g_tok, v_seq, g_seq = _both(s, b, seq)
    cosine = torch.nn.functional.cosine_similarity(g_tok.flatten(), g_seq.flatten(), dim=0).item()
    assert v_tok.item() == pytest.approx(0.1115, abs=5e-4) and v_seq.item() == pytest.approx(0.1098, abs=5e-4)
    assert cosine == pytest.approx(0.977, abs=2e-3)
