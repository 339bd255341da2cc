# `make demo`, `make test` and `make bench` each create the virtual environment they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m trainer log.name=demo-$$(date +%Y%m%d-%H%M%S)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not slurm"

bench: install
	$(BIN)/python -m bench

clean-venv:
	rm -rf $(VENV)
