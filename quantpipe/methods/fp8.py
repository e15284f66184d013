"""`fp8`: FP8 E4M3 weights and activations (W8A8-FP8), written by llm-compressor as compressed-tensors
(`float-quantized`), the format vLLM serves on Hopper's FP8 tensor cores.

Schemes: `dynamic` (weights per output channel; activations per token, scaled at run time: no calibration data)
and `static` (weights and activations per tensor; the activation scales calibrated on the recipe's calibration
set). `kv_cache: fp8` adds llm-compressor's KV-cache scheme: one K and one V scale per attention layer calibrated
on the calibration set, so the engine stores the cache in FP8 (half a bf16 cache); transformers applies the same
quantization to K and V when it loads the checkpoint, so the eval measures what the FP8 cache costs.
Embeddings and lm_head stay in the model dtype.
"""

from __future__ import annotations

from typing import Any, Literal

from quantpipe.deps import Requirements
from quantpipe.memory import DTYPE_BYTES, Shapes, Storage, activation_bytes
from quantpipe.methods import Method, MethodParams, QuantizeJob, _llmcompressor, linear_sizes, register

# FP8 GEMMs (torch._scaled_mm, vLLM's CUTLASS kernels) tile both matrix dimensions by 16
FP8_TILE = 16


class Fp8Params(MethodParams):
    scheme: Literal["dynamic", "static"] = "dynamic"
    kv_cache: Literal["fp8"] | None = None


def kv_storage(kv_cache: str | None, dtype: str) -> dict[str, Any]:
    """The Storage fields of an artifact with (or without) an FP8 KV cache: its scales, the cache's bytes."""
    if kv_cache is None:
        return {}
    return {"layer_extra": _llmcompressor.KV_SCALES_PER_LAYER * DTYPE_BYTES[dtype], "kv_bytes": 1}


def kv_calibration(shapes: Shapes, n_samples: int, seq_len: int, a: int) -> dict[str, int]:
    """Calibrating activation or KV scales: llm-compressor runs the calibration set layer by layer, keeping
    the layer's inputs and outputs for every sample, and one sample's forward."""
    return {"layer inputs+outputs": 2 * n_samples * seq_len * shapes.hidden * a,
            "forward": activation_bytes(shapes, seq_len, 1, a, scores_len=seq_len)}


def check_tiles(config: Any, tile: int, what: str) -> list[str]:
    """Every Linear's input and output size must be a multiple of `tile`."""
    bad = {k: v for k, v in linear_sizes(config).items() if v % tile}
    if not bad:
        return []
    sizes = ", ".join(f"{k} = {v}" for k, v in bad.items())
    return [f"scheme: {what} needs every Linear dimension to be a multiple of {tile}; this model has {sizes} "
            "(use int8 or a 4-bit method with group_size -1 for it)"]


class Fp8(Method):
    name = "fp8"
    summary = "FP8 E4M3 weights and activations, dynamic or static scales, optional FP8 KV cache (llm-compressor)"
    Params = Fp8Params

    def requirements(self, p: Fp8Params) -> Requirements:
        return _llmcompressor.REQUIREMENTS

    def format(self, p: Fp8Params) -> str:
        return _llmcompressor.FORMAT

    def calibrates(self, p: Fp8Params) -> bool:
        return p.scheme == "static" or p.kv_cache is not None

    def storage(self, p: Fp8Params, dtype: str) -> Storage:
        b = DTYPE_BYTES[dtype]
        return Storage(float_bytes=b, decompressed_on_cpu=True,
                       linear=_llmcompressor.float8_bytes(b, per_channel=p.scheme == "dynamic",
                                                          static_input=p.scheme == "static"),
                       **kv_storage(p.kv_cache, dtype))

    def calibration_memory(self, p: Fp8Params, shapes: Shapes, n_samples: int, seq_len: int, a: int
                           ) -> dict[str, int] | None:
        return kv_calibration(shapes, n_samples, seq_len, a) if self.calibrates(p) else None

    def check_model(self, p: Fp8Params, config: Any) -> list[str]:
        return check_tiles(config, FP8_TILE, "FP8 (torch._scaled_mm, vLLM's FP8 GEMMs)")

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        p: Fp8Params = job.params
        preset = "FP8_DYNAMIC" if p.scheme == "dynamic" else "FP8"
        mod = QuantizationModifier(targets="Linear", scheme=preset, ignore=["lm_head"],
                                   kv_cache_scheme=_llmcompressor.kv_cache_scheme(p.kv_cache))
        acts = "FP8 per token, dynamic" if p.scheme == "dynamic" else "FP8 per tensor, static (calibrated)"
        return {**_llmcompressor.oneshot(job, [mod]), "bits": 8, "scheme": p.scheme, "activations": acts,
                "kv_cache": p.kv_cache or "model dtype"}


register(Fp8())
