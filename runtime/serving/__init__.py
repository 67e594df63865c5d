"""Serving on NVIDIA Triton: request checks, the in-flight batching scheduler, the model repository,
the python-backend glue and the bundled tritonserver process."""
