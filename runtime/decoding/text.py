"""Byte-level text (as upstream's enwik8 training): one token per UTF-8 byte."""
from __future__ import annotations

from .base import DecodingError


def encode_text(text: str, vocab_size: int) -> list[int]:
    if vocab_size < 256:
        raise DecodingError(f"text prompts are byte-level and need a vocabulary of at least 256 tokens "
                            f"(this model has {vocab_size}); pass --prompt-ids instead")
    return list(text.encode("utf-8"))


def decode_bytes(tokens: list[int]) -> str:
    """Tokens below 256 as UTF-8 bytes; others as <id>."""
    out, pending = [], bytearray()
    for token in tokens:
        if token < 256:
            pending.append(token)
            continue
        out.append(pending.decode("utf-8", errors="replace"))
        pending.clear()
        out.append(f"<{token}>")
    out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)
