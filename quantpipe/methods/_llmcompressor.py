"""Shared by the methods that llm-compressor runs (gptq, awq, smoothquant): calibration dataset, the one-shot
call, and the compressed-tensors checkpoint it writes (vLLM's native format; transformers reloads it with
`compressed-tensors` installed)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from quantpipe.deps import Requirements
from quantpipe.methods import QuantizeJob, copy_tokenizer
from quantpipe.sources import DTYPE

REQUIREMENTS = Requirements(("llmcompressor", "compressed_tensors"), "llmcompressor",
                            ("llmcompressor", "compressed-tensors", "transformers"))
FORMAT = "compressed-tensors"


def weight_args(bits: int, group_size: int, symmetric: bool) -> Any:
    """compressed-tensors QuantizationArgs for integer weights, per group (group_size > 0) or per channel."""
    from compressed_tensors.quantization import QuantizationArgs

    grouped = group_size > 0
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="group" if grouped else "channel", group_size=group_size if grouped else None)


def packed_bytes(bits: int, group_size: int, zero_point: bool, scale_bytes: int) -> Callable[[int, int], int]:
    """Bytes of one Linear(out, inp) in compressed-tensors `pack-quantized`: `weight_packed` int32 [out, inp·bits/32],
    `weight_scale` [out, groups] in the model dtype, `weight_zero_point` int32 [out·bits/32, groups] when
    asymmetric, and `weight_shape` (2 × int64)."""

    def size(out: int, inp: int) -> int:
        groups = inp // group_size if group_size > 0 else 1
        zeros = -(-out * bits // 32) * groups * 4 if zero_point else 0
        return out * -(-inp * bits // 32) * 4 + out * groups * scale_bytes + zeros + 16

    return size


def int8_bytes(scale_bytes: int) -> Callable[[int, int], int]:
    """Bytes of one Linear(out, inp) in compressed-tensors `int-quantized`: int8 weight, one scale per channel."""
    return lambda out, inp: out * inp + out * scale_bytes


def config_groups(weights: Any, input_activations: Any = None) -> dict[str, Any]:
    """The modifiers' `config_groups`: one scheme for every Linear layer (lm_head is ignored by the caller)."""
    from compressed_tensors.quantization import QuantizationScheme

    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=input_activations)}


def oneshot(job: QuantizeJob, modifiers: list[Any]) -> dict[str, Any]:
    """Run llm-compressor's one-shot calibration on the job's calibration ids; save compressed; return meta."""
    import compressed_tensors
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot as run_oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        # llm-compressor pins its cached activations for fast host-to-device copies, which asks for an
        # accelerator and fails on CPU-only torch; on CPU there is nothing to gain from pinning.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None  # this process only: quantize runs alone
    ids = job.calibration
    assert ids is not None, "llm-compressor methods calibrate"
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The model stays in CPU memory: on a GPU, llm-compressor's sequential pipeline moves one decoder layer at a
    # time onto it and keeps the calibration activations between layers in CPU memory, so GPU memory holds one
    # layer's weights and activations, whatever the model's size.
    model = AutoModelForCausalLM.from_pretrained(job.base_dir, dtype=DTYPE[job.model.dtype], device_map="cpu")
    # a random-weight base has no tokenizer; the calibration is token ids already
    has_tok = any((job.base_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = AutoTokenizer.from_pretrained(job.base_dir) if has_tok else None
    run_oneshot(model=model, dataset=data, recipe=modifiers, max_seq_length=ids.shape[1],
                num_calibration_samples=ids.shape[0], processor=tok, shuffle_calibration_samples=False)
    model.save_pretrained(job.out_dir, save_compressed=True)
    copy_tokenizer(job.base_dir, job.out_dir)
    qdict = json.loads((job.out_dir / "config.json").read_text())["quantization_config"]
    ct = compressed_tensors.__version__
    return {
        "format_detail": f"compressed-tensors ({qdict.get('format')})",
        "quantization_config": {k: qdict.get(k) for k in ("quant_method", "format", "ignore")},
        "library": f"llm-compressor {llmcompressor.__version__}, compressed-tensors {ct}",
        "needs": f"pip install compressed-tensors=={ct}",
        "serve": "vllm serve PATH  # compressed-tensors is vLLM's native format",
        "quantize_device": device,
    }
