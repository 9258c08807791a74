# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= $(CURDIR)/.demo

.PHONY: venv run test test-fast lint bench clean wheel

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# The demo: waportd with the simulated network, state and sockets under .demo/.
run: venv
	mkdir -p $(RUN_DIR)
	$(BIN)/waportd --backend sim --state-dir $(RUN_DIR)/state --run-dir $(RUN_DIR)/run \
		--metrics-listen '' --config /dev/null $(ARGS)

# Everything: lint, import contracts, unit and end-to-end tests (real processes).
test: venv
	bash .ci/install-system-deps
	$(BIN)/ruff check waportd workers ipc cli api tests
	$(BIN)/lint-imports --no-logo --no-cache  # the import rules of DESIGN.md §8 (pyproject.toml)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=30 $(PYTEST_ARGS)

# The unit tests alone, in seconds: no test that starts a process (tests marked e2e, see tests/conftest.py).
test-fast: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not e2e" $(PYTEST_ARGS)

# The package for servers (README "Install on a server"): dist/waport-VERSION-py3-none-any.whl
wheel: venv
	$(BIN)/pip wheel --no-deps --quiet -w dist .

bench: venv
	command -v wrk >/dev/null || [ "$$(id -u)" != 0 ] || (apt-get update -qq && apt-get install -y -qq wrk) || true
	$(BIN)/python tests/bench/run.py

clean:
	rm -rf $(VENV) $(RUN_DIR) *.egg-info build dist
