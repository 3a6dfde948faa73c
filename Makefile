# Two entry points: `make demo` (set up everything, train on Fashion-MNIST) and `make test`.
# Both are idempotent: a second run reuses the venv and the prepared data.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup data demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

data: setup
	$(BIN)/localcredit prepare-data

# --resume makes a second `make demo` reuse the finished runs (it says so) and finish an interrupted one.
demo: data
	$(BIN)/localcredit train --rule bp  --data fashion-mnist --hidden 1000 --epochs 3 --out runs/demo/bp  --resume
	$(BIN)/localcredit train --rule fa  --data fashion-mnist --hidden 1000 --epochs 3 --out runs/demo/fa  --resume
	$(BIN)/localcredit train --rule dfa --data fashion-mnist --hidden 1000 --epochs 3 --out runs/demo/dfa --resume
	$(BIN)/localcredit align --run runs/demo/fa

test: data
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python tests/run_shards.py

clean:
	rm -rf runs .pytest_cache
