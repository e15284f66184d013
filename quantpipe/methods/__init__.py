"""The method contract and registry: a method turns (base model dir, calibration, params) into an artifact dir.

Adding a method means adding one module in this package that calls `register(...)`; it is found on import.
A method module must not import its heavy library at import time, so `quantpipe methods` works without it.
Modules whose name starts with `_` are helpers shared by several methods (one per backend library).
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
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from quantpipe.errors import QuantpipeError


def _group_size(v: int) -> int:
    if v != -1 and (v < 16 or v & (v - 1)):
        raise ValueError(f"{v} is not a power of two >= 16 or -1 (per channel)")
    return v


# The `group_size` param of the weight-quantizing methods: columns per scale, or -1 for one per output channel.
GroupSize = Annotated[int, Field(description="columns per scale; -1 = one scale per output channel"),
                      AfterValidator(_group_size)]


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
class Storage:
    """How an artifact stores the weights: the inputs of `quantpipe plan`'s byte arithmetic."""

    float_bytes: int  # bytes per element of what stays float: embeddings, lm_head, norms, biases
    # bytes of one quantized decoder Linear's weight tensors (no bias) from its (out_features, in_features);
    # None: the Linears stay float too
    linear: Callable[[int, int], int] | None = None
    # transformers turns the weights back into float when it loads this format on a CPU
    decompressed_on_cpu: bool = False
    # what the arithmetic leaves out when this format runs on a CPU (shown beside the measured memory)
    cpu_note: str = ""
    # bytes of the token embedding (and of an untied lm_head) from (vocab, hidden); None: float_bytes each
    embedding: Callable[[int, int], int] | None = None
    # False where the backend picks some tensors' types itself (llama.cpp's k-quant mixes): nominal bytes
    exact: bool = True
    # non-empty where the quantization's float model is not all resident at once (why): the prediction's
    # `model` term is then an upper bound, and the measured peak may fall below the prediction
    quantize_upper_bound: str = ""
    # decoder Linears (names as plan.Shapes.linears gives them, matched as substrings) that stay float
    float_linears: tuple[str, ...] = ()
    # bytes of an untied lm_head, and of the one tensor a tied embedding and lm_head share, from (vocab, hidden);
    # None: as `embedding`
    lm_head: Callable[[int, int], int] | None = None
    tied_embedding: Callable[[int, int], int] | None = None


def float_storage(params: Any, dtype: str) -> Storage:
    """Default: every tensor in the recipe dtype (the baseline)."""
    return Storage(float_bytes=DTYPE_BYTES[dtype])


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    params: type[MethodParams]
    quantize: Callable[[QuantizeJob], dict[str, Any]]
    runtime: str  # runtime module that serves the artifact
    requires: tuple[str, ...] = ()  # import names of the libraries it needs
    extra: str | None = None  # pip extra that installs them
    # whether it reads the calibration ids: always, or a function of its params
    uses_calibration: bool | Callable[[Any], bool] = False
    libraries: tuple[str, ...] = field(default=())  # distributions whose versions key the cache
    # Per-params requirements, for methods whose backend depends on a param (e.g. the output format):
    # params -> (import names, pip extra, distributions). None: `requires`/`extra`/`libraries` always apply.
    backend: Callable[[Any], tuple[tuple[str, ...], str | None, tuple[str, ...]]] | None = None
    # Checks of params against the model's config (shapes), before any work: (params, config) -> problems.
    check_model: Callable[[Any, Any], list[str]] | None = None
    # How the artifact stores the weights, from (params, recipe dtype); see Storage.
    storage: Callable[[Any, str], Storage] = float_storage
    # Memory of calibrated quantization beyond the loaded float model, from (params, plan.Shapes, n_samples,
    # seq_len, dtype bytes) -> {component: bytes}; None for methods without calibration.
    calibration_memory: Callable[[Any, Any, int, int, int], dict[str, int]] | None = None
    # Bumped when the method's artifact changes for the same inputs, so cached quantize stages are redone.
    version: int = 1

    def calibrates(self, params: Any) -> bool:
        """Whether this method, with these params, reads the run's calibration ids."""
        u = self.uses_calibration
        return bool(u(params)) if callable(u) else u

    def _deps(self, params: Any = None) -> tuple[tuple[str, ...], str | None, tuple[str, ...]]:
        if self.backend is not None and params is not None:
            return self.backend(params)
        return self.requires, self.extra, self.libraries

    def imports(self, params: Any = None) -> tuple[str, ...]:
        """Import names of the libraries this method (with these params) runs."""
        return self._deps(params)[0]

    def missing(self, params: Any = None) -> list[str]:
        return [r for r in self._deps(params)[0] if importlib.util.find_spec(r) is None]

    def install_hint(self, params: Any = None) -> str:
        extra = self._deps(params)[1]
        return f"pip install 'quantpipe[{extra}]'" if extra else "pip install " + " ".join(self.missing(params))

    def require(self, variant: str, params: Any = None) -> None:
        """Stop before any work when the method's libraries are missing, naming the install command."""
        missing = self.missing(params)
        if missing:
            raise QuantpipeError(f"variants({variant}): method '{self.name}' needs {', '.join(missing)}: "
                                 f"{self.install_hint(params)}")

    def versions(self, params: Any = None) -> dict[str, str]:
        out = {}
        for dist in self._deps(params)[2]:
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
            if mod.name.startswith("_"):
                continue
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
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if not loc:  # a check across params names its field as 'field: message'
                head, sep, rest = msg.partition(": ")
                loc, msg = (head, rest) if sep and head.isidentifier() else ("params", msg)
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(methods[variant.method].params.model_fields) or "none"
                msg = f"unknown parameter for method '{variant.method}'; allowed: {allowed}"
            out.append(f"{loc}: {msg}")
        return out
    return []


def parse_params(variant: Any) -> MethodParams:
    return get_method(variant.method).params.model_validate(variant.raw_params)


def check_against_model(recipe: Any, config: Any) -> list[str]:
    """Problems of each variant's params with the model's shapes (e.g. a group size that does not divide a
    layer's input size), as 'variants[i](name).field: message'. `config` is a transformers config."""
    problems = []
    for i, v in enumerate(recipe.variants):
        method = get_method(v.method)
        if method.check_model is not None:
            problems += [f"variants[{i}]({v.name}).{p}" for p in method.check_model(parse_params(v), config)]
    return problems


def linear_input_sizes(config: Any) -> dict[str, int]:
    """Input sizes (the K of each matmul) of a decoder's Linear layers, from its config."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {"hidden_size (q/k/v/gate/up inputs)": hidden, "num_heads*head_dim (o_proj input)": heads * head_dim,
            "intermediate_size (down_proj input)": config.intermediate_size}


def check_group_size(group_size: int, config: Any) -> list[str]:
    """A group must tile every Linear input exactly (vLLM's kernels and the packers require it)."""
    if group_size <= 0:
        return []
    bad = {k: v for k, v in linear_input_sizes(config).items() if v % group_size}
    if not bad:
        return []
    sizes = linear_input_sizes(config).values()
    fits = [g for g in (32, 64, 128, 256) if all(s % g == 0 for s in sizes)]
    what = ", ".join(f"{k} = {v}" for k, v in bad.items())
    fix = f"use group_size {' or '.join(map(str, fits))}" if fits else "use group_size -1 (per channel)"
    return [f"group_size: {group_size} does not divide {what}; {fix}"]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of the base dir into an artifact dir (artifacts must be servable alone)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
