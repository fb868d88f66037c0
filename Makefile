# The README's two commands: `make run` (main job on the embedded default) and `make test`.
# Each creates its own virtualenv; torch is installed first, pinned to the CPU build on disk.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-slow test-all lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev,ddpo]'
	touch $@

run: setup
	$(BIN)/msdda run

# pytest's exit code 5 ("no tests collected") is not a failure.
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# Lint rules and formatting (both configured in pyproject.toml); `ruff format .` fixes what the second reports.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache
