"""The runtime contract and registry: load an artifact, then score token ids and generate greedily.

Eval, lm-eval and bench only talk to this contract, so perplexity, KL divergence and tokens/s mean the same thing
in every runtime. A runtime declares, in one `RuntimeSpec`, the artifact formats it loads and what it can do
(`Capabilities`): full-vocabulary logits or only top-k log-probs, batched scoring, whether its memory is this
process's or a server's, whether it names its kernels and counts the bytes a decode step reads. The recipe chooses
runtimes (`eval.runtimes`, `bench.runtimes`); `auto` is the format's natural runtime, and on a GPU the compiled
engine for the formats it loads. Adding a runtime means adding one module that calls `register(...)`: modules
in this package are found on import, and a module elsewhere registers when it is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from quantpipe import artifact
from quantpipe.artifact import ArtifactMeta
from quantpipe.deps import Requirements
from quantpipe.errors import QuantpipeError, first_line


class Capabilities(BaseModel):
    """What a runtime can do, declared once (eval, lm-eval and bench read this instead of probing)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # "full": logits over the whole vocabulary at every position. "topk": only the k most likely tokens' log-probs
    # and the scored token's own (a server's OpenAI API): KL divergence is then estimated (evaluate.kl_topk).
    scores: Literal["full", "topk"] = "full"
    max_topk: int | None = None  # the largest k a top-k runtime returns
    batched_scoring: bool = False  # scores several sequences in one call (logits_batch) faster than one by one
    memory: Literal["in-process", "out-of-process"] = "in-process"  # whose memory the bench measures
    names_kernels: bool = True  # kernel() says what computed the matmuls
    decode_bytes: bool = False  # reports the weight and KV bytes a decode step reads (the bandwidth limit)
    static_cache: bool = False  # generate() compiles per (batch, length): the bench warms each shape first
    devices: tuple[str, ...] = ("cpu",)


@dataclass(frozen=True)
class TopK:
    """Top-k scoring of one sequence of T ids: for each position t < T-1, the log-prob of the next id (`target`,
    [T-1]); for each position t < T, the k most likely next ids (`ids`, [T, k], most likely first) and their
    log-probs (`logprobs`, [T, k])."""

    target: torch.Tensor
    ids: torch.Tensor
    logprobs: torch.Tensor

    @staticmethod
    def from_logits(logits: torch.Tensor, ids: list[int], k: int) -> TopK:
        lp = torch.log_softmax(logits.float(), dim=-1)
        target = lp[:-1].gather(1, torch.tensor(ids[1:], dtype=torch.long)[:, None])[:, 0]
        top = lp.topk(min(k, lp.shape[1]), dim=-1)
        return TopK(target=target, ids=top.indices, logprobs=top.values)


class BaseRuntime:
    """Defaults of the runtime contract; a runtime overrides what it can do better. Subclasses set `name` and
    `device` and implement `generate` and either `logits` (full scores) or `topk` (top-k scores)."""

    name: str = "?"
    device: str = "cpu"
    threads: int | None = None
    engine: str = "runtime"  # how generation runs, one line for the matrix
    fallback_note: str | None = None  # set when `auto` fell back from another runtime: why

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Next-token logits for every position of one sequence: float32 [len(ids), vocab] on the CPU."""
        raise NotImplementedError(f"runtime '{self.name}' returns top-k log-probs, not full logits")

    def logits_batch(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """Next-token logits of several sequences (a runtime with batched scoring does it in one call)."""
        return [self.logits(s) for s in seqs]

    def topk(self, ids: list[int], k: int) -> TopK:
        """Top-k scoring of one sequence (a full-logits runtime derives it from its logits)."""
        return TopK.from_logits(self.logits(ids), ids, k)

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation of a batch [B, T] of equal-length prompts: exactly `new_tokens` ids each, [B, n].
        End-of-sequence tokens do not stop generation, so timings always cover `new_tokens` steps."""
        raise NotImplementedError

    def kernel(self) -> str:
        """What computed the matmuls (after a forward: some formats decompress on the first)."""
        return "unknown"

    def decode_bytes(self) -> int | None:
        """Weight bytes one decode step reads (None: not known to this runtime)."""
        return None

    def kv_bytes_per_position(self) -> int | None:
        return None

    def cache_length(self, prompt_len: int, new_tokens: int) -> float:
        """KV positions a decode step reads on average: a dynamic cache's middle length."""
        return prompt_len + new_tokens / 2

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class RuntimeSpec:
    """One registered runtime: its name, the formats it loads, its capabilities and how to load it."""

    name: str
    summary: str
    formats: frozenset[str]  # artifact formats (artifact.FORMATS) it loads
    load: Callable[[Path, str, ArtifactMeta], BaseRuntime]  # (artifact dir, device, metadata) -> runtime
    capabilities: Capabilities = field(default_factory=Capabilities)
    requirements: Requirements = field(default_factory=Requirements)
    natural_for: frozenset[str] = frozenset()  # formats for which `auto` means this runtime
    gpu_auto_for: frozenset[str] = frozenset()  # formats for which `auto` means this runtime on a GPU
    # Import what loading an artifact will import, without loading weights: the bench takes its memory baseline
    # after this, so "memory the model takes" excludes the libraries' own code and data.
    preload: Callable[[Path, ArtifactMeta], None] | None = None


