"""
The ∞-MoE FFN in Triton kernels, forward and backward, for CUDA: triton_inf_ffn, with
fastpath.fast_inf_ffn's signature, results and tie rule (fastpath.py states the function). Used
with use_kernel=on, or auto after kernel_ok's self-check against the PyTorch path.

The Triton pipeline (N tokens, width d, hidden F = d_ff, K samples):
  forward
    1. select  For each sample and chunk of rows, the fp32 scores go to a small scratch buffer (at
               most SCRATCH_ELEMS floats, reused: never the K x N x F scores) by the torch matmul
               the PyTorch path uses. `_select_kernel` finds each row's n_keep-th largest score by
               a binary search on the float bits and stores the keep decisions as bits: K*N*F/8 B.
    2. up      `_up_kernel`: the x W1^T GEMM with everything else in its epilogue: + b1, GELU, and
               M rebuilt in registers from the keep bits and the kept values (recomputed from z and
               W_z, a d_z-deep dot per sample). Writes pre = x W1^T + b1 and a = GELU(pre) * M. M
               never reaches memory. The neuron counts and the non-zeros of M come out too.
    3. down    y = a W2^T + b2 by cuBLAS: a plain GEMM, nothing to fuse.
  backward
    4. `_down_bwd_kernel`: g = dy W2 with the epilogue rebuilding h and M: dpre = g * M * GELU'(pre)
               and dM = g * h. Then dx, dW1, dW2 and the biases are plain GEMMs/sums (cuBLAS).
    5. `_dz_kernel`, `_dwz_kernel`: dz_k = dm_k W_z and dW_z = sum_k dm_k^T z_k, where dm_k = dM/K
               on the entries sample k kept (0 elsewhere) is formed tile by tile from dM, bits.

Why it is exact. A keep decision is taken once, in the select kernel, by comparing scores with a
threshold found in those very scores; later kernels read the decision from the bits and only
recompute the *value* of a kept score. So no recomputation can change which neurons are kept (a
threshold recomputed in another summation order could drop the n_keep-th neuron). The deciding
scores are torch's fp32 product in IEEE fp32 (ieee_fp32, whatever TF32 setting the caller made), as
in the PyTorch path. Not bit-exact on a GPU: that path multiplies all rows at once and the kernel a
chunk of rows at a time, and cuBLAS may sum in another order for another shape; two scores within
a rounding error of each other can then rank differently, and at such a near-tie one path may keep
a neuron the other drops. -0.0 and +0.0 are equal floats, so -0.0 becomes +0.0 before the search.

Memory kept for backward: pre and a (N x F each, in x's dtype: the two tensors a dense FFN keeps)
and the keep bits (K/16 of one bf16 N x F tensor), plus the inputs. Not the scores, not M, not h.
Precision: fp32 inputs use full-fp32 dots ("ieee", no TF32) and match the PyTorch path tightly;
bf16 and fp16 inputs use half-precision GEMMs with fp32 accumulation and TF32 for the d_z-deep score
values (errors of the order of the dtype's rounding; the keep decisions are unaffected). Below sm80
Triton emits no tensor-core instructions for these dots, so use_kernel=auto leaves those GPUs to the
PyTorch path (kernel_ok).

On GPUs this code never ran on: `python bench.py --compile-check` compiles every kernel, in every
launch configuration the code can choose, for sm75/80/86/89/90 with Triton's own compiler (no GPU
needed). The kernel is two torch.library custom ops (forward, backward) with shape-only fake
versions, so torch.compile of the model stays one graph. use_kernel=auto asks `kernel_ok`, which
compares the kernel with the PyTorch path once per device and dtype and falls back, with one
warning, when they disagree.
"""
import os
import warnings
from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastpath import fast_inf_ffn, ieee_fp32
from model import keep_count

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only. Elsewhere these stand-ins let the kernel
    class triton:    # definitions below be read; triton_inf_ffn refuses to run without Triton.
        __version__ = None
        jit = staticmethod(lambda fn: fn)
        autotune = staticmethod(lambda *args, **kwargs: (lambda fn: fn))
        Config = staticmethod(lambda *args, **kwargs: None)

    class tl:
        constexpr = staticmethod(lambda value=None: value)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SCRATCH_ELEMS = 1 << 24  # fp32 scores held at once by the Triton path's selection (64 MB)

# ----------------------------------------------------------------------------- the Triton path
_I32_MIN = tl.constexpr(-2**31)
_F32_DOTS = tl.constexpr(INTERPRET)  # the Triton 3.9 interpreter mis-computes bf16 tl.dot: upcast


