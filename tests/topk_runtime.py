"""A runtime added from one file, outside quantpipe: transformers underneath, but answering like a server's OpenAI
API does, with the top-k log-probs of each position and the scored token's own, never full logits. Importing this
module registers it; the tests run recipes through it (test_runtime_axis.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from quantpipe.artifact import TRANSFORMERS_FORMATS, ArtifactMeta
from quantpipe.deps import Requirements
from quantpipe.runtimes import BaseRuntime, Capabilities, RuntimeSpec, TopK, register
from quantpipe.runtimes.hf import HFRuntime

MAX_K = 20


class TopKRuntime(BaseRuntime):
    name = "topk-hf"
    engine = "transformers behind a top-k API"

    def __init__(self, artifact_dir: Path, device: str, meta: ArtifactMeta) -> None:
        self.inner = HFRuntime(artifact_dir, device)
        self.device = self.inner.device

    def topk(self, ids: list[int], k: int) -> TopK:
        if k > MAX_K:
            raise ValueError(f"this API returns at most {MAX_K} log-probs per position")
        return TopK.from_logits(self.inner.logits(ids), ids, k)

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return self.inner.generate(ids, new_tokens)

    def kernel(self) -> str:
        return "top-k API over " + self.inner.kernel()

    def close(self) -> None:
        self.inner.close()


register(RuntimeSpec(
    name="topk-hf",
    summary="transformers, answering with top-k log-probs only (a test double of a server's API)",
    formats=frozenset(TRANSFORMERS_FORMATS),
    load=TopKRuntime,
    capabilities=Capabilities(scores="topk", max_topk=MAX_K, memory="in-process", names_kernels=True),
    requirements=Requirements(("transformers",)),
))
