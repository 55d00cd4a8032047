# ese_assets: `make demo` runs the pipeline on a simulated month; `make test` runs the tests.
# Each target creates .venv on first use and installs the pinned environment into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= $(CURDIR)/data
DEMO_DIR ?= $(DATA_DIR)/demo
PORT ?= 3000
HOST ?= 127.0.0.1
# The review web app and REST API (`make ui`): the seed guide's curl examples use port 8000.
WEB_PORT ?= 8000
WEB_HOST ?= 127.0.0.1

# The Dagster instance (run history, sensor cursors, schedules) lives under the data directory.
export DAGSTER_HOME ?= $(DATA_DIR)/dagster_home
# The UI runs against the demo survey unless the caller points these elsewhere; then its night
# partitions start at the demo's first night (`ese demo` writes it to demo.env).
ifeq ($(origin ESE_INCOMING_DIR),undefined)
export ESE_PARTITION_START ?= $(shell sed -n 's/^export ESE_PARTITION_START=//p' "$(DEMO_DIR)/demo.env" 2>/dev/null)
endif
export ESE_INCOMING_DIR ?= $(DEMO_DIR)/incoming
export ESE_CATALOG ?= $(DEMO_DIR)/catalog.csv
export PIPELINE_PRODUCTS_DB ?= $(DEMO_DIR)/products.sqlite3

.PHONY: demo test ui venv dagster-home validate bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[test]"
	touch $@

dagster-home:
	mkdir -p "$(DAGSTER_HOME)/.nux"
	cp dagster.yaml "$(DAGSTER_HOME)/dagster.yaml"
	printf 'seen: 1\n' > "$(DAGSTER_HOME)/.nux/nux.yaml"

demo: venv dagster-home
	$(BIN)/ese demo --out-dir "$(DEMO_DIR)"

test: venv
	$(BIN)/python -m pytest ese_assets_tests

# The Dagster UI (webserver + daemon) and the review web app / REST API in one command; Ctrl-C
# stops both. WEB_HOST other than loopback needs ESE_WEB_TOKEN (writes need the bearer token).
ui: venv dagster-home
	mkdir -p "$(ESE_INCOMING_DIR)"
	$(BIN)/python -m ese_assets.web --host $(WEB_HOST) --port $(WEB_PORT) \
		--with-dagster --dagster-host $(HOST) --dagster-port $(PORT)

validate: venv dagster-home
	$(BIN)/dagster definitions validate -m ese_assets.definitions

bench: venv
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(DATA_DIR) .pytest_cache
