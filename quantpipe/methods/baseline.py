"""`baseline`: the base model materialized as a plain HF safetensors directory in the recipe dtype.

It is the reference every other variant is compared with, and the directory every other method starts from.
From a .gguf source, the tokenizer transformers saves is repaired from the GGUF's metadata (sources.py says what).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantpipe.methods import Method, MethodParams, QuantizeJob, register
from quantpipe.sources import load_base, repair_gguf_tokenizer, resolve


class BaselineParams(MethodParams):
    pass


class Baseline(Method):
    name = "baseline"
    summary = "unquantized reference, HF safetensors in the recipe dtype"
    Params = BaselineParams
    version = 2  # 2: tokenizer of a .gguf source repaired

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        model, tok = load_base(job.model)
        model.save_pretrained(job.out_dir, safe_serialization=True)
        meta = {"format_detail": f"transformers safetensors, {job.model.dtype}", "dtype": job.model.dtype,
                "bits": 8 * model.dtype.itemsize, "serve": "vllm serve PATH"}
        if tok is None:  # random weights: no tokenizer, no quality; the run feeds it random token ids
            return {**meta, "weights": "random", "arch": job.model.arch, "seed": job.model.seed,
                    "serve": "(random weights: for speed and memory measurement only)"}
        tok.save_pretrained(job.out_dir)
        where, gguf = resolve(job.model)
        if gguf:  # transformers' GGUF import gets some tokenizer metadata wrong: repair it from the GGUF itself
            meta["tokenizer_repairs"] = repair_gguf_tokenizer(job.out_dir, Path(where) / gguf)
        return meta


register(Baseline())
