# The two commands of the README. Each installs what it needs first (idempotent), into the project
# virtualenv $(VENV): never into the system Python. PYTHON picks the interpreter the venv is made from.
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 52415
export VENV

.PHONY: run test test-fast lint

run:
	bash .ci/setup.sh run
	$(PY) -m p2pinfer warm  # compiles the engine's kernels once per machine (seconds when already cached)
	$(PY) -m p2pinfer run --http-port $(PORT)

test:
	bash .ci/setup.sh test
	$(PY) -m ruff check .
	$(PY) -m pytest -q -ra
	$(PY) -m pytest -q -ra -m slow

test-fast:
	$(PY) -m pytest -q -ra -m "not slow and not netns"

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
