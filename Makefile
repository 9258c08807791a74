# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= $(CURDIR)/.demo

.PHONY: venv run test lint bench clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,neonize]'
	touch $@

venv: $(BIN)/.installed

# The demo: waportd with the simulated network, state and sockets under .demo/.
run: venv
	mkdir -p $(RUN_DIR)
	$(BIN)/waportd --backend sim --state-dir $(RUN_DIR)/state --run-dir $(RUN_DIR)/run \
		--metrics-listen '' --config /dev/null $(ARGS)

test: venv
	bash .ci/install-system-deps
	$(BIN)/ruff check waportd workers ipc cli tests
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: venv
	$(BIN)/python tests/bench/run.py

clean:
	rm -rf $(VENV) $(RUN_DIR) *.egg-info
