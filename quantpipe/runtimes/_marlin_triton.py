"""Dequantization of a Marlin-layout weight to bfloat16 on the GPU, for prompts (marlin.MarlinLinear): one
Triton program per strip of 16 x 64 tiles reads the tiles' packed words contiguously, unpacks them and writes
every value at its place in W^T [K, N], found in a table of the tile order (read back from the repack itself by
marlin._tile_order). Not a GEMM: the product runs on cuBLAS afterwards. Imported only where Triton and a CUDA
device are present; marlin.dequantize (torch.compile's gather) is the same arithmetic everywhere else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_K, TILE_N = 16, 64


@triton.jit
def _dequant(q_ptr, kl_ptr, nl_ptr, s_ptr, z_ptr, out_ptr, N, NT, GROUP: tl.constexpr, BITS: tl.constexpr,
             WORDS: tl.constexpr, TILES: tl.constexpr, HAS_ZP: tl.constexpr, MID: tl.constexpr):
    PER: tl.constexpr = 32 // BITS
    kt = tl.program_id(0)
    nt0 = tl.program_id(1) * TILES
    t = tl.arange(0, TILES)[:, None, None]
    w = tl.arange(0, WORDS)[None, :, None]
    j = tl.arange(0, PER)[None, None, :]
    words = tl.load(q_ptr + (kt * NT + nt0 + t) * WORDS + w)  # [TILES, WORDS, 1] int32, contiguous
    vals = (words >> (j * BITS)) & ((1 << BITS) - 1)  # [TILES, WORDS, PER]
    slot = w * PER + j
    k = kt * 16 + tl.load(kl_ptr + slot)
    n = (nt0 + t) * 64 + tl.load(nl_ptr + slot)
    g = k // GROUP
    s = tl.load(s_ptr + g * N + n).to(tl.float32)
    if HAS_ZP:
        z = tl.load(z_ptr + g * N + n).to(tl.float32)
    else:
        z = MID
    tl.store(out_ptr + k * N + n, ((vals.to(tl.float32) - z) * s).to(tl.bfloat16))


def tables(order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-tile row and column (int32) of each slot, from `order` (slot -> k * 64 + n)."""
    return (order // TILE_N).to(torch.int32), (order % TILE_N).to(torch.int32)


def dequantize(qm: torch.Tensor, kl: torch.Tensor, nl: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               bits: int, k: int, n: int, group: int) -> torch.Tensor:
    """W^T [K, N] in bfloat16 from Marlin words `qm` [K/16, N*16/(32/bits)]: (u - zero) * scale, `scale` and
    `zero` [K/group, N] in natural order (zero None: the symmetric midpoint); `kl`, `nl`: `tables(order)`."""
    per = 32 // bits
    words = TILE_K * TILE_N // per
    nt = n // TILE_N
    tiles = next(t for t in (8, 4, 2, 1) if nt % t == 0)
    out = torch.empty(k, n, dtype=torch.bfloat16, device=qm.device)
    s = scale.contiguous()
    z = s if zero is None else zero.contiguous()
    _dequant[(k // TILE_K, nt // tiles)](qm, kl, nl, s, z, out, n, nt, GROUP=group, BITS=bits, WORDS=words,
                                          TILES=tiles, HAS_ZP=zero is not None, MID=1 << (bits - 1))
    return out
