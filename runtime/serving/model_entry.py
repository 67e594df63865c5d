"""Triton python-backend entry of the `generate` model (copied to generate/1/model.py).

The work is in the toolkit (runtime.serving.triton_model): this file only hands Triton's calls over.
"""
import triton_python_backend_utils as pb_utils

from runtime.serving.triton_model import GenerateModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = GenerateModel(pb_utils, args)

    def execute(self, requests):
        for request in requests:
            self.model.submit(request)
        return None  # decoupled: the scheduler thread sends the responses

    def finalize(self):
        self.model.close()
