"""The method contract and registry: a method turns (base model dir, calibration, params) into an artifact dir.

Adding a method means adding one module in this package that calls `register(...)`; it is found on import.
A method module must not import its heavy library at import time, so `quantpipe methods` works without it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from quantpipe.errors import QuantpipeError


class MethodParams(BaseModel):
    """Base class of every method's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class QuantizeJob:
    """Everything a method gets. It writes the servable artifact into `out_dir` and returns its metadata."""

    variant: str
    params: Any  # the method's MethodParams subclass instance
    out_dir: Path
    base_dir: Path | None  # HF dir of the baseline artifact (None for the baseline method itself)
    model: Any  # recipe ModelSpec
    calibration: torch.Tensor | None  # [n_samples, seq_len] token ids, identical for every method of a run


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    params: type[MethodParams]
    quantize: Callable[[QuantizeJob], dict[str, Any]]
    runtime: str  # runtime module that serves the artifact
    requires: tuple[str, ...] = ()  # import names of the libraries it needs
    extra: str | None = None  # pip extra that installs them
    uses_calibration: bool = False
    libraries: tuple[str, ...] = field(default=())  # distributions whose versions key the cache

    def missing(self) -> list[str]:
        return [r for r in self.requires if importlib.util.find_spec(r) is None]

    def install_hint(self) -> str:
        return f"pip install 'quantpipe[{self.extra}]'" if self.extra else "pip install " + " ".join(self.missing())

    def require(self, variant: str) -> None:
        """Stop before any work when the method's libraries are missing, naming the install command."""
        missing = self.missing()
        if missing:
            raise QuantpipeError(f"variants({variant}): method '{self.name}' needs {', '.join(missing)}: "
                                 f"{self.install_hint()}")

    def versions(self) -> dict[str, str]:
        out = {}
        for dist in self.libraries:
            try:
                out[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                out[dist] = "not installed"
        return out


_REGISTRY: dict[str, Method] = {}
_LOADED = False


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise RuntimeError(f"method '{method.name}' registered twice")
    _REGISTRY[method.name] = method
    return method


def _load_all() -> None:
    global _LOADED
    if not _LOADED:
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
        _LOADED = True


def all_methods() -> dict[str, Method]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> Method:
    methods = all_methods()
    if name not in methods:
        raise QuantpipeError(f"unknown method '{name}'; registered methods: {', '.join(methods)}")
    return methods[name]


def check_variant(variant: Any) -> list[str]:
    """Problems with one recipe variant's method and params, each as 'field: message' (empty list if fine)."""
    methods = all_methods()
    if variant.method not in methods:
        return [f"method: unknown method '{variant.method}'; registered methods: {', '.join(methods)}"]
    try:
        methods[variant.method].params.model_validate(variant.raw_params)
    except ValidationError as e:
        out = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "params"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(methods[variant.method].params.model_fields) or "none"
                msg = f"unknown parameter for method '{variant.method}'; allowed: {allowed}"
            out.append(f"{loc}: {msg}")
        return out
    return []


def parse_params(variant: Any) -> MethodParams:
    return get_method(variant.method).params.model_validate(variant.raw_params)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of the base dir into an artifact dir (artifacts must be servable alone)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
