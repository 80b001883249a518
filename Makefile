# Two entry points for a newcomer: `make demo` and `make test`. Both set up .venv first.
# The install re-runs only when pyproject.toml is newer than the stamp file.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test test-slow demo clean-venv fuzz

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# Order-only on the interpreter, so that recreating nothing never forces a reinstall.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

# The default run leaves out tests marked slow (multi-process training, SIGKILL-and-resume,
# the whole layer harness again under JAX); `make test-slow` runs just those, CI runs both.
test: venv
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

# The main job: train the default spec (a linear model on 100 low 2-D DCT coefficients) on the
# Fashion-MNIST subset shipped in the package, export it to TFLite (checked with LiteRT), and
# write runs/demo/model.keras, model.tflite and report.json.
demo: venv
	$(BIN)/keras-decomp train specs/linear_dct.yaml --data bundled --out runs/demo

clean-venv:
	rm -rf $(VENV)

# Coverage-guided fuzzing of the parser with atheris for FUZZ_TIME seconds (RELIABILITY.md);
# without atheris (pip install -e '.[fuzz]') the same target runs as a plain random loop.
FUZZ_TIME ?= 60
fuzz: venv
	$(BIN)/python fuzz/parser_atheris.py -max_total_time=$(FUZZ_TIME)
