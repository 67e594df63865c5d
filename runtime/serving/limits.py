"""What one server accepts: rows decoded at once, prompt and output lengths, waiting requests.

The same record is written into the `generate` model's config.pbtxt parameters, read back by the
python backend, and set by `serve`'s flags, so the names are spelled here only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from models.errors import ToolkitError


class LimitsError(ToolkitError, ValueError):
    """Limits that are not positive integers, or that the model cannot hold."""


FLAGS = {"max_rows": "--max-rows", "max_prompt_tokens": "--max-prompt-tokens",
         "max_new_tokens": "--max-new-tokens-limit", "max_queue": "--queue"}  # serve's and export-triton's flags
HIGHEST = {"max_rows": 4096, "max_prompt_tokens": 1 << 20, "max_new_tokens": 1 << 20, "max_queue": 1 << 20,
           "default_new_tokens": 1 << 20}  # far past any real server; bounds a typo before anything starts


def limit_name(field: str) -> str:
    """How a user set the limit: the flag, with the config parameter it becomes."""
    return f"{FLAGS[field]} ({field})" if field in FLAGS else field


@dataclass(frozen=True)
class Limits:
    max_rows: int = 8  # requests decoded together (rows of the one decoder)
    max_prompt_tokens: int = 256
    max_new_tokens: int = 256  # the most a request may ask for
    max_queue: int = 64  # requests waiting while every row is busy; more are refused (0: no waiting)
    default_new_tokens: int = 64  # for a request that does not say

    def __post_init__(self):
        for item in fields(self):
            value = getattr(self, item.name)
            low = 0 if item.name == "max_queue" else 1
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= HIGHEST[item.name]:
                raise LimitsError(f"{limit_name(item.name)} must be an integer from {low} to {HIGHEST[item.name]}, "
                                  f"got {value!r}")

    @property
    def new_tokens_default(self) -> int:
        return min(self.default_new_tokens, self.max_new_tokens)

    def check_capacity(self, capacity: int | None, what: str) -> None:
        """A prompt of max_prompt_tokens must leave room for at least one new token in `capacity`."""
        if capacity is not None and self.max_prompt_tokens >= capacity:
            raise LimitsError(f"{limit_name('max_prompt_tokens')} {self.max_prompt_tokens} leaves no room for new "
                              f"tokens in {what}; lower it below {capacity}")

    def to_parameters(self) -> dict[str, str]:
        return {name: str(value) for name, value in asdict(self).items()}

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> "Limits":
        """The limits among a model config's parameters (missing ones take their defaults)."""
        values = {}
        for item in fields(cls):
            if item.name in parameters:
                text = str(parameters[item.name]).strip()
                if not text.lstrip("-").isdigit():
                    raise LimitsError(f"parameter {item.name} must be an integer, got {text!r}")
                values[item.name] = int(text)
        return cls(**values)

    def fitted(self, capacity: int | None, given: set[str]) -> "Limits":
        """These limits with the prompt and new-token limits the user did not give (`given`: field
        names) lowered to what a row of `capacity` tokens holds: half of it each, so a small
        static cache works without flags. Given limits are kept, and refused when they do not fit
        (check_capacity)."""
        if not capacity:
            return self
        prompt = self.max_prompt_tokens if "max_prompt_tokens" in given else \
            max(1, min(self.max_prompt_tokens, capacity // 2))
        new = self.max_new_tokens if "max_new_tokens" in given else max(1, min(self.max_new_tokens, capacity - prompt))
        fitted = self.replace(max_prompt_tokens=prompt, max_new_tokens=new)
        fitted.check_capacity(capacity, f"the decoder's {capacity}-token capacity")
        if new >= capacity:  # given, and unreachable (repositories written before this check still load)
            raise LimitsError(f"{limit_name('max_new_tokens')} {new} can never be reached (a prompt takes at least "
                              f"one token) in the decoder's {capacity}-token capacity; lower it below {capacity}")
        return fitted

    def replace(self, **changes) -> "Limits":
        """These limits with the given fields changed (None leaves a field as it is)."""
        return Limits(**{**asdict(self), **{k: v for k, v in changes.items() if v is not None}})
