"""`gptq`: GPTQ weight quantization (int4/int8 weights, float activations), calibrated on the run's calibration set.

`format: compressed-tensors` (default) runs llm-compressor's GPTQModifier and writes vLLM's native format;
`format: gptq` runs GPTQModel and writes the classic `quant_method: gptq` checkpoint.
Column order: llm-compressor 0.14 always quantizes columns in activation order without changing the layout
(its `static` actorder), close to GPTQModel's default for `desc_act: false` (group-aware reordering, no g_idx).
`desc_act: true` (groups in activation order, stored as g_idx) exists only in `format: gptq`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from quantpipe.memory import DTYPE_BYTES, Shapes, Storage, gptq_calibration, natural_zero_points_bytes, tinygemm_bytes
from quantpipe.methods import (
    BackendMethod,
    GroupSize,
    MethodParams,
    QuantizeJob,
    _gptqmodel,
    _llmcompressor,
    register,
)


class GPTQParams(MethodParams):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: GroupSize = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = Field(0.01, gt=0, lt=1)
    format: Literal["compressed-tensors", "gptq"] = "compressed-tensors"
    quantize_lm_head: bool = False  # lm_head too (vocab x hidden: the largest Linear; the embedding stays float)

    @model_validator(mode="after")
    def _fits(self) -> GPTQParams:
        if self.format == "gptq" and self.quantize_lm_head:
            raise ValueError("quantize_lm_head: only the llm-compressor backend (`format: compressed-tensors`) "
                             "has it")
        if self.format == "compressed-tensors" and self.desc_act:
            raise ValueError("desc_act: true (g_idx) needs `format: gptq`; llm-compressor 0.14 dropped it, and "
                             "already quantizes in activation order without g_idx")
        if self.format == "compressed-tensors" and self.bits not in (4, 8):
            raise ValueError(f"bits: {self.bits}-bit GPTQ needs `format: gptq` (compressed-tensors W*A16 "
                             "schemes that vLLM runs are 4 and 8 bits)")
        return self


class LLMCompressorGPTQ:
    """`format: compressed-tensors`: llm-compressor's GPTQModifier -> compressed-tensors `pack-quantized`."""

    requirements = _llmcompressor.REQUIREMENTS

    def quantize(self, job: QuantizeJob, p: GPTQParams) -> dict[str, Any]:
        from llmcompressor.modifiers.quantization import GPTQModifier

        weights = _llmcompressor.weight_args(p.bits, p.group_size, p.sym)
        modifier = GPTQModifier(config_groups=_llmcompressor.config_groups(weights),
                                ignore=_llmcompressor.ignore(p.quantize_lm_head),
                                dampening_frac=p.damp_percent, actorder="static")
        return _llmcompressor.oneshot(job, [modifier])

    def storage(self, p: GPTQParams, dtype: str) -> Storage:
        return _llmcompressor.packed_storage(p.bits, p.group_size, not p.sym, DTYPE_BYTES[dtype],
                                             p.quantize_lm_head)


class GPTQModelGPTQ:
    """`format: gptq`: GPTQModel -> the classic `quant_method: gptq` checkpoint."""

    requirements = _gptqmodel.REQUIREMENTS

    def quantize(self, job: QuantizeJob, p: GPTQParams) -> dict[str, Any]:
        return _gptqmodel.quantize(job, "gptq", bits=p.bits, group_size=p.group_size, desc_act=p.desc_act,
                                   sym=p.sym, damp_percent=p.damp_percent)

    def storage(self, p: GPTQParams, dtype: str) -> Storage:
        return Storage(float_bytes=DTYPE_BYTES[dtype], linear=_gptqmodel.gptq_bytes(p.bits, p.group_size),
                       cpu_note=_gptqmodel.CPU_NOTE, quantize_upper_bound=_gptqmodel.OFFLOAD_NOTE,
                       one_row_copy=tinygemm_bytes(p.group_size) if p.bits == 4 and not p.desc_act else None,
                       natural_zero_points=natural_zero_points_bytes(p.group_size) if p.bits == 4 and not p.sym
                       else None)


# `format` picks the backend library once (BackendMethod); everything backend-specific goes through it
BACKENDS = {"compressed-tensors": LLMCompressorGPTQ(), "gptq": GPTQModelGPTQ()}


class GPTQ(BackendMethod):
    name = "gptq"
    summary = "GPTQ int4/int8 weights (llm-compressor -> compressed-tensors, or GPTQModel -> gptq format)"
    Params = GPTQParams
    backends = BACKENDS

    def calibration_memory(self, p: GPTQParams, shapes: Shapes, n_samples: int, seq_len: int, a: int
                           ) -> dict[str, int]:
        head = _llmcompressor.head_calibration(shapes, n_samples, seq_len, a) if p.quantize_lm_head else {}
        return gptq_calibration(shapes, n_samples, seq_len, a) | head


register(GPTQ())
