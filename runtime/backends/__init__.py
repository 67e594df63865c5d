"""Backends behind one interface (named arrays in, named arrays out); heavy libraries are imported
only when a backend is opened. Which backends exist, and how each is opened: runtime/registry.py."""
from __future__ import annotations

from .base import Backend, BackendError, TensorMeta

__all__ = ["Backend", "BackendError", "TensorMeta"]
