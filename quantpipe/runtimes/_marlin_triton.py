"""Dequantization of a Marlin-layout weight to bfloat16 on the GPU, for prompts (marlin.MarlinLinear). Two
kernels, both one Triton program per block of 16 rows x up to 8 tiles writing W^T [K, N] row segments contiguously
(coalesced stores), with one row of scales (and zero points) per program (16 rows never straddle a group):
- `dequantize` (mode `triton`) reads each value from the tiles' packed words (a few KB, served by the cache) at the
  slot that a table of the tile order gives (read back from the repack itself by marlin._tile_order): any order;
- `dequantize_fields` (mode `fields`) loads the tiles' words once, contiguously, unpacks them in slot order and
  puts the values in place with one reshape/permute of the slot's bit fields (marlin.TILE_FIELDS): no table and
  no per-value word loads; used only where the order read back is that permutation (marlin.fields_match).
Not a GEMM: the product runs on cuBLAS afterwards. Imported only where Triton is installed (with CUDA torch);
marlin.dequantize (torch.compile's gather) is the same arithmetic everywhere else.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from quantpipe.runtimes.marlin import TILE_K, TILE_N


@triton.jit
def _scale_and_store(u, kt, nt0, s_ptr, z_ptr, p_ptr, out_ptr, N, GROUP: tl.constexpr, TILES: tl.constexpr,
                     HAS_ZP: tl.constexpr, MID: tl.constexpr, SPERM: tl.constexpr):
    """(u - zero) * scale of the block's [16, 64 * TILES] values u, stored in W^T's rows. SPERM > 0: the scales
    are in Marlin's order, each run of SPERM columns permuted; column n's scale sits at p_ptr[n % SPERM] of its
    run (no un-permuted copy of the scales is made per call)."""
    k = kt * 16 + tl.arange(0, 16)[:, None]
    n = nt0 * 64 + tl.arange(0, 64 * TILES)[None, :]
    g = kt * 16 // GROUP  # the block's 16 rows share a group (GROUP is a multiple of 16)
    if SPERM > 0:
        col = (n // SPERM) * SPERM + tl.load(p_ptr + n % SPERM)
    else:
        col = n
    s = tl.load(s_ptr + g * N + col).to(tl.float32)  # [1, 64 * TILES]
    if HAS_ZP:
        z = tl.load(z_ptr + g * N + n).to(tl.float32)
    else:
        z = MID
    tl.store(out_ptr + k * N + n, ((u.to(tl.float32) - z) * s).to(tl.bfloat16))


@triton.jit
def _dequant(q_ptr, inv_ptr, s_ptr, z_ptr, p_ptr, out_ptr, N, NT, GROUP: tl.constexpr, BITS: tl.constexpr,
             WORDS: tl.constexpr, TILES: tl.constexpr, HAS_ZP: tl.constexpr, MID: tl.constexpr,
             SPERM: tl.constexpr):
    PER: tl.constexpr = 32 // BITS
    kt = tl.program_id(0)
    nt0 = tl.program_id(1) * TILES
    kl = tl.arange(0, 16)[:, None]  # the block: 16 rows of K x TILES * 64 columns of N (stored contiguously)
    c = tl.arange(0, 64 * TILES)[None, :]
    slot = tl.load(inv_ptr + kl * 64 + c % 64)  # where each (k, n) of a tile sits among its 1024 slots
    word = tl.load(q_ptr + (kt * NT + nt0 + c // 64) * WORDS + slot // PER)  # the tiles' words: cached reads
    u = (word >> ((slot % PER) * BITS)) & ((1 << BITS) - 1)
    _scale_and_store(u, kt, nt0, s_ptr, z_ptr, p_ptr, out_ptr, N, GROUP, TILES, HAS_ZP, MID, SPERM)


@triton.jit
def _dequant_fields(q_ptr, s_ptr, z_ptr, p_ptr, out_ptr, N, NT, GROUP: tl.constexpr, BITS: tl.constexpr,
                    WORDS: tl.constexpr, TILES: tl.constexpr, HAS_ZP: tl.constexpr, MID: tl.constexpr,
                    SPERM: tl.constexpr):
    PER: tl.constexpr = 32 // BITS
    kt = tl.program_id(0)
    nt0 = tl.program_id(1) * TILES
    t = tl.arange(0, TILES)[:, None]
    w = tl.arange(0, WORDS)[None, :]
    words = tl.load(q_ptr + (kt * NT + nt0 + t) * WORDS + w)  # [TILES, WORDS]: the tiles' words, contiguous
    j = tl.arange(0, PER)[None, None, :]
    u = (words[:, :, None] >> (j * BITS)) & ((1 << BITS) - 1)  # [TILES, WORDS, PER]: values in slot order
    # a slot's bits as fields of sizes (8, 4, 4, 2, 2, 2) put in the order of a position's (k * 64 + n) bits:
    # marlin.TILE_FIELDS, with the tile dimension in front
    u = tl.reshape(u, (TILES, 8, 4, 4, 2, 2, 2))
    if BITS == 4:
        u = tl.permute(u, (0, 6, 2, 4, 3, 5, 1))
    else:
        u = tl.permute(u, (0, 6, 2, 5, 3, 4, 1))
    u = tl.reshape(tl.permute(tl.reshape(u, (TILES, 16, 64)), (1, 0, 2)), (16, TILES * 64))
    _scale_and_store(u, kt, nt0, s_ptr, z_ptr, p_ptr, out_ptr, N, GROUP, TILES, HAS_ZP, MID, SPERM)


def _launch(kernel: Any, qm: torch.Tensor, table: tuple[torch.Tensor, ...], scale: torch.Tensor,
            zero: torch.Tensor | None, bits: int, k: int, n: int, group: int,
            scale_order: torch.Tensor | None) -> torch.Tensor:
    """Run one of the kernels over W^T [K, N]: a program per 16 rows x up to 8 tiles (`table`: the tile order
    the table-reading kernel takes, () for `fields`; `scale_order`: see `dequantize`)."""
    nt = n // TILE_N
    tiles = next(t for t in (8, 4, 2, 1) if nt % t == 0)
    out = torch.empty(k, n, dtype=torch.bfloat16, device=qm.device)
    s = scale.contiguous()
    z = s if zero is None else zero.contiguous()
    perm = s if scale_order is None else scale_order.to(torch.int32).contiguous()
    kernel[(k // TILE_K, nt // tiles)](qm, *table, s, z, perm, out, n, nt, GROUP=group, BITS=bits,
                                       WORDS=TILE_K * TILE_N // (32 // bits), TILES=tiles,
                                       HAS_ZP=zero is not None, MID=1 << (bits - 1),
                                       SPERM=0 if scale_order is None else scale_order.numel(), num_warps=8)
    return out


def dequantize(qm: torch.Tensor, inv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
               k: int, n: int, group: int, scale_order: torch.Tensor | None = None) -> torch.Tensor:
    """W^T [K, N] in bfloat16 from Marlin words `qm` [K/16, N*16/(32/bits)]: (u - zero) * scale, `scale` and
    `zero` [K/group, N] (zero in natural order, None: the symmetric midpoint); `inv` (int32): the slot of each
    in-tile position k * 64 + n. `scale_order` None: `scale` in natural order; else `scale` as Marlin stores it,
    each run of len(scale_order) columns permuted, column j of a run at scale_order[j]."""
    return _launch(_dequant, qm, (inv,), scale, zero, bits, k, n, group, scale_order)


def dequantize_fields(qm: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, k: int, n: int,
                      group: int, scale_order: torch.Tensor | None = None) -> torch.Tensor:
    """`dequantize` for weights whose tile order is marlin.TILE_FIELDS' permutation (the caller checks that)."""
    return _launch(_dequant_fields, qm, (), scale, zero, bits, k, n, group, scale_order)
