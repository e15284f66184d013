"""The one exception type the CLI turns into a clear one-line message (exit code 2)."""


class QuantpipeError(Exception):
    """A problem with the user's input or environment, worded so the user can fix it."""


def first_line(e: BaseException, default: str | None = None) -> str:
    """The first non-empty line of an exception's message (libraries put tracebacks and hints below it), or
    `default` (the exception's type name) when it has none: what one-line error messages quote."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else (default if default is not None else type(e).__name__)
