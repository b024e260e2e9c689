"""One declaration is one: a loss added to `registry.LOSSES` alone is seen everywhere that lists losses.

    .venv/bin/python -m pytest tests/stages/train/test_loss_declaration.py -q

The toy loss here (total variation distance over the K + 1 grouped classes) is declared with its
row function itself, from this file, and nothing else is edited: no `__all__`, no list of online
losses, no benchmark list, no test case list. It must then appear in `train --help`, in the
cache-mode and tokenizer refusals, as `losses.toy_tvd`, in online training, in the fused-head test,
in the fidelity benchmark and in the battery.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from trainkit import world

from logitcache.pipeline.cli import main
from logitcache.stages.train import losses, online
from logitcache.stages.train.checks import check_loss_fits_cache
from logitcache.stages.train.loss_settings import loss_settings
from logitcache.stages.train.losses import registry
from logitcache.stages.train.losses.divergences import _divergence_rows
from logitcache.storage.errors import ConfigError

HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toy_tvd_rows(student_logits, teacher_ids, teacher_logprobs, *, temperature, tail, tail_mass, want_metrics,
                 n_rows=None):
    """Total variation distance 1/2 sum_c |p_c - q_c| over the cached ids (+ the tail bucket), at T."""
    def tvd(lt, ls, mask):
        return 0.5 * torch.where(mask, (lt.exp() - ls.exp()).abs(), 0.0).sum(-1)

    return _divergence_rows(tvd, student_logits, teacher_ids, teacher_logprobs, temperature, tail, tail_mass,
                            want_metrics, n_rows)


def toy_tvd_reference(s, t, temperature=1.0):
    return 0.5 * (F.softmax(t / temperature, -1) - F.softmax(s / temperature, -1)).abs().sum(-1).mean()


TOY = registry.Loss("toy_tvd", toy_tvd_rows, "a toy: total variation distance",
                    (registry.Option("temperature", 1.0, "softmax temperature", low=0.0), registry._TAIL),
                    approximates="full-vocabulary TVD; a lower bound of it over the K + 1 grouped classes")


@pytest.fixture
def toy(monkeypatch):
    """The toy declared in the registry, and nowhere else."""
    monkeypatch.setitem(registry.LOSSES, TOY.name, TOY)
    return TOY.name


def test_a_loss_declared_in_the_registry_is_public_and_in_help(toy, capsys):
    assert toy in registry.kd_names()
    assert losses.toy_tvd.__doc__ == toy_tvd_rows.__doc__
    assert list(losses.get_loss(toy).__signature__.parameters)[3:5] == ["temperature", "tail"]
    s, t = torch.randn(3, 20, dtype=torch.float64), torch.randn(3, 20, dtype=torch.float64)
    ids = t.argsort(-1, descending=True)
    got = losses.toy_tvd(s, ids, t.log_softmax(-1).gather(1, ids), temperature=2.0)
    torch.testing.assert_close(got, toy_tvd_reference(s, t, 2.0))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "toy_tvd: a toy: total variation distance (temperature=1.0, tail=bucket)" in capsys.readouterr().out


def test_a_declared_loss_is_refused_where_its_declaration_says(toy, capsys):
    """Its modes (top-K only) and its default need of the teacher's tokenizer reach the refusals."""
    with pytest.raises(ConfigError, match="--loss toy_tvd needs a topk-mode cache"):
        check_loss_fits_cache({"sparsification": {"mode": "sample", "k": 8}}, loss_settings(toy), cache="c")
    # ... and it is offered where a top-K cache is refused to a sample-mode loss.
    with pytest.raises(ConfigError, match=r"Use a loss that reads it \(.*toy_tvd"):
        check_loss_fits_cache({"sparsification": {"mode": "topk", "k": 8}}, loss_settings("rskd"), cache="c")
    w = world()
    rc = main(["train", "--student", str(w.other_student), "--cache", str(w.cache), "--loss", toy,
               "--out", str(w.root / "toy-refused"), "--max-steps", "1", "--num-workers", "0"])
    assert rc == 2 and "--loss toy_tvd reads the cache's teacher token ids" in capsys.readouterr().err


def test_a_declared_loss_trains_online(toy, tmp_path):
    assert toy in online.online_losses()
    online.check_online_loss(toy)
    w = world()
    out = tmp_path / "online"
    assert main(["train", "--student", str(w.student), "--cache", str(w.cache), "--online-teacher", str(w.teacher),
                 "--loss", toy, "--temperature", "2", "--out", str(out), "--max-steps", "1", "--batch-size", "2",
                 "--num-workers", "0", "--logging-steps", "1"]) == 0
    logged = [h for h in json.loads((out / "logitcache_train.json").read_text())["log_history"] if "kd" in h]
    assert logged and logged[0]["kd"] > 0


def test_a_declared_loss_is_a_fused_head_case(toy):
    fused = _load("test_fused_head_for_toy", HERE / "test_fused_head.py")
    assert (toy, {}) in fused.cases()
    fused.test_fused_equals_unfused_fp32(toy, {}, "softcap+scale", True)
    fused.test_fused_equals_unfused_bf16(toy, {})


def test_a_declared_loss_is_in_the_fidelity_benchmark(toy):
    bench = _load("bench_fidelity_for_toy", HERE.parents[2] / "benchmarks" / "bench_fidelity.py")
    assert toy in bench.loss_names()
    from llm_tails import teacher_logits

    t = teacher_logits("zipf", 3, vocab=2048, seed=1)
    # No plain reference: the benchmark measures it against the library with a cache of the whole vocabulary.
    plain = bench.check_references(t, (1.0,))
    assert plain[toy] is False
    rows = bench.run_regime("zipf", t, (16,), (1.0, 2.0), seed=0, plain=plain, names=(toy,))
    measured = [r for r in rows if r["loss"] == toy and "cos" in r]
    assert {r["T"] for r in measured} == {1.0, 2.0} and all(0.5 < r["cos"] <= 1.0 + 1e-9 for r in measured)
    assert "| toy_tvd |" in bench.tables(rows, ["zipf"], (16,), goal_k=16)


def test_a_declared_loss_passes_the_battery(toy, monkeypatch):
    battery = _load("test_loss_battery_for_toy", HERE / "test_loss_battery.py")
    monkeypatch.setitem(battery.ref.REFERENCES, toy, toy_tvd_reference)
    battery.test_declaration_is_coherent(toy)
    battery.test_full_vocabulary_value_and_gradient_match_the_reference(toy)
    battery.test_padding_changes_nothing(toy)
    battery.test_no_teacher_rows_is_the_cross_entropy_alone(toy)
    battery.test_bf16_logits_give_an_fp32_loss_and_a_bf16_gradient(toy)
    battery.test_declared_defaults_pass_and_out_of_range_values_are_refused(toy)
