"""Low-bit Linear modules on torch's weight-only kernels, and the loader that puts a transformers checkpoint's
quantized Linears on them without dequantizing (the compiled runtime's model).

Formats with a kernel here (`LAYOUTS`): compressed-tensors `pack-quantized` (llm-compressor's GPTQ/AWQ, 4 or 8
bits, grouped or per channel, symmetric or not) and `int-quantized` (8-bit weights, with or without dynamic
per-token int8 activations), `float-quantized` (FP8 E4M3 weights and activations, dynamic per token or static
per tensor), GPTQModel's `gptq` (4 bits, no act-order permutation), torchao's int8 (our `int8`
method). 4-bit weights run on tinygemm (`_weight_int4pack_mm`), 8-bit weight-only on `_weight_int8pack_mm`,
W8A8 on `_int_mm`, FP8 on `_scaled_mm`; everything else of the model (embeddings, norms, an unquantized lm_head)
stays in its dtype.
A float artifact loads as it is. Another format raises `Unsupported`.

On a CPU the same modules run on the CPU builds of those kernels: the tests check the arithmetic there against
transformers' own loading of each format.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantpipe.errors import QuantpipeError

INNER_K_TILES = 8  # tinygemm's K tiling: K must be a multiple of 16 x this


class Unsupported(Exception):
    """The artifact's format has no low-bit kernel path here (the caller benchmarks it eagerly)."""


