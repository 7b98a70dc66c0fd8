# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
DEMO_DIR ?= runs/demo

.PHONY: demo test venv clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip

# Core install (what a user gets from `pip install arjax`).
$(VENV)/.core: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e .
	touch $@

# Test install: core + Hugging Face interop + plots + the CPU torch wheel for parity tests.
$(VENV)/.test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e ".[test]"
	touch $@ $(VENV)/.core

venv: $(VENV)/.core

# Train a small byte-level model on the bundled corpus (a few minutes on 2 CPU cores),
# then generate a batch of samples, streamed as they are produced.
demo: $(VENV)/.core
	$(VENV)/bin/arjax train --config tpu_configs/cpu-demo.yaml --out $(DEMO_DIR)
	$(VENV)/bin/arjax generate --ckpt $(DEMO_DIR) --max-new-tokens 110 --temperature 0.8 --top-k 40 \
		--prompt "The " --prompt "In the beginning" --prompt "def "

# Lint first (ruff's check and format, configured in pyproject.toml: a second, not worth a test run),
# then one pytest worker per core (pytest-xdist), each test file on one worker (module fixtures built once).
TEST_WORKERS ?= auto
test: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) runs build dist *.egg-info
