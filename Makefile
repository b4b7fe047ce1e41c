# make demo   - set up, then run a gateway + node on loopback with a demo user
# make test   - set up, then run the whole test suite
# make bench  - set up, then run the benchmark suite (python -m bench)
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# tests run in parallel (pytest-xdist): most of a test's time is spent waiting on the
# processes and sockets it talks to, so three workers on two cores halve the run
TEST_WORKERS ?= 3

.PHONY: setup demo test bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(BIN)/edgegw demo

test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf build dist *.egg-info edgegw/_relay.c edgegw/_relay*.so internal/ssh/_aead.c \
		internal/ssh/_aead*.so .pytest_cache
