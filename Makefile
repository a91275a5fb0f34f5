# The README's two commands: `make course` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default. GPU users: install the CUDA build of torch into .venv first
# (`.venv/bin/pip install torch` with the index for your CUDA version); it is then left alone.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: course test test-research setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

# --allow-root only where we are root (containers, cloud machines); jupyter refuses root otherwise
course: $(STAMP)
	ELITE_PRESET=$${ELITE_PRESET:-toy} $(BIN)/jupyter lab --no-browser --ip=127.0.0.1 --notebook-dir=notebooks \
		$$([ "$$(id -u)" = 0 ] && echo --allow-root)

# --durations: where the time goes, in every run's log. Tests of the studies and of research-only
# recipe options are marked `research`: `make test-research` runs them.
test: $(STAMP)
	$(BIN)/python -m pytest --durations=10 -m "not research" tests
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
		ELITE_PRESET=toy $(BIN)/python -m pytest --durations=10 --nbval --nbval-current-env \
			--nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider notebooks; \
	else echo "no notebooks to check"; fi

test-research: $(STAMP)
	$(BIN)/python -m pytest --durations=10 -m research tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
