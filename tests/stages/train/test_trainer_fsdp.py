"""FSDP2 on CPU: two gloo ranks under torchrun train the same as DDP, and resume exactly, with the fused head.

    .venv/bin/pytest tests/stages/train/test_trainer_fsdp.py -m slow   # four torchrun runs, one accelerate launch; ~6 min

The DDP baseline is `trainkit.ddp_run()`, the run test_trainer.py's DDP test checks too (one launch
for both when they run in one process).

accelerate turns `--fsdp` (or an accelerate FSDP config) into DDP on a multi-process CPU run without
a word; `trainer.cpu_fsdp` makes it FSDP2 (`fully_shard`), which runs on gloo. These tests check that it really shards (the
model the steps run is FSDP2's class), that the losses equal DDP's on the same batches (the fused head
computes the loss inside the forward, where FSDP has gathered the head's weight), and that
stopping at a checkpoint and resuming gives the uninterrupted run's batches and losses; evaluation
while training (`--eval-cache`) runs under FSDP and gives DDP's numbers.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trainkit import DDP_ENTRY, SUPPORT, ddp_run, torchrun_train, world
pytestmark = pytest.mark.slow


def step_logs(result: dict) -> dict[int, dict]:
    return {h["step"]: h for h in result["log_history"] if "loss" in h}


@pytest.mark.xdist_group("torchrun")  # torchrun's default rendezvous port: one run at a time
def test_fsdp_trains_like_ddp_and_resumes_exactly(tmp_path):
    _, ddp = ddp_run()
    fsdp = torchrun_train(tmp_path / "fsdp", "--fsdp", "full_shard")
    assert ddp["wrapper"] == ["DistributedDataParallel"] * 2
    assert fsdp["wrapper"] == ["FSDPLlamaForCausalLM"] * 2  # fully_shard's class: parameters are DTensor shards
    assert ddp["fused_head"] is fsdp["fused_head"] is True  # the loss under FSDP too is the fused head's
    assert fsdp["rows"] == ddp["rows"] and not set(fsdp["rows"][0]) & set(fsdp["rows"][1])
    got, want = step_logs(fsdp), step_logs(ddp)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:  # the same batches and the same arithmetic up to the reduction order
        for key in ("loss", "ce", "kd"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-3, abs=1e-4), (step, key)
    assert got[4]["ce"] < got[1]["ce"] - 1.0  # it trains
    # Evaluation while training runs under FSDP too (every rank joins the sharded forward).
    evals = {name: [h for h in r["log_history"] if "eval_cache_kd_loss" in h] for name, r in (("d", ddp), ("f", fsdp))}
    assert [h["step"] for h in evals["f"]] == [4]
    for key in ("eval_cache_kd_loss", "eval_cache_nll", "eval_cache_teacher_agreement"):
        assert evals["f"][0][key] == pytest.approx(evals["d"][0][key], rel=1e-4), key
    state = json.loads((tmp_path / "fsdp" / "checkpoint-2" / "logitcache_data_rank1.json").read_text())
    assert state["rank"] == 1 and state["world_size"] == 2 and state["consumed"] == [4]

    # Stop after step 2 (its checkpoint holds the sharded optimizer and each rank's data position); resume.
    out = tmp_path / "fsdp"
    shutil.rmtree(out / "checkpoint-4")
    resumed = torchrun_train(out, "--fsdp", "full_shard", "--resume")
    assert resumed["wrapper"] == ["FSDPLlamaForCausalLM"] * 2
    assert resumed["global_step"] == 4 and resumed["fused_head"] is True
    assert resumed["rows"] == [rows[4:] for rows in fsdp["rows"]]  # exactly the uninterrupted run's steps 3-4
    again = step_logs(resumed)
    for step in (3, 4):
        for key in ("loss", "ce", "kd", "grad_norm"):
            assert again[step][key] == pytest.approx(got[step][key], rel=1e-5), (step, key)
    resumed_eval = [h for h in resumed["log_history"] if "eval_cache_kd_loss" in h][-1]
    assert resumed_eval["eval_cache_kd_loss"] == pytest.approx(evals["f"][0]["eval_cache_kd_loss"], rel=1e-5)


@pytest.mark.xdist_group("torchrun")  # torchrun's default rendezvous port: one run at a time
def test_an_accelerate_fsdp_config_shards_on_cpu_too(tmp_path):
    """`accelerate launch --config_file` with distributed_type FSDP (no --fsdp flag): FSDP2 on two CPU ranks."""
    w = world()
    config = tmp_path / "fsdp.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\n"
                      "num_processes: 2\nuse_cpu: true\nmixed_precision: 'no'\nfsdp_config:\n  fsdp_version: 2\n"
                      "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n  fsdp_state_dict_type: FULL_STATE_DICT\n")
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(config), str(DDP_ENTRY),
           "train", "--student", str(w.student), "--cache", str(w.cache), "--loss", "kl", "--out", str(out),
           "--max-steps", "2", "--batch-size", "2", "--num-workers", "1", "--logging-steps", "1", "--save-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(out / f"wrapper_rank{r}.txt").read_text() for r in range(2)] == ["FSDPLlamaForCausalLM"] * 2
    rows = [json.loads((out / f"rows_rank{r}.json").read_text()) for r in range(2)]
    assert len(rows[0]) == len(rows[1]) == 4 and not set(rows[0]) & set(rows[1])
    result = json.loads((out / "logitcache_train.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 2


# One torchrun launch, two gloo ranks, FSDP2 (`--fsdp full_shard`), a 151,936-word student: the fused head
# against the unfused FSDP run on the same batches, then each rank's peak RSS growth from 2 to 8 sequences
# per step (clear_refs resets the high-water mark before each run). The unfused run goes first: it also
# takes the process's first-run costs (gloo, FSDP and Trainer set-up), which would otherwise count in the
# first fused run and hide part of the growth (measured: -0.14 of the logits with the fused runs first).
_FSDP_PEAK = r"""
import gc, json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
from big_vocab import big_world
from logitcache.stages.train.run import TrainSettings, train
import logitcache.stages.train.student, logitcache.stages.train.trainer  # noqa: E401  (imports are no step's memory)

