# Two entry points for a newcomer: `make demo` and `make test`. Both set up .venv first.
# The install re-runs only when pyproject.toml is newer than the stamp file.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test demo clean-venv

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# Order-only on the interpreter, so that recreating nothing never forces a reinstall.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/keras-decomp parse "W = (A1*a + B1*b)(DCT[:k]) | dense" --in 784 --out 10 --param k=10

clean-venv:
	rm -rf $(VENV)
