# Every target sets up .venv on first use: a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall when the package's requirements or the torch pin change.
STAMP := $(VENV)/.installed

.PHONY: test lint docs docs-serve demo demo-megatron bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all,dev,trl,docs]'
	touch $(STAMP)

test: $(STAMP) lint docs
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# The documentation site, strictly: a broken link or reference, a page left out of the
# nav, or a public name without a docstring fails the build. Its examples run in pytest
# (tests/test_docs.py).
docs: $(STAMP)
	$(BIN)/ruff check docs/hooks
	$(BIN)/ruff format --check docs/hooks
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict

# The main job: a tiny MoE trained with GRPO three ways (no replay, R2, R3), about a
# minute on 2 CPU cores; the table prints, demo.json and demo.png keep the rest.
demo: $(STAMP)
	$(BIN)/routereplay demo --json demo.json --plot demo.png

# The seed's scenario: a megatron-core GPTModel (dense prefix, then MoE layers) split
# PP=2 x VPP=2 over 2 gloo processes with full recompute, routes from a bf16 engine in
# vLLM's wire format, and verl's pre-fix route mapping measured; under 4 minutes.
demo-megatron: $(STAMP)
	$(BIN)/routereplay demo --trainer megatron --json demo-megatron.json --plot demo-megatron.png

bench: $(STAMP)
	@ls benchmarks/*.py >/dev/null 2>&1 || { echo "no benchmarks yet"; exit 2; }
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) site .mypy_cache .ruff_cache .pytest_cache .hypothesis