w = big_world(sys.argv[2])
rank = int(os.environ["RANK"])
out = {"tokens_per_sequence": w["tokens"] // 8, "vocab": w["vocab"]}
for name, fused, batch in (("unfused2", False, 2), ("fused2", True, 2), ("fused8", True, 8)):
    settings = TrainSettings(student=str(w["student"]), cache=str(w["cache"]), output_dir=f"{sys.argv[3]}/{name}",
                             loss="kl", max_steps=2, per_device_train_batch_size=batch, learning_rate=1e-3,
                             logging_steps=1, dataloader_num_workers=0, save_steps=1000,
                             chunk_size=64, fused_head=fused, fsdp="full_shard")
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")
    before = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
    result = train(settings)
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    out[name] = {"growth": peak - before, "fused_head": result["fused_head"],
                 "steps": [{k: h[k] for k in ("loss", "ce", "kd", "grad_norm")} for h in result["log_history"] if "loss" in h]}
with open(f"{sys.argv[3]}/peak_rank{rank}.json", "w") as f:
    json.dump(out, f)
"""


@pytest.mark.xdist_group("torchrun")
def test_the_fused_head_under_fsdp_equals_the_unfused_run_and_never_builds_the_logits(big_vocab_world, tmp_path):
    """Two FSDP2 ranks at V = 151,936: the fused head (the loss computed inside the forward, where FSDP has
    gathered the head's weight) gives the unfused FSDP run's losses and gradient norms within 1e-5 on the same
    batches, and a rank's peak RSS grows from 2 to 8 sequences per step by at most 0.35 of the 6 sequences'
    extra fp32 logits (the unfused run grew by 3.1 of them when FSDP switched the fused head off)."""
    if sys.platform != "linux" or not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's resettable peak RSS")
    script = tmp_path / "fsdp_peak.py"
    script.write_text(_FSDP_PEAK)
    here = str(SUPPORT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", str(script), here,
           str(big_vocab_world), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        out = json.loads((tmp_path / f"peak_rank{rank}.json").read_text())
        assert [out[n]["fused_head"] for n in ("fused2", "fused8", "unfused2")] == [True, True, False]
        got, want = out["fused2"]["steps"], out["unfused2"]["steps"]
        assert len(got) == len(want) == 2
        for g, u in zip(got, want):
            for key in ("loss", "ce", "kd", "grad_norm"):
                assert g[key] == pytest.approx(u[key], rel=1e-5, abs=1e-6), (rank, key, got, want)
        extra_logits = 6 * out["tokens_per_sequence"] * out["vocab"] * 4
        growth = out["fused8"]["growth"] - out["fused2"]["growth"]
        print(f"rank {rank}: growth 2 -> 8 sequences {growth / 2**20:.0f} MiB = {growth / extra_logits:.3f} "
              f"of the extra logits ({extra_logits / 2**20:.0f} MiB)")
        assert growth <= 0.35 * extra_logits, (rank, growth, extra_logits, out)
