"""`smoothquant`: SmoothQuant + W8A8 INT8 (int8 weights per channel, int8 activations per token, dynamic),
written by llm-compressor as compressed-tensors. SmoothQuant moves activation outliers into the weights
(`smoothing_strength`, 0 disables it); the weights are then quantized by GPTQ (or round-to-nearest).
The second INT8 flavour beside `int8` (torchao): this one is the format vLLM serves with int8 GEMMs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from quantpipe.deps import Requirements
from quantpipe.memory import DTYPE_BYTES, Shapes, Storage, gptq_calibration
from quantpipe.methods import Method, MethodParams, QuantizeJob, _llmcompressor, register


class SmoothQuantParams(MethodParams):
    smoothing_strength: float = Field(0.8, ge=0, lt=1)
    weights: Literal["gptq", "rtn"] = "gptq"
    damp_percent: float = Field(0.01, gt=0, lt=1)


class SmoothQuant(Method):
    name = "smoothquant"
    summary = "SmoothQuant + W8A8 INT8 weights and activations (llm-compressor -> compressed-tensors)"
    Params = SmoothQuantParams

    def requirements(self, p: SmoothQuantParams) -> Requirements:
        return _llmcompressor.REQUIREMENTS

    def format(self, p: SmoothQuantParams) -> str:
        return _llmcompressor.FORMAT

    def calibrates(self, p: SmoothQuantParams) -> bool:
        return True

    def storage(self, p: SmoothQuantParams, dtype: str) -> Storage:
        return Storage(float_bytes=DTYPE_BYTES[dtype], decompressed_on_cpu=True,
                       linear=_llmcompressor.int8_bytes(DTYPE_BYTES[dtype]))

    def calibration_memory(self, p: SmoothQuantParams, shapes: Shapes, n_samples: int, seq_len: int, a: int
                           ) -> dict[str, int]:
        """GPTQ's working set (the smoothing statistics are a few vectors per layer); RTN: the layer's inputs
        and outputs and one sample's forward."""
        need = gptq_calibration(shapes, n_samples, seq_len, a)
        return need if p.weights == "gptq" else {k: need[k] for k in ("layer inputs+outputs", "forward")}

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        from compressed_tensors.quantization import QuantizationArgs
        from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        p: SmoothQuantParams = job.params
        weights = _llmcompressor.weight_args(8, -1, symmetric=True)
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        groups = _llmcompressor.config_groups(weights, acts)
        modifiers: list[Any] = []
        if p.smoothing_strength:
            modifiers.append(SmoothQuantModifier(smoothing_strength=p.smoothing_strength))
        if p.weights == "gptq":
            modifiers.append(GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=p.damp_percent))
        else:
            modifiers.append(QuantizationModifier(config_groups=groups, ignore=["lm_head"]))
        return {**_llmcompressor.oneshot(job, modifiers), "bits": 8, "activations": "int8 per token, dynamic"}


register(SmoothQuant())
