"""`quantpipe plan`: will it fit? From a model's config alone (no weights): every variant's weight bytes, KV-cache
bytes per token, an activation allowance, the largest context x concurrency on a GPU, and the memory calibrated
quantization needs; the run's predictions beside its measured memory. The byte arithmetic itself (and its
definitions) is memory.py's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from quantpipe.errors import QuantpipeError
from quantpipe.memory import (  # noqa: F401 - plan's callers (and tests) read the arithmetic through plan too
    DTYPE_BYTES,
    GIB,
    MIB,
    Shapes,
    Storage,
    activation_bytes,
    kv_bytes_per_token,
    shapes,
    weight_bytes,
)

# Total memory of each GPU in MiB, as nvidia-smi reports it (published figures; only the H100's was read here, on
# a lent H100 80GB HBM3: 81559 MiB, docs/benchmarks.md). Part of it goes to the CUDA context and
# the framework: `--utilization` (default 0.9, vLLM's default) is the share the model may use.
GPUS: dict[str, int] = {name: mib * MIB for name, mib in {
    "T4-16GB": 15360, "L4-24GB": 23034, "A10-24GB": 23028, "RTX4090-24GB": 24564, "A100-40GB": 40960,
    "L40S-48GB": 46068, "A100-80GB": 81920, "H100-80GB": 81559, "H200-141GB": 143771}.items()}
KV_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}

# -- what fits ---------------------------------------------------------------------------------------------
def parse_memory(text: str) -> int:
    """'24GiB', '80GB', '512MiB', '81559MiB', '1.5TiB' -> bytes (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B)\s*", text, re.IGNORECASE)
    if not m:
        raise QuantpipeError(f"--gpu-memory: '{text}' is not a size like 24GiB, 80GB or 81559MiB")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "KMGT".index(unit[0]) * base)


def gpu_memory(name: str) -> int:
    for k, v in GPUS.items():
        if k.lower() == name.lower() or k.split("-")[0].lower() == name.lower():
            return v
    raise QuantpipeError(f"--gpu: unknown GPU '{name}'; known: {', '.join(GPUS)} (or give --gpu-memory 24GiB)")


@dataclass
class Fit:
    """One variant on one GPU: its memory and the largest context × concurrency it serves."""

    variant: str
    method: str
    weights: int
    kv_per_token: int
    activations: int
    budget: int  # usable bytes: memory × utilization
    kv_budget: int  # what is left for the KV cache
    max_concurrency: int  # at the requested context
    max_context: dict[int, int]  # concurrency -> largest context (capped at the model's max positions)

    @property
    def fits(self) -> bool:
        return self.max_concurrency >= 1


