"""Write models/byte_tokenizer: this model's text encoding (token id = UTF-8 byte) as a Hugging Face
tokenizer folder, for clients that count tokens with one (aiperf, genai-perf, guidellm).

Usage (needs the `tokenizers` package, e.g. in .venv-aiperf): python scripts/make_byte_tokenizer.py [FOLDER]
"""
import json
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def byte_stand_ins() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte's printable stand-in, as the ByteLevel pre-tokenizer maps it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def main() -> int:
    folder = sys.argv[1] if len(sys.argv) > 1 else "models/byte_tokenizer"
    tokenizer = Tokenizer(models.BPE(vocab={char: byte for byte, char in byte_stand_ins().items()}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(f"{folder}/tokenizer.json")
    with open(f"{folder}/tokenizer_config.json", "w") as file:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1000000,
                   "clean_up_tokenization_spaces": False}, file, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
