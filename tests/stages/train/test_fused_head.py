"""The fused head + loss: the same loss as the model's logits, in value and gradient; no (B, T, V) logits.

    .venv/bin/python -m pytest tests/stages/train/test_fused_head.py -x -q
    .venv/bin/python -m pytest tests/stages/train/test_fused_head.py -x -q -m slow   # the 151,936-token train run
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from logitcache.stages.train.batch_loss import fused_head_loss, loss_parts
from logitcache.stages.train.loss_settings import loss_settings
from logitcache.stages.train.losses import registry
from logitcache.storage.head import apply_head

# Options where a loss's default would make the case trivial (kl at T = 1) or not fit K = 6 (bild's k = 8).
OPTIONS = {"kl": ({"temperature": 2.0}, {"tail": "renorm"}), "bild": ({"top_k": 4},)}
TRANSFORMS = {"plain": {}, "softcap+scale": {"softcap": 3.0, "logit_scale": 0.7, "hidden_scale": 1.3}}


def cases() -> list[tuple[str, dict]]:
    """(loss, options) for every loss of the registry, read at collection time (a new loss is a case)."""
    return [(name, options) for name in registry.names() for options in OPTIONS.get(name, ({},))]


CASES = cases()


def make_batch(n=13, v=300, h=16, k=6, *, subset: bool, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(v, generator=g) * 0.1).to(dtype)
    t = torch.randn(n, v, generator=g, dtype=torch.float64).mul(3)
    lp, ids = t.log_softmax(-1).float().topk(k, -1)
    select = torch.tensor([8, 0, 2, 3, 6, 12]) if subset else torch.arange(n)  # unsorted on purpose
    batch = {"next_ids": torch.randint(0, v, (n,), generator=g), "kd_select": select,
             "teacher_ids": ids[select], "teacher_logprobs": lp[select],
             "tail_mass": (1 - lp.exp().sum(-1))[select],
             "sample_counts": torch.randint(1, 5, (len(select), k), generator=g)}
    return hidden, weight, bias, batch


def run_both(name, options, hidden, weight, bias, batch, *, transform, ce_weight, kd_weight, chunk_size):
    """(fused total, metrics, grads), (unfused ...): grads of hidden, weight and bias."""
    out = []
    for fused in (True, False):
        h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        plan = loss_settings(name, options=options, ce_weight=ce_weight, kd_weight=kd_weight)
        if fused:
            total, metrics = fused_head_loss(h, w, b, batch, plan, chunk_size=chunk_size, transform=transform)
        else:
            total, metrics = loss_parts(apply_head(h, w, b, **transform), batch, plan)
        (total * 0.5).backward()  # a grad_output other than 1
        out.append((total.detach(), metrics, (h.grad, w.grad, b.grad)))
    return out


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in CASES])
@pytest.mark.parametrize("transform", list(TRANSFORMS), ids=list(TRANSFORMS))
@pytest.mark.parametrize("subset", [False, True], ids=["every-row", "teacher-subset"])
def test_fused_equals_unfused_fp32(name, options, transform, subset):
    """Value, metrics and the gradients of hidden states, head weight and bias, over 4 chunks of rows."""
    hidden, weight, bias, batch = make_batch(subset=subset)
    weights = (1.0, 0.0) if name == "sft" else (0.5, 2.0)
    (got, got_m, got_g), (want, want_m, want_g) = run_both(
        name, options, hidden, weight, bias, batch, transform=TRANSFORMS[transform], ce_weight=weights[0],
        kd_weight=weights[1], chunk_size=4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert set(got_m) == set(want_m) and "ce" in got_m
    for key in got_m:
        torch.testing.assert_close(got_m[key].float(), want_m[key].float(), rtol=1e-5, atol=1e-6, msg=key)
    for g, w, what in zip(got_g, want_g, ("hidden", "weight", "bias")):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=what)


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in CASES])
def test_fused_equals_unfused_bf16(name, options):
    """bf16 hidden states and head: the same logits chunk by chunk; gradients within bf16 rounding."""
    hidden, weight, bias, batch = make_batch(subset=True, dtype=torch.bfloat16, seed=1)
    weights = (1.0, 0.0) if name == "sft" else (1.0, 1.0)
    (got, _, got_g), (want, _, want_g) = run_both(
        name, options, hidden, weight, bias, batch, transform=TRANSFORMS["softcap+scale"], ce_weight=weights[0],
        kd_weight=weights[1], chunk_size=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, w, what in zip(got_g, want_g, ("hidden", "weight", "bias")):
        assert g.dtype == torch.bfloat16, what
        # bf16 has 8 bits of mantissa: the unfused weight gradient is one bf16 matmul over all rows,
        # the fused one a float32 sum of per-chunk matmuls, rounded once.
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2 * w.float().abs().max().item(), msg=what)


def test_ce_weight_zero_skips_rows_without_teacher_and_no_grad_mode_runs():
    hidden, weight, bias, batch = make_batch(subset=True)
    (got, got_m, got_g), (want, _, want_g) = run_both("kl", {}, hidden, weight, bias, batch, transform={},
                                                      ce_weight=0.0, kd_weight=1.0, chunk_size=3)
    torch.testing.assert_close(got, want)
    assert "ce" not in got_m
    unsupervised = torch.ones(13, dtype=torch.bool)
    unsupervised[batch["kd_select"]] = False
    assert got_g[0][unsupervised].abs().sum() == 0 and got_g[0][~unsupervised].abs().sum() > 0
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        total, _ = fused_head_loss(hidden, weight, bias, batch, loss_settings("kl", ce_weight=0.0), chunk_size=3)
    torch.testing.assert_close(total, want)


@pytest.mark.parametrize("name", ["bild", "kl"])
def test_rows_without_teacher_rows_at_ce_weight_zero_backpropagate_a_zero(name):
    """bild's default ce_weight = 0 on a micro-batch whose supervised rows have no teacher row: the
    unfused path (FSDP, DeepSpeed, a non-Linear head) returned a zero with no graph, and backward raised."""
    hidden, weight, bias, batch = make_batch(subset=True)
    batch = {**batch, **{key: batch[key][:0] for key in ("kd_select", "teacher_ids", "teacher_logprobs",
                                                          "tail_mass", "sample_counts")}}
    (got, got_m, got_g), (want, want_m, want_g) = run_both(name, OPTIONS.get(name, ({},))[0], hidden, weight, bias,
                                                           batch, transform={}, ce_weight=0.0, kd_weight=1.0,
                                                           chunk_size=4)
    assert float(got) == float(want) == 0.0 and got_m == want_m == {}
    for g, w in zip(got_g, want_g):
        assert g is not None and w is not None and not g.any() and not w.any()


def test_trainer_fused_and_unfused_steps_agree(tmp_path):
    """KDTrainer.compute_loss on a real (tiny Llama) student and cache: fused = model logits path."""
    from transformers import AutoModelForCausalLM
    from trainkit import world

    from logitcache.stages.train.alignment import SameTokenizerTargets
    from logitcache.stages.train.collate import Collator
    from logitcache.stages.train.student import fused_head_problem
    from logitcache.stages.train.trainer import KDTrainer, training_arguments
    from logitcache.storage import open_cache

    w = world()
    cache = open_cache(str(w.cache))
    v = len(w.tokenizer)
    batch = Collator(pad_id=0)([SameTokenizerTargets(v)(cache[i]) for i in range(3)])
    grads = []
    for fused in (True, False):
        model = AutoModelForCausalLM.from_pretrained(w.padded_student, dtype=torch.float32)
        assert fused_head_problem(model) is None
        trainer = KDTrainer(model=model, args=training_arguments(str(tmp_path / str(fused)), max_steps=1,
                                                                 report_to="none", use_cpu=True),
                            plan=loss_settings("bild", top_k=4), vocab_size=v, chunk_size=7, fused_head=fused)
        assert trainer.fused_head is fused
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, dict(trainer._sums)))
    (got, got_g, got_m), (want, want_g, want_m) = grads
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_g.keys() == want_g.keys()
    for name in got_g:
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-4, atol=1e-6, msg=name)
    assert got_g["lm_head.weight"][v:].abs().sum() == 0  # padded columns: never in the loss
    for name in want_m:
        torch.testing.assert_close(got_m[name], want_m[name], rtol=1e-5, atol=1e-6)


_PEAK_SCRIPT = r"""
import gc, json, sys
sys.path.insert(0, sys.argv[1])
import torch
from big_vocab import big_world
from logitcache.stages.train.run import TrainSettings, train

