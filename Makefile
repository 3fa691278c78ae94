# Two commands do everything on a fresh machine with Python 3.11+:
#   make demo   train a CartPole controller by BPTT from scratch, then play it (GIF if no display)
#   make test   the test suite (fast tier; `make test-all` adds the slow training runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench test-gymnax clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[render,train,test]'
	touch $(STAMP)

install: $(STAMP)

# Trains from scratch (no bundled weights), then plays the result: in a pygame window when there
# is a display, else headless into runs/demo/cartpole.gif.
demo: $(STAMP)
	$(BIN)/train-controller --env cartpole --algo bptt --seed 0 --out runs/demo
	@if $(BIN)/python -c "import sys, agents.play as p; sys.exit(not p.display_available())"; then \
		$(BIN)/train-controller play --policy runs/demo --episodes 3; \
	else \
		echo "No display found: recording the controller to runs/demo/cartpole.gif instead."; \
		$(BIN)/train-controller play --policy runs/demo --episodes 1 --record runs/demo/cartpole.gif; \
	fi

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -n 2 -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

# The anchors (gymnax 1.0.1 pins gymnasium<1.4) live in their own venv, never in .venv.
BENCH_STAMP := .venv-bench/.installed
$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install --quiet --upgrade pip
	.venv-bench/bin/pip install --quiet -e '.[render,train,test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	.venv-bench/bin/python -m bench.run_all

# diffgym.gymnax_compat through gymnax's own wrappers (skipped in .venv, which has no gymnax).
test-gymnax: $(BENCH_STAMP)
	.venv-bench/bin/python -m pytest tests/test_gymnax_compat.py -q

clean:
	rm -rf $(VENV) runs .pytest_cache
