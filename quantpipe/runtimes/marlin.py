"""Marlin weight-only GEMMs (4-bit GPTQ/AWQ-style and 8-bit weights, bfloat16 activations) for the compiled
runtime on an NVIDIA GPU: the kernels vLLM and GPTQModel run such checkpoints on.

This file owns where the kernel comes from, the weight layouts it wants and `MarlinLinear`:
- the CUDA sources ship in the `gptqmodel` package (`gptqmodel_ext/marlin`); they are compiled just in time with
  nvcc (`torch.utils.cpp_extension.load`, once per machine and torch build, cached under ~/.cache/quantpipe) without
  importing gptqmodel's Python (whose imports want packages a GPU image may lack). `QUANTPIPE_MARLIN_SO` names a
  prebuilt library to load instead;
- the checkpoint on disk stays the standard one: its unsigned values are packed along K (GPTQ's layout), repacked by
  the kernel library's own `gptq_marlin_repack` at load time, and the scales and zero points permuted here;
- prefill of more than PREFILL_ROWS rows dequantizes the layer to bfloat16 from the Marlin layout (the position
  of every value in a 16 x 64 tile is read back from the repack itself; _marlin_triton's kernel reads the tiles
  contiguously, torch.compile's gather is the fallback) and runs the dense GEMM, where Marlin is slower than
  cuBLAS; decode and short prompts run on Marlin.
On a CPU nothing here runs: `unusable()` says why, and the loader keeps torch's kernels (QUANTPIPE_MARLIN=0 turns
Marlin off on a GPU too, for comparisons).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantpipe.errors import QuantpipeError
from quantpipe.runtimes.kernels import row_chunks, unpack_int32

OPS_NAMESPACE = "gptqmodel_marlin_bf16"  # the TORCH_LIBRARY name in the shipped bf16 binding
TILE_K, TILE_N = 16, 64  # one Marlin tile of the repacked weight
# Above this many rows a layer is dequantized to bfloat16 for the dense GEMM (QUANTPIPE_MARLIN_PREFILL_ROWS).
# Measured on the H200 (Qwen2-7B layer shapes, `decode_probe.py crossover`, sixth session): replayed from a CUDA
# graph, as the compiled runtime runs a prompt shape it has seen, dequantizing with the `fields` kernel wins
# from 256 rows (512 rows: 0.528 ms a layer against Marlin's 0.695); called eagerly, where the host's launch
# time counts, only from 1024. The 7B's 512-token prompt: 19.69 ms dequantized against 24.99 on Marlin.
PREFILL_ROWS = 255


def prefill_rows() -> int:
    """PREFILL_ROWS, or QUANTPIPE_MARLIN_PREFILL_ROWS where set (for comparisons)."""
    raw = os.environ.get("QUANTPIPE_MARLIN_PREFILL_ROWS")
    if raw is None:
        return PREFILL_ROWS
    if not raw.isdigit():
        raise QuantpipeError(f"QUANTPIPE_MARLIN_PREFILL_ROWS={raw}: a whole number of rows (default {PREFILL_ROWS})")
    return int(raw)


GROUPS = (32, 64, 128)  # group sizes its kernels are generated for (and channelwise)


# At one row (batch-1 decode) Marlin's fixed grid leaves small weights short of work: on the H200 the 7B's
# 3584-wide attention projections (fused q/k/v 4608 x 3584, o_proj 3584 x 3584) ran on Marlin at 0.83 and 0.60
# TB/s (1.07x and 1.05x bf16's cuBLAS) and on tinygemm at 1.29x and 1.78x bf16; the MLP projections and lm_head
# ran faster on Marlin (1.9-2.3x bf16), and at 8 rows tinygemm is behind on every shape (`decode_probe.py
# marlin-opts`, docs/benchmarks.md). So each 4-bit weight of at most ONE_ROW_MAX_ELEMENTS values gets a tinygemm
# copy for one-row calls: the 7B's W4 (lm_head 4-bit) step went from 2.663 to 2.491 ms, 1.85x bf16 at batch 1 in
# the same run (fifth session). It costs the copy's memory (~411 MB, ~9 % of a 7B's W4 weights; plan.bench_memory
# counts it); QUANTPIPE_ONE_ROW_TINYGEMM=0 turns it off.
ONE_ROW_MAX_ELEMENTS = 24 << 20


def _switch(name: str, default: str, meaning: str) -> bool:
    """An on/off environment switch: `name` set to 1 or 0 (`default` where unset); anything else is an error
    that says what each value means (`meaning`: "1 (...) or 0 (...)")."""
    raw = os.environ.get(name, default)
    if raw not in ("0", "1"):
        raise QuantpipeError(f"{name}={raw}: {meaning}")
    return raw == "1"


def one_row_tinygemm() -> bool:
    """Whether small 4-bit weights get a tinygemm copy for one-row calls (QUANTPIPE_ONE_ROW_TINYGEMM, default 1)."""
    return _switch("QUANTPIPE_ONE_ROW_TINYGEMM", "1", "1 (a tinygemm copy for one row, the default) or 0")


def prefill_prefetch() -> bool:
    """Whether a prompt dequantizes the next layer's weights on a second CUDA stream while this layer computes
    (QUANTPIPE_PREFILL_PREFETCH=1; `prefetch`): the dequantization reads and writes memory, the prompt's GEMMs
    are bound by arithmetic, so the two can overlap."""
    return _switch("QUANTPIPE_PREFILL_PREFETCH", "0", "1 (dequantize the next layer during a prompt) or 0")


def fp32_reduce() -> bool:
    """Whether Marlin sums the partial products of a split K in float32 (vLLM's default, the one measured in
    docs/benchmarks.md) or in bfloat16 in the output itself (QUANTPIPE_MARLIN_FP32_REDUCE=0, for comparisons:
    `scripts/decode_probe.py marlin-opts` times both)."""
    return _switch("QUANTPIPE_MARLIN_FP32_REDUCE", "1", "1 (float32 partial sums) or 0 (bfloat16)")

_STATE: dict[str, Any] = {}


def scalar_type_id(bits: int, bias: int) -> int:
    """The kernel library's id of an unsigned `bits`-bit type stored with `bias` (uint4b8 = GPTQ symmetric,
    uint4 = with zero points, uint8b128 = symmetric 8-bit): exponent 0 | mantissa bits << 8 | signed 0 << 16 |
    bias << 17 | finite-only 0 << 49 | nan representation IEEE (1) << 50."""
    return bits << 8 | bias << 17 | 1 << 50


# -- where the kernel comes from ----------------------------------------------------------------------------
def sources_dir() -> Path | None:
    spec = importlib.util.find_spec("gptqmodel_ext")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "marlin"
    return root if (root / "marlin_torch_bf16.cpp").exists() else None


def _build_dir() -> Path:
    cc = "".join(str(x) for x in torch.cuda.get_device_capability())
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-sm{cc}".replace("+", "_")
    return Path(os.environ.get("QUANTPIPE_MARLIN_BUILD", Path.home() / ".cache" / "quantpipe" / "marlin" / tag))


def prepare_sources(build: Path) -> list[str]:
    """Copy the shipped Marlin sources into `build`/src (the package directory may be read-only), generate the
    kernel instances there with the package's own generator, and return the files to compile (bfloat16)."""
    root = sources_dir()
    if root is None:
        raise RuntimeError("no gptqmodel_ext/marlin sources")
    src = build / "src"
    shutil.copytree(root, src, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    if subprocess.run([sys.executable, "generate_kernels.py", "--check"], cwd=src, capture_output=True).returncode:
        gen = subprocess.run([sys.executable, "generate_kernels.py"], cwd=src, capture_output=True, text=True)
        if gen.returncode:
            raise RuntimeError(f"Marlin kernel generation failed: {(gen.stderr or gen.stdout).strip()[-300:]}")
    kernels = sorted(str(p) for p in src.glob("kernel_bf16_*.cu"))
    return [str(src / n) for n in ("marlin_torch_bf16.cpp", "gptq_marlin_bf16.cu", "gptq_marlin_repack.cu",
                                    "awq_marlin_repack.cu")] + kernels


def _compile() -> None:
    """Compile the bfloat16 library (cached in the build directory: a later process only loads it)."""
    from torch.utils.cpp_extension import load

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = ".".join(str(x) for x in torch.cuda.get_device_capability())
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    build = _build_dir()
    build.mkdir(parents=True, exist_ok=True)
    sources = prepare_sources(build)
    flags = ["-O3", "-DENABLE_BF16"]
    load(name="quantpipe_marlin_bf16", sources=sources, build_directory=str(build), is_python_module=False,
         extra_include_paths=[str(build / "src")], extra_cflags=flags,
         extra_cuda_cflags=[*flags, "--threads", "4", "-diag-suppress=179,39,177",
                            "-static-global-template-stub=false"],
         verbose=os.environ.get("QUANTPIPE_MARLIN_VERBOSE") == "1")


def unusable() -> str | None:
    """Why Marlin cannot run in this process (None: it can; the library is compiled on the first call)."""
    if "reason" in _STATE:
        return _STATE["reason"]
    reason = None
    so = os.environ.get("QUANTPIPE_MARLIN_SO")
    if os.environ.get("QUANTPIPE_MARLIN") == "0":
        reason = "turned off (QUANTPIPE_MARLIN=0)"
    elif not torch.cuda.is_available():
        reason = "Marlin needs an NVIDIA GPU"
    elif torch.cuda.get_device_capability() < (8, 0):
        reason = "Marlin's bfloat16 kernels need compute capability 8.0 or later"
    elif so:
        try:
            torch.ops.load_library(so)
        except (OSError, RuntimeError) as e:
            reason = f"QUANTPIPE_MARLIN_SO={so} does not load ({str(e)[:120]})"
    elif sources_dir() is None:
        reason = "Marlin's sources come with the gptqmodel package (pip install 'quantpipe[gptqmodel]')"
    elif shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        reason = "Marlin is compiled on first use and needs nvcc (the CUDA toolkit), which is not on PATH"
    else:
        try:
            _compile()
        except Exception as e:  # a compiler's failure is a reason to fall back, with its last words
            reason = f"compiling Marlin failed: {' '.join(str(e).split())[-200:]}"
    if reason is None:
        _register_op()
    _STATE["reason"] = reason
    return reason


def _register_op() -> None:
    """`quantpipe::marlin_gemm`: the kernel as a custom op with a shape function, so torch.compile can trace a
    step that calls it (and capture it in a CUDA graph)."""
    if "op" in _STATE:
        return
    ops = getattr(torch.ops, OPS_NAMESPACE)

    @torch.library.custom_op("quantpipe::marlin_gemm", mutates_args=())
    def marlin_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    workspace: torch.Tensor, type_id: int, n: int, k: int, fp32_reduce: bool) -> torch.Tensor:
        # flags: is_k_full, use_atomic_add (it only engages for N <= 2048), use_fp32_reduce, is_zp_float
        return ops.gptq_marlin_gemm_bf16(x, None, qweight, None, scales, None, zeros, None, None, workspace, type_id,
                                         x.shape[0], n, k, True, False, fp32_reduce, False)

    @marlin_gemm.register_fake
    def _(x, qweight, scales, zeros, workspace, type_id, n, k, fp32_reduce):  # noqa: ANN001, ANN202
        return x.new_empty(x.shape[0], n)

    _STATE["op"] = marlin_gemm
    _STATE["ops"] = ops