# selection
@triton.jit
def _select_kernel(s_ptr, bits_ptr, n_rows, F, NB, n_keep,
                   ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    # One program holds ROWS whole rows of scores in registers.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_F)
    r64 = rows.to(tl.int64)[:, None]
    inb = (rows[:, None] < n_rows) & (cols[None, :] < F)
    s = tl.load(s_ptr + r64 * F + cols[None, :], mask=inb, other=0.0)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0 (they are equal as floats)
    # Integer key in the order of the floats: negative floats get their magnitude bits flipped.
    b = s.to(tl.int32, bitcast=True)
    key = tl.where(inb, b ^ ((b >> 31) & 0x7FFFFFFF), _I32_MIN)
    # t = the n_keep-th largest key = the largest t with count(key >= t) >= n_keep. Decide the sign,
    # then set bits 30..0 greedily from the top (31 counting passes over registers, no sorting).
    n_pos = tl.sum((key >= 0).to(tl.int32), axis=1)
    t = tl.where(n_pos >= n_keep, 0, _I32_MIN)
    for i in range(31):
        cand = t + (1 << (30 - i))
        cnt = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
        t = tl.where(cnt >= n_keep, cand, t)
    keep = (key >= t[:, None]) & inb  # the tie rule: everything >= the n_keep-th largest
    # Pack 8 neighbouring columns per byte: bit j of byte c is column 8c + j.
    k8 = tl.reshape(keep.to(tl.int32), (ROWS, BLOCK_F // 8, 8))
    byte = tl.sum(k8 << tl.arange(0, 8)[None, None, :], axis=2)
    bc = tl.arange(0, BLOCK_F // 8)
    tl.store(bits_ptr + r64 * NB + bc[None, :], byte.to(tl.uint8),
             mask=(rows[:, None] < n_rows) & (bc[None, :] < NB))


# ----------------------------------------------------------------------------- shared pieces
@triton.jit
def _kept(bits_ptr, rows, c0, N, NB, k, BM: tl.constexpr, BN: tl.constexpr):
    # Keep decisions of sample k for rows x columns [c0, c0 + BN), c0 a multiple of 8: load the
    # BN/8 bytes of each row and spread their bits (a 2D gather of single bits would cost a pointer
    # each).
    bc = c0 // 8 + tl.arange(0, BN // 8)
    byte = tl.load(bits_ptr + (k * N + rows).to(tl.int64)[:, None] * NB + bc[None, :],
                   mask=(rows[:, None] < N) & (bc[None, :] < NB), other=0)
    bit = (byte.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bit, (BM, BN)) != 0


@triton.jit
def _mask_tile(z_ptr, wz_ptr, bits_ptr, rows, c0, N, F, DZ, NB, K,
               BM: tl.constexpr, BN: tl.constexpr, BZ: tl.constexpr, ZPREC: tl.constexpr):
    # M for a tile: the kept score values (recomputed, z_k W_z^T over d_z) averaged over the K
    # samples.
    # Also returns how many (token, sample) pairs of the tile kept each column (the neuron counts).
    # Rows/columns past the end read wrapped, valid addresses (fewer registers than 2D masks): their
    # keep bits are 0, so they contribute nothing.
    cols = c0 + tl.arange(0, BN)
    M = tl.zeros((BM, BN), tl.float32)
    n_sel = tl.zeros((BN,), tl.int32)
    for k in range(K):
        s = tl.zeros((BM, BN), tl.float32)
        for z0 in range(0, DZ, BZ):
            zc = z0 + tl.arange(0, BZ)
            zt = tl.load(z_ptr + (k * N + rows % N).to(tl.int64)[:, None] * DZ + zc[None, :],
                         mask=zc[None, :] < DZ, other=0.0)
            wzt = tl.load(wz_ptr + (cols % F)[None, :] * DZ + zc[:, None],
                          mask=zc[:, None] < DZ, other=0.0)
            s = tl.dot(zt, wzt, s, input_precision=ZPREC)
        keep = _kept(bits_ptr, rows, c0, N, NB, k, BM, BN)
        M += tl.where(keep, s, 0.0)
        n_sel += tl.sum(keep.to(tl.int32), axis=0)
    return M / K, n_sel


@triton.jit
def _gemm_tile(a_ptr, b_ptr, rows, cols, N, D, F, sbk, sbn,
               PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # A[rows, :] @ B[:, cols] for A (N, D) row-major and B (D, F) with strides (sbk, sbn), in fp32.
    # Out-of-range rows/columns read wrapped addresses: those results are never stored.
    acc = tl.zeros((BM, BN), tl.float32)
    a_rows = (rows % N).to(tl.int64)[:, None] * D
    b_cols = (cols % F)[None, :] * sbn
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        at = tl.load(a_ptr + a_rows + kk[None, :], mask=kk[None, :] < D, other=0.0)
        bt = tl.load(b_ptr + b_cols + kk[:, None] * sbk, mask=kk[:, None] < D, other=0.0)
        if _F32_DOTS:
            at, bt = at.to(tl.float32), bt.to(tl.float32)
        acc = tl.dot(at, bt, acc, input_precision=PREC)
    return acc


@triton.jit
def _gelu(u):
    # exact (erf) GELU and its derivative
    cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
    return u * cdf, cdf + u * tl.exp(-0.5 * u * u) * 0.3989422804014327


@triton.jit
def _tile(N, F, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    # First row and column of this program's output tile. Programs are ordered in groups of GROUP_M
    # row-blocks that sweep the columns together, so a weight tile is reused from L2.
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(N, BM), tl.cdiv(F, BN)
    first_m = (pid // (GROUP_M * n_n)) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    return pid_m * BM, pid_n * BN


# launch configurations
# Autotune candidates per activation dtype as (BM, BN or BF, BK, num_warps, num_stages): tiles that
# `python bench.py --compile-check` compiles without register spills for sm80, sm86, sm89 and sm90
# (on sm75 Triton emits CUDA-core code and some spill; kernel_ok leaves it to the PyTorch path).
# bf16 and fp16 share their tiles (both 2-byte tensor-core operands). fp32 takes half-depth
# (BK = 32) GEMM tiles and smaller router tiles: its full-precision dots hold their operands in
# registers (no tensor cores), and BK = 64 spills on sm80. Candidates that do not fit the device's
# per-block shared memory (64 KB on a T4; 99 KB on an RTX 3090/4090, L40S; 163 KB on an A100;
# 227 KB on an H100) are dropped before tuning by `_prune`.
_HALF_GEMM = [(128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 4), (64, 64, 64, 4, 3)]
_HALF_ROUTER = [(64, 64, 0, 8, 3), (64, 64, 0, 4, 3), (32, 64, 0, 4, 3), (64, 32, 0, 4, 3),
                (32, 32, 0, 4, 3)]
GEMM_CANDIDATES = {torch.bfloat16: _HALF_GEMM, torch.float16: _HALF_GEMM,
                   torch.float32: [(64, 128, 32, 8, 3), (64, 64, 32, 4, 4), (64, 64, 32, 4, 3)]}
DZ_CANDIDATES = {torch.bfloat16: _HALF_ROUTER, torch.float16: _HALF_ROUTER,
                 torch.float32: [(64, 32, 0, 4, 3), (32, 32, 0, 4, 3)]}
# dW_z: 32 x 32 tiles with 8 warps, as Triton 3.6 spills a few bytes at 4 (sm86/89); fp32 64 x 32
# spills too
_HALF_DWZ = _HALF_ROUTER[:-1] + [(32, 32, 0, 8, 3)]
DWZ_CANDIDATES = {torch.bfloat16: _HALF_DWZ, torch.float16: _HALF_DWZ,
                  torch.float32: [(32, 32, 0, 8, 3)]}


def _candidates(table, interpret_meta, make):
    if INTERPRET:  # one small tile: the CPU tests stay fast and exercise the edge handling
        return [triton.Config(interpret_meta, num_warps=1)]
    rows = dict.fromkeys(r for per_dtype in table.values() for r in per_dtype)  # union, in order
    return [triton.Config(make(*r[:3]), num_warps=r[3], num_stages=r[4]) for r in rows]


def _gemm_configs():
    return _candidates(GEMM_CANDIDATES, dict(BM=16, BN=16, BK=16, BZ=16, GROUP_M=2),
                       lambda bm, bn, bk: dict(BM=bm, BN=bn, BK=bk, BZ=16, GROUP_M=8))


def _router_configs(table):
    return _candidates(table, dict(BM=16, BF=16), lambda bm, bf, _: dict(BM=bm, BF=bf))


def _shared_bytes(meta, num_stages, dtype, cap):
    """Shared memory (bytes) a config needs on compute capability cap, as Triton 3.x lays it out:
    the tiles a loop loads, buffered num_stages - 1 deep (num_stages deep on sm90+), plus 2 KB for
    reductions. `python bench.py --compile-check` checks it is never below the compiler's figure.
    """
    el, depth = torch.finfo(dtype).bits // 8, num_stages if cap >= 90 else num_stages - 1
    if "BK" in meta:  # _up_kernel / _down_bwd_kernel: an x (or dy) tile and a weight tile
        return depth * (meta["BM"] + meta["BN"]) * meta["BK"] * el + 2048
    # _dz_kernel / _dwz_kernel: a dm tile and a W_z (or z) tile in fp32, plus dm in fp32 (the dot);
    # on sm90 Triton 3.8 stages one more dm tile (dW_z's wgmma; 3.9 does not)
    BM, BF, BZ = meta["BM"], meta["BF"], meta["BLOCK_Z"]
    extra = BM * BF * el if cap >= 90 else 0
    return depth * (BM * BF * el + max(BM, BF) * BZ * 4) + BM * BF * 4 + extra + 2048


def _launchable(table, configs, dtype, shared_limit, block_z, cap):
    """The configs of table[dtype] that fit in shared_limit bytes on sm<cap>, in candidate order."""
    key = lambda c: (c.kwargs["BM"], c.kwargs.get("BN", c.kwargs.get("BF")), c.kwargs.get("BK", 0),
                     c.num_warps, c.num_stages)
    return [c for c in configs if key(c) in table[dtype]
            and _shared_bytes({"BLOCK_Z": block_z, **c.kwargs}, c.num_stages, dtype, cap)
            <= shared_limit]


def _prune(table, configs, named_args, **kwargs):
    """Autotune pre-filter: this dtype's candidates that fit the device's shared memory."""
    x = next(v for k, v in named_args.items() if k.endswith("_ptr"))  # activations: x, dy or dm
    if INTERPRET or not x.is_cuda:
        return configs
    prop = torch.cuda.get_device_properties(x.device)
    fit = _launchable(table, configs, x.dtype, prop.shared_memory_per_block_optin,
                      kwargs.get("BLOCK_Z", 0),                      10 * prop.major + prop.minor)
    if not fit:
        raise RuntimeError(f"kernel.py: no launch configuration fits the "
                           f"{prop.shared_memory_per_block_optin} B "
                           f"of shared memory per block of {torch.cuda.get_device_name(x.device)}; "
                           f"use use_kernel=off")
    return fit


# the two fused GEMMs. Tuned per power-of-two bucket of N (N_BUCKET), not per N: generation and
# HellaSwag change N at every call.
@triton.autotune(_gemm_configs(), key=["N_BUCKET", "D", "F", "K"],
                 reset_to_zero=["counts_ptr", "nact_ptr"],
                 prune_configs_by=dict(early_config_prune=partial(_prune, GEMM_CANDIDATES)))
@triton.jit
def _up_kernel(x_ptr, w1_ptr, b1_ptr, z_ptr, wz_ptr, bits_ptr, pre_ptr, a_ptr, counts_ptr, nact_ptr,
               N, D, F, DZ, K, NB, N_BUCKET, HAS_B1: tl.constexpr, PREC: tl.constexpr,
               ZPREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               BZ: tl.constexpr, GROUP_M: tl.constexpr):
    r0, c0 = _tile(N, F, BM, BN, GROUP_M)
    rows, cols = r0 + tl.arange(0, BM), c0 + tl.arange(0, BN)
    acc = _gemm_tile(x_ptr, w1_ptr, rows, cols, N, D, F, 1, D, PREC, BM, BN, BK)  # x W1^T
    if HAS_B1:
        acc += tl.load(b1_ptr + cols, mask=cols < F, other=0.0).to(tl.float32)[None, :]
    # Round pre to the storage dtype before GELU: backward recomputes GELU from the stored copy.
    pre = acc.to(pre_ptr.dtype.element_ty)
    out = (rows[:, None] < N) & (cols[None, :] < F)
    offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
    tl.store(pre_ptr + offs, pre, mask=out)
    M, n_sel = _mask_tile(z_ptr, wz_ptr, bits_ptr, rows, c0, N, F, DZ, NB, K, BM, BN, BZ, ZPREC)
    h, _ = _gelu(pre.to(tl.float32))  # after M: fewer live registers during the score dots
    tl.store(a_ptr + offs, (h * M).to(a_ptr.dtype.element_ty), mask=out)
    # statistics: one atomic per column and one per tile (out-of-range entries are 0 already)
    tl.atomic_add(counts_ptr + cols, n_sel, mask=cols < F)
    tl.atomic_add(nact_ptr, tl.sum(tl.sum((M != 0.0).to(tl.int32), axis=1), axis=0))


@triton.autotune(_gemm_configs(), key=["N_BUCKET", "D", "F", "K"],
                 prune_configs_by=dict(early_config_prune=partial(_prune, GEMM_CANDIDATES)))
@triton.jit
def _down_bwd_kernel(dy_ptr, w2_ptr, pre_ptr, z_ptr, wz_ptr, bits_ptr, dpre_ptr, dm_ptr,
                     N, D, F, DZ, K, NB, N_BUCKET, PREC: tl.constexpr, ZPREC: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BZ: tl.constexpr,
                     GROUP_M: tl.constexpr):
    r0, c0 = _tile(N, F, BM, BN, GROUP_M)
    rows, cols = r0 + tl.arange(0, BM), c0 + tl.arange(0, BN)
    g = _gemm_tile(dy_ptr, w2_ptr, rows, cols, N, D, F, F, 1, PREC, BM, BN, BK)  # dL/da = dy W2
    M, _ = _mask_tile(z_ptr, wz_ptr, bits_ptr, rows, c0, N, F, DZ, NB, K, BM, BN, BZ, ZPREC)
    out = (rows[:, None] < N) & (cols[None, :] < F)
    offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
    h, dh = _gelu(tl.load(pre_ptr + offs, mask=out, other=0.0).to(tl.float32))
    tl.store(dpre_ptr + offs, (g * M * dh).to(dpre_ptr.dtype.element_ty), mask=out)
    tl.store(dm_ptr + offs, (g * h).to(dm_ptr.dtype.element_ty), mask=out)


# router gradients
@triton.autotune(_router_configs(DZ_CANDIDATES), key=["N_BUCKET", "F", "DZ", "K"],
                 prune_configs_by=dict(early_config_prune=partial(_prune, DZ_CANDIDATES)))
@triton.jit
def _dz_kernel(dm_ptr, bits_ptr, wz_ptr, dz_ptr, N, F, DZ, K, NB, N_BUCKET, ZPREC: tl.constexpr,
               BLOCK_Z: tl.constexpr, BM: tl.constexpr, BF: tl.constexpr):
    # dz_k[rows] = sum over neurons of dm_k[rows, f] W_z[f]; one program = BM tokens of one sample
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    k = tl.program_id(1)
    zc = tl.arange(0, BLOCK_Z)
    acc = tl.zeros((BM, BLOCK_Z), tl.float32)
    for f0 in range(0, F, BF):
        cols = f0 + tl.arange(0, BF)
        dm = tl.load(dm_ptr + rows.to(tl.int64)[:, None] * F + cols[None, :],
                     mask=(rows[:, None] < N) & (cols[None, :] < F), other=0.0).to(tl.float32)
        dm = tl.where(_kept(bits_ptr, rows, f0, N, NB, k, BM, BF), dm, 0.0)
        wz = tl.load(wz_ptr + cols[:, None] * DZ + zc[None, :],
                     mask=(cols[:, None] < F) & (zc[None, :] < DZ), other=0.0)
        acc = tl.dot(dm, wz, acc, input_precision=ZPREC)
    tl.store(dz_ptr + (k * N + rows[:, None]).to(tl.int64) * DZ + zc[None, :], acc / K,
             mask=(rows[:, None] < N) & (zc[None, :] < DZ))


@triton.autotune(_router_configs(DWZ_CANDIDATES), key=["N_BUCKET", "F", "DZ", "K"],
                 reset_to_zero=["dwz_ptr"],
                 prune_configs_by=dict(early_config_prune=partial(_prune, DWZ_CANDIDATES)))
@triton.jit
def _dwz_kernel(dm_ptr, bits_ptr, z_ptr, dwz_ptr, N, F, DZ, K, NB, N_BUCKET, ZPREC: tl.constexpr,
                BLOCK_Z: tl.constexpr, BM: tl.constexpr, BF: tl.constexpr):
    # dW_z[cols] = sum_k sum_n dm_k[n, cols]^T z_k[n]. One program = BF neurons and every SPLIT-th
    # block of tokens; the SPLIT partial sums meet in an atomic add (F/BF programs alone are too
    # few).
    SPLIT = tl.num_programs(1)
    c0 = tl.program_id(0) * BF
    cols, zc = c0 + tl.arange(0, BF), tl.arange(0, BLOCK_Z)
    acc = tl.zeros((BF, BLOCK_Z), tl.float32)
    for k in range(K):
        for n0 in range(tl.program_id(1) * BM, N, BM * SPLIT):
            rows = n0 + tl.arange(0, BM)
            dm = tl.load(dm_ptr + rows.to(tl.int64)[:, None] * F + cols[None, :],
                         mask=(rows[:, None] < N) & (cols[None, :] < F), other=0.0).to(tl.float32)
            dm = tl.where(_kept(bits_ptr, rows, c0, N, NB, k, BM, BF), dm, 0.0)
            zt = tl.load(z_ptr + (k * N + rows[:, None]).to(tl.int64) * DZ + zc[None, :],
                         mask=(rows[:, None] < N) & (zc[None, :] < DZ), other=0.0)
            acc = tl.dot(tl.trans(dm), zt, acc, input_precision=ZPREC)
    tl.atomic_add(dwz_ptr + cols[:, None] * DZ + zc[None, :], acc / K,
                  mask=(cols[:, None] < F) & (zc[None, :] < DZ))


# the autograd wrapper
def _precision(dtype):
    """tl.dot precision: fp32 inputs get full fp32 dots (no TF32); bf16/fp16 GEMMs ignore it, and
    the d_z-deep dots that recompute kept score values then use TF32 (their error is below bf16's
    and about fp16's)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _select_meta(Fh):
    """(ROWS, BLOCK_F) of the selection kernel: whole rows of scores in registers."""
    BLOCK_F = max(8, triton.next_power_of_2(Fh))
    return (16 if INTERPRET else max(1, min(4, 4096 // BLOCK_F))), BLOCK_F


def _select(z, W_z, n_keep):
    """Keep bits (K, N, ceil(F/8)) uint8 of the per-row top-n_keep of z_k W_z^T (tie rule: >=)."""
    K, N, _ = z.shape
    Fh = W_z.shape[0]
    NB = triton.cdiv(Fh, 8)
    bits = torch.empty(K, N, NB, dtype=torch.uint8, device=z.device)
    chunk = max(1, min(N, SCRATCH_ELEMS // Fh))
    scratch = torch.empty(chunk, Fh, dtype=torch.float32, device=z.device)
    ROWS, BLOCK_F = _select_meta(Fh)
    for k in range(K):
        for r0 in range(0, N, chunk):
            n = min(chunk, N - r0)
            with ieee_fp32():  # the scores that decide, as in the PyTorch path
                torch.matmul(z[k, r0:r0 + n], W_z.t(), out=scratch[:n])  # m_k = W_z z_k
            _select_kernel[(triton.cdiv(n, ROWS),)](scratch, bits[k, r0:], n, Fh, NB, n_keep,
                                                     ROWS=ROWS, BLOCK_F=BLOCK_F, num_warps=8)
    return bits


def _dwz_grid(N, Fh, BM, BF, device):
    # F/BF programs alone are too few to fill the GPU: split the tokens into up to 4 waves' worth.
    n_f = triton.cdiv(Fh, BF)
    if INTERPRET:
        return (n_f, 1)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return (n_f, max(1, min(triton.cdiv(N, BM), 4 * sms // n_f)))


# One custom op per direction, so torch.compile sees the whole FFN as one node of its graph (no
# graph break) and the autograd link between them is registered with the op. The forward op also
# returns what backward needs (pre, a, the keep bits); triton_inf_ffn hands the user only y and
# the statistics.
@torch.library.custom_op("infmoe::inf_ffn_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, W1: torch.Tensor, b1: Optional[torch.Tensor], W2: torch.Tensor,
            b2: Optional[torch.Tensor], W_z: torch.Tensor, z: torch.Tensor, n_keep: int
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor]:
    N, D, Fh, K = x.shape[0], x.shape[1], W1.shape[0], z.shape[0]
    prec = _precision(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        bits = _select(z, W_z, n_keep)
        pre, a = (torch.empty(N, Fh, dtype=x.dtype, device=x.device) for _ in range(2))
        counts = torch.zeros(Fh, dtype=torch.int32, device=x.device)
        nact = torch.zeros(1, dtype=torch.int32, device=x.device)
        grid = lambda meta: (triton.cdiv(N, meta["BM"]) * triton.cdiv(Fh, meta["BN"]),)
        _up_kernel[grid](x, W1, b1 if b1 is not None else x, z, W_z, bits, pre, a, counts, nact,
                         N, D, Fh, z.shape[2], K, bits.shape[2], triton.next_power_of_2(N),
                         HAS_B1=b1 is not None, PREC=prec, ZPREC=prec)
        y = F.linear(a, W2, b2)
    return y, counts.float(), nact[0].float(), pre, a, bits


@_fwd_op.register_fake
def _(x, W1, b1, W2, b2, W_z, z, n_keep):
    (N, _), Fh, K = x.shape, W1.shape[0], z.shape[0]
    f32 = dict(dtype=torch.float32)
    return (x.new_empty(N, W2.shape[0]), x.new_empty(Fh, **f32), x.new_empty((), **f32),
            x.new_empty(N, Fh), x.new_empty(N, Fh),
            x.new_empty(K, N, triton.cdiv(Fh, 8), dtype=torch.uint8))


@torch.library.custom_op("infmoe::inf_ffn_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor,
            W_z: torch.Tensor, z: torch.Tensor, pre: torch.Tensor, a: torch.Tensor,
            bits: torch.Tensor, need: List[bool]
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor, torch.Tensor]:
    """Gradients (dx, dW1, db1, dW2, db2, dW_z, dz); those `need` does not ask for are empty."""
    (N, D), Fh, (K, _, DZ), NB = x.shape, W1.shape[0], z.shape, bits.shape[2]
    prec = _precision(x.dtype)
    dx, dW1, db1, dW2, db2, dwz, dz = (x.new_empty(0) for _ in range(7))  # outputs may not alias
    with torch.autocast(x.device.type, enabled=False):
        dpre, dM = torch.empty_like(pre), torch.empty_like(pre)
        grid = lambda meta: (triton.cdiv(N, meta["BM"]) * triton.cdiv(Fh, meta["BN"]),)
        _down_bwd_kernel[grid](dy, W2, pre, z, W_z, bits, dpre, dM, N, D, Fh, DZ, K, NB,
                               triton.next_power_of_2(N), PREC=prec, ZPREC=prec)
        BLOCK_Z = max(16, triton.next_power_of_2(DZ))
        if need[6]:
            dz = torch.empty_like(z)
            _dz_kernel[lambda meta: (triton.cdiv(N, meta["BM"]), K)](
                dM, bits, W_z, dz, N, Fh, DZ, K, NB, triton.next_power_of_2(N), ZPREC=prec,
                BLOCK_Z=BLOCK_Z)
        if need[5]:
            dwz = torch.zeros_like(W_z)
            _dwz_kernel[lambda meta: _dwz_grid(N, Fh, meta["BM"], meta["BF"], x.device)](
                dM, bits, z, dwz, N, Fh, DZ, K, NB, triton.next_power_of_2(N), ZPREC=prec,
                BLOCK_Z=BLOCK_Z)
        if need[0]:
            dx = dpre @ W1
        if need[1]:
            dW1 = dpre.t() @ x
        if need[2]:
            db1 = dpre.sum(0)
        if need[3]:
            dW2 = dy.t() @ a
        if need[4]:
            db2 = dy.sum(0)
    return dx, dW1, db1, dW2, db2, dwz, dz


@_bwd_op.register_fake
def _(dy, x, W1, W2, W_z, z, pre, a, bits, need):
    shapes = [x, W1, W1[:, 0], W2, W2[:, 0], W_z, z]
    return tuple(torch.empty_like(t) if n else x.new_empty(0) for t, n in zip(shapes, need))


def _setup_context(ctx, inputs, output):
    x, W1, b1, W2, b2, W_z, z, _ = inputs
    _, _, _, pre, a, bits = output
    ctx.save_for_backward(x, W1, W2, W_z, z, pre, a, bits)
    ctx.has_bias = (b1 is not None, b2 is not None)
    ctx.set_materialize_grads(False)  # only y has a gradient: no zero-filled N x d_ff tensors


def _backward(ctx, dy, *_):
    need = list(ctx.needs_input_grad[:7])
    need[2], need[4] = need[2] and ctx.has_bias[0], need[4] and ctx.has_bias[1]
    if dy is None or not any(need):
        return (None,) * 8
    grads = _bwd_op(dy.contiguous(), *ctx.saved_tensors, need)
    return (*(g if n else None for g, n in zip(grads, need)), None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def triton_inf_ffn(x, W1, b1, W2, b2, W_z, z, top_frac):
    """The ∞-MoE FFN in Triton kernels: fast_inf_ffn's signature and results. x (N, d), W1 (d_ff,
    d), b1 (d_ff,) or None, W2 (d, d_ff), b2 (d,) or None, W_z (d_ff, d_z), z (K, N, d_z),
    top_frac in (0, 1]. Returns (y (N, d) in x's dtype, counts (d_ff,) float32 = selections per
    neuron, n_active float32 = non-zeros of M)."""
    if triton.__version__ is None:
        raise RuntimeError("kernel.triton_inf_ffn needs Triton (pip install triton, Linux only); "
                           "use use_kernel='off' (the PyTorch path) without it")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("kernel.triton_inf_ffn runs Triton kernels, which need CUDA tensors. "
                           "For CPU tensors set TRITON_INTERPRET=1 in the environment before "
                           "importing kernel (slow; for tests), or use use_kernel='off' (the "
                           "PyTorch path).")
    assert x.dim() == 2 and z.dim() == 3 and z.shape[1] == x.shape[0], "x (N, d), z (K, N, d_z)"
    assert 0.0 < top_frac <= 1.0, "top_frac must be in (0, 1]"
    # The casts are autograd ops: gradients come back in each parameter's own dtype.
    dt = x.dtype
    W1, W2, b1, b2 = (None if t is None else t.to(dt).contiguous() for t in (W1, W2, b1, b2))
    n_keep = keep_count(top_frac, W1.shape[0])
    y, counts, n_active, _, _, _ = _fwd_op(x.contiguous(), W1, b1, W2, b2,
                                           W_z.float().contiguous(), z.float().contiguous(), n_keep)
    return y, counts.detach(), n_active.detach()

# ----------------------------------------------------------------------------- use_kernel=auto
# rtol, atol: the tests'. fp16 has 3 more mantissa bits than bf16 (rounding 8x finer).
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (5e-2, 5e-2),
              torch.float16: (1e-2, 1e-2)}
_VERDICTS = {}  # (device, dtype) -> did the kernel pass its self-check there
MIN_SM = 80  # below it Triton emits no tensor-core code for the kernel's dots: see kernel_ok


@torch._dynamo.assume_constant_result  # torch.compile runs it once while tracing, keeps the answer
def kernel_ok(device, dtype):
    """use_kernel=auto: may the kernel be used for `dtype` activations on `device` (a string)?

    The first call for a (device, dtype) runs triton_inf_ffn and fast_inf_ffn on a small random
    problem and compares the forward and every gradient with the tests' tolerances. On a mismatch
    or an error it warns once, naming what differed and the GPU, and answers False from then on
    (the PyTorch path is used). A GPU, driver or Triton version the kernel was never run on fails
    here rather than in the middle of a training run. Below sm80 (T4, V100) it answers False at
    once: Triton compiles the kernel's dots to CUDA-core FMAs there, no tensor-core instructions
    (`python bench.py --compile-check` shows it), so cuBLAS's GEMMs in the PyTorch path are faster.
    """
    key = (str(device), dtype)
    if key not in _VERDICTS:
        dev = torch.device(device)
        where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else device
        sm = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
        if sm is not None and 10 * sm[0] + sm[1] < MIN_SM:
            warnings.warn(f"kernel.py: {where} is sm{sm[0]}{sm[1]}; Triton compiles the ∞-MoE "
                          f"kernel's dots there to CUDA-core FMAs, not tensor-core instructions, "
                          f"so the PyTorch path (cuBLAS) is used (use_kernel=on forces the "
                          f"kernel).",
                          RuntimeWarning, stacklevel=2)
            _VERDICTS[key] = False
            return False
        problem = _self_check(dev, dtype)
        if problem:
            warnings.warn(f"kernel.py: the Triton ∞-MoE kernel disagrees with the PyTorch path on "
                          f"{where} ({str(dtype)[6:]}, Triton {triton.__version__}): {problem}. "
                          f"Using the PyTorch path (use_kernel=on forces the kernel).",
                          RuntimeWarning, stacklevel=2)
        _VERDICTS[key] = not problem
    return _VERDICTS[key]


def _self_check(device, dtype):
    """'' when triton_inf_ffn matches fast_inf_ffn on a small problem, else what differed."""
    if dtype not in TOLERANCES:  # a dtype it was never checked in (a float8, say)
        return "no self-check tolerance for this dtype"
    # Its own generator: the training run's random stream is untouched. Tiny in the interpreter.
    g = torch.Generator(device=device).manual_seed(0)
    N, d, d_ff, d_z, K = (16, 16, 32, 8, 2) if INTERPRET else (64, 64, 512, 32, 2)
    r = lambda *s, std=1.0, dt=dtype: (torch.randn(*s, device=device, generator=g) * std).to(dt)
    inputs = [r(N, d), r(d_ff, d, std=d ** -0.5), r(d_ff, std=0.1), r(d, d_ff, std=d_ff ** -0.5),
              r(d, std=0.1), r(d_ff, d_z, std=d_z ** -0.5, dt=torch.float32),
              r(K, N, d_z, dt=torch.float32)]
    dy = r(N, d)
    names = ["y", "counts", "n_active", "dx", "dW1", "db1", "dW2", "db2", "dW_z", "dz"]
    results = []
    try:
        with ieee_fp32():  # every matmul (train.py turns TF32 on), as the kernel's fp32 dots
            for fn in (fast_inf_ffn, triton_inf_ffn):
                leaves = [t.clone().requires_grad_() for t in inputs]
                with torch.autocast(device.type, enabled=False):
                    y, counts, n_active = fn(*leaves, 0.25)
                    y.backward(dy)
                results.append([y.detach(), counts.float(), n_active.float()]
                               + [t.grad for t in leaves])
    except Exception as e:  # a launch or compile error is a verdict, not a crash
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    rtol, atol = TOLERANCES[dtype]
    bad = []
    for name, want, got in zip(names, *results):
        exact = name in ("counts", "n_active")
        if want.shape != got.shape or not torch.allclose(
                got.float(), want.float(), rtol=0 if exact else rtol, atol=0 if exact else atol):
            same = want.shape == got.shape
            err = (got.float() - want.float()).abs().max().item() if same else float("nan")
            bad.append(f"{name} (max abs error {err:.3g})")
    return ", ".join(bad)
