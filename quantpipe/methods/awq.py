"""`awq`: activation-aware weight quantization (int4 weights, float activations), calibrated on the run's set.

`format: compressed-tensors` (default) runs llm-compressor's AWQModifier and writes vLLM's native format;
`format: awq` runs GPTQModel and writes the classic AutoAWQ GEMM checkpoint (`quant_method: awq`).
`zero_point: true` is asymmetric quantization (AutoAWQ's default). `n_grid` is the number of scale ratios the
llm-compressor backend tries per mapping (its default 20; the search is most of AWQ's time, so 10 halves it).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from quantpipe.memory import DTYPE_BYTES, Shapes, Storage, awq_calibration
from quantpipe.methods import (
    BackendMethod,
    GroupSize,
    MethodParams,
    QuantizeJob,
    _gptqmodel,
    _llmcompressor,
    register,
)


class AWQParams(MethodParams):
    bits: Literal[4, 8] = 4
    group_size: GroupSize = 128
    zero_point: bool = True
    duo_scaling: bool = True
    n_grid: int = Field(20, ge=2, le=100)
    format: Literal["compressed-tensors", "awq"] = "compressed-tensors"
    quantize_lm_head: bool = False  # lm_head too (round-to-nearest: AWQ's smoothing has no mapping into it)

    @model_validator(mode="after")
    def _fits(self) -> AWQParams:
        if self.format == "awq" and self.quantize_lm_head:
            raise ValueError("quantize_lm_head: only the llm-compressor backend (`format: compressed-tensors`) "
                             "has it")
        if self.format == "awq" and self.n_grid != 20:
            raise ValueError("n_grid: only the llm-compressor backend (`format: compressed-tensors`) has it")
        if self.format == "awq" and not self.duo_scaling:
            raise ValueError("duo_scaling: only the llm-compressor backend (`format: compressed-tensors`) has it")
        if self.format == "awq" and (self.bits != 4 or self.group_size == -1):
            raise ValueError("format: the AWQ GEMM format stores 4-bit grouped weights only; use bits: 4 and a "
                             "group_size, or `format: compressed-tensors`")
        return self


class LLMCompressorAWQ:
    """`format: compressed-tensors`: llm-compressor's AWQModifier -> compressed-tensors `pack-quantized`."""

    requirements = _llmcompressor.REQUIREMENTS

    def quantize(self, job: QuantizeJob, p: AWQParams) -> dict[str, Any]:
        from llmcompressor.modifiers.awq import AWQModifier

        weights = _llmcompressor.weight_args(p.bits, p.group_size, symmetric=not p.zero_point)
        modifier = AWQModifier(config_groups=_llmcompressor.config_groups(weights),
                               ignore=_llmcompressor.ignore(p.quantize_lm_head),
                               duo_scaling=p.duo_scaling, n_grid=p.n_grid)
        return _llmcompressor.oneshot(job, [modifier])

    def storage(self, p: AWQParams, dtype: str) -> Storage:
        return _llmcompressor.packed_storage(p.bits, p.group_size, p.zero_point, DTYPE_BYTES[dtype],
                                             p.quantize_lm_head)


class GPTQModelAWQ:
    """`format: awq`: GPTQModel -> the AutoAWQ GEMM checkpoint (`quant_method: awq`), float16 throughout."""

    requirements = _gptqmodel.REQUIREMENTS

    def quantize(self, job: QuantizeJob, p: AWQParams) -> dict[str, Any]:
        return _gptqmodel.quantize(job, "awq", bits=p.bits, group_size=p.group_size, sym=not p.zero_point)

    def storage(self, p: AWQParams, dtype: str) -> Storage:  # float16 whatever the recipe dtype
        return Storage(float_bytes=2, linear=_gptqmodel.awq_bytes(p.bits, p.group_size),
                       cpu_note=_gptqmodel.CPU_NOTE, quantize_upper_bound=_gptqmodel.OFFLOAD_NOTE)


# `format` picks the backend library once (BackendMethod); everything backend-specific goes through it
BACKENDS = {"compressed-tensors": LLMCompressorAWQ(), "awq": GPTQModelAWQ()}


class AWQ(BackendMethod):
    name = "awq"
    summary = "AWQ int4 weights (llm-compressor -> compressed-tensors, or GPTQModel -> AutoAWQ GEMM format)"
    Params = AWQParams
    backends = BACKENDS

    def calibration_memory(self, p: AWQParams, shapes: Shapes, n_samples: int, seq_len: int, a: int
                           ) -> dict[str, int]:
        head = _llmcompressor.head_calibration(shapes, n_samples, seq_len, a) if p.quantize_lm_head else {}
        return awq_calibration(shapes, n_samples, seq_len, a) | head


register(AWQ())
