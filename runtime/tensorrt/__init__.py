"""TensorRT engines: profiles, builds, caching and the engine sidecar.

Nothing here imports TensorRT at module load; `library.load_tensorrt` does, on demand.
"""
