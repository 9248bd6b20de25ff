# labrelay — the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/labrelay.example.yaml
DB     ?= sqlite:///labrelay.db

.PHONY: run test lint typecheck pytest bench clean venv

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "labrelay needs Python 3.11 ($(PYTHON) not found); set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

# Installed marker: reinstall when the metadata changes.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/labrelay db upgrade --database "$${LABRELAY_DATABASE_URL:-$(DB)}"
	$(BIN)/labrelay run --config $(CONFIG)

lint: $(VENV)/.installed
	$(BIN)/ruff check engine drivers lis_bridge tests bench

typecheck: $(VENV)/.installed
	$(BIN)/mypy

pytest: $(VENV)/.installed
	$(BIN)/pytest

test: lint typecheck pytest

BENCHES = bench/mllp_framer.py bench/ingest_hl7.py bench/ingest_astm.py bench/reports.py

bench: $(VENV)/.installed
	@for script in $(BENCHES); do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