# -- layouts ------------------------------------------------------------------------------------------------
def _pack_rows(v: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] unsigned values -> [R, C / (32 / bits)] int32, consecutive values of a row in one word, the first in
    the lowest bits (the inverse of kernels.unpack_int32 along dim 1); in chunks of rows (kernels.row_chunks)."""
    per = 32 // bits
    r, c = v.shape
    shifts = torch.arange(per, device=v.device) * bits
    out = torch.empty(r, c // per, dtype=torch.int32, device=v.device)
    step = row_chunks(r, c * 24)  # int64 values, shifted, and the sum's word per value
    for i in step:
        part = v[i:i + step.step]
        word = (part.to(torch.int64).reshape(part.shape[0], c // per, per) << shifts).sum(-1)
        out[i:i + step.step] = torch.where(word >= 2**31, word - 2**32, word)
    return out


def pack_along_k(u: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] unsigned values -> [K / (32 / bits), N] int32, consecutive K values in one word, the first in the
    lowest bits (GPTQ's qweight layout, what the repack reads)."""
    return _pack_rows(u, bits).t().contiguous()


def _interleave(bits: int) -> list[int]:
    """The kernel's order of the zero points inside one packed word."""
    return [0, 2, 4, 6, 1, 3, 5, 7] if bits == 4 else [0, 2, 1, 3]


