"""Triton python-backend entry of the `generate` model (copied to generate/1/model.py).

The work is in the toolkit (runtime.serving.triton_model): this file only hands Triton's calls over.
"""
import json
import os
import sys

# The stub's interpreter ignores PYTHONPATH: put `serve`'s own import path first, before
# triton_python_backend_utils imports numpy, so the stub imports what `serve` would (its numpy, its
# onnxruntime build, this toolkit).
sys.path[:0] = json.loads(os.environ.get("ROTARY_SERVE_SYS_PATH", "[]"))

import triton_python_backend_utils as pb_utils  # noqa: E402

from runtime.serving.triton_model import GenerateModel  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.model = GenerateModel(pb_utils, args)

    def execute(self, requests):
        for request in requests:
            self.model.submit(request)
        return None  # decoupled: the scheduler thread sends the responses

    def finalize(self):
        self.model.close()
