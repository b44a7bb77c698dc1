# The front door. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup run run-docker test test-fast test-e2e test-jax test-launcher test-docker lint compile lock wheels images \
	local-up local-down clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[cpu,onnx,serve,dev]'
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install the pinned dependencies

run: $(STAMP) ## run the whole pipeline locally on the built-in dataset (kfp.local, CPU)
	$(BIN)/python pipeline.py run-local --weights none $(ARGS)

test: $(STAMP) ## lint, then every test but the e2e, jax, launcher and docker tiers: real training and a kfp.local run included
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -m "not e2e and not jax and not launcher and not docker" $(PYTEST_ARGS)

test-e2e: $(STAMP) ## the whole pipeline through kfp.local: two runs against one registry, a run killed mid-train (CI runs it)
	$(BIN)/python -m pytest -m e2e $(PYTEST_ARGS)

test-jax: $(STAMP) ## the GPU image's backend (Keras on JAX) trained on the CPU: resume, out of memory, export (CI runs it)
	$(BIN)/python -m pytest -m jax $(PYTEST_ARGS)

test-launcher: $(STAMP) ## the compiled pipeline step by step, artifacts in S3 (needs root for /minio; CI runs it)
	$(BIN)/python -m pytest -m launcher $(PYTEST_ARGS)

test-docker: $(STAMP) ## build the images on a local base and run every step and the pipeline in docker (needs root + dockerd; CI runs it)
	$(BIN)/python -m pytest -m docker $(PYTEST_ARGS)

test-fast: $(STAMP) ## lint, then the tests not marked slow (seconds, no training)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -m "not slow and not e2e and not jax and not launcher and not docker" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff: the lint rules and the one format (`ruff format .` applies it)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

run-docker: $(STAMP) ## run-local with every step in its image; data and registry in MinIO (make images, make local-up)
	$(BIN)/python pipeline.py run-local --runner docker $(ARGS)

# Image builds. Optional inputs (docker/Dockerfile says more): BASE_IMAGE, INDEX_URL (a package
# mirror), WHEEL_URL (a wheel server on this host, e.g. python -m http.server -d docker/wheels).
# Not named PIP_*: pip's own environment variables on this host must not leak into the build.
# BUILD_FLAGS goes to `docker build` as is (e.g. --network=host where containers have no NAT).
REVISION := $(shell git describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)
IMAGE ?= efficientnet-retrain
DOCKER_BUILD = docker build $(BUILD_FLAGS) -f docker/Dockerfile --build-arg REVISION=$(REVISION) \
	$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) $(if $(INDEX_URL),--build-arg PIP_INDEX_URL=$(INDEX_URL)) \
	$(if $(WHEEL_URL),--network host --build-arg PIP_FIND_LINKS=$(WHEEL_URL))
images: ## build the CPU and GPU step images, tagged with the git revision (needs docker)
	$(DOCKER_BUILD) --build-arg FLAVOR=cpu -t $(IMAGE):cpu-$(REVISION) -t $(IMAGE):cpu .
	$(DOCKER_BUILD) --build-arg FLAVOR=gpu -t $(IMAGE):gpu-$(REVISION) -t $(IMAGE):gpu .
	@echo "compile with: python pipeline.py compile --image $(IMAGE):cpu-$(REVISION) --gpu-image $(IMAGE):gpu-$(REVISION)"

lock: $(STAMP) ## re-pin docker/requirements-{cpu,gpu}.txt after a change to pyproject.toml
	$(BIN)/python docker/lock.py

wheels: $(STAMP) ## fill docker/wheels/ for offline image builds (on a machine that reaches PyPI)
	$(BIN)/pip wheel --no-deps --quiet -r docker/requirements-cpu.txt -w docker/wheels
	$(BIN)/pip wheel --no-deps --quiet -r docker/requirements-gpu.txt -w docker/wheels

COMPOSE = docker compose -p efficientnet-retrain --env-file .env -f docker/compose.yaml
local-up: ## start MinIO for run-docker (reads .env: cp .env.example .env first)
	@test -f .env || { echo "no .env: cp .env.example .env, then set a password in it"; exit 1; }
	$(COMPOSE) up -d --wait

local-down: ## stop the local MinIO (its data stays in a docker volume)
	$(COMPOSE) down

compile: $(STAMP) ## write pipeline.yaml (KFP IR)
	$(BIN)/python pipeline.py compile --output pipeline.yaml

clean: ## remove local run outputs and caches (keeps .venv)
	rm -rf local-run local_outputs pipeline.yaml .pytest_cache .ruff_cache
