"""DeepSpeed ZeRO-3 on CPU: two gloo ranks under torchrun train the same as DDP (skipped without deepspeed).

    DS_BUILD_OPS=0 pip install --no-build-isolation --target /tmp/ds deepspeed hjson py-cpuinfo
    DS_ACCELERATOR=cpu PYTHONPATH=/tmp/ds .venv/bin/pytest tests/stages/train/test_trainer_deepspeed.py -m slow   # ~2 min

deepspeed is not a dependency (its package is a source build that pulls a CUDA torch into an isolated
build), so CI skips this. DeepSpeed's CPU accelerator runs ZeRO-3 over gloo; `--deepspeed` is passed to
transformers, which builds the engine. The fused head is off under DeepSpeed (`fused_head_problem`: the
head's weight is partitioned outside the forward), so this checks the unfused loss.
"""

import json

import pytest
from trainkit import ddp_run, torchrun_train

pytestmark = pytest.mark.slow


@pytest.mark.xdist_group("torchrun")  # torchrun's default rendezvous port: one run at a time
def test_zero3_trains_like_ddp(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    config = tmp_path / "zero3.json"
    # No "optimizer" section: transformers' AdamW, which ZeRO-3 accepts only when told to (DeepSpeed's own
    # fused Adam needs CUDA).
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                  "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}))
    _, ddp = ddp_run()
    zero3 = torchrun_train(tmp_path / "zero3", "--deepspeed", str(config))
    assert zero3["wrapper"] == ["DeepSpeedEngine"] * 2
    assert zero3["rows"] == ddp["rows"]
    got = {h["step"]: h for h in zero3["log_history"] if "loss" in h}
    want = {h["step"]: h for h in ddp["log_history"] if "loss" in h}
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:  # measured: equal to DDP's to ~1e-6
        for key in ("loss", "ce", "kd"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-5), (step, key)
    assert got[4]["ce"] < got[1]["ce"] - 1.0  # it trains
