"""The one exception type the CLI turns into a clear one-line message (exit code 2)."""


class QuantpipeError(Exception):
    """A problem with the user's input or environment, worded so the user can fix it."""
