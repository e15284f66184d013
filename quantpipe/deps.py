"""What a method or a runtime needs installed: import names, the pip extra that installs them, and the
distributions whose versions key the stage cache. One type for both, so `quantpipe methods`, the run's
pre-flight check and the cache keys read the same declaration."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from quantpipe.errors import QuantpipeError, first_line
from quantpipe.sysinfo import versions


@dataclass(frozen=True)
class Requirements:
    imports: tuple[str, ...] = ()  # import names of the libraries
    extra: str | None = None  # the pip extra of quantpipe that installs them
    dists: tuple[str, ...] = ()  # distributions whose versions key the cache
    # imports that must really import, not only be found: bindings whose shared library may fail to load
    loads: tuple[str, ...] = ()

    def missing(self) -> list[str]:
        out = [r for r in self.imports if importlib.util.find_spec(r) is None]
        for name in self.loads:
            if name not in out and (why := load_failure(name)):
                out.append(f"{name} (installed, but it fails to load: {why})")
        return out

    def hint(self) -> str:
        return f"pip install 'quantpipe[{self.extra}]'" if self.extra else "pip install " + " ".join(self.missing())

    def versions(self) -> dict[str, str]:
        return versions(self.dists)

    def require(self, who: str) -> None:
        """Stop before any work when a library is missing, naming the install command."""
        missing = self.missing()
        if missing:
            raise QuantpipeError(f"{who} needs {', '.join(missing)}: {self.hint()}")


_LOAD_FAILURES: dict[str, str | None] = {}


def load_failure(name: str) -> str | None:
    """Why importing `name` fails although it is installed (a shared library that will not load), or None."""
    if name not in _LOAD_FAILURES:
        try:
            importlib.import_module(name)
            _LOAD_FAILURES[name] = None
        except ImportError as e:
            _LOAD_FAILURES[name] = None if importlib.util.find_spec(name) is None else first_line(e)
        except Exception as e:  # noqa: BLE001 - OSError from ctypes, RuntimeError from the bindings, ...
            _LOAD_FAILURES[name] = f"{type(e).__name__}: {first_line(e)}"
    return _LOAD_FAILURES[name]
