# `make demo`, `make test` and `make bench` each create the virtual environment they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast fuzz bench faults converge clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m trainer log.name=demo-$$(date +%Y%m%d-%H%M%S)

# Two pytest workers: a module stays on one worker, the SLURM modules share one (tests/conftest.py).
test: install
	$(BIN)/python -m pytest -q -n 2 --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not slurm"

# The reader fuzz of tests/test_fuzz_readers.py at 14 times its CI cases (over 11,000): the counts per reader at the end.
fuzz: install
	FUZZ_SCALE=14 $(BIN)/python -m pytest -q tests/test_fuzz_readers.py -m "not slow"

bench: install
	$(BIN)/python -m bench

# 1000 checkpoint saves SIGKILLed at random moments (CI kills 30; tests/test_faults.py).
faults: install
	KILLED_SAVES=1000 $(BIN)/python -m pytest -q -s tests/test_faults.py -k kill

# Do the defaults converge on a small real set? scikit-learn's digits, seeds 0-3 on 1 process and 0 on 2.
converge: install
	$(BIN)/python -m bench.converge

clean-venv:
	rm -rf $(VENV)
