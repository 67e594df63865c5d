# Quick start: `make demo` and `make test` on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= build/demo

.PHONY: setup demo test test-gpu clean

setup: $(VENV)/.installed

# CPU torch first, pinned: a bare `torch` requirement could pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,plot,serve]'
	touch $@

demo: setup
	@mkdir -p $(DEMO_DIR)
	$(VENV)/bin/export-model --opset 17 --output $(DEMO_DIR)/model.onnx --json $(DEMO_DIR)/export.json
	$(VENV)/bin/check-parity $(DEMO_DIR)/model.onnx --json $(DEMO_DIR)/parity.json
	$(VENV)/bin/export-model --opset 17 --with-past --output $(DEMO_DIR)/model-past.onnx
	$(VENV)/bin/generate --model $(DEMO_DIR)/model-past.onnx --prompt "The rotary transformer" \
		--max-new-tokens 24 --json $(DEMO_DIR)/generate.json
	@$(PY) -m runtime.commands.demo_summary $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q

# On the accelerator, after staging the GPU wheels (see README).
# The GPU tests live in tests/gpu: collecting only them needs none of the serving wheels.
test-gpu:
	python3 -m pytest -q -m gpu tests/gpu

clean:
	rm -rf build $(VENV)
