"""The runtime contract and registry: load an artifact dir, then score token ids and generate greedily.

Eval and bench only talk to this contract, so perplexity, KL divergence and tokens/s mean the same thing for
every artifact format. Adding a runtime means adding one module here that calls `register(...)`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from quantpipe.errors import QuantpipeError

META_FILE = "quantpipe.json"


class Runtime(Protocol):
    """What eval and bench need from a loaded artifact."""

    name: str
    device: str

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Next-token logits for every position of one sequence: float32 tensor [len(ids), vocab] on CPU."""
        ...

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation of a batch [B, T] of equal-length prompts: exactly `new_tokens` ids each, [B, n].

        End-of-sequence tokens do not stop generation, so timings always cover `new_tokens` steps.
        """
        ...

    def close(self) -> None: ...


def logits_batch(runtime: Runtime, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Next-token logits of several sequences: the runtime's own `logits_batch` where it has one (one padded
    forward: about twice the throughput of single sequences on CPU), else one `logits` call each."""
    fn = getattr(runtime, "logits_batch", None)
    if fn is not None and len(seqs) > 1:
        return fn(seqs)
    return [runtime.logits(s) for s in seqs]


@dataclass(frozen=True)
class RuntimeInfo:
    name: str
    load: Callable[[Path, str], Runtime]
    requires: tuple[str, ...] = ()
    extra: str | None = None
    # Import what loading this artifact will import, without loading weights: bench takes its memory
    # baseline after this, so "memory the model takes" excludes the libraries' own code and data.
    preload: Callable[[Path], None] | None = None


_REGISTRY: dict[str, RuntimeInfo] = {}


def register(info: RuntimeInfo) -> RuntimeInfo:
    _REGISTRY[info.name] = info
    return info


def all_runtimes() -> dict[str, RuntimeInfo]:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    return dict(_REGISTRY)


def read_meta(artifact_dir: Path) -> dict:
    meta_path = Path(artifact_dir) / META_FILE
    if not meta_path.is_file():
        raise QuantpipeError(f"{artifact_dir}: not a quantpipe artifact (no {META_FILE})")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise QuantpipeError(f"{meta_path}: corrupt metadata ({e})") from None


def pick_device(wanted: str = "auto") -> str:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise QuantpipeError("bench.device: 'cuda' was asked for but no CUDA device is visible; use 'auto' or 'cpu'")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def preload(artifact_dir: Path) -> None:
    """Import the libraries the artifact's runtime will need to load it (best effort: errors surface in load)."""
    info = all_runtimes().get(read_meta(artifact_dir).get("runtime"))
    if info is not None and info.preload is not None:
        try:
            info.preload(Path(artifact_dir))
        except Exception:  # noqa: BLE001 - load() reports a broken artifact properly
            pass


def load(artifact_dir: Path, device: str = "auto") -> Runtime:
    """Load an artifact with the runtime its metadata names; every failure is a one-line QuantpipeError."""
    meta = read_meta(artifact_dir)
    runtimes = all_runtimes()
    name = meta.get("runtime")
    if name not in runtimes:
        raise QuantpipeError(f"{artifact_dir}: unknown runtime '{name}'; known: {', '.join(runtimes)}")
    info = runtimes[name]
    missing = [r for r in info.requires if importlib.util.find_spec(r) is None]
    if missing:
        hint = f"pip install 'quantpipe[{info.extra}]'" if info.extra else "pip install " + " ".join(missing)
        raise QuantpipeError(f"runtime '{name}' needs {', '.join(missing)}: {hint}")
    try:
        return info.load(Path(artifact_dir), pick_device(device))
    except QuantpipeError:
        raise
    except Exception as e:  # a corrupt or foreign artifact: say which and why, in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantpipeError(f"{artifact_dir}: could not load with runtime '{name}': {first}") from None
