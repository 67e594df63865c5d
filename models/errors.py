"""The toolkit's error base: library code raises these; only CLIs turn them into messages."""


class ToolkitError(Exception):
    """A user-facing problem: its message is one sentence naming the problem and the fix."""
