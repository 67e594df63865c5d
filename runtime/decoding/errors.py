"""The decoding error, apart from the Decoder (which needs torch): request checks and text
encoding raise it in processes that never load a model, such as `loadtest` and the API workers."""
from __future__ import annotations

from models.errors import ToolkitError


class DecodingError(ToolkitError, ValueError):
    """Bad prompts, rows or settings for decoding."""
