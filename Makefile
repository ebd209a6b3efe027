# Two commands on a fresh machine: `make demo` (the pipeline on the built-in example) and `make test`.
# Both create .venv and install mpr into it. TORCH_SPEC pins PyTorch so a CPU machine does not pull
# CUDA wheels; set TORCH_INDEX to PyTorch's CPU wheel index where PyPI's default build is a CUDA one.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install demo test test-fast test-real-llm docs lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	bash scripts/demo.sh

test: install
	$(BIN)/mypy  # [tool.mypy] in pyproject.toml: zero errors
	$(BIN)/ruff check .
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The edit loop: everything but the tests marked slow or real_llm.
test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not real_llm"

# The documentation site (docs/, mkdocs.yml) served on 127.0.0.1:8000.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# The real-model tests, building llama-server (once, cached; 20-40 min on 2 cores) and fetching SmolLM2 if missing.
test-real-llm: install
	MPR_REAL_LLM=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m real_llm

lint: install
	$(BIN)/ruff check .

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_mine.py

clean:
	rm -rf runs/demo .pytest_cache
