# Every target builds its own virtualenv: a fresh clone needs nothing else.
# torch==2.13.0 is installed first so pip takes the CPU build instead of CUDA.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench bench-quick reliability reliability-quick proto venv sysdeps clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP) sysdeps
	$(BIN)/pytest $(PYTEST_ARGS)

# Fuzzing, the soak with memory bounds and the fault drills (issue 12; see RELIABILITY.md):
# sized for ~30 min on an idle 2-core machine, real Gemma 270M; the last stdout line is the JSON of figures and the
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
	rm -rf $(VENV) build *.egg-info