def _scale_perms() -> tuple[list[int], list[int]]:
    """The kernel's order of grouped scales (8 x 8 blocks transposed) and of per-channel scales."""
    grouped = [i + 8 * j for i in range(8) for j in range(8)]
    single = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    return grouped, single


def permute_scales(s: torch.Tensor, channelwise: bool) -> torch.Tensor:
    """[G, N] scales in the order Marlin reads them."""
    grouped, single = _scale_perms()
    perm = single if channelwise else grouped
    return s.reshape(-1, len(perm))[:, perm].reshape(s.shape).contiguous()


def pack_zero_points(z: torch.Tensor, bits: int) -> torch.Tensor:
    """[G, N] unsigned zero points -> [G, N / (32 / bits)] int32: permuted like grouped scales, interleaved for
    the kernel's dequantization, consecutive columns packed into one word (first in the lowest bits)."""
    grouped, _ = _scale_perms()
    g, n = z.shape
    z = z.reshape(-1, len(grouped))[:, grouped]
    inter = _interleave(bits)
    return _pack_rows(z.reshape(-1, len(inter))[:, inter].reshape(g, n), bits)


def _tile_order(bits: int, device: torch.device) -> torch.Tensor:
    """For each (word, slot) of one repacked 16 x 64 tile, the index k * 64 + n of the value it holds: read back
    by repacking tiles whose values spell their own positions, `bits` bits at a time."""
    key = f"order{bits}"
    if key not in _STATE:
        ops, per = _STATE["ops"], 32 // bits
        pos = torch.arange(TILE_K * TILE_N, device=device).reshape(TILE_K, TILE_N)  # [k, n]
        order = torch.zeros(TILE_K * TILE_N // per, per, dtype=torch.int64, device=device)
        for r in range(-(-10 // bits)):
            digit = (pos >> (r * bits)) & ((1 << bits) - 1)
            words = ops.gptq_marlin_repack(pack_along_k(digit.t(), bits), torch.empty(0, dtype=torch.int32,
                                           device=device), TILE_K, TILE_N, bits).reshape(1, -1)
            order |= unpack_int32(words, bits, 1).reshape(-1, per).to(torch.int64) << (r * bits)
        order = order.reshape(-1)
        # the order must hold for every tile of a larger weight (the prefill path relies on it): check once
        u = torch.randint(0, 1 << bits, (128, 256), device=device)
        qm = ops.gptq_marlin_repack(pack_along_k(u, bits), torch.empty(0, dtype=torch.int32, device=device),
                                    256, 128, bits)
        if not torch.equal(_unpermute(qm, torch.argsort(order), bits, 256, 128), u.t().to(torch.int32)):
            raise RuntimeError("the Marlin tile order read back does not reproduce a repacked weight")
        _STATE[key] = order
    return _STATE[key]


# The tile order of gptq_marlin_repack as a permutation of bit fields: a value's slot in a tile (word * per +
# place in the word) written in bits is six fields of sizes (8, 4, 4, 2, 2, 2), most significant first, and its
# position k * 64 + n is the same fields in another order (k: 4 bits, n: 6). 4-bit: slot (c, r, w, a, b, d) holds
# k = (d, r, a), n = (w, b, c); 8-bit: k = (d, r, b), n = (w, a, c). Read off the repack kernel's indexing
# (each thread's mma fragment rows and columns, then the interleave inside a word); `fields_match` checks it
# against the order read back, and the `fields` dequantizer runs only where it holds.
TILE_FIELDS = {4: ((8, 4, 4, 2, 2, 2), (5, 1, 3, 2, 4, 0)), 8: ((8, 4, 4, 2, 2, 2), (5, 1, 4, 2, 3, 0))}


def fields_order(bits: int) -> torch.Tensor:
    """TILE_FIELDS' tile order in `_tile_order`'s form: for each slot, the position k * 64 + n it holds."""
    sizes, perm = TILE_FIELDS[bits]
    slot_at = torch.arange(TILE_K * TILE_N).reshape(sizes).permute(perm).reshape(-1)  # position -> slot
    order = torch.empty_like(slot_at)
    order[slot_at] = torch.arange(TILE_K * TILE_N)
    return order


def fields_match(bits: int, device: torch.device) -> bool:
    """Whether the tile order read back from this build's repack is TILE_FIELDS' (once per process)."""
    key = f"fields{bits}"
    if key not in _STATE:
        _STATE[key] = torch.equal(_tile_order(bits, device).cpu(), fields_order(bits))
    return _STATE[key]


def _unpermute(qm: torch.Tensor, inv: torch.Tensor, bits: int, k: int, n: int) -> torch.Tensor:
    """Marlin-layout words [K/16, N*16/per] -> unsigned values [K, N] (`inv`: slot of each in-tile position)."""
    slots = unpack_int32(qm, bits, 1)  # [K/16, N*16]: each tile's 1024 values in the kernel's order
    vals = slots.reshape(k // TILE_K, n // TILE_N, TILE_K * TILE_N)[..., inv]  # in-tile order k * 64 + n
    return vals.reshape(k // TILE_K, n // TILE_N, TILE_K, TILE_N).permute(0, 2, 1, 3).reshape(k, n)


def dequantize(qm: torch.Tensor, inv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, k: int,
               n: int, group: int) -> torch.Tensor:
    """W^T [K, N] in bfloat16 from the Marlin layout: (u - zero) * scale per group of `group` rows of K."""
    u = _unpermute(qm, inv, bits, k, n).to(torch.float32).reshape(k // group, group, n)
    w = (u - zero.float().unsqueeze(1)) * scale.float().unsqueeze(1)
    return w.reshape(k, n).to(torch.bfloat16)


def _inverses(bits: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The inverse permutations the dequantization applies (computed once per process and device)."""
    key = f"inv{bits}{device}"
    if key not in _STATE:
        grouped, single = _scale_perms()
        t = {"grouped": grouped, "single": single}
        _STATE[key] = {k: torch.argsort(torch.tensor(v)).to(device) for k, v in t.items()}
        _STATE[key]["tile"] = torch.argsort(_tile_order(bits, device))
        _STATE[key]["slots"] = _STATE[key]["tile"].to(torch.int32)  # the same, as the Triton kernel reads it
        for name in ("grouped", "single"):  # the scales' orders, as the Triton kernels read them
            _STATE[key][f"{name}32"] = _STATE[key][name].to(torch.int32)
    return _STATE[key]


_DEQUANT: dict[str, Any] = {}


def _dequant_fn() -> Any:
    if "fn" not in _DEQUANT:
        _DEQUANT["fn"] = torch.compile(dequantize, dynamic=False, fullgraph=True)
    return _DEQUANT["fn"]


# How prefill dequantizes: `fields` (the default: _marlin_triton's kernel placing the values by a permutation of
# bit fields, where TILE_FIELDS holds; else `triton` runs), `triton` (_marlin_triton's kernel reading values
# through a table of the tile order) or `gather` (torch.compile's gather, also what runs where Triton is missing).
# On the H200, in a 7B prompt's profile, `fields` moved int4 in + bf16 out at 3.34 TB/s against `triton`'s 1.14
# (second session); a kernel placing the values with tl.gather ran at 0.43-0.80x `triton` and was dropped
# (docs/benchmarks.md).
DEQUANT_MODES = ("triton", "fields", "gather")


def dequant_mode() -> str:
    """QUANTPIPE_MARLIN_DEQUANT (for comparisons): one of DEQUANT_MODES, `fields` where unset."""
    mode = os.environ.get("QUANTPIPE_MARLIN_DEQUANT", "fields")
    if mode not in DEQUANT_MODES:
        raise QuantpipeError(f"QUANTPIPE_MARLIN_DEQUANT={mode}: one of {', '.join(DEQUANT_MODES)}")
    return mode


def triton_dequant() -> Any:
    """_marlin_triton (the Triton dequantization) where Triton imports and the mode is a Triton kernel, else None
    (the compiled gather runs)."""
    if dequant_mode() == "gather":
        return None
    if "triton" not in _DEQUANT:
        mod = None
        if importlib.util.find_spec("triton") is not None:
            from quantpipe.runtimes import _marlin_triton as mod
        _DEQUANT["triton"] = mod
    return _DEQUANT["triton"]


_STREAMS: dict[torch.device, Any] = {}


def prefetch(mods: list[nn.Module], rows: int) -> None:
    """Start dequantizing, on a second stream, the weights of those `mods` (MarlinLinear on a GPU) that a call of
    `rows` rows will dequantize; each one's next such call waits for its own and takes it (`_prompt_weight`).
    The host runs ahead of the GPU in an eager prompt, so a layer's prefetch runs beside the layer before it.
    The second stream first waits for the work the current one has queued, so:
    - a weight freed after its GEMM (its memory belongs to the second stream) is not written again before that
      GEMM ran: the prefetch that may reuse it is queued after the free, behind this wait (no `record_stream`,
      which would keep every layer's weight alive until a CUDA-graph capture ends);
    - in a capture (compiled.PromptGraphs) the second stream forks from the capturing one, and each weight's
      event joins it back where the weight is used."""
    for m in mods:
        if not (isinstance(m, MarlinLinear) and m.qweight.is_cuda and rows > m.prefill_rows):
            continue
        if rows == 1 and m.one_row is not None:
            continue
        dev = m.qweight.device
        side = _STREAMS.setdefault(dev, torch.cuda.Stream(dev))
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            w = m.dequantized()
            done = torch.cuda.Event()
            done.record(side)
        m.prefetched = (w, done)


# -- the module ---------------------------------------------------------------------------------------------
def shape_problem(n: int, k: int, group: int, bits: int, dtype: torch.dtype) -> str | None:
    """Why a [N, K] weight cannot go on Marlin (None: it can)."""
    if dtype != torch.bfloat16:
        return f"Marlin is built here for bfloat16 models (this one is {str(dtype).removeprefix('torch.')})"
    if bits not in (4, 8):
        return f"{bits}-bit weights"
    if not (n % 64 == 0 and k % 128 == 0 or n % 128 == 0 and k % 64 == 0):
        return f"Marlin tiles a weight by 64 x 128 (this one is {n} x {k})"
    if group != k and group not in GROUPS:
        return f"Marlin groups are {', '.join(map(str, GROUPS))} or per channel (got {group})"
    return None


class MarlinLinear(nn.Module):
    """y = x W^T, W = (u - zero) * scale per group of input columns (`scale`, `zero_u`: [N, G]; G = 1 per
    channel), u [N, K] unsigned `bits`-bit (zero None: the symmetric midpoint, 8 or 128). Decode rows run on
    Marlin; more than PREFILL_ROWS rows on the dequantized bfloat16 weight and the dense GEMM; one row on
    `one_row` where a copy was given (use_one_row)."""

    def __init__(self, u: torch.Tensor, scale: torch.Tensor, zero_u: torch.Tensor | None, bits: int,
                 bias: torch.Tensor | None, out_dtype: torch.dtype) -> None:
        super().__init__()
        n, k = u.shape
        dev = u.device
        self.in_features, self.out_features, self.bits, self.out_dtype = k, n, bits, out_dtype
        self.group = k // scale.shape[1]
        ops = _STATE["ops"]
        self.register_buffer("qweight", ops.gptq_marlin_repack(pack_along_k(u, bits), torch.empty(
            0, dtype=torch.int32, device=dev), k, n, bits))
        s_t = scale.t().to(torch.bfloat16).contiguous()  # [G, N]
        self.register_buffer("scales", permute_scales(s_t, self.group == k))
        mid = 1 << (bits - 1)
        # the zero points for the prompt's dequantizers, in natural order ([G, N] uint8, 1/64 of the int4 weight's
        # bytes; plan.natural_zero_points): un-permuting the packed ones took about five small kernels per call.
        # A plain attribute, not a buffer: a decode step never reads it (memory.decode_bytes counts buffers).
        self.zeros_natural: torch.Tensor | None = None
        if zero_u is None or bool((zero_u == mid).all()):
            self.type_id, self.zeros = scalar_type_id(bits, mid), None
        else:
            if bits != 4:
                raise ValueError("8-bit weights with zero points")
            self.type_id = scalar_type_id(bits, 0)
            z_t = zero_u.t().contiguous()  # [G, N]
            self.register_buffer("zeros", pack_zero_points(z_t.to(torch.int32), bits))
            self.zeros_natural = z_t.to(torch.uint8)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        self.register_buffer("workspace", torch.zeros(max(sms, 128), dtype=torch.int32, device=dev))
        self.register_buffer("bias", bias)
        self.prefill_rows = prefill_rows()
        self.fp32_reduce = fp32_reduce()
        self.one_row: nn.Module | None = None
        self.prefetched: tuple[torch.Tensor, Any] | None = None  # `prefetch`: a dequantized weight and its event
        self.label = (f"Marlin W{bits}A16 (gptq_marlin_gemm{'' if self.zeros is None else ', zero points'}"
                      f"{'' if self.fp32_reduce else ', bfloat16 split-K sums'}; "
                      f"prefill over {self.prefill_rows} rows: dequantized bf16 GEMM)")
        _tile_order(bits, dev)  # read back (and checked) once per process

    def use_one_row(self, mod: nn.Module, name: str) -> None:
        """Compute one-row calls with `mod` (the same weight on another kernel, `name`). It is marked `alternate`:
        a step reads it or the Marlin words, not both (memory.decode_bytes counts one)."""
        mod.alternate = True
        self.one_row = mod
        self.label = self.label[:-1] + f"; one row: {name})"

    def dequantized(self) -> torch.Tensor:
        """W^T [K, N] in bfloat16, from the Marlin-layout weight and scales (scales un-permuted) and the zero
        points kept in natural order."""
        inv = _inverses(self.bits, self.qweight.device)
        perm_name = "single" if self.group == self.in_features else "grouped"
        perm, order = inv[perm_name], inv[f"{perm_name}32"]
        zeros = self.zeros_natural
        tri = triton_dequant() if self.qweight.is_cuda else None
        # the Triton kernels read the scales in Marlin's order through `order`: un-permuting them here was an
        # indexing kernel per call, 617 us of a 7B prompt's 20 ms on the H200 (sixth session)
        if tri is not None and dequant_mode() == "fields" and fields_match(self.bits, self.qweight.device):
            return tri.dequantize_fields(self.qweight, self.scales, zeros, self.bits, self.in_features,
                                         self.out_features, self.group, scale_order=order)
        if tri is not None:
            return tri.dequantize(self.qweight, inv["slots"], self.scales, zeros, self.bits, self.in_features,
                                  self.out_features, self.group, scale_order=order)
        scales = self.scales.reshape(-1, perm.numel())[:, perm].reshape(self.scales.shape)
        if zeros is None:
            zeros = torch.full_like(scales, 1 << (self.bits - 1))
        return _dequant_fn()(self.qweight, inv["tile"], scales, zeros, self.bits, self.in_features,
                             self.out_features, self.group)

    def _prompt_weight(self) -> torch.Tensor:
        """The dequantized weight for a prompt's GEMM: the prefetched one (once its stream has written it), else
        dequantized now."""
        if self.prefetched is None:
            return self.dequantized()
        w, done = self.prefetched
        self.prefetched = None
        torch.cuda.current_stream(w.device).wait_event(done)  # `prefetch` says why no record_stream
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.one_row is not None and x2.shape[0] == 1:
            y = self.one_row(x2)
        elif x2.shape[0] > self.prefill_rows and not torch.compiler.is_compiling():
            y = x2 @ self._prompt_weight()
        else:
            y = _STATE["op"](x2.contiguous(), self.qweight, self.scales, self.zeros, self.workspace, self.type_id,
                             self.out_features, self.in_features, self.fp32_reduce)
        y = y.to(self.out_dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