w = big_world(sys.argv[2])
# The modules `train` imports on first use (the Trainer: ~70 MB) are no part of a step's memory.
import logitcache.stages.train.student, logitcache.stages.train.trainer  # noqa: E401
out = {"tokens": w["tokens"], "vocab": w["vocab"]}
for mode in ("fused", "unfused"):
    settings = TrainSettings(student=str(w["student"]), cache=str(w["cache"]), output_dir=f"{sys.argv[3]}/{mode}",
                             loss="kl", max_steps=2, per_device_train_batch_size=8, learning_rate=1e-3,
                             logging_steps=1, dataloader_num_workers=0, save_steps=1000,
                             chunk_size=64, fused_head=mode == "fused")
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
    before = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
    train(settings)
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    out[mode] = peak - before
from transformers import AutoModelForCausalLM
out["param_bytes"] = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(w["student"]).parameters())
print(json.dumps(out))
"""


@pytest.mark.slow
def test_train_on_a_152k_vocabulary_never_builds_the_full_logits(big_vocab_world, tmp_path):
    """`train` with a 151,936-token student: peak RSS growth below one (B, T, V) fp32 logits tensor.

    8 sequences of 128 tokens: the (B, T, V) logits are 622 MB in fp32. The unfused step (the
    yardstick) holds them, their gradient and more (measured 3.6 such tensors); the fused one holds
    64-row chunks. Both hold the fp32 model, its gradient and AdamW's two moments (4 x the
    parameters, 156 MB with the tied 151,936 x 64 embedding), which is subtracted. Measured in
    a fresh process whose glibc returns freed tensors to the system at once (see test_losses'
    `peak_memory`), with the training modules imported first: the fused run first, then the
    yardstick in the same process (one start-up less); whatever the first run left behind can only
    lower the second's growth, so the yardstick's assert holds a fortiori. Measured 2026-11-30: fused
    255 MB net of the state (the bound is 311 MB; a step that held the logits once would be 622+),
    unfused 1,830 MB (bound 1,245 MB). (The world was built by the measuring process before; its
    freed heap hid ~30 MB of the fused step's growth: 226 MB then.)
    """
    if sys.platform != "linux" or not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's resettable peak RSS")
    from trainkit import SUPPORT

    here = str(SUPPORT)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, here, str(big_vocab_world), str(tmp_path)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    logits_bytes = out["tokens"] * out["vocab"] * 4
    state = 4 * out["param_bytes"]
    assert out["unfused"] - state > 2 * logits_bytes, out  # the yardstick is what we think it is
    assert out["fused"] - state < 0.5 * logits_bytes, out


def test_the_fused_head_is_refused_with_its_reason_under_deepspeed_and_for_lora_under_fsdp():
    """FSDP alone keeps the fused head (test_trainer_fsdp.py); DeepSpeed and LoRA under FSDP get a reason."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trainkit import world

    from logitcache.stages.train.student import fused_head_problem

    model = AutoModelForCausalLM.from_pretrained(world().student, dtype=torch.float32)
    fsdp, deepspeed = SimpleNamespace(fsdp=["full_shard"], deepspeed=None), SimpleNamespace(fsdp=[], deepspeed="ds.json")
    assert fused_head_problem(model, fsdp) is None
    assert "DeepSpeed" in fused_head_problem(model, deepspeed)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert fused_head_problem(lora) is None
    assert "without LoRA" in fused_head_problem(lora, fsdp) == fused_head_problem(lora, fsdp=True)
