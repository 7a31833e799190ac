# Two commands do everything on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: run test lint bench venv dev clean browser

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(DEVSTAMP): $(STAMP)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(STAMP)
dev: $(DEVSTAMP)

# The main job: train the default ViT on the bundled digits data and report test accuracy.
run: $(STAMP)
	$(BIN)/vitkit train

# Browser tests need Debian's Chromium; install it when absent (root on these machines).
browser:
	@test -x /usr/bin/chromium || (command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser tests will skip")

test: $(DEVSTAMP) browser
	$(BIN)/python -m pytest -q --durations=25

lint: $(DEVSTAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(DEVSTAMP)
	$(BIN)/python benchmarks/models.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/explain.py

clean:
	rm -rf $(VENV) build src/*.egg-info
