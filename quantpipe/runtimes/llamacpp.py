"""The llama.cpp runtime: a .gguf artifact through llama-cpp-python's low-level bindings (llama.cpp's C API).

Scoring decodes the window's ids in one batch with an output for every position, so the logits are those of
the same ids every other runtime scores. Generation is greedy over B sequences at once (one llama.cpp
sequence id each, a KV cache of B x (prompt + new tokens)), as llama-server serves parallel requests.
The file is checked with the gguf library before llama.cpp sees it (a corrupt file is an error, not a crash).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantpipe import artifact
from quantpipe.artifact import ArtifactMeta
from quantpipe.backends import llamacpp_tools
from quantpipe.deps import Requirements
from quantpipe.errors import QuantpipeError
from quantpipe.runtimes import BaseRuntime, Capabilities, RuntimeSpec, register


class LlamaCppRuntime(BaseRuntime):
    name = "llama.cpp"
    engine = "llama.cpp runtime"

    def __init__(self, artifact_dir: Path, device: str, meta: ArtifactMeta | None = None) -> None:
        meta = meta or artifact.read(artifact_dir)
        self.path = Path(artifact_dir) / (meta.file or "")
        if not meta.file or not self.path.is_file():
            raise QuantpipeError(f"{artifact_dir}: the GGUF file named in quantpipe.json ({meta.file}) "
                                 "is missing")
        self.info = llamacpp_tools.check_gguf(self.path)
        self.lib = lib = llamacpp_tools.bindings()
        gpu = device == "cuda" and bool(lib.llama_supports_gpu_offload())
        self.device = "cuda" if gpu else "cpu"
        self.threads = torch.get_num_threads()
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 999 if gpu else 0
        self.extra_bufts, self.extra_bufts_why = llamacpp_tools.use_extra_bufts()
        mp.use_extra_bufts = self.extra_bufts
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            raise QuantpipeError(f"{self.path}: llama.cpp could not load it: {llamacpp_tools.last_error()}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.ctx = None
        self.ctx_shape = (0, 0)  # (tokens per sequence, sequences) of the current context

    def _context(self, tokens: int, seqs: int) -> Any:
        """A context with room for `seqs` sequences of `tokens` each, batches of up to tokens x seqs ids."""
        if self.ctx is not None and self.ctx_shape[0] >= tokens and self.ctx_shape[1] >= seqs:
            self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
            return self.ctx
        self._free_context()
        tokens = max(tokens, self.ctx_shape[0])
        seqs = max(seqs, self.ctx_shape[1])
        cp = self.lib.llama_context_default_params()
        cp.n_ctx = cp.n_batch = tokens * seqs
        cp.n_ubatch = min(512, tokens * seqs)
        cp.n_seq_max = seqs
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.no_perf = True
        self.ctx = self.lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise QuantpipeError(f"{self.path}: llama.cpp could not make a context of {tokens} x {seqs} tokens: "
                                 f"{llamacpp_tools.last_error()}")
        self.ctx_shape = (tokens, seqs)
        return self.ctx

    def _decode(self, ctx: Any, tokens: list[int], pos: list[int], seq: list[int], want: list[bool]) -> None:
        lib = self.lib
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, (t, p, s, w) in enumerate(zip(tokens, pos, seq, want, strict=True)):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, p, 1
                batch.seq_id[i][0] = s
                batch.logits[i] = w
            rc = lib.llama_decode(ctx, batch)
        finally:
            lib.llama_batch_free(batch)
        if rc != 0:
            raise QuantpipeError(f"{self.path}: llama_decode failed (code {rc}): {llamacpp_tools.last_error()}")

    def _row(self, ctx: Any, i: int) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(ctx, i)
        if not ptr:
            raise QuantpipeError(f"{self.path}: llama.cpp returned no logits for output {i}")
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))

    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.logits_batch([list(ids)])[0]

    def logits_batch(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """The sequences in one llama_decode, a sequence id each, an output for every position."""
        top = max(max(s) for s in seqs)
        if top >= self.n_vocab:
            raise QuantpipeError(f"token id {top} is outside the GGUF's vocabulary ({self.n_vocab})")
        ctx = self._context(max(len(s) for s in seqs), len(seqs))
        toks = [t for s in seqs for t in s]
        self._decode(ctx, toks, [p for s in seqs for p in range(len(s))],
                     [i for i, s in enumerate(seqs) for _ in s], [True] * len(toks))
        ptr = self.lib.llama_get_logits(ctx)
        rows = torch.from_numpy(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                      shape=(len(toks), self.n_vocab)).copy())
        return list(torch.split(rows, [len(s) for s in seqs]))

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        b, t = ids.shape
        ctx = self._context(t + new_tokens, b)
        prompt = ids.tolist()
        self._decode(ctx, [x for row in prompt for x in row], [p for _ in range(b) for p in range(t)],
                     [s for s in range(b) for _ in range(t)], [p == t - 1 for _ in range(b) for p in range(t)])
        out = [[int(self._row(ctx, s * t + t - 1).argmax())] for s in range(b)]
        for k in range(1, new_tokens):
            self._decode(ctx, [row[-1] for row in out], [t + k - 1] * b, list(range(b)), [True] * b)
            for s in range(b):
                out[s].append(int(self._row(ctx, s).argmax()))
        return torch.tensor(out, dtype=torch.long)

    def kernel(self) -> str:
        types = ", ".join(f"{k} x{v}" for k, v in self.info["tensor_types"].items())
        # REPACK needs the extra buffer types
        feats = " ".join(f for f in llamacpp_tools.cpu_features() if f != "REPACK" or self.extra_bufts)
        return f"llama.cpp {self.device.upper()} ({feats}; extra buffer types {self.extra_bufts_why}): {types}"

    def _free_context(self) -> None:
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def close(self) -> None:
        self._free_context()
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None



def preload(artifact_dir: Path, meta: ArtifactMeta | None = None) -> None:
    llamacpp_tools.bindings()


register(RuntimeSpec(
    name="llama.cpp",
    summary="llama.cpp through llama-cpp-python's C API (GGUF files)",
    formats=frozenset({"gguf"}),
    natural_for=frozenset({"gguf"}),
    load=LlamaCppRuntime,
    capabilities=Capabilities(scores="full", batched_scoring=True, devices=("cpu", "cuda")),
    requirements=Requirements(("llama_cpp", "gguf"), "gguf", loads=("llama_cpp",)),
    preload=preload,
))
