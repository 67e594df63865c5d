"""Byte-level text (as upstream's enwik8 training): one token per UTF-8 byte."""
from __future__ import annotations

import codecs

from .errors import DecodingError


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


class TextPieces:
    """Turns one row's tokens into text as they come: bytes decoded incrementally (a piece is empty
    while a multi-byte character is incomplete), ids of 256 and over as <id>. The pieces join to
    exactly decode_bytes(tokens): an id of 256 or over, or the end (`final`, or flush()), turns the
    bytes of an unfinished character into U+FFFD as decode_bytes does."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, token: int, final: bool = False) -> str:
        if token < 256:
            return self._decoder.decode(bytes([token]), final=final)
        return self.flush() + f"<{token}>"

    def flush(self) -> str:
        """What is left of an unfinished character (U+FFFD, or nothing); the next byte starts afresh."""
        return self._decoder.decode(b"", final=True)
