"""Shared test helpers. pyproject puts this folder on pytest's `pythonpath`, so tests import a helper by its
module name (`from trainkit import world`), not through this package; benchmarks put it on `sys.path`.

- big_vocab.py: a student, a teacher and a cache at Qwen2.5's vocabulary width (151,936), for memory tests.
- cli_errors.py: the CLI's one-line error contract, asserted by the bad-input sweep and the fault tests.
- counting_fs.py: `countfs://`, local files behind fsspec's buffered reads, recording every byte range fetched.
- cpu_time.py: a pytest plugin (`-p cpu_time`) reporting CPU seconds per test file and the slowest tests.
- ddp_entry.py: torchrun's entry script for `logitcache train` on two ranks, recording each rank's rows.
- doc_commands.py: the shell commands quoted in markdown docs, parsed to check them against the real CLIs.
- fake_hub.py: a loopback HTTP server answering the Hub API calls `HfFileSystem` makes, serving local folders.
- llm_tails.py: LLM-like teacher logits over a real vocabulary size, students near them, their top-K caches.
- loss_reference.py: plain full-vocabulary references for the cached losses, from the papers' formulas.
- precompute_util.py: stage one's test rows and jobs, a vLLM engine sized for tests, cache comparison.
- realtok.py: Qwen's real BPE ranks and chat templates (tests/fixtures/chat_templates) on tiny models.
- s3server.py: a real S3 server (moto) on loopback, a latency-adding TCP proxy, a listener that never answers.
- source_imports.py: every module a source file imports (ast; inside functions too), for the layering tests.
- synthetic.py: synthetic sparse targets from random logits (re-exports `logitcache.storage.testing`).
- trainkit.py: stage two's world (tokenizers, teacher, students, caches, text rows) built once per process.
- triton_interpreter.py: Triton kernels run on CPU tensors under Triton's interpreter, in a child process.
"""
