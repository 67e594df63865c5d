# Quick start: `make demo` and `make test` on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= build/demo

AIPERF_VENV ?= .venv-aiperf

.PHONY: setup demo test test-gpu aiperf bench-outside-client clean

setup: $(VENV)/.installed

# CPU torch first, pinned: a bare `torch` requirement could pull a multi-GB CUDA build.
# pip prints a line per package it collects (and a progress bar for large downloads on a terminal),
# so the ~2 minutes of installing are never silent.
$(VENV)/.installed: pyproject.toml
	@echo "setup: installing into $(VENV): CPU PyTorch $(TORCH_VERSION) and the toolkit with its test, plot and serve extras (about 2 minutes and 2.5 GB on a fresh machine; faster from pip's cache)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@echo "setup: [1/2] PyTorch $(TORCH_VERSION), the largest download ..."
	$(PY) -m pip install --disable-pip-version-check --progress-bar on torch==$(TORCH_VERSION)
	@echo "setup: [2/2] the toolkit and its dependencies (onnx, onnxruntime, the serving wheels; about a minute) ..."
	$(PY) -m pip install --disable-pip-version-check --progress-bar on -e '.[test,plot,serve]'
	touch $@

demo: setup
	@mkdir -p $(DEMO_DIR)
	$(VENV)/bin/export-model --opset 17 --output $(DEMO_DIR)/model.onnx --json $(DEMO_DIR)/export.json
	$(VENV)/bin/check-parity $(DEMO_DIR)/model.onnx --json $(DEMO_DIR)/parity.json
	$(VENV)/bin/export-model --opset 17 --with-past --output $(DEMO_DIR)/model-past.onnx
	$(VENV)/bin/generate --model $(DEMO_DIR)/model-past.onnx --prompt "The rotary transformer" \
		--max-new-tokens 24 --json $(DEMO_DIR)/generate.json
	@$(PY) -m runtime.commands.demo_summary $(DEMO_DIR)

# Two workers on a 2-core machine: most slow tests wait on subprocesses (servers, exports, signals).
# A file's tests stay on one worker, so module fixtures are built once.
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# On the accelerator, after staging the GPU wheels (see docs/gpu-verification.md).
# The GPU tests live in tests/gpu: collecting only them needs none of the serving wheels.
test-gpu:
	python3 -m pytest -q -m gpu tests/gpu

# NVIDIA's aiperf (an OpenAI-protocol benchmark client) in an environment of its own: its many
# dependencies are pinned apart from the toolkit's.
aiperf: $(AIPERF_VENV)/.installed

$(AIPERF_VENV)/.installed:
	$(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/pip install -q --disable-pip-version-check aiperf==0.13.0
	touch $@

# aiperf and loadtest (gRPC and OpenAI) against one CPU `serve` of the tiny preset.
bench-outside-client: setup aiperf
	bash scripts/outside_client.sh

clean:
	rm -rf build $(VENV) $(AIPERF_VENV)
