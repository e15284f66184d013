"""An artifact directory's metadata, `quantpipe.json`: one typed model with a version, one writer, one reader.

It says what the artifact is (its `format`: the on-disk layout a runtime must load) and how it was made (method,
params, libraries, calibration). Which runtime measures it is the recipe's choice, not the artifact's: runtimes
declare the formats they load (runtimes/__init__.py). Method-specific facts (the GGUF's tensor types and
vocabulary check, the ONNX graph's inputs, the usage and serving lines) ride along as extra fields.

Version 1 files (quantpipe before the runtime axis) had no `format` enum but a `runtime` and a descriptive
`format` string; `parse` upgrades them, so artifacts and cached stages made by older runs keep loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quantpipe.errors import QuantpipeError

META_FILE = "quantpipe.json"
META_VERSION = 2
# The on-disk layouts quantpipe writes. transformers loads the first six; llama.cpp the GGUF; ONNX Runtime the ONNX.
Format = Literal["safetensors", "compressed-tensors", "gptq", "awq", "torchao", "bitsandbytes", "gguf", "onnx"]
FORMATS: tuple[str, ...] = Format.__args__  # type: ignore[attr-defined]
TRANSFORMERS_FORMATS = ("safetensors", "compressed-tensors", "gptq", "awq", "torchao", "bitsandbytes")


class ArtifactMeta(BaseModel):
    """The contents of quantpipe.json."""

    model_config = ConfigDict(extra="allow")
    meta_version: int = META_VERSION
    quantpipe_version: str = "unknown"  # provenance: unknown for a directory quantpipe did not make
    variant: str = ""
    method: str = "unknown"
    format: Format
    format_detail: str = Field("", description="the library's own name of the layout, e.g. "
                               "'compressed-tensors (pack-quantized)'")
    params: dict[str, Any] = Field(default_factory=dict)
    file: str | None = Field(None, description="the model file inside the directory (gguf, onnx)")
    library: str | None = None
    library_versions: dict[str, str] = Field(default_factory=dict)
    weights: Literal["real", "random"] = "real"
    arch: str | None = None
    seed: int | None = None
    calibration_sha256: str | None = None
    usage: str | None = None
    needs: str | None = None
    serve: str | None = None

    def extra(self, key: str, default: Any = None) -> Any:
        """A method-specific field (bits, vocab, io, tensor_types, ...)."""
        return (self.model_extra or {}).get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


# v1 'format' strings and runtimes -> the v2 format enum
_V1_FORMATS = {"hf-safetensors": "safetensors", "torchao-int8": "torchao", "gguf": "gguf", "onnx": "onnx",
               "gptq": "gptq", "awq (gemm)": "awq"}


def _upgrade_v1(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    detail = str(d.get("format") or "")
    runtime = d.pop("runtime", None)
    if runtime == "llama.cpp":
        fmt = "gguf"
    elif runtime == "onnxruntime":
        fmt = "onnx"
    elif detail.startswith("compressed-tensors"):
        fmt = "compressed-tensors"
    else:
        fmt = _V1_FORMATS.get(detail, "safetensors")
    d.update(format=fmt, format_detail=detail if detail != fmt else "", meta_version=META_VERSION)
    return d


def parse(data: Any, where: str = META_FILE) -> ArtifactMeta:
    """Validate a metadata mapping (upgrading version 1); a QuantpipeError names what is wrong."""
    if not isinstance(data, dict):
        raise QuantpipeError(f"{where}: corrupt metadata (a JSON {type(data).__name__}, not an object)")
    if "meta_version" not in data:
        data = _upgrade_v1(data)
    elif data.get("meta_version") != META_VERSION:
        raise QuantpipeError(f"{where}: metadata version {data.get('meta_version')!r}; this quantpipe reads "
                             f"{META_VERSION} (and 1)")
    try:
        return ArtifactMeta.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "metadata"
        raise QuantpipeError(f"{where}: corrupt metadata: {loc}: {err['msg']}") from None


def read(artifact_dir: Path) -> ArtifactMeta:
    """The metadata of an artifact directory; one-line errors for a missing or corrupt file."""
    path = Path(artifact_dir) / META_FILE
    if not path.is_file():
        raise QuantpipeError(f"{artifact_dir}: not a quantpipe artifact (no {META_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantpipeError(f"{path}: corrupt metadata ({e})") from None
    except RecursionError:
        raise QuantpipeError(f"{path}: corrupt metadata (nested too deeply to be quantpipe's)") from None
    return parse(data, str(path))


def write(artifact_dir: Path, meta: ArtifactMeta) -> None:
    (Path(artifact_dir) / META_FILE).write_text(json.dumps(meta.to_dict(), indent=2) + "\n")


def readme(meta: ArtifactMeta) -> str:
    """The artifact's README.md: how it was made, what loading it needs, how to load and serve it."""
    usage = meta.usage or (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(\"PATH\")\n"
        "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")")
    layout = meta.format + (f", {meta.format_detail}" if meta.format_detail else "")
    return (f"# {meta.variant}\n\nMade by quantpipe {meta.quantpipe_version} with method `{meta.method}` "
            f"({layout}), params `{json.dumps(meta.params)}`"
            + (f", library {meta.library}" if meta.library else "") + ".\n\n"
            + (f"Loading needs: `{meta.needs}`.\n\n" if meta.needs else "")
            + f"```python\n{usage}\n```\n\n"
            + (f"Serving (PATH is this directory):\n\n```sh\n{meta.serve}\n```\n\n" if meta.serve else "")
            + "`quantpipe.json` holds the full metadata.\n")
