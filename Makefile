# `make demo` and `make test` each create/refresh .venv with the pinned dependencies, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test test-slow browser bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m nanoseek r1-zero --out runs/r1-zero

test: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# a headless Chromium for the chat page's browser test (tests/test_server.py skips it, saying so, without one)
browser:
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