def fit(variant: str, method: str, weights: int, s: Shapes, kv_bytes: int, act_bytes: int, memory: int,
        context: int, concurrency: list[int], utilization: float = 0.9, prefill_chunk: int = 8192) -> Fit:
    """How many sequences of `context` tokens fit beside the weights, and the longest context per concurrency.
    The activation allowance is one prefill chunk of min(context, prefill_chunk) tokens (flash attention:
    no score matrix), with the logits of every concurrent sequence."""
    per_tok = kv_bytes_per_token(s, kv_bytes)
    acts = activation_bytes(s, min(context, prefill_chunk), max(concurrency + [1]), act_bytes)
    budget = int(memory * utilization)
    kv_budget = max(0, budget - weights - acts)
    tokens = kv_budget // per_tok
    cap = s.max_positions or tokens
    return Fit(variant=variant, method=method, weights=weights, kv_per_token=per_tok, activations=acts,
               budget=budget, kv_budget=kv_budget, max_concurrency=tokens // context,
               max_context={c: min(cap, tokens // c) for c in concurrency})


def resident_bytes(s: Shapes, storage: Storage, dtype: str, device: str) -> int:
    """Weight bytes a loaded artifact holds: its stored layout; where transformers decompresses the format
    on a CPU (compressed-tensors), the float weights it makes plus the stored tensors it read."""
    stored = weight_bytes(s, storage)["total"]
    if device == "cpu" and storage.decompressed_on_cpu:
        return weight_bytes(s, Storage(float_bytes=DTYPE_BYTES[dtype]))["total"] + stored
    return stored


def one_row_copies(s: Shapes, storage: Storage, dtype: str, device: str) -> int:
    """Bytes of the tinygemm copies that the compiled runtime (what `auto` picks for 4-bit checkpoints on a
    GPU) keeps beside Marlin's weights for one-row calls: every 4-bit weight of at most
    runtimes.marlin.ONE_ROW_MAX_ELEMENTS values as the decoder fuses them (q/k/v, o, gate/up, down; lm_head
    where it is quantized). 0 off a GPU, for other dtypes than bfloat16 (Marlin's) or formats, or with
    QUANTPIPE_ONE_ROW_TINYGEMM=0."""
    from quantpipe.runtimes import marlin

    if device != "cuda" or dtype != "bfloat16" or storage.one_row_copy is None or not marlin.one_row_tinygemm():
        return 0
    q, kv, h, i = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.hidden, s.intermediate
    fused = [(("q_proj", "k_proj", "v_proj"), q + 2 * kv, h), (("o_proj",), h, q),
             (("gate_proj", "up_proj"), 2 * i, h), (("down_proj",), h, i)]
    per_layer = sum(storage.one_row_copy(o, n) for names, o, n in fused
                    if o * n <= marlin.ONE_ROW_MAX_ELEMENTS
                    and not any(f in name for name in names for f in storage.float_linears))
    head = 0
    if storage.lm_head is not None and s.vocab * s.hidden <= marlin.ONE_ROW_MAX_ELEMENTS:
        head = storage.one_row_copy(s.vocab, s.hidden)
    return s.layers * per_layer + head


def natural_zero_points(s: Shapes, storage: Storage, dtype: str, device: str) -> int:
    """Bytes of the zero points that the compiled runtime keeps in natural order beside Marlin's packed ones on a
    GPU (runtimes.marlin.MarlinLinear: the prompt's dequantizers read them so, instead of un-permuting the packed
    ones on every call): every 4-bit Linear with zero points, lm_head where it is quantized. 0 off a GPU, for
    other dtypes than bfloat16 (Marlin's) and for formats without zero points."""
    zp = storage.natural_zero_points
    if device != "cuda" or dtype != "bfloat16" or zp is None:
        return 0
    per_layer = sum(zp(o, i) for n, o, i, _ in s.linears() if not any(f in n for f in storage.float_linears))
    return s.layers * per_layer + (zp(s.vocab, s.hidden) if storage.lm_head is not None else 0)


def bench_memory(s: Shapes, storage: Storage, dtype: str, device: str, bench: dict[str, Any]) -> dict[str, int]:
    """Predicted memory of `quantpipe bench` at its largest batch: resident weights, the compiled runtime's
    one-row copies and natural-order zero points on a GPU (`one_row_copies`, `natural_zero_points`: keys of their
    own where there are any), the KV cache of prompt_len + gen_len tokens per sequence, and one prefill's
    activations (CPU attention materializes the scores; CUDA's flash/efficient kernels do not)."""
    b = max(bench["batch_sizes"])
    act = storage.float_bytes
    out = {
        "weights": resident_bytes(s, storage, dtype, device),
        "kv_cache": b * (bench["prompt_len"] + bench["gen_len"]) * kv_bytes_per_token(s, act),
        "activations": activation_bytes(s, b * bench["prompt_len"], b, act,
                                        scores_len=bench["prompt_len"] if device == "cpu" else 0),
    }
    copies = one_row_copies(s, storage, dtype, device)
    if copies:
        out["one_row_copies"] = copies
    zeros = natural_zero_points(s, storage, dtype, device)
    if zeros:
        out["natural_zero_points"] = zeros
    out["total"] = sum(out.values())
    return out


def quantize_memory(s: Shapes, method: Any, params: Any, dtype: str, n_samples: int, seq_len: int
                    ) -> dict[str, int] | None:
    """Predicted memory of a calibrated method's quantization: the float model it loads, its calibration
    working set (`Method.calibration_memory`), and the quantized tensors it builds to save. None for methods
    without calibration."""
    storage = method.storage(params, dtype)
    a = storage.float_bytes  # the dtype the backend loads the model in
    working = method.calibration_memory(params, s, n_samples, seq_len, a)
    if working is None:
        return None
    out = {"model": weight_bytes(s, Storage(float_bytes=a))["total"], **working,
           "artifact": weight_bytes(s, storage)["total"]}
    out["total"] = sum(out.values())
    return out


def tensor_bytes(artifact_dir: Any) -> int:
    """Sum of the tensor bytes in an artifact's .safetensors, model .gguf and model .onnx files (from their
    headers or graphs)."""
    import json
    import struct
    from pathlib import Path

    total = 0
    for f in sorted(Path(artifact_dir).glob("model*.onnx")):
        from quantpipe.backends.onnx import tensor_bytes as onnx_tensor_bytes

        total += onnx_tensor_bytes(f)
    for f in sorted(Path(artifact_dir).glob("model*.gguf")):
        from quantpipe.backends.llamacpp_tools import check_gguf

        total += check_gguf(f)["tensor_bytes"]
    for f in sorted(Path(artifact_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


# -- the `quantpipe plan` report ----------------------------------------------------------------------------
def plan_recipe(recipe: Any, config: Any, memory: int, context: int, concurrency: list[int],
                kv_dtype: str = "auto", utilization: float = 0.9) -> dict[str, Any]:
    """Every variant's weights, KV cache and fit on a GPU of `memory` bytes, and the memory of calibrated
    quantization for the recipe's n_samples × seq_len; plain data (printed by `format_plan`, or JSON)."""
    from quantpipe.methods import get_method

    s = shapes(config)
    dtype, cal = recipe.model.dtype, recipe.calibration
    variants = []
    for v in recipe.variants:
        method, params = get_method(v.method), v.params
        storage = method.storage(params, dtype)
        kv = KV_DTYPES[kv_dtype] if kv_dtype != "auto" else storage.kv_bytes or storage.float_bytes
        w = weight_bytes(s, storage)
        f = fit(v.name, v.method, w["total"], s, kv, storage.float_bytes, memory, context, concurrency, utilization)
        variants.append({"name": v.name, "method": v.method, "weights": w, "kv_bytes_per_token": f.kv_per_token,
                         "kv_dtype_bytes": kv, "activations": f.activations, "kv_budget": f.kv_budget,
                         "fits": f.fits, "max_concurrency": f.max_concurrency,
                         "max_context": {str(c): n for c, n in f.max_context.items()},
                         "quantize": quantize_memory(s, method, params, dtype, cal.n_samples, cal.seq_len)})
    return {"shapes": s.__dict__, "n_params": s.n_params(), "memory": memory, "utilization": utilization,
            "budget": int(memory * utilization), "context": context, "concurrency": concurrency,
            "calibration": {"n_samples": cal.n_samples, "seq_len": cal.seq_len}, "variants": variants}


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def format_plan(p: dict[str, Any], title: str, available: tuple[str, int] | None = None) -> str:
    """The plan as text: a fit table and, for calibrated methods, their quantization memory."""
    s, ctx = p["shapes"], p["context"]
    lines = [title,
             f"shapes: {s['model_type']}, {s['layers']} layers, hidden {s['hidden']}, {s['heads']} query / "
             f"{s['kv_heads']} KV heads × {s['head_dim']}, intermediate {s['intermediate']}, vocab {s['vocab']}, "
             f"{'tied' if s['tied'] else 'untied'} embeddings, {p['n_params'] / 1e9:.3f} B params",
             f"GPU memory {_gib(p['memory'])} GiB × {p['utilization']:.2f} = {_gib(p['budget'])} GiB for weights, "
             f"activations and KV cache; context {ctx}", ""]
    conc = [str(c) for c in p["concurrency"]]
    head = ["variant", "method", "weights GiB", "KV KiB/token", "activations GiB", "KV room GiB",
            f"max concurrency @ {ctx}", *[f"max context @ {c}" for c in conc], "fits"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in p["variants"]:
        room = p["budget"] - v["weights"]["total"] - v["activations"]
        verdict = "yes" if v["fits"] else (
            f"NO: weights + activations exceed {_gib(p['budget'])} GiB" if room <= 0 else
            f"NO: {ctx} tokens of KV need {_gib(ctx * v['kv_bytes_per_token'])} GiB")
        lines.append("| " + " | ".join([
            v["name"], v["method"], _gib(v["weights"]["total"]), f"{v['kv_bytes_per_token'] / 1024:.1f}",
            _gib(v["activations"]), _gib(v["kv_budget"]), str(v["max_concurrency"]),
            *[str(v["max_context"][c]) for c in conc], verdict]) + " |")
    calibrated = [v for v in p["variants"] if v["quantize"]]
    if calibrated:
        cal = p["calibration"]
        lines += ["", f"Calibrated quantization, {cal['n_samples']} samples × {cal['seq_len']} tokens "
                  "(float model + working set + quantized output):", ""]
        for v in calibrated:
            q = v["quantize"]
            parts = ", ".join(f"{k} {_gib(x)}" for k, x in q.items() if k != "total")
            warn = ""
            if available is not None and q["total"] > WARN_SHARE * available[1]:
                warn = f"  WARNING: this machine has {_gib(available[1])} GiB of {available[0]}; it may run out"
            lines.append(f"- {v['name']}: {_gib(q['total'])} GiB ({parts}){warn}")
    return "\n".join(lines) + "\n"


def available_memory() -> tuple[str, int]:
    """Where quantization would run here and how much memory it has: the GPU's total, or free RAM."""
    import psutil
    import torch

    if torch.cuda.is_available():
        return "GPU memory", torch.cuda.get_device_properties(0).total_memory
    return "available RAM", psutil.virtual_memory().available


# Measured quantize peaks ran up to 30% above the prediction on CPU (SmolLM2 demo, docs/benchmarks.md: the
# process's RSS keeps freed transients), so a run warns once the prediction passes 75% of what is available.
WARN_SHARE = 0.75


def calibration_warnings(recipe: Any, config: Any) -> list[str]:
    """One line per calibrated variant whose predicted quantization memory passes WARN_SHARE of what this
    machine has."""
    from quantpipe.methods import get_method

    try:
        s = shapes(config)
    except QuantpipeError:
        return []
    where, have = available_memory()
    cal, out = recipe.calibration, []
    for v in recipe.variants:
        need = quantize_memory(s, get_method(v.method), v.params, recipe.model.dtype, cal.n_samples,
                               cal.seq_len)
        if need is not None and need["total"] > WARN_SHARE * have:
            out.append(f"variant '{v.name}' ({v.method}) needs about {_gib(need['total'])} GiB to quantize "
                       f"with {cal.n_samples} × {cal.seq_len} calibration tokens (an estimate; peaks were measured "
                       f"up to 30% above it) and this machine has {_gib(have)} GiB of {where}, so it may run out: "
                       "lower calibration.n_samples or calibration.seq_len, or use a bigger machine "
                       "(`quantpipe plan RECIPE` shows the parts)")
    return out
