"""The `compiled` runtime: a transformers artifact with its quantized Linears on low-bit kernels (kernels.py,
marlin.py: never dequantized for decode), a static KV cache, and the one-token decode step compiled with CUDA
graphs (torch.compile mode "reduce-overhead") on a GPU; a prompt shape seen before is replayed from a CUDA graph
of the eager prompt pass (`PromptGraphs`). The Llama family (llama, mistral, qwen2) runs on the
decoder written out here (decoder.py: fused q/k/v and gate/up, its own cache); other model types on
transformers' modeling code with transformers' StaticCache. On a CPU the same model runs uncompiled. `auto` picks
it on a GPU for the formats it loads; formats or layouts without a kernel (AWQ GEMM, GPTQ act-order) raise
`Unsupported` when loaded, and `auto` then falls back to the format's natural runtime.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quantpipe import memory
from quantpipe.artifact import ArtifactMeta
from quantpipe.deps import Requirements
from quantpipe.errors import QuantpipeError
from quantpipe.runtimes import BaseRuntime, Capabilities, RuntimeSpec, Unavailable, decoder, register
from quantpipe.runtimes.hf import preload as hf_preload
from quantpipe.runtimes.kernels import Unsupported, load_model

# the formats it has kernels for (AWQ's GEMM layout has none: tinygemm's packing differs)
FORMATS = frozenset({"safetensors", "compressed-tensors", "gptq", "torchao"})

# The greedy pick over the vocabulary in two stages: the maximum of each of this many slices, then of those. One
# row's argmax is one Triton program in Inductor (33.7 us over Qwen2's 152,064 logits at batch 1 on the H200,
# ~1.3 % of a W4 step); the slices' maxima run in parallel.
ARGMAX_SLICES = 128


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B, 1]: the index of each row's maximum, the first one where several are equal (what
    `argmax` returns), computed as the maxima of ARGMAX_SLICES slices and the first slice holding the largest."""
    b, v = logits.shape
    if v < ARGMAX_SLICES * 64:
        return logits.argmax(-1, keepdim=True)
    width = -(-v // ARGMAX_SLICES)
    x = F.pad(logits, (0, width * ARGMAX_SLICES - v), value=float("-inf")).view(b, ARGMAX_SLICES, width)
    best, where = x.max(-1)  # [B, slices]: each slice's maximum and its first position
    first = best.argmax(-1, keepdim=True)
    return first * width + where.gather(-1, first)


# Graphs one process may compile of the decode step: every runtime compiles the same `_decode_one` code, one
# graph per (runtime, batch size, cache length), and dynamo's default of 8 per code object ends a process that
# benchmarks or tests several artifacts (with fullgraph=True, as an error: seen in tests/test_gpu.py on the H200).
RECOMPILE_LIMIT = 256


def set_inductor_flags() -> None:
    """Cache compiled graphs on disk (the GPTQ and AWQ rows of one shape share theirs); let one process compile
    RECOMPILE_LIMIT graphs of the step. gpt-fast's coordinate-descent tuning of kernel tilings is on only with
    QUANTPIPE_TUNE=1: it multiplies compile time (with it Inductor also writes one-row matmuls as its own
    reductions, fused with the norm before them: docs/benchmarks.md)."""
    import torch._dynamo.config as dc
    import torch._inductor.config as ic

    dc.recompile_limit = max(dc.recompile_limit, RECOMPILE_LIMIT)
    dc.accumulated_recompile_limit = max(dc.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)

    ic.fx_graph_cache = True
    ic.triton.unique_kernel_names = True
    ic.coordinate_descent_tuning = os.environ.get("QUANTPIPE_TUNE") == "1"


# Prompt shapes one runtime keeps captured (least recently used dropped first; they share one memory pool).
PROMPT_GRAPHS = 8
SEEN_SHAPES = 4096  # prompt shapes remembered as seen once (forgotten all at once beyond this)


def prompt_graphs() -> bool:
    """Whether a prompt shape seen before is replayed from a CUDA graph (QUANTPIPE_PROMPT_GRAPH, default 1)."""
    raw = os.environ.get("QUANTPIPE_PROMPT_GRAPH", "1")
    if raw not in ("0", "1"):
        raise QuantpipeError(f"QUANTPIPE_PROMPT_GRAPH={raw}: 1 (replay prompts of a shape seen before from a "
                             "CUDA graph, the default) or 0 (every prompt eager)")
    return raw == "1"


Replay = Callable[[torch.Tensor], torch.Tensor]


class PromptGraphs:
    """Which prompt passes run eagerly and which replay a captured graph. An eager prompt pass launches each
    kernel from Python: on the H200 the 7B's 512-token pass took 22 ms of host time for 15 ms of kernels (fifth
    session), so the time to first token measured the host, not the GPU. A shape's first prompt runs eagerly
    (it builds the Triton and cuBLAS kernels, which must not happen inside a capture, and a one-off prompt length
    never pays a capture); its second is captured (`capture`: ids, cache -> a replay function) and replayed from
    then on. `eager` and the replay both return the prompt's greedy token [B, 1]. A capture that fails is
    reported once, and from then on shapes not yet captured stay eager (those captured still replay)."""

    def __init__(self, eager: Callable[[torch.Tensor, Any], torch.Tensor],
                 capture: Callable[[torch.Tensor, Any], Replay], keep: int = PROMPT_GRAPHS) -> None:
        self.eager, self.capture, self.keep = eager, capture, keep
        self.graphs: OrderedDict[tuple[Any, ...], Replay] = OrderedDict()
        self.seen: set[tuple[Any, ...]] = set()
        self.captures = 0
        self.failed: str | None = None

    def __call__(self, key: tuple[Any, ...], ids: torch.Tensor, cache: Any) -> torch.Tensor:
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return self.graphs[key](ids)
        if self.failed is not None or key not in self.seen:
            if len(self.seen) >= SEEN_SHAPES:
                self.seen.clear()
            self.seen.add(key)
            return self.eager(ids, cache)
        try:
            replay = self.capture(ids, cache)
        except Exception as e:  # noqa: BLE001 - the eager pass still gives the answer
            self.failed = f"{type(e).__name__}: {e}"[:300]
            import warnings

            warnings.warn(f"prompt CUDA graph not captured, prompts stay eager: {self.failed}", stacklevel=2)
            return self.eager(ids, cache)
        self.captures += 1
        self.graphs[key] = replay
        while len(self.graphs) > self.keep:
            self.graphs.popitem(last=False)
        return replay(ids)

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()


class CompiledRuntime(BaseRuntime):
    """The runtime contract over `load_model`: eager `logits`; `generate` with a static KV cache per (batch,
    length) and, on CUDA, the decode step compiled with CUDA graphs."""

    name = "compiled"

    def __init__(self, artifact_dir: Path, device: str, compile: bool | None = None,
                 own_decoder: bool | None = None) -> None:
        self.device = device
        self.own = False
        if own_decoder is None:  # QUANTPIPE_DECODER=0: transformers' modeling code, for comparisons
            own_decoder = os.environ.get("QUANTPIPE_DECODER") != "0"
        why = "turned off" if not own_decoder else None
        if own_decoder:
            try:
                self.model, self.kernels = decoder.load(artifact_dir, device)
                self.own = True
            except decoder.NotSupported as e:
                why = str(e)
        if not self.own:
            self.model, self.kernels = load_model(artifact_dir, device)
        self.compiled = device == "cuda" if compile is None else compile
        forward = ("quantpipe decoder (fused q/k/v and gate/up)" if self.own
                   else f"transformers modeling (no quantpipe decoder: {why})")
        self.engine = forward + (", torch.compile reduce-overhead (CUDA graphs)" if self.compiled else ", eager") + \
            ", static KV cache"
        self._caches: dict[tuple[int, int], Any] = {}
        self._step = self._decode_one
        if self.compiled:
            set_inductor_flags()
            self._step = torch.compile(self._decode_one, mode="reduce-overhead", fullgraph=True, dynamic=False)
        # the transformers path is left eager: its masks and cache bookkeeping are not checked for capture
        self.prompts: PromptGraphs | None = None
        if self.compiled and self.own and device == "cuda" and prompt_graphs():
            self.prompts = PromptGraphs(self._prompt_eager, self._capture_prompt)
            self.engine += ", prompts of a shape seen before replayed from a CUDA graph"
        self._pool: Any = None

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: Any, keep: int | None) -> torch.Tensor:
        if self.own:
            return self.model(ids, pos, cache, keep=keep)
        return self.model(input_ids=ids, cache_position=pos, past_key_values=cache, use_cache=cache is not None,
                          logits_to_keep=keep or 0).logits

    def _decode_one(self, tok: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        return greedy(self._forward(tok, pos, cache, 1)[:, -1])

    def _prompt_eager(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """The prompt pass: keys and values written into `cache`, the greedy next token [B, 1]."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        return greedy(self._forward(ids, pos, cache, 1)[:, -1])  # the last position's logits only

    def _capture_prompt(self, ids: torch.Tensor, cache: Any) -> Replay:
        """A CUDA graph of `_prompt_eager` over these shapes and this cache (its memory in one pool shared by
        this runtime's prompt graphs, which never run at the same time), and the function replaying it."""
        static = ids.clone()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._prompt_eager(static, cache)

        def replay(x: torch.Tensor) -> torch.Tensor:
            static.copy_(x)
            graph.replay()
            return out.clone()  # the next replay writes `out` again

        return replay

    def _prompt(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        if self.prompts is None:
            return self._prompt_eager(ids, cache)
        b, t = ids.shape
        return self.prompts((b, t, id(cache)), ids, cache)  # a graph writes that cache's tensors (kept in _caches)

    def _cache(self, batch: int, length: int) -> Any:
        """The static cache of this (batch, length), reused across calls. The decoder's needs no reset: a prompt
        overwrites its positions and attention never reads past the step's own."""
        from transformers import StaticCache

        key = (batch, length)
        if key not in self._caches:
            self._caches[key] = (self.model.new_cache(batch, length) if self.own
                                 else StaticCache(config=self.model.config, max_cache_len=length))
        elif not self.own:
            self._caches[key].reset()
        return self._caches[key]

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self._forward(x, torch.arange(len(ids), device=self.device), None, None)[0].float().cpu()

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        x = ids.to(self.device)
        b, t = x.shape
        cache = self._cache(b, self.cache_length(t, new_tokens))
        tok = self._prompt(x, cache)
        out = [tok]
        positions = torch.arange(t, t + new_tokens, device=self.device)
        for i in range(new_tokens - 1):
            tok = self._step(tok, positions[i:i + 1], cache).clone()  # a CUDA graph's output is reused
            out.append(tok)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return torch.cat(out, 1).cpu()

    @staticmethod
    def cache_length(prompt_len: int, new_tokens: int) -> int:
        """Static cache length: rounded up to 64 for fewer distinct shapes (and compiled graphs) across calls."""
        return -(-(prompt_len + new_tokens) // 64) * 64

    def kernel(self) -> str:
        return self.kernels

    def decode_bytes(self) -> int:
        return memory.decode_bytes(self.model)

    def kv_bytes_per_position(self) -> int:
        return memory.kv_bytes_per_position(self.model.config, self.model.dtype)

    def close(self) -> None:
        if self.prompts is not None:
            self.prompts.clear()
        del self.model
        self._caches.clear()


def load(artifact_dir: Path, device: str, meta: ArtifactMeta) -> CompiledRuntime:
    try:
        return CompiledRuntime(artifact_dir, device)
    except Unsupported as e:
        raise Unavailable(f"no low-bit kernel here for this layout ({e})") from None


register(RuntimeSpec(
    name="compiled",
    summary="transformers checkpoints on torch's low-bit kernels, static KV cache, CUDA graphs on a GPU",
    formats=FORMATS,
    gpu_auto_for=FORMATS,
    load=load,
    capabilities=Capabilities(scores="full", decode_bytes=True, static_cache=True, devices=("cpu", "cuda")),
    requirements=Requirements(("transformers", "accelerate")),
    preload=hf_preload,
))
