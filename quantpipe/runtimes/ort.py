"""The ONNX Runtime runtime: an ONNX decoder with past key values (the `onnx` method's artifact) through a plain
`onnxruntime.InferenceSession`.

Scoring runs the window's ids in one pass with an empty past, so the logits are those of the same ids (and the
same window) every other runtime scores; dynamic INT8 quantizes activations per call, so this matters. Generation
runs the B prompts in one prefill, then one token per step with the present key/values fed back as the past
(no recomputation). Inputs are found by name: optimum's layout (`input_ids`, `attention_mask`, optional
`position_ids`, `past_key_values.N.key/value`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantpipe import artifact
from quantpipe.artifact import ArtifactMeta
from quantpipe.backends.onnx import past_inputs
from quantpipe.deps import Requirements
from quantpipe.errors import QuantpipeError
from quantpipe.runtimes import BaseRuntime, Capabilities, RuntimeSpec, register


class ORTRuntime(BaseRuntime):
    name = "onnxruntime"
    engine = "onnxruntime runtime"

    def __init__(self, artifact_dir: Path, device: str, meta: ArtifactMeta | None = None) -> None:
        import onnxruntime as ort

        meta = meta or artifact.read(artifact_dir)
        self.path = Path(artifact_dir) / (meta.file or "model.onnx")
        if not self.path.is_file():
            raise QuantpipeError(f"{artifact_dir}: the ONNX file named in quantpipe.json ({self.path.name}) is missing")
        self.threads = torch.get_num_threads()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        available = ort.get_available_providers()
        providers = ["CUDAExecutionProvider"] if device == "cuda" and "CUDAExecutionProvider" in available else []
        self.session = ort.InferenceSession(str(self.path), so, providers=[*providers, "CPUExecutionProvider"])
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        inputs = {i.name: i for i in self.session.get_inputs()}
        for need in ("input_ids", "attention_mask"):
            if need not in inputs:
                raise QuantpipeError(f"{self.path}: not a decoder ONNX model (no '{need}' input)")
        self.positions = "position_ids" in inputs
        self.past = past_inputs([(n, i.shape, i.type) for n, i in inputs.items()], Path(artifact_dir))
        self.outputs = [o.name for o in self.session.get_outputs()]
        if "logits" not in self.outputs:
            raise QuantpipeError(f"{self.path}: not a decoder ONNX model (no 'logits' output)")
        self.vocab = self.session.get_outputs()[self.outputs.index("logits")].shape[-1]
        self.ops = (meta.extra("io") or {}).get("ops", {})

    def _run(self, ids: np.ndarray, past: dict[str, np.ndarray], total: int
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        b, s = ids.shape
        feed: dict[str, Any] = {"input_ids": ids, "attention_mask": np.ones((b, total), dtype=np.int64)}
        if self.positions:
            feed["position_ids"] = np.broadcast_to(np.arange(total - s, total, dtype=np.int64), (b, s)).copy()
        feed.update(past)
        out = dict(zip(self.outputs, self.session.run(None, feed), strict=True))
        present = {n.replace("present.", "past_key_values.", 1): x for n, x in out.items() if n.startswith("present.")}
        return out["logits"], present

    def _empty(self, b: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((b, h, 0, d), dtype=t) for n, (h, d, t) in self.past.items()}

    def logits(self, ids: list[int]) -> torch.Tensor:
        if isinstance(self.vocab, int) and max(ids) >= self.vocab:
            raise QuantpipeError(f"token id {max(ids)} is outside the ONNX model's vocabulary ({self.vocab})")
        x = np.asarray([ids], dtype=np.int64)
        out, _ = self._run(x, self._empty(1), len(ids))
        return torch.from_numpy(np.ascontiguousarray(out[0], dtype=np.float32))

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        b, t = ids.shape
        logits, past = self._run(ids.numpy().astype(np.int64), self._empty(b), t)
        nxt = logits[:, -1].argmax(-1)
        out = [nxt]
        for k in range(1, new_tokens):
            logits, past = self._run(nxt[:, None].astype(np.int64), past, t + k)
            nxt = logits[:, -1].argmax(-1)
            out.append(nxt)
        return torch.from_numpy(np.stack(out, axis=1).astype(np.int64))

    def kernel(self) -> str:
        import onnxruntime as ort

        keys = ("MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "MatMul",
                "com.microsoft.GroupQueryAttention", "com.microsoft.MatMulNBits")
        ops = ", ".join(f"{k} x{self.ops[k]}" for k in keys if self.ops.get(k))
        return f"onnxruntime {ort.__version__} {self.provider} ({self.threads} threads): {ops}"

    def close(self) -> None:
        self.session = None



def preload(artifact_dir: Path, meta: ArtifactMeta | None = None) -> None:
    import onnxruntime  # noqa: F401


register(RuntimeSpec(
    name="onnxruntime",
    summary="ONNX Runtime InferenceSession (ONNX decoders with past key values)",
    formats=frozenset({"onnx"}),
    natural_for=frozenset({"onnx"}),
    load=ORTRuntime,
    capabilities=Capabilities(scores="full", devices=("cpu", "cuda")),
    requirements=Requirements(("onnxruntime",), "onnx"),
    preload=preload,
))
