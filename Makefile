# make demo: the main job.  make test: the whole suite (each framework in its own process).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: demo test test-core test-cli test-lightning test-keras test-paddle test-reliability venv clean

$(STAMP): requirements-dev.txt setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# Suites run one after another, each in a fresh Python process: importing TensorFlow and
# then Paddle in one process crashes.
test: $(STAMP)
	$(PY) -m tests.run_suites

test-%: $(STAMP)
	$(PY) -m tests.run_suites $*

clean:
	rm -rf $(VENV) demo_output .pytest_cache .hypothesis
