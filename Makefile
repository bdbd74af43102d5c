# The two commands of README.md: `make demo` and `make test`. Both create their own
# virtual environment (.venv) with the CPU torch pinned by constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo

.PHONY: venv demo test lint clean

$(BIN)/bids_roimae: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

venv: $(BIN)/bids_roimae

test: venv
	$(BIN)/python -m pytest -n 2 -q

lint: venv
	$(BIN)/ruff check .

demo: venv
	PATH=$(abspath $(BIN)):$$PATH bash scripts/demo.sh $(DEMO)

clean:
	rm -rf $(VENV) $(DEMO)
