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

from quantpipe.methods import DTYPE_BYTES as _BYTES
from quantpipe.methods import (
    GroupSize,
    Method,
    MethodParams,
    QuantizeJob,
    Storage,
    _gptqmodel,
    _llmcompressor,
    check_group_size,
    register,
)


class GPTQParams(MethodParams):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: GroupSize = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = Field(0.01, gt=0, lt=1)
    format: Literal["compressed-tensors", "gptq"] = "compressed-tensors"

    @model_validator(mode="after")
    def _fits(self) -> GPTQParams:
        if self.format == "compressed-tensors" and self.desc_act:
            raise ValueError("desc_act: true (g_idx) needs `format: gptq`; llm-compressor 0.14 dropped it, and "
                             "already quantizes in activation order without g_idx")
        if self.format == "compressed-tensors" and self.bits not in (4, 8):
            raise ValueError(f"bits: {self.bits}-bit GPTQ needs `format: gptq` (compressed-tensors W*A16 "
                             "schemes that vLLM runs are 4 and 8 bits)")
        return self


def quantize(job: QuantizeJob) -> dict[str, Any]:
    p: GPTQParams = job.params
    if p.format == "gptq":
        meta = _gptqmodel.quantize(job, "gptq", bits=p.bits, group_size=p.group_size, desc_act=p.desc_act,
                                   sym=p.sym, damp_percent=p.damp_percent)
    else:
        from llmcompressor.modifiers.quantization import GPTQModifier

        weights = _llmcompressor.weight_args(p.bits, p.group_size, p.sym)
        modifier = GPTQModifier(config_groups=_llmcompressor.config_groups(weights), ignore=["lm_head"],
                                dampening_frac=p.damp_percent, actorder="static")
        meta = _llmcompressor.oneshot(job, [modifier])
    return {**meta, "bits": p.bits, "group_size": p.group_size}


def storage(p: GPTQParams, dtype: str) -> Storage:
    if p.format == "gptq":
        return Storage(float_bytes=_BYTES[dtype], linear=_gptqmodel.gptq_bytes(p.bits, p.group_size),
                       cpu_note=_gptqmodel.CPU_NOTE,
                       quantize_upper_bound=_gptqmodel.OFFLOAD_NOTE)
    return Storage(float_bytes=_BYTES[dtype], decompressed_on_cpu=True,
                   linear=_llmcompressor.packed_bytes(p.bits, p.group_size, not p.sym, _BYTES[dtype]))


def calibration_memory(p: GPTQParams, shapes: Any, n_samples: int, seq_len: int, a: int) -> dict[str, int]:
    from quantpipe.plan import gptq_calibration

    return gptq_calibration(shapes, n_samples, seq_len, a)


register(Method(
    name="gptq",
    summary="GPTQ int4/int8 weights (llm-compressor -> compressed-tensors, or GPTQModel -> gptq format)",
    params=GPTQParams,
    quantize=quantize,
    runtime="hf",
    requires=_llmcompressor.IMPORTS,
    extra=_llmcompressor.EXTRA,
    uses_calibration=True,
    libraries=_llmcompressor.DISTS,
    backend=lambda p: _gptqmodel.DEPS if p.format == "gptq" else _llmcompressor.DEPS,
    check_model=lambda p, config: check_group_size(p.group_size, config),
    storage=storage,
    calibration_memory=calibration_memory,
))
