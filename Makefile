SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := $(shell find protos -name '*.proto')

# Keep compiled DeepSpeed ops and tokenizer files out of the source tree.
export VIDALIGN_CACHE ?= $(CURDIR)/.cache/vidalign
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_BUILD_OPS := 0
export OMP_NUM_THREADS ?= 2

IMAGE_PREFIX ?= vidalign
IMAGE_TAG ?= 0.1.0
COMPOSE = docker compose -f deploy/compose.yaml --env-file deploy/.env

.PHONY: help setup test test-fast lint format protos bench soak gpu-smoke gpu-bench demo demo-assets clean \
	images local-gpu local-gpu-down validate-deploy

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@echo "==> creating $(VENV) (about a minute on a fresh machine)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

setup: $(STAMP) ## create .venv with the pinned dependencies and vidalign installed (editable)

test: $(STAMP) lint validate-deploy ## lint, validate the manifests, run the whole test suite (does its own set-up)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) ## the tests not marked slow
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

format: $(STAMP) ## ruff format + import sorting
	$(BIN)/ruff check --fix --select I .
	$(BIN)/ruff format .

protos: $(STAMP) ## regenerate libs/vidalign/teacher/v1 from protos/
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=libs --pyi_out=libs \
		--grpc_python_out=libs $(PROTO_SRC)

bench: $(STAMP) ## wire throughput, stage-2 gRPC vs in-process, attention capture memory, video decoding vs stage 2, teacher under 1-8 clients (BENCHMARKS.md)
	$(BIN)/python bench/wire.py
	$(BIN)/python bench/stage2.py
	$(BIN)/python bench/attention_capture.py
	$(BIN)/python bench/data.py
	$(BIN)/python bench/teacher_load.py --quick

soak: $(STAMP) ## teacher under load on loopback: 8 clients x 25 requests + 8 idle streams; errors, health latency, RSS (BENCHMARKS.md)
	$(BIN)/python bench/soak.py --clients 8 --requests 25 --idle 8

gpu-smoke: $(STAMP) ## needs CUDA: the remote gradient over gRPC vs in-process on the GPU, fp16/bf16 teachers
	$(BIN)/python bench/gpu_smoke.py

gpu-bench: $(STAMP) ## needs CUDA, <= 8 min: real-size teacher loss+grad and load (batching), CogVideoX priors, 7B train step (BENCHMARKS.md)
	$(BIN)/python bench/gpu_bench.py --device cuda

demo: $(STAMP) ## baseline vs +VDA vs +MotionEnhancer, with controls, on SynthMotion (tiny models, offline)
	VIDALIGN_LOG_FORMAT=$${VIDALIGN_LOG_FORMAT:-console} VIDALIGN_LOG_LEVEL=$${VIDALIGN_LOG_LEVEL:-warning} \
		$(BIN)/vidalign demo --out runs/demo

demo-assets: $(STAMP) ## retrain the demo's teachers and baseline VideoLLM into assets/demo (slow: see README)
	VIDALIGN_LOG_FORMAT=$${VIDALIGN_LOG_FORMAT:-console} $(BIN)/python scripts/demo_assets.py --out assets/demo

validate-deploy: $(STAMP) ## render every k8s overlay and deploy/; validate them (Kubernetes 1.33, strict) and the compose file
	$(BIN)/python scripts/validate_deploy.py

images: ## build the teacher and trainer images (needs docker): $(IMAGE_PREFIX)/{teacher,trainer}:$(IMAGE_TAG)
	docker build --target teacher -t $(IMAGE_PREFIX)/teacher:$(IMAGE_TAG) .
	docker build --target trainer -t $(IMAGE_PREFIX)/trainer:$(IMAGE_TAG) .

deploy/.env:
	@echo "deploy/.env is missing: cp deploy/.env.example deploy/.env, then set real credentials" >&2; exit 1

local-gpu: deploy/.env ## MinIO + GPU teacher + stage 2 on this machine (docker compose, deploy/.env)
	$(COMPOSE) up --build --detach --wait teacher
	$(COMPOSE) run --rm trainer

local-gpu-down: ## stop the local-gpu stack (its volumes stay)
	$(COMPOSE) down

clean: ## remove the venv, caches and runs
	rm -rf $(VENV) .cache runs .pytest_cache .ruff_cache
