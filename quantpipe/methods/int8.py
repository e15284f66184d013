"""`int8`: INT8 quantization of every Linear layer with torchao, saved as safetensors that transformers reloads.

Schemes: `weight_only` (int8 weights, per-channel scales, activations stay in the model dtype) and
`dynamic` (int8 weights and per-token dynamically quantized int8 activations, W8A8).
Embeddings and the (tied) lm_head stay in the base dtype. Reloading needs `torchao` installed.
"""

from __future__ import annotations

from typing import Any, Literal

from quantpipe.deps import Requirements
from quantpipe.memory import DTYPE_BYTES, Storage
from quantpipe.methods import Method, MethodParams, QuantizeJob, copy_tokenizer, register
from quantpipe.sources import DTYPE


class Int8Params(MethodParams):
    scheme: Literal["weight_only", "dynamic"] = "weight_only"


class Int8(Method):
    name = "int8"
    summary = "INT8 Linear weights via torchao (weight-only or W8A8 dynamic), safetensors"
    Params = Int8Params
    needs = Requirements(("torchao",), None, ("torchao", "transformers"))

    def format(self, p: Int8Params) -> str:
        return "torchao"

    def storage(self, p: Int8Params, dtype: str) -> Storage:
        # torchao Int8Tensor: int8 qdata [out, in], a scale and an int8 zero point per output channel
        return Storage(float_bytes=DTYPE_BYTES[dtype], linear=lambda out, inp: out * inp + out * DTYPE_BYTES[dtype]
                       + out)

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
        from transformers import AutoModelForCausalLM, TorchAoConfig

        config = (Int8WeightOnlyConfig() if job.params.scheme == "weight_only"
                  else Int8DynamicActivationInt8WeightConfig())
        model = AutoModelForCausalLM.from_pretrained(
            job.base_dir, dtype=DTYPE[job.model.dtype], quantization_config=TorchAoConfig(config))
        model.save_pretrained(job.out_dir, safe_serialization=True)
        copy_tokenizer(job.base_dir, job.out_dir)
        n_q = sum(1 for m in model.modules() if type(getattr(m, "weight", None)).__module__.startswith("torchao"))
        return {"format_detail": "torchao int8", "scheme": job.params.scheme, "bits": 8, "quantized_linears": n_q,
                "library": f"torchao {torchao.__version__}", "needs": f"pip install torchao=={torchao.__version__}"}


register(Int8())
