# The two commands of the README. Each installs what it needs first (idempotent).
PYTHON ?= python3
PORT ?= 52415

.PHONY: run test test-fast lint

run:
	bash .ci/setup.sh run
	$(PYTHON) -m p2pinfer run --http-port $(PORT)

test:
	bash .ci/setup.sh test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -ra
	$(PYTHON) -m pytest -q -ra -m slow

test-fast:
	$(PYTHON) -m pytest -q -ra -m "not slow and not netns"

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .
