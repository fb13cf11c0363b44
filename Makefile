# The README's two quick-start commands are `make demo` and `make test`. Each installs what it
# needs (apt packages when root, a venv in .venv, casfs with its extras) and is idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
FUZZ_SECONDS ?= 300

.PHONY: setup demo test fuzz bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@bash scripts/test.sh

fuzz: setup
	@FUZZ_SECONDS=$(FUZZ_SECONDS) bash scripts/fuzz.sh

bench: setup
	@$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
