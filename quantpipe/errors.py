"""The one exception type the CLI turns into a clear one-line message (exit code 2)."""


class QuantpipeError(Exception):
    """A problem with the user's input or environment, worded so the user can fix it."""


def first_line(e: BaseException, default: str | None = None) -> str:
    """The first non-empty line of an exception's message (libraries put tracebacks and hints below it), or
    `default` (the exception's type name) when it has none: what one-line error messages quote."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else (default if default is not None else type(e).__name__)


def location(loc: tuple, data: object, whole: str) -> str:
    """A validation error's location in a mapping as `variants[1](int8).quality.kld_mean`: list items are named
    by their `name` key where they have one; `whole` when the error is about the mapping itself."""
    out, node = "", data
    for part in loc:
        if isinstance(part, int):
            item = node[part] if isinstance(node, list) and part < len(node) else None
            name = item.get("name") if isinstance(item, dict) else None
            out += f"[{part}]" + (f"({name})" if name else "")
        else:
            out += ("." if out else "") + str(part)
        try:
            node = node[part]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            node = None
    return out or whole
