"""Protocol-buffer text format for Triton's config.pbtxt, written from plain dicts (no protobuf
dependency at export time; the tests parse every file with Triton's own ModelConfig schema)."""
from __future__ import annotations

import json


class Enum(str):
    """An enum value (KIND_GPU, TYPE_INT64): written without quotes."""


def render(message: dict, indent: int = 0) -> str:
    """`message`: field -> scalar, Enum, dict (a sub-message) or list (a repeated field)."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key} {{\n{render(value, indent + 1)}{pad}}}")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items = ",\n".join(f"{pad}  {{\n{render(v, indent + 2)}{pad}  }}" for v in value)
            lines.append(f"{pad}{key} [\n{items}\n{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "".join(line + "\n" for line in lines)


def _scalar(value) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # JSON escapes (\n, \", \\) are text-format escapes


def parameters(values: dict[str, str]) -> list[dict]:
    """A config's `parameters` map as text-format entries."""
    return [{"key": key, "value": {"string_value": str(value)}} for key, value in values.items()]
