# make demo   - set up, then run a gateway + node on loopback with a demo user
# make test   - set up, then run the whole test suite
# make bench  - set up, then run the benchmark suite (python -m bench)
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(BIN)/edgegw demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf build dist *.egg-info edgegw/_relay.c edgegw/_relay*.so internal/ssh/_aead.c \
		internal/ssh/_aead*.so .pytest_cache
