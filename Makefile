# The two commands a newcomer needs: `make all` (the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_BASE ?= models/mnist
DATA_DIR ?= data/tfds
SAMPLES ?= samples
GRPC_PORT ?= 8500
REST_PORT ?= 8501
TRAIN_FLAGS ?=
# What bench/ measured fastest on 2 cores (docs/benchmarks.md): batching, one intra-op thread, inter-op -1.
SERVER_FLAGS ?= --enable_batching=true --batching_parameters_file=serving/batching.config \
	--tensorflow_intra_op_parallelism=1 --tensorflow_inter_op_parallelism=-1
DIST_DIR ?= dist
# the suite's worker processes: each takes whole test files, so a module's shared server starts once
TEST_WORKERS ?= 2

.PHONY: all venv data train evaluate samples serve demo test lint dist k8s-config clean

## all: set up, get MNIST, train, export, serve with the embedded server and predict on sample images
all: venv data train samples demo

## venv: the virtual environment from requirements.txt (re-made when requirements.txt changes)
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	@echo "[setup] virtual environment in $(VENV) from requirements.txt"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

## data: make the tfds dataset `mnist` available offline in $(DATA_DIR)
data: venv
	$(PY) -m training.mnist --data-dir $(DATA_DIR) --cache-dir data/cache

## train: train, evaluate and export the next version under $(MODEL_BASE); TRAIN_FLAGS="--epochs 2" etc.
train: venv
	$(PY) -m training.train --export-dir $(MODEL_BASE) --data-dir $(DATA_DIR) $(TRAIN_FLAGS)

## evaluate: evaluate the newest exported version on the test set, fed PNG bytes
evaluate: venv
	$(PY) -m training.evaluate --model $(MODEL_BASE) --data-dir $(DATA_DIR)

## samples: write 20 MNIST test digits as PNG files into $(SAMPLES)/
samples: venv
	$(PY) -m training.samples --out $(SAMPLES) --count 20 --data-dir $(DATA_DIR)

## serve: the embedded TF-Serving-compatible server in the foreground (Ctrl-C stops it)
serve: venv
	$(PY) -m serving.server --model_name=mnist --model_base_path=$(MODEL_BASE) \
		--port=$(GRPC_PORT) --rest_api_port=$(REST_PORT) $(SERVER_FLAGS)

## demo: start the embedded server, predict the sample images over REST and gRPC, stop the server
demo: venv
	@echo "[demo] starting the embedded server on gRPC $(GRPC_PORT), REST $(REST_PORT)"
	@$(PY) -m serving.server --model_name=mnist --model_base_path=$(MODEL_BASE) \
		--port=$(GRPC_PORT) --rest_api_port=$(REST_PORT) $(SERVER_FLAGS) > server.log 2>&1 & pid=$$!; \
	trap 'kill -TERM $$pid 2>/dev/null; wait $$pid' EXIT; \
	$(PY) client/predict.py --wait 120 --server localhost:$(REST_PORT) $(SAMPLES) && \
	echo "[demo] the same over gRPC:" && \
	$(PY) client/predict.py --protocol grpc --server localhost:$(GRPC_PORT) $(firstword $(wildcard $(SAMPLES)/*.png)) && \
	echo "[demo] done; the server's log is in server.log"

## test: the whole test suite with line coverage of training/, serving/ and client/, on TEST_WORKERS processes
test: venv
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --cov --cov-report=term --cov-fail-under=85

## lint: ruff
lint: venv
	$(VENV)/bin/ruff check .

## dist: source release $(DIST_DIR)/mnist-serving-<version>.tar.gz and .zip from the files git tracks
dist:
	$(PYTHON) tools/dist.py --out $(DIST_DIR)

## k8s-config: write k8s/configmap.yaml from serving/*.config (tests/test_k8s.py fails while they differ)
k8s-config:
	$(PYTHON) tools/k8s_configmap.py

clean:
	rm -rf runs reports $(SAMPLES) server.log .pytest_cache .coverage .coverage.*