# -- low-bit Linear modules -------------------------------------------------------------------------------
class Int4Linear(nn.Module):
    """y = x W^T with W = (u - 8) * scale + zero per group of `group` input columns, u in 0..15 (tinygemm's
    arithmetic). Holds the packed weight and [K/group, N, 2] bfloat16 scales-and-zeros; computes in bfloat16.
    The kernel tiles K by 128 and N by 8 (16 on a CPU): other sizes are padded with zero weights and inputs."""

    def __init__(self, u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                 bias: torch.Tensor | None, out_dtype: torch.dtype) -> None:
        super().__init__()
        n, k = u.shape
        if group not in (32, 64, 128, 256) or k % group:
            raise Unsupported(f"int4 kernel groups are 32, 64, 128 or 256 columns (got {group} of {k})")
        self.in_features, self.out_features, self.group, self.out_dtype = k, n, group, out_dtype
        kp, np_ = -(-k // max(group, 16 * INNER_K_TILES)) * max(group, 16 * INNER_K_TILES), -(-n // 16) * 16
        if (kp, np_) != (k, n):  # padded weights are (8 - 8) * 1 + 0 = 0
            u = torch.nn.functional.pad(u, (0, kp - k, 0, np_ - n), value=8)
            scale = torch.nn.functional.pad(scale, (0, (kp - k) // group, 0, np_ - n), value=1.0)
            zero = torch.nn.functional.pad(zero, (0, (kp - k) // group, 0, np_ - n), value=0.0)
        self.k_padded = kp
        if u.is_cuda:
            u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(u8, INNER_K_TILES)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), INNER_K_TILES)
        self.register_buffer("weight_int4pack", packed)
        self.register_buffer("scales_and_zeros",
                             torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.k_padded != self.in_features:
            x2 = torch.nn.functional.pad(x2, (0, self.k_padded - self.in_features))
        if x2.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight_int4pack, self.group, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_int4pack, self.group,
                                                            self.scales_and_zeros)
        y = y[:, :self.out_features].to(self.out_dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """Weight-only int8: y = (x q^T) * scale per output channel (`_weight_int8pack_mm`), in the model dtype."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        # a fresh copy: tensors read from a safetensors file may be unaligned, which the CPU kernel can fault on
        self.register_buffer("weight_int8", q.to(torch.int8).clone(memory_format=torch.contiguous_format))
        self.register_buffer("scale", scale.reshape(-1).to(dtype).clone())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.scale.dtype)
        y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scale).reshape(*shape[:-1], self.out_features)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8DynamicLinear(nn.Module):
    """W8A8: activations quantized per token (symmetric int8) at run time, int8 x int8 -> int32 on `_int_mm`,
    rescaled by the token's and the channel's scales."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8_t", q.to(torch.int8).t().contiguous())  # [K, N]
        self.register_buffer("scale", scale.reshape(1, -1).float())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        sx = x2.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.5  # torchao's symmetric int8 scale
        xq = torch.round(x2 / sx).clamp(-128, 127).to(torch.int8)
        m = xq.shape[0]
        if xq.is_cuda and m <= 16:  # cuBLAS int8 GEMM wants more than 16 rows
            xq = torch.nn.functional.pad(xq, (0, 0, 0, 17 - m))
        acc = torch._int_mm(xq, self.weight_int8_t)[:m]
        y = (acc.float() * sx * self.scale).to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


FP8_MAX = 448.0  # the largest finite FP8 E4M3 value


_CPU_ROWWISE: list[bool] = []


def cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU `_scaled_mm` takes row-wise scales (2.13 does; 2.11 takes per-tensor only)."""
    if not _CPU_ROWWISE:
        a = torch.zeros(1, 16, dtype=torch.float8_e4m3fn)
        try:
            torch._scaled_mm(a, torch.zeros(16, 16, dtype=torch.float8_e4m3fn).t(), torch.ones(1, 1),
                             torch.ones(1, 16), out_dtype=torch.bfloat16)
            _CPU_ROWWISE.append(True)
        except RuntimeError:
            _CPU_ROWWISE.append(False)
    return _CPU_ROWWISE[0]


class Fp8Linear(nn.Module):
    """W8A8-FP8 on `torch._scaled_mm` (Hopper's and Ada's FP8 tensor cores; a CPU build exists too): FP8 E4M3
    weights with a scale per output channel (or one per tensor), activations quantized to FP8 per token at run
    time (`input_scale` None: dynamic) or with the checkpoint's calibrated per-tensor scale (static); float32
    accumulation and the row-wise scales applied in the kernel, bfloat16 out (what the row-wise kernel gives),
    then the model dtype."""

    def __init__(self, w: torch.Tensor, w_scale: torch.Tensor, input_scale: torch.Tensor | None,
                 bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        n, k = w.shape
        if n % 16 or k % 16:
            raise Unsupported(f"FP8 GEMMs tile by 16 (a {n} x {k} weight)")
        self.out_features, self.in_features, self.dtype = n, k, dtype
        self.register_buffer("weight", w.contiguous())  # [N, K]; .t() is the column-major [K, N] the kernel wants
        self.register_buffer("weight_scale", w_scale.float().reshape(-1).expand(n).reshape(1, n).contiguous())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1, 1))
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if self.input_scale is None:
            sx = x2.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        else:
            sx = self.input_scale.expand(x2.shape[0], 1).contiguous()
        xq = (x2 / sx).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        if xq.is_cuda or cpu_rowwise_scaled_mm():
            y = torch._scaled_mm(xq, self.weight.t(), sx, self.weight_scale, out_dtype=torch.bfloat16)
        else:  # a CPU build of torch with per-tensor scales only (2.11): the same product, unfused
            y = ((xq.float() * sx) @ (self.weight.float() * self.weight_scale.t()).t()).to(torch.bfloat16)
        y = y.to(self.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


# -- what a quantized Linear holds, read from a checkpoint ----------------------------------------------------
@dataclass
class Int4Weight:
    """W = (u - zero_u) * scale per group of K columns: u [N, K] unsigned 0..15, scale and zero_u [N, G]
    (zero_u None: 8, symmetric)."""
    u: torch.Tensor
    scale: torch.Tensor
    zero_u: torch.Tensor | None


@dataclass
class Int8Weight:
    """W = q * scale per output channel (q [N, K] int8, scale [N]); activations int8 per token when `dynamic`."""
    q: torch.Tensor
    scale: torch.Tensor
    dynamic: bool


@dataclass
class Fp8Weight:
    """FP8 E4M3 w [N, K] with a float32 scale per output channel; `input_scale` (static) or None (per token)."""
    w: torch.Tensor
    scale: torch.Tensor
    input_scale: torch.Tensor | None


@dataclass
class DenseWeight:
    w: torch.Tensor


QWeight = Int4Weight | Int8Weight | Fp8Weight | DenseWeight


def _main(rec: QWeight) -> torch.Tensor:
    return rec.u if isinstance(rec, Int4Weight) else rec.q if isinstance(rec, Int8Weight) else rec.w


def out_features(rec: QWeight) -> int:
    return int(_main(rec).shape[0])


def device_of(rec: QWeight) -> torch.device:
    return _main(rec).device


def concat(recs: list[QWeight]) -> QWeight | None:
    """One weight with the outputs of all of `recs` (fused projections read their input once), or None where
    they cannot share a kernel call (different kinds, group sizes or static activation scales)."""
    kinds = {type(r) for r in recs}
    if len(kinds) != 1:
        return None
    first = recs[0]
    if isinstance(first, DenseWeight):
        return DenseWeight(torch.cat([r.w for r in recs]))
    if isinstance(first, Int4Weight):
        if len({r.scale.shape[1] for r in recs}) != 1:
            return None
        zeros = None
        if any(r.zero_u is not None for r in recs):
            zeros = torch.cat([torch.full_like(r.scale, 8) if r.zero_u is None else r.zero_u.to(r.scale.dtype)
                               for r in recs])
        return Int4Weight(torch.cat([r.u for r in recs]), torch.cat([r.scale for r in recs]), zeros)
    if isinstance(first, Int8Weight):
        if len({r.dynamic for r in recs}) != 1:
            return None
        return Int8Weight(torch.cat([r.q for r in recs]), torch.cat([r.scale for r in recs]), first.dynamic)
    if any(r.input_scale is not None for r in recs):
        if not all(r.input_scale is not None and torch.equal(r.input_scale, first.input_scale) for r in recs):
            return None
    return Fp8Weight(torch.cat([r.w for r in recs]), torch.cat([r.scale for r in recs]), first.input_scale)


def build(rec: QWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """The kernel module of one (possibly fused) weight, on the device its tensors are on: Marlin on a CUDA GPU
    where it runs (`marlin.unusable()`), else torch's kernels; the reason Marlin was not used is kept on the
    module (`fallback`)."""
    dev = device_of(rec)
    fallback = None
    if dev.type == "cuda" and isinstance(rec, Int4Weight | Int8Weight) and not (isinstance(rec, Int8Weight)
                                                                                 and rec.dynamic):
        from quantpipe.runtimes import marlin

        bits = 4 if isinstance(rec, Int4Weight) else 8
        n, k = _main(rec).shape
        g = rec.scale.shape[1] if bits == 4 else 1
        fallback = marlin.unusable() or marlin.shape_problem(n, k, k // g, bits, dtype)
        if fallback is None:
            if bits == 4:
                lin = marlin.MarlinLinear(rec.u, rec.scale, rec.zero_u, 4, bias, dtype)
                if marlin.one_row_tinygemm() and rec.u.numel() <= marlin.ONE_ROW_MAX_ELEMENTS:
                    try:
                        lin.use_one_row(int4_from_unsigned(rec.u, rec.scale, rec.zero_u, None, torch.bfloat16),
                                        KERNEL_NAMES[Int4Linear])
                    except Unsupported:  # tinygemm's group sizes are narrower than Marlin's: Marlin alone
                        pass
                return lin
            return marlin.MarlinLinear((rec.q.to(torch.int16) + 128).to(torch.uint8), rec.scale.reshape(-1, 1),
                                        None, 8, bias, dtype)
    if isinstance(rec, DenseWeight):
        lin = nn.Linear(rec.w.shape[1], rec.w.shape[0], bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(rec.w.to(dtype), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        mod: nn.Module = lin
    elif isinstance(rec, Int4Weight):
        mod = int4_from_unsigned(rec.u, rec.scale, rec.zero_u, bias, dtype)
    elif isinstance(rec, Int8Weight):
        mod = Int8DynamicLinear(rec.q, rec.scale, bias) if rec.dynamic else Int8Linear(rec.q, rec.scale, bias, dtype)
    else:
        mod = Fp8Linear(rec.w, rec.scale, rec.input_scale, bias, dtype)
    mod.fallback = fallback
    return mod


def kernel_name(mod: nn.Module) -> str:
    """One line naming what computes a module's matmul (and why Marlin did not, where it was passed over)."""
    name = (getattr(mod, "label", None) or KERNEL_NAMES.get(type(mod))
            or f"dense {str(getattr(mod, 'weight', torch.empty(0)).dtype)[6:]} matmul")
    why = getattr(mod, "fallback", None)
    return f"{name}; Marlin not used: {why}" if why else name


# -- reading quantized checkpoints --------------------------------------------------------------------------
# Temporaries of unpacking/packing stay under this many bytes per chunk of rows, whatever the layer's size: a
# 152k-row lm_head unpacked whole in int32/int64 temporaries took ~10 GiB on the GPU at load (docs/benchmarks.md).
CHUNK_BYTES = 64 << 20


def row_chunks(rows: int, bytes_per_row: int) -> range:
    """Start rows of chunks whose temporaries stay under CHUNK_BYTES (one chunk while torch.compile traces, so a
    compiled caller gets one vectorized graph, not an unrolled loop)."""
    if torch.compiler.is_compiling():
        return range(0, rows, max(rows, 1))
    return range(0, rows, max(1, CHUNK_BYTES // max(1, bytes_per_row)))


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned `bits`-bit values packed densely into int32 along `dim` (first value in the lowest bits), as
    compressed-tensors and GPTQ write them; bits 4 or 8 (no value crosses a word). Returns uint8, unpacked in
    chunks of rows so that loading a large Linear needs its values' bytes plus CHUNK_BYTES, not 8-16 times more."""
    if bits not in (4, 8):
        raise Unsupported(f"{bits}-bit packing")
    per, mask = 32 // bits, (1 << bits) - 1
    p = packed.t() if dim == 0 else packed
    rows, words = p.shape
    shifts = torch.arange(0, 32, bits, device=p.device, dtype=torch.int32)
    u = torch.empty(rows, words * per, dtype=torch.uint8, device=p.device)
    step = row_chunks(rows, words * per * 8)  # two int32 temporaries per value
    for r in step:
        c = p[r:r + step.step].to(torch.int32)
        u[r:r + step.step] = ((c.unsqueeze(-1) >> shifts) & mask).reshape(c.shape[0], words * per)
    return u.t().contiguous() if dim == 0 else u


def _groups(scale: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """[N, G] scales and their group size; per-channel ([N, 1]) becomes groups of 128 with the same scale."""
    g = scale.shape[1]
    if g == 1:
        group = 128 if k % 128 == 0 else k
        return scale.repeat(1, k // group), group
    return scale, k // g


def int4_from_unsigned(u: torch.Tensor, scale: torch.Tensor, zero_u: torch.Tensor | None, bias: Any,
                       dtype: torch.dtype) -> Int4Linear:
    """W = (u - zero_u) * scale (zero_u: unsigned zero point per group, None = 8), as tinygemm's (u - 8)*s + z."""
    n, k = u.shape
    scale, group = _groups(scale.float(), k)
    if zero_u is None:
        zero = torch.zeros_like(scale)
    else:
        zero_u, _ = _groups(zero_u.float(), k)
        zero = (8 - zero_u) * scale
    return Int4Linear(u, scale, zero, group, bias, dtype)


def compressed_tensors_weight(t: dict[str, torch.Tensor], qc: dict[str, Any]) -> QWeight:
    """One Linear's weight in compressed-tensors format (`t`: its tensors without the prefix)."""
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise Unsupported("compressed-tensors with several config groups")
    w, act = groups[0].get("weights") or {}, groups[0].get("input_activations")
    bits, sym = int(w.get("num_bits", 0)), bool(w.get("symmetric", True))
    if w.get("type") == "float" and bits == 8 and t.get("weight") is not None:
        if act is None or act.get("type") != "float" or act.get("num_bits") != 8:
            raise Unsupported("FP8 weights without FP8 activations")
        n = t["weight"].shape[0]
        scale = t["weight_scale"].float().reshape(-1).expand(n).contiguous()
        if act.get("dynamic") is True and act.get("strategy") == "token":
            return Fp8Weight(t["weight"], scale, None)
        if act.get("dynamic") is False and act.get("strategy") == "tensor" and "input_scale" in t:
            return Fp8Weight(t["weight"], scale, t["input_scale"].float().reshape(1, 1))
        raise Unsupported(f"FP8 weights with {act.get('strategy')} activations")
    if w.get("type") == "float" and bits == 4:
        raise Unsupported("FP4 weights (NVFP4/MXFP4): no FP4 kernel here (FP4 tensor cores are Blackwell's)")
    if w.get("type") != "int":
        raise Unsupported(f"compressed-tensors {w.get('type')} weights")
    if "weight_packed" in t:
        n, k = (int(x) for x in t["weight_shape"].tolist())
        u = unpack_int32(t["weight_packed"], bits, 1)[:, :k]  # unsigned: signed value + 2^(bits-1)
        if act is not None:
            raise Unsupported("packed weights with quantized activations")
        if bits == 8:
            if not sym:
                raise Unsupported("asymmetric 8-bit packed weights")
            return Int8Weight((u.to(torch.int16) - 128).to(torch.int8), t["weight_scale"].reshape(-1), False)
        zp = None
        if "weight_zero_point" in t:  # signed zero point, packed along the output dim
            zp = unpack_int32(t["weight_zero_point"], bits, 0)[:n]  # packed like the weights: signed + 8
        return Int4Weight(u, t["weight_scale"].float(), None if zp is None else zp.float())
    if t.get("weight") is not None and t["weight"].dtype == torch.int8:
        if not sym or "weight_zero_point" in t and t["weight_zero_point"].abs().max() > 0:
            raise Unsupported("asymmetric int8 weights")
        if act is None:
            return Int8Weight(t["weight"], t["weight_scale"].reshape(-1), False)
        if act.get("dynamic") and act.get("strategy") == "token" and act.get("num_bits") == 8 and act.get(
                "symmetric", True):
            return Int8Weight(t["weight"], t["weight_scale"].reshape(-1), True)
        raise Unsupported(f"int8 weights with {act.get('strategy')} activations")
    raise Unsupported("compressed-tensors tensors " + ", ".join(sorted(t)))


def gptq_weight(t: dict[str, torch.Tensor], qc: dict[str, Any]) -> QWeight:
    """GPTQ v1 checkpoint (`gptq` format): qweight [K/8, N], qzeros [G, N/8] storing zero - 1, scales [G, N]."""
    bits = int(qc.get("bits", 0))
    if bits != 4:
        raise Unsupported(f"{bits}-bit gptq")
    if qc.get("checkpoint_format", "gptq") != "gptq":
        raise Unsupported(f"gptq checkpoint_format {qc.get('checkpoint_format')}")
    u = unpack_int32(t["qweight"], 4, 0)  # [K, N]
    k, n = u.shape
    scales = t["scales"].float().t().contiguous()  # [N, G]
    group = k // scales.shape[1]
    g_idx = t.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(k) // group):
        raise Unsupported("gptq with act-order (g_idx permutes the input columns)")
    zeros = (unpack_int32(t["qzeros"], 4, 1)[:, :n] + 1).float().t().contiguous()  # [N, G]
    return Int4Weight(u.t().contiguous(), scales, zeros)


def torchao_weight(t: dict[str, torch.Tensor], qc: dict[str, Any]) -> QWeight:
    """torchao Int8Tensor (our `int8` method): `_weight_qdata` int8 [N, K], `_weight_scale` [N, 1], zero 0."""
    zp = t.get("_weight_zero_point")
    if zp is not None and zp.abs().max() > 0:
        raise Unsupported("torchao int8 with a zero point")
    kind = json.dumps(qc.get("quant_type", {}))
    if "Int8WeightOnlyConfig" in kind:
        return Int8Weight(t["_weight_qdata"], t["_weight_scale"].reshape(-1), False)
    if "Int8DynamicActivationInt8WeightConfig" in kind:
        return Int8Weight(t["_weight_qdata"], t["_weight_scale"].reshape(-1), True)
    raise Unsupported(f"torchao {kind[:60]}")


# quantization_config.quant_method -> (marker tensor of a quantized Linear, builder)
LAYOUTS = {"compressed-tensors": (("weight_scale",), compressed_tensors_weight),
           "gptq": (("qweight",), gptq_weight),
           "torchao": (("_weight_qdata",), torchao_weight)}


def _read_tensors(artifact_dir: Path, device: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(artifact_dir).glob("*.safetensors"))
    if not files:
        raise QuantpipeError(f"{artifact_dir}: no .safetensors files")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f), device=device))
    return out


Reader = Callable[[], QWeight]


def load_parts(artifact_dir: Path, device: str) -> tuple[nn.Module, dict[str, tuple[Reader, Any]], torch.dtype]:
    """The artifact's model on `device` with every tensor loaded but its quantized Linears' (left on the meta
    device), those Linears' weight readers and biases by module name (empty for a float artifact), and the model
    dtype. A reader unpacks its Linear's checkpoint tensors when called: callers read one layer at a time and
    drop what they built from (unpacked 4-bit values take 8 times the packed bytes)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((Path(artifact_dir) / "config.json").read_text())
    qc = raw.get("quantization_config")
    if qc is None:
        model = AutoModelForCausalLM.from_pretrained(artifact_dir, dtype="auto", device_map=device)
        return model.eval(), {}, model.dtype
    method = qc.get("quant_method")
    if method not in LAYOUTS:
        raise Unsupported(f"quant_method {method}")
    markers, read = LAYOUTS[method]
    if qc.get("kv_cache_scheme"):
        raise Unsupported("a quantized KV cache (k_scale, v_scale): the compiled engine's static cache holds the "
                          "model dtype")
    config = AutoConfig.from_pretrained(artifact_dir)
    del config.quantization_config  # the skeleton is a float model; its Linears are replaced below
    dtype = getattr(torch, str(raw.get("dtype") or raw.get("torch_dtype") or "float32").removeprefix("torch."))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _read_tensors(artifact_dir, device)
    records: dict[str, tuple[Reader, Any]] = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or f"{name}.{markers[0]}" not in tensors:
            continue
        own = {k[len(name) + 1:]: tensors.pop(k) for k in list(tensors) if k.startswith(name + ".")
               and "." not in k[len(name) + 1:]}
        bias = own.pop("bias", None)
        records[name] = (partial(read, own, qc), None if bias is None else bias.to(dtype))
    if not records:
        raise Unsupported(f"no Linear of the {method} checkpoint has the tensors {markers}")
    floats = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    unexpected = model.load_state_dict(floats, strict=False, assign=True).unexpected_keys
    if config.tie_word_embeddings:
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta and n.rpartition(".")[0] not in records]
    if unexpected or left:
        raise QuantpipeError(f"{artifact_dir}: tensors the model does not have: {unexpected[:3]}; "
                             f"parameters with no tensor: {left[:3]}")
    return model, records, dtype


def load_model(artifact_dir: Path, device: str) -> tuple[nn.Module, str]:
    """The artifact's model on `device` with its quantized Linears on kernels; and a line naming the kernels."""
    model, records, dtype = load_parts(artifact_dir, device)
    if not records:
        return model, f"torch dense matmul ({model.dtype})".replace("torch.", "")
    kinds: set[str] = set()
    for name in list(records):
        reader, bias = records.pop(name)
        new = build(reader(), bias, dtype)
        kinds.add(kernel_name(new))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    model.to(device)
    return model.eval(), "; ".join(sorted(kinds))


KERNEL_NAMES = {Int4Linear: "int4 tinygemm (_weight_int4pack_mm)", Int8Linear: "int8 weight-only (_weight_int8pack_mm)",
                Int8DynamicLinear: "int8 x int8 dynamic per-token (_int_mm)", Fp8Linear: "fp8 e4m3 x fp8 (_scaled_mm)"}
