"""The method contract and registry: a method turns (base model dir, calibration ids, params) into an artifact
directory of one format, and says what it needs, how it stores the weights and how much memory it calibrates in.

A method is a subclass of `Method` with a name, a params model and `quantize`; every other part has a default
(no calibration, float storage, transformers' safetensors format, no shape checks). Adding a method means adding
one module in this package that calls `register(TheMethod())`; it is found on import. A method module must not
import its heavy library at import time, so `quantpipe methods` works without it. Modules whose name starts with
`_` hold a backend library's glue shared by several methods (llm-compressor, GPTQModel).
"""

from __future__ import annotations

import importlib
import pkgutil
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from quantpipe.deps import Requirements
from quantpipe.errors import QuantpipeError
from quantpipe.memory import DTYPE_BYTES, Shapes, Storage


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
    method: str
    params: Any  # the method's MethodParams subclass instance
    out_dir: Path
    base_dir: Path | None  # HF dir of the baseline artifact (None for the baseline method itself)
    model: Any  # recipe ModelSpec
    calibration: torch.Tensor | None  # [n_samples, seq_len] token ids, identical for every method of a run


class Method:
    """Base class of a quantization method; the defaults fit a method without calibration that writes a float
    transformers checkpoint."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    # Bumped when the method's artifact changes for the same inputs, so cached quantize stages are redone.
    version: ClassVar[int] = 1
    needs: ClassVar[Requirements] = Requirements(("transformers",), None, ("transformers",))

    def requirements(self, params: Any) -> Requirements:
        """What quantizing with these params needs installed (a method with backends: the chosen backend's)."""
        return self.needs

    def format(self, params: Any) -> str:
        """The artifact format it writes (artifact.FORMATS): what decides which runtimes load it."""
        return "safetensors"

    def calibrates(self, params: Any) -> bool:
        """Whether it reads the run's calibration ids."""
        return False

    def storage(self, params: Any, dtype: str) -> Storage:
        """How the artifact stores the weights (`quantpipe plan`'s arithmetic); default: all in the recipe dtype."""
        return Storage(float_bytes=DTYPE_BYTES[dtype])

    def calibration_memory(self, params: Any, shapes: Shapes, n_samples: int, seq_len: int, act_bytes: int
                           ) -> dict[str, int] | None:
        """Memory of calibrated quantization beyond the loaded float model, by part; None without calibration."""
        return None

    def check_model(self, params: Any, config: Any) -> list[str]:
        """Problems of the params with the model's shapes (config only), as 'field: message'."""
        return []

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        """Write the artifact into job.out_dir; return its metadata (format_detail, library, needs, usage, ...)."""
        raise NotImplementedError

    # -- derived from the above ------------------------------------------------------------------------------
    def missing(self, params: Any = None) -> list[str]:
        return self.requirements(self.params_or_default(params)).missing()

    def install_hint(self, params: Any = None) -> str:
        return self.requirements(self.params_or_default(params)).hint()

    def require(self, variant: str, params: Any = None) -> None:
        """Stop before any work when the method's libraries are missing, naming the install command."""
        self.requirements(self.params_or_default(params)).require(f"variants({variant}): method '{self.name}'")

    def versions(self, params: Any = None) -> dict[str, str]:
        return self.requirements(self.params_or_default(params)).versions()

    def params_or_default(self, params: Any) -> Any:
        return self.Params() if params is None else params

    def choices(self) -> dict[str, Any]:
        """{format param value: params with that choice} for methods whose `format` param picks a backend."""
        fmt = self.Params.model_fields.get("format")
        if fmt is None:
            return {}
        import typing

        return {c: self.Params.model_construct(format=c) for c in typing.get_args(fmt.annotation)}


class BackendMethod(Method):
    """A weight-quantizing method whose `format` param picks the backend library once (gptq, awq): `backends`
    maps each format to an object with `requirements`, `quantize(job, params)` and `storage(params, dtype)`;
    everything backend-specific goes through it. The params have `format`, `bits` and `group_size`."""

    backends: ClassVar[dict[str, Any]] = {}

    def backend(self, params: Any) -> Any:
        return self.backends[params.format]

    def requirements(self, params: Any) -> Requirements:
        return self.backend(params).requirements

    def format(self, params: Any) -> str:
        return params.format

    def calibrates(self, params: Any) -> bool:
        return True

    def storage(self, params: Any, dtype: str) -> Storage:
        return self.backend(params).storage(params, dtype)

    def check_model(self, params: Any, config: Any) -> list[str]:
        return check_group_size(params.group_size, config)

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        p = job.params
        return {**self.backend(p).quantize(job, p), "bits": p.bits, "group_size": p.group_size}


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


def check_params(method_name: str, raw: dict[str, Any]) -> tuple[MethodParams | None, list[str]]:
    """A variant's params validated by its method: (params, []) or (None, ['field: message', ...])."""
    methods = all_methods()
    if method_name not in methods:
        return None, [f"method: unknown method '{method_name}'; registered methods: {', '.join(methods)}"]
    method = methods[method_name]
    try:
        return method.Params.model_validate(raw), []
    except ValidationError as e:
        out = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if not loc:  # a check across params names its field as 'field: message'
                head, sep, rest = msg.partition(": ")
                loc, msg = (head, rest) if sep and head.isidentifier() else ("params", msg)
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(method.Params.model_fields) or "none"
                msg = f"unknown parameter for method '{method_name}'; allowed: {allowed}"
            out.append(f"{loc}: {msg}")
        return None, out


def check_variant(variant: Any) -> list[str]:
    """Problems with one recipe variant's method and params, each as 'field: message' (empty list if fine)."""
    return check_params(variant.method, variant.raw_params)[1]


def parse_params(variant: Any) -> MethodParams:
    return get_method(variant.method).Params.model_validate(variant.raw_params)


def check_against_model(recipe: Any, config: Any) -> list[str]:
    """Problems of each variant's params with the model's shapes (e.g. a group size that does not divide a
    layer's input size), as 'variants[i](name).field: message'. `config` is a transformers config."""
    problems = []
    for i, v in enumerate(recipe.variants):
        problems += [f"variants[{i}]({v.name}).{p}" for p in get_method(v.method).check_model(v.params, config)]
    return problems


def linear_input_sizes(config: Any) -> dict[str, int]:
    """Input sizes (the K of each matmul) of a decoder's Linear layers, from its config."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {"hidden_size (q/k/v/gate/up inputs)": hidden, "num_heads*head_dim (o_proj input)": heads * head_dim,
            "intermediate_size (down_proj input)": config.intermediate_size}


def linear_sizes(config: Any) -> dict[str, int]:
    """Input and output sizes of a decoder's Linear layers (both sides of every matmul), from its config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return {**linear_input_sizes(config), "num_key_value_heads*head_dim (k/v outputs)": kv}


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


def run_quantize(arg: tuple[Method, QuantizeJob]) -> dict[str, Any]:
    """The quantize stage's body, in its own process (isolate.run): the method's quantize, timed. The method
    travels by pickle (its class by reference), so a method defined outside this package runs too."""
    import time
    import traceback

    from quantpipe.cache import explain_os_error

    method, job = arg
    t = time.perf_counter()
    try:
        meta = method.quantize(job)
    except OSError as e:
        traceback.print_exc()
        raise explain_os_error(e, f"method '{method.name}' was writing its artifact") from None
    return {"meta": meta, "quantize_s": time.perf_counter() - t}
