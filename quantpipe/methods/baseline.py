"""`baseline`: the base model materialized as a plain HF safetensors directory in the recipe dtype.

It is the reference every other variant is compared with, and the directory every other method starts from.
"""

from __future__ import annotations

from typing import Any

from quantpipe.methods import Method, MethodParams, QuantizeJob, register
from quantpipe.sources import load_base


class BaselineParams(MethodParams):
    pass


def quantize(job: QuantizeJob) -> dict[str, Any]:
    model, tok = load_base(job.model)
    model.save_pretrained(job.out_dir, safe_serialization=True)
    tok.save_pretrained(job.out_dir)
    return {"format": "hf-safetensors", "dtype": job.model.dtype, "bits": 8 * model.dtype.itemsize,
            "serve": "vllm serve PATH"}


register(Method(
    name="baseline",
    summary="unquantized reference, HF safetensors in the recipe dtype",
    params=BaselineParams,
    quantize=quantize,
    runtime="hf",
    requires=("transformers",),
    libraries=("transformers",),
))
