"""Shared by the methods that llm-compressor runs (gptq, awq, smoothquant, fp8, fp4, autoround): calibration
dataset, the one-shot call (data-free when nothing calibrates), the FP8 KV-cache scheme, the byte arithmetic of
its layouts, and the compressed-tensors checkpoint it writes (vLLM's native format; transformers reloads it with
`compressed-tensors` installed)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from quantpipe.deps import Requirements
from quantpipe.memory import Shapes, Storage, natural_zero_points_bytes, tinygemm_bytes
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


def float8_bytes(scale_bytes: int, per_channel: bool, static_input: bool) -> Callable[[int, int], int]:
    """Bytes of one Linear(out, inp) in compressed-tensors `float-quantized`: FP8 E4M3 weight, its scale per
    output channel ([out, 1]) or per tensor ([1]), and a per-tensor `input_scale` when activations are static;
    scales in the model dtype."""
    return lambda out, inp: out * inp + (out if per_channel else 1) * scale_bytes + (scale_bytes if static_input
                                                                                      else 0)


def fp4_bytes(group_size: int, global_scales: int) -> Callable[[int, int], int]:
    """Bytes of one Linear(out, inp) in `nvfp4-pack-quantized` / `mxfp4-pack-quantized`: two E2M1 values per
    uint8 (`weight_packed` [out, inp/2]), one 1-byte scale per group (FP8 E4M3 for NVFP4, an E8M0 exponent for
    MXFP4: [out, inp/group]) and `global_scales` float32 scalars (NVFP4: the weight's, and the input's when
    activations are quantized)."""
    return lambda out, inp: out * inp // 2 + out * (inp // group_size) + 4 * global_scales


# An FP8 KV cache: llm-compressor calibrates one scale for K and one for V per attention layer (`k_scale`,
# `v_scale`, in the model dtype); vLLM stores the cache in FP8 E4M3 with them.
KV_SCALES_PER_LAYER = 2


def kv_cache_scheme(kind: str | None) -> dict[str, Any] | None:
    """llm-compressor's `kv_cache_scheme` for the recipe's `kv_cache` param (None: the cache stays float)."""
    if kind is None:
        return None
    return {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def ignore(quantize_lm_head: bool) -> list[str]:
    """The modifiers' `ignore`: lm_head stays float unless the recipe quantizes it too (llm-compressor then
    unties a tied embedding: the embedding stays float, lm_head is stored quantized)."""
    return [] if quantize_lm_head else ["lm_head"]


def packed_storage(bits: int, group_size: int, zero_point: bool, dtype_bytes: int,
                   quantize_lm_head: bool) -> Storage:
    """`Storage` of a compressed-tensors `pack-quantized` artifact, lm_head included when it is quantized too
    (tied: the float embedding plus the quantized lm_head, untied by llm-compressor)."""
    linear = packed_bytes(bits, group_size, zero_point, dtype_bytes)
    head = None
    tied = None
    if quantize_lm_head:
        head = linear
        tied = lambda vocab, hidden: vocab * hidden * dtype_bytes + linear(vocab, hidden)  # noqa: E731
    return Storage(float_bytes=dtype_bytes, decompressed_on_cpu=True, linear=linear, lm_head=head,
                   tied_embedding=tied, one_row_copy=tinygemm_bytes(group_size) if bits == 4 else None,
                   natural_zero_points=natural_zero_points_bytes(group_size) if bits == 4 and zero_point else None)


def head_calibration(s: Shapes, n_samples: int, seq_len: int, a: int) -> dict[str, int]:
    """What calibrating a quantized lm_head adds: its outputs (the logits) for every calibration sample, which
    the layer-by-layer pipeline keeps like any layer's (measured on SmolLM2, docs/benchmarks.md)."""
    return {"lm_head outputs": n_samples * seq_len * s.vocab * a}


def config_groups(weights: Any, input_activations: Any = None) -> dict[str, Any]:
    """The modifiers' `config_groups`: one scheme for every Linear layer (lm_head is ignored by the caller)."""
    from compressed_tensors.quantization import QuantizationScheme

    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=input_activations)}


def oneshot(job: QuantizeJob, modifiers: list[Any], dtype: str | None = None) -> dict[str, Any]:
    """Run llm-compressor's one-shot calibration on the job's calibration ids (None: data-free); save compressed;
    return meta. `dtype`: the checkpoint's float dtype when it must differ from the recipe's."""
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
    ids = job.calibration  # None: a data-free scheme (FP8 dynamic, MXFP4): the weights are quantized alone
    data = None if ids is None else Dataset.from_dict({"input_ids": ids.tolist(),
                                                       "attention_mask": torch.ones_like(ids).tolist()})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The model stays in CPU memory: on a GPU, llm-compressor's sequential pipeline moves one decoder layer at a
    # time onto it and keeps the calibration activations between layers in CPU memory, so GPU memory holds one
    # layer's weights and activations, whatever the model's size.
    model = AutoModelForCausalLM.from_pretrained(job.base_dir, dtype=DTYPE[dtype or job.model.dtype],
                                                 device_map="cpu")
    # a random-weight base has no tokenizer; the calibration is token ids already
    has_tok = any((job.base_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = AutoTokenizer.from_pretrained(job.base_dir) if has_tok else None
    # AutoRound tunes each block in bfloat16 and leaves a float32 model's norm weights in bfloat16: keep the
    # small tensors that no modifier quantizes (norms) and put back any whose dtype a modifier changed
    small = {n: p.detach().clone() for n, p in model.named_parameters()
             if not isinstance(model.get_submodule(n.rpartition(".")[0]), (torch.nn.Linear, torch.nn.Embedding))}
    if ids is None:
        run_oneshot(model=model, recipe=modifiers)
    else:
        run_oneshot(model=model, dataset=data, recipe=modifiers, max_seq_length=ids.shape[1],
                    num_calibration_samples=ids.shape[0], processor=tok, shuffle_calibration_samples=False)
    for n, p in model.named_parameters():
        if n in small and p.dtype != small[n].dtype:
            p.data = small[n]
    model.save_pretrained(job.out_dir, save_compressed=True)
    copy_tokenizer(job.base_dir, job.out_dir)
    qdict = json.loads((job.out_dir / "config.json").read_text())["quantization_config"]
    ct = compressed_tensors.__version__
    return {
        "format_detail": f"compressed-tensors ({qdict.get('format')})",
        "quantization_config": {k: qdict.get(k) for k in ("quant_method", "format", "ignore", "kv_cache_scheme")},
        "library": f"llm-compressor {llmcompressor.__version__}, compressed-tensors {ct}",
        "needs": f"pip install compressed-tensors=={ct}",
        "serve": "vllm serve PATH  # compressed-tensors is vLLM's native format",
        "quantize_device": device,
    }
