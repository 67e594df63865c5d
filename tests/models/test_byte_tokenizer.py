"""models/byte_tokenizer, the Hugging Face tokenizer folder that benchmark clients (aiperf) count
this model's tokens with: every byte is its own token, with the byte's value as its id."""
import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[2] / "models" / "byte_tokenizer"


def gpt2_byte_stand_ins() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def test_each_byte_is_the_token_with_its_value():
    spec = json.loads((FOLDER / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["model"]["merges"] == []
    assert spec["model"]["vocab"] == {char: byte for byte, char in gpt2_byte_stand_ins().items()}
    assert spec["pre_tokenizer"]["type"] == "ByteLevel" and spec["pre_tokenizer"]["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel" and spec["added_tokens"] == []
    assert json.loads((FOLDER / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
