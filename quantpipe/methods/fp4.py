"""`fp4`: 4-bit floating point (E2M1) weights, and activations unless `activations: false`, written by
llm-compressor as compressed-tensors: `nvfp4` (groups of 16 with an FP8 E4M3 scale each and a float32 global
scale per tensor: Blackwell's NVFP4) or `mxfp4` (the OCP microscaling format: groups of 32 with a power-of-two
E8M0 scale). NVFP4 activations use a global scale calibrated on the recipe's calibration set; MXFP4 activations
are scaled per group at run time (no calibration data). `kv_cache: fp8` as in `fp8`.

The checkpoint's float parts (embeddings, norms, lm_head) are bfloat16 when the recipe's dtype is float32:
compressed-tensors decompresses FP4 to bfloat16 (or float16), and a float32 FP4 checkpoint does not run in
transformers (float32 inputs against bfloat16 weights); FP4 deployments compute in bfloat16 anyway.
Quality is measured wherever the runtime runs (transformers on a CPU computes through compressed-tensors'
quantize-dequantize emulation); only Blackwell-class GPUs have FP4 tensor cores, so a speed measured elsewhere is
emulation, and the bench says so instead of reporting it as FP4 speed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from quantpipe.deps import Requirements
from quantpipe.memory import DTYPE_BYTES, Shapes, Storage
from quantpipe.methods import Method, MethodParams, QuantizeJob, _llmcompressor, linear_input_sizes, register
from quantpipe.methods.fp8 import kv_calibration, kv_storage

GROUP = {"nvfp4": 16, "mxfp4": 32}  # fixed by each format


def checkpoint_dtype(dtype: str) -> str:
    """The float dtype of an FP4 checkpoint: the recipe's, but bfloat16 for float32 (see the module docstring)."""
    return "bfloat16" if dtype == "float32" else dtype


class Fp4Params(MethodParams):
    scheme: Literal["nvfp4", "mxfp4"] = "nvfp4"
    activations: bool = True  # False: weight-only (NVFP4A16 / MXFP4A16)
    group_size: int | None = None  # the format's own (16 / 32); accepted only with that value
    kv_cache: Literal["fp8"] | None = None

    @model_validator(mode="after")
    def _group(self) -> Fp4Params:
        want = GROUP[self.scheme]
        if self.group_size is not None and self.group_size != want:
            raise ValueError(f"group_size: {self.scheme} groups are {want} values by definition (got "
                             f"{self.group_size}); leave group_size out or set it to {want}")
        return self


class Fp4(Method):
    name = "fp4"
    summary = "FP4 (E2M1) weights and activations, NVFP4 or MXFP4 (llm-compressor -> compressed-tensors)"
    Params = Fp4Params

    def requirements(self, p: Fp4Params) -> Requirements:
        return _llmcompressor.REQUIREMENTS

    def format(self, p: Fp4Params) -> str:
        return _llmcompressor.FORMAT

    def calibrates(self, p: Fp4Params) -> bool:
        return (p.scheme == "nvfp4" and p.activations) or p.kv_cache is not None

    def storage(self, p: Fp4Params, dtype: str) -> Storage:
        scalars = (1 + p.activations) if p.scheme == "nvfp4" else 0
        dtype = checkpoint_dtype(dtype)
        return Storage(float_bytes=DTYPE_BYTES[dtype], decompressed_on_cpu=True,
                       linear=_llmcompressor.fp4_bytes(GROUP[p.scheme], scalars),
                       **kv_storage(p.kv_cache, dtype))

    def calibration_memory(self, p: Fp4Params, shapes: Shapes, n_samples: int, seq_len: int, a: int
                           ) -> dict[str, int] | None:
        return kv_calibration(shapes, n_samples, seq_len, a) if self.calibrates(p) else None

    def check_model(self, p: Fp4Params, config: Any) -> list[str]:
        g = GROUP[p.scheme]
        bad = {k: v for k, v in linear_input_sizes(config).items() if v % g}
        if not bad:
            return []
        return [f"scheme: {p.scheme} groups {g} input columns, which do not tile "
                + ", ".join(f"{k} = {v}" for k, v in bad.items())]

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        p: Fp4Params = job.params
        preset = p.scheme.upper() + ("" if p.activations else "A16")
        mod = QuantizationModifier(targets="Linear", scheme=preset, ignore=["lm_head"],
                                   kv_cache_scheme=_llmcompressor.kv_cache_scheme(p.kv_cache))
        acts = ("none (weight-only)" if not p.activations else "FP4 per 16, global scale calibrated"
                if p.scheme == "nvfp4" else "FP4 per 32, dynamic")
        meta = _llmcompressor.oneshot(job, [mod], checkpoint_dtype(job.model.dtype))
        return {**meta, "bits": 4, "group_size": GROUP[p.scheme], "scheme": p.scheme,
                "activations": acts, "kv_cache": p.kv_cache or "model dtype",
                "native_compute": {"what": "FP4 tensor cores (Blackwell)", "min_cuda_capability": [10, 0]}}


register(Fp4())