_REGISTRY: dict[str, RuntimeSpec] = {}
_LOADED = False


def register(spec: RuntimeSpec) -> RuntimeSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise RuntimeError(f"runtime '{spec.name}' registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def all_runtimes() -> dict[str, RuntimeSpec]:
    global _LOADED
    if not _LOADED:
        for mod in pkgutil.iter_modules(__path__):
            if not mod.name.startswith("_") and mod.name != "kernels":
                importlib.import_module(f"{__name__}.{mod.name}")
        _LOADED = True
    return dict(_REGISTRY)


def get_runtime(name: str, field_name: str = "runtime") -> RuntimeSpec:
    runtimes = all_runtimes()
    if name not in runtimes:
        raise QuantpipeError(f"{field_name}: unknown runtime '{name}'; registered runtimes: auto, "
                             f"{', '.join(runtimes)}")
    return runtimes[name]


def natural(fmt: str) -> RuntimeSpec:
    """The runtime that loads a format by default (transformers for checkpoints, llama.cpp, ONNX Runtime)."""
    for spec in all_runtimes().values():
        if fmt in spec.natural_for:
            return spec
    raise QuantpipeError(f"no registered runtime loads format '{fmt}'")


def resolve(name: str, fmt: str, device: str) -> RuntimeSpec | None:
    """The runtime a recipe's runtime name means for an artifact of format `fmt` on `device`: `auto` is the
    compiled engine on a GPU where it loads the format, else the format's natural runtime. None when a named
    runtime does not load the format (that pair is not measured). `natural` is the format's own runtime."""
    if name == "natural":
        return natural(fmt)
    if name == "auto":
        if device == "cuda":
            for spec in all_runtimes().values():
                if fmt in spec.gpu_auto_for and "cuda" in spec.capabilities.devices:
                    return spec
        return natural(fmt)
    spec = get_runtime(name)
    return spec if fmt in spec.formats else None


def pick_device(wanted: str = "auto") -> str:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise QuantpipeError("bench.device: 'cuda' was asked for but no CUDA device is visible; use 'auto' or 'cpu'")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def preload(artifact_dir: Path, runtime: str = "auto", device: str = "cpu") -> None:
    """Import the libraries a runtime will need to load the artifact (best effort: errors surface in load)."""
    try:
        meta = artifact.read(artifact_dir)
        spec = resolve(runtime, meta.format, device)
        if spec is not None and spec.preload is not None:
            spec.preload(Path(artifact_dir), meta)
    except Exception:  # noqa: BLE001 - load() reports a broken artifact properly
        pass


class Unavailable(QuantpipeError):
    """The runtime does not serve this artifact (its format or layout): the row says why; the run goes on."""


def load(artifact_dir: Path, device: str = "auto", runtime: str = "auto") -> BaseRuntime:
    """Load an artifact in a runtime (`auto`: see resolve); every failure is a one-line QuantpipeError. A runtime
    that does not serve the artifact raises Unavailable; `auto` then falls back to the natural runtime (the
    loaded runtime's `fallback_note` says why)."""
    meta = artifact.read(artifact_dir)
    device = pick_device(device)
    spec = resolve(runtime, meta.format, device)
    if spec is None:
        raise Unavailable(f"runtime '{runtime}' does not load format {meta.format}")
    try:
        return _load(spec, Path(artifact_dir), device, meta)
    except Unavailable as e:
        if runtime != "auto" or spec.name == natural(meta.format).name:
            raise
        rt = _load(natural(meta.format), Path(artifact_dir), device, meta)
        rt.fallback_note = f"runtime '{spec.name}' does not serve it ({e}); ran in '{rt.name}'"
        return rt


def _load(spec: RuntimeSpec, artifact_dir: Path, device: str, meta: ArtifactMeta) -> BaseRuntime:
    spec.requirements.require(f"runtime '{spec.name}'")
    try:
        return spec.load(artifact_dir, device, meta)
    except QuantpipeError:
        raise
    except Exception as e:  # a corrupt or foreign artifact: say which and why, in one line
        raise QuantpipeError(f"{artifact_dir}: could not load with runtime '{spec.name}': {first_line(e)}") from None


def capabilities(runtime: BaseRuntime) -> Capabilities:
    spec = _REGISTRY.get(runtime.name)
    return spec.capabilities if spec is not None else Capabilities()


def logits_batch(runtime: BaseRuntime, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Next-token logits of several sequences: one call where the runtime scores batches, else one each."""
    if len(seqs) > 1 and capabilities(runtime).batched_scoring:
        return runtime.logits_batch(seqs)
    return [runtime.logits(s) for s in seqs]


def describe(spec: RuntimeSpec) -> dict[str, Any]:
    """A runtime's declaration as plain data (for `quantpipe runtimes`)."""
    return {"name": spec.name, "summary": spec.summary, "formats": sorted(spec.formats),
            "natural_for": sorted(spec.natural_for), "gpu_auto_for": sorted(spec.gpu_auto_for),
            "capabilities": spec.capabilities.model_dump(), "missing": spec.requirements.missing(),
            "install": spec.requirements.hint() if spec.requirements.missing() else None}
