# The front door. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup run test test-fast test-launcher lint compile images clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[cpu,onnx,dev]'
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install the pinned dependencies

run: $(STAMP) ## run the whole pipeline locally on the built-in dataset (kfp.local, CPU)
	$(BIN)/python pipeline.py run-local $(ARGS)

test: $(STAMP) ## lint, then every test but the launcher tier: real training and kfp.local runs included
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not launcher" $(PYTEST_ARGS)

test-launcher: $(STAMP) ## the compiled pipeline step by step, artifacts in S3 (needs root for /minio; CI runs it)
	$(BIN)/python -m pytest -m launcher $(PYTEST_ARGS)

test-fast: $(STAMP) ## lint, then the tests not marked slow (seconds, no training)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow and not launcher" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

REVISION := $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
IMAGE ?= efficientnet-retrain
images: ## build the CPU and GPU step images, tagged with the git revision (needs docker)
	docker build -f docker/Dockerfile --build-arg REVISION=$(REVISION) -t $(IMAGE):cpu-$(REVISION) -t $(IMAGE):cpu .
	docker build -f docker/Dockerfile --build-arg REVISION=$(REVISION) --build-arg EXTRA=gpu \
		-t $(IMAGE):gpu-$(REVISION) -t $(IMAGE):gpu .
	@echo "compile with: python pipeline.py compile --image $(IMAGE):cpu-$(REVISION) --gpu-image $(IMAGE):gpu-$(REVISION)"

compile: $(STAMP) ## write pipeline.yaml (KFP IR)
	$(BIN)/python pipeline.py compile --output pipeline.yaml

clean: ## remove local run outputs and caches (keeps .venv)
	rm -rf local-run local_outputs pipeline.yaml .pytest_cache .ruff_cache
