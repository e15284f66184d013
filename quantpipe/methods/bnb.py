"""`bnb`: bitsandbytes, quantized by transformers when it loads the model (no calibration data) and saved as a
checkpoint transformers reloads (`quant_method: bitsandbytes`): `nf4` / `fp4` (4-bit NormalFloat or FP4 in
blocks of 64 values with an absmax each; `double_quant` quantizes those absmax values again, to 8 bits in blocks
of 256; `compute_dtype` is what the matmul dequantizes to) and `int8` (LLM.int8(): int8 weights per row;
activation columns with an outlier above `threshold` are multiplied in 16-bit, the rest in int8).
bitsandbytes has a CPU backend and CUDA kernels. Embeddings and lm_head stay in the model dtype.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from quantpipe.deps import Requirements
from quantpipe.memory import DTYPE_BYTES, Storage
from quantpipe.methods import Method, MethodParams, QuantizeJob, copy_tokenizer, register
from quantpipe.sources import DTYPE

BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes' 4-bit block and its double-quantization block


class BnbParams(MethodParams):
    scheme: Literal["nf4", "fp4", "int8"] = "nf4"
    double_quant: bool = True  # 4-bit: quantize the per-block absmax values too
    compute_dtype: Literal["bfloat16", "float16", "float32"] | None = None  # 4-bit; None: the model dtype
    threshold: float = Field(6.0, ge=0)  # int8: activation outlier threshold (0: no outlier decomposition)


def quant_state_bytes(p: BnbParams, out: int, inp: int, dtype: str) -> int:
    """The JSON bitsandbytes stores per 4-bit Linear (`weight.quant_state.bitsandbytes__nf4`). With double
    quantization it holds a float (`nested_offset`) whose printed length varies (17 to 20 characters): counted
    as 17, so the prediction is at most a few bytes per Linear short, never over."""
    state: dict[str, Any] = {"quant_type": p.scheme, "blocksize": BLOCK, "dtype": p.compute_dtype or dtype,
                             "shape": [out, inp]}
    if p.double_quant:
        state.update({"nested_blocksize": NESTED_BLOCK, "nested_dtype": "float32", "nested_offset": 0.0})
        return len(json.dumps(state)) - len("0.0") + 17
    return len(json.dumps(state))


class Bnb(Method):
    name = "bnb"
    summary = "bitsandbytes NF4/FP4 (double quantization) or LLM.int8(), quantized at load time by transformers"
    Params = BnbParams
    needs = Requirements(("bitsandbytes",), "bnb", ("bitsandbytes", "transformers"))

    def format(self, p: BnbParams) -> str:
        return "bitsandbytes"

    def storage(self, p: BnbParams, dtype: str) -> Storage:
        if p.scheme == "int8":  # int8 weight [out, in], float32 row scales `SCB` [out], a 1-byte `weight_format`
            return Storage(float_bytes=DTYPE_BYTES[dtype], linear=lambda out, inp: out * inp + 4 * out + 1)

        def four_bit(out: int, inp: int) -> int:
            n = out * inp
            blocks = -(-n // BLOCK)
            # packed weight [n/2, 1] uint8; quant_map float32 [16]; the absmax per block: float32, or (double
            # quantization) uint8 plus float32 nested absmax per 256 blocks and the float32 [256] nested map
            absmax = blocks + 4 * -(-blocks // NESTED_BLOCK) + 4 * 256 if p.double_quant else 4 * blocks
            return n // 2 + 4 * 16 + absmax + quant_state_bytes(p, out, inp, dtype)

        return Storage(float_bytes=DTYPE_BYTES[dtype], linear=four_bit, exact=not p.double_quant,
                       cpu_note="bitsandbytes' CPU backend repacks 4-bit weights for its kernel on the first forward "
                                "(and expands double-quantized absmax values to float32)",
                       inexact="bitsandbytes' per-Linear quant_state JSON holds a float whose printed length "
                               "varies: a few bytes per Linear" if p.double_quant else "")

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        import bitsandbytes
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        p: BnbParams = job.params
        if p.scheme == "int8":
            config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=p.threshold)
        else:
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=p.scheme,
                                        bnb_4bit_use_double_quant=p.double_quant,
                                        bnb_4bit_compute_dtype=DTYPE[p.compute_dtype or job.model.dtype])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(job.base_dir, dtype=DTYPE[job.model.dtype],
                                                     quantization_config=config, device_map=device)
        model.save_pretrained(job.out_dir)
        copy_tokenizer(job.base_dir, job.out_dir)
        v = bitsandbytes.__version__
        return {"format_detail": f"bitsandbytes {'LLM.int8()' if p.scheme == 'int8' else p.scheme}",
                "bits": 8 if p.scheme == "int8" else 4, "scheme": p.scheme, "quantize_device": device,
                "library": f"bitsandbytes {v}", "needs": f"pip install bitsandbytes=={v}",
                "serve": "vllm serve PATH --quantization bitsandbytes"}


register(Bnb())
