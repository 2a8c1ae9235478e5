"""
The infinite-MoE FFN as Triton kernels, forward and backward, plus a benchmark (`python kernel.py`).

    M = (1/K) sum_k mask_k,  mask_k = where(m_k >= thr_k, m_k, 0),  m_k = z_k W_z^T   (router math, fp32)
    y = (GELU(x W1^T + b1) * M) W2^T + b2

thr_k[n] is the n_keep-th largest entry of row n of m_k, n_keep = max(1, round(top_frac * d_ff)).
Because the mask multiplies the activation, the K samples cost ONE pass through W1 and W2.

Pipeline (N tokens, width d, hidden F = d_ff, K samples):
  forward
    1. select  For each sample and chunk of rows, the fp32 scores go to a small scratch buffer (at most
               SCRATCH_ELEMS floats, reused: never the K x N x F scores) by the same torch matmul the
               reference uses. `_select_kernel` finds each row's n_keep-th largest score by a binary
               search on the float bits and stores the keep decisions as bits: K*N*F/8 bytes.
    2. up      `_up_kernel`: the x W1^T GEMM with everything else in its epilogue: + b1, GELU, and
               M rebuilt in registers from the keep bits and the kept values (recomputed from z and W_z,
               a d_z-deep dot per sample). Writes pre = x W1^T + b1 and a = GELU(pre) * M. M never
               reaches memory. The neuron counts and the number of non-zero M entries come out too.
    3. down    y = a W2^T + b2 by cuBLAS: a plain GEMM, nothing to fuse.
  backward
    4. `_down_bwd_kernel`: g = dy W2 with the epilogue rebuilding h and M: dpre = g * M * GELU'(pre)
               and dM = g * h. Then dx, dW1, dW2 and the biases are plain GEMMs/sums (cuBLAS).
    5. `_dz_kernel`, `_dwz_kernel`: dz_k = dm_k W_z and dW_z = sum_k dm_k^T z_k, where dm_k = dM/K on
               the entries sample k kept (0 elsewhere) is formed tile by tile from dM and the bits.

Why it is exact. A neuron's keep decision is taken once, in the select kernel, by comparing scores
with a threshold found in those very scores; later kernels read the decision from the bits and only
recompute the *value* of a kept score. So no recomputation can change which neurons are kept (a
threshold recomputed in a different summation order could drop the n_keep-th neuron). The scores
used for the decision are torch's fp32 product, computed in IEEE fp32 (TF32 off for that matmul
whatever the caller set), as in the reference. Exact: the kernel keeps exactly the neurons whose
scores, as computed, are >= the n_keep-th largest of their row. Not bit-exact on a GPU: the reference
multiplies all rows at once and the kernel a chunk of rows at a time, and cuBLAS may sum in another
order for another shape; two scores within a rounding error of each other can then rank differently
in the two paths, so at such near-ties one path may keep a neuron the other drops.

Tie rule. The search returns exactly the n_keep-th largest score and every score >= it is kept, so
exact ties at the threshold are all kept (more than n_keep neurons), as `m >= thr` in the reference.
-0.0 and +0.0 are equal floats, so -0.0 is turned into +0.0 before the search.

Memory kept for backward: pre and a (N x F each, in x's dtype: the two tensors a dense FFN keeps,
its pre-activation and its activation) and the keep bits (K/16 of one bf16 N x F tensor), plus the
inputs. Not the scores, not M, not h (GELU is recomputed from pre).

Precision: fp32 inputs use full-fp32 dots ("ieee", no TF32) and match the reference tightly; bf16
inputs use bf16 GEMMs with fp32 accumulation and TF32 for the d_z-deep score values (errors of the
order of bf16 rounding; the keep decisions are unaffected).

On GPUs this code never ran on:
  - `python kernel.py --compile-check` compiles every kernel, in every launch configuration the code
    can choose, for sm80/86/89/90 with Triton's own compiler (no GPU needed) and fails on spills or
    on shared memory beyond the GPU's. Autotune candidates are per dtype and pruned by the device's
    shared memory before tuning.
  - The kernel is two torch.library custom ops (forward, backward) with shape-only fake versions, so
    torch.compile of the model stays one graph.
  - use_kernel=auto asks `kernel_ok`, which compares the kernel with the PyTorch path once per device
    and dtype and falls back to PyTorch, with one warning, when they disagree.
"""
import argparse
import ctypes
import os
import sys
import time
import warnings
from functools import partial

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SCRATCH_ELEMS = 1 << 24  # fp32 scores held at once by the selection (64 MB)
_I32_MIN = tl.constexpr(-2**31)
_F32_DOTS = tl.constexpr(INTERPRET)  # the Triton 3.9 interpreter mis-computes bf16 tl.dot: upcast there


# ----------------------------------------------------------------------------- selection
@triton.jit
def _select_kernel(s_ptr, bits_ptr, n_rows, F, NB, n_keep, ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    # One program holds ROWS whole rows of scores in registers.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_F)
    r64 = rows.to(tl.int64)[:, None]
    inb = (rows[:, None] < n_rows) & (cols[None, :] < F)
    s = tl.load(s_ptr + r64 * F + cols[None, :], mask=inb, other=0.0)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0 (they are equal as floats)
    # Integer key with the same order as the floats: negative floats get their magnitude bits flipped.
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
    # BN/8 bytes of each row and spread their bits (a 2D gather of single bits would cost a pointer each).
    bc = c0 // 8 + tl.arange(0, BN // 8)
    byte = tl.load(bits_ptr + (k * N + rows).to(tl.int64)[:, None] * NB + bc[None, :],
                   mask=(rows[:, None] < N) & (bc[None, :] < NB), other=0)
    bit = (byte.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bit, (BM, BN)) != 0


@triton.jit
def _mask_tile(z_ptr, wz_ptr, bits_ptr, rows, c0, N, F, DZ, NB, K,
               BM: tl.constexpr, BN: tl.constexpr, BZ: tl.constexpr, ZPREC: tl.constexpr):
    # M for a tile: the kept score values (recomputed, z_k W_z^T over d_z) averaged over the K samples.
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
            zt = tl.load(z_ptr + (k * N + rows % N).to(tl.int64)[:, None] * DZ + zc[None, :], mask=zc[None, :] < DZ, other=0.0)
            wzt = tl.load(wz_ptr + (cols % F)[None, :] * DZ + zc[:, None], mask=zc[:, None] < DZ, other=0.0)
            s = tl.dot(zt, wzt, s, input_precision=ZPREC)
        keep = _kept(bits_ptr, rows, c0, N, NB, k, BM, BN)
        M += tl.where(keep, s, 0.0)
        n_sel += tl.sum(keep.to(tl.int32), axis=0)
    return M / K, n_sel


@triton.jit
def _gemm_tile(a_ptr, b_ptr, rows, cols, N, D, F, sbk, sbn,
               PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # A[rows, :] @ B[:, cols] for A (N, D) row-major and B (D, F) with strides (sbk, sbn), fp32 result.
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


# ----------------------------------------------------------------------------- launch configurations
# Autotune candidates per activation dtype as (BM, BN or BF, BK, num_warps, num_stages): tiles that
# `python kernel.py --compile-check` compiles without register spills for sm80, sm86, sm89 and sm90.
# fp32 takes half-depth (BK = 32) GEMM tiles and smaller router tiles: its full-precision dots hold
# their operands in registers (no tensor cores), and BK = 64 spills on sm80. Candidates that do not
# fit the device's per-block shared memory (99 KB on an RTX 3090/4090, L40S; 163 KB on an A100;
# 227 KB on an H100) are dropped before tuning by `_prune`.
GEMM_CANDIDATES = {torch.bfloat16: [(128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 4),
                                    (64, 64, 64, 4, 3)],
                   torch.float32: [(64, 128, 32, 8, 3), (64, 64, 32, 4, 4), (64, 64, 32, 4, 3)]}
DZ_CANDIDATES = {torch.bfloat16: [(64, 64, 0, 8, 3), (64, 64, 0, 4, 3), (32, 64, 0, 4, 3), (64, 32, 0, 4, 3),
                                  (32, 32, 0, 4, 3)],
                 torch.float32: [(64, 32, 0, 4, 3), (32, 32, 0, 4, 3)]}
DWZ_CANDIDATES = {**DZ_CANDIDATES, torch.float32: [(32, 32, 0, 4, 3)]}  # 64 x 32 spills in fp32 here


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
    """Shared memory (bytes) a config needs on compute capability cap, as Triton 3.x lays it out: the
    tiles a loop loads, buffered num_stages - 1 deep (num_stages deep on sm90+), plus 2 KB for
    reductions. `python kernel.py --compile-check` checks it is never below the compiler's figure."""
    el, depth = torch.finfo(dtype).bits // 8, num_stages if cap >= 90 else num_stages - 1
    if "BK" in meta:  # _up_kernel / _down_bwd_kernel: an x (or dy) tile and a weight tile
        return depth * (meta["BM"] + meta["BN"]) * meta["BK"] * el + 2048
    # _dz_kernel / _dwz_kernel: a dm tile and a W_z (or z) tile in fp32, plus dm in fp32 for the dot
    BM, BF, BZ = meta["BM"], meta["BF"], meta["BLOCK_Z"]
    return depth * (BM * BF * el + max(BM, BF) * BZ * 4) + BM * BF * 4 + 2048


def _launchable(table, configs, dtype, shared_limit, block_z, cap):
    """The configs of table[dtype] that fit in shared_limit bytes on sm<cap>, in candidate order."""
    key = lambda c: (c.kwargs["BM"], c.kwargs.get("BN", c.kwargs.get("BF")), c.kwargs.get("BK", 0),
                     c.num_warps, c.num_stages)
    return [c for c in configs if key(c) in table[dtype]
            and _shared_bytes({"BLOCK_Z": block_z, **c.kwargs}, c.num_stages, dtype, cap) <= shared_limit]


def _prune(table, configs, named_args, **kwargs):
    """Autotune pre-filter: this dtype's candidates that fit the device's per-block shared memory."""
    x = next(v for k, v in named_args.items() if k.endswith("_ptr"))  # activations: x, dy or dm
    if INTERPRET or not x.is_cuda:
        return configs
    prop = torch.cuda.get_device_properties(x.device)
    fit = _launchable(table, configs, x.dtype, prop.shared_memory_per_block_optin, kwargs.get("BLOCK_Z", 0),
                      10 * prop.major + prop.minor)
    if not fit:
        raise RuntimeError(f"kernel.py: no launch configuration fits the {prop.shared_memory_per_block_optin} B "
                           f"of shared memory per block of {torch.cuda.get_device_name(x.device)}; "
                           f"use use_kernel=off")
    return fit


# ----------------------------------------------------------------------------- the two fused GEMMs
# Tuned per power-of-two bucket of N (N_BUCKET), not per N: generation and HellaSwag change N at every call.
@triton.autotune(_gemm_configs(), key=["N_BUCKET", "D", "F", "K"], reset_to_zero=["counts_ptr", "nact_ptr"],
                 prune_configs_by=dict(early_config_prune=partial(_prune, GEMM_CANDIDATES)))
@triton.jit
def _up_kernel(x_ptr, w1_ptr, b1_ptr, z_ptr, wz_ptr, bits_ptr, pre_ptr, a_ptr, counts_ptr, nact_ptr,
               N, D, F, DZ, K, NB, N_BUCKET, HAS_B1: tl.constexpr, PREC: tl.constexpr, ZPREC: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BZ: tl.constexpr, GROUP_M: tl.constexpr):
    r0, c0 = _tile(N, F, BM, BN, GROUP_M)
    rows, cols = r0 + tl.arange(0, BM), c0 + tl.arange(0, BN)
    acc = _gemm_tile(x_ptr, w1_ptr, rows, cols, N, D, F, 1, D, PREC, BM, BN, BK)  # x W1^T; W1 is (F, D)
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
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BZ: tl.constexpr, GROUP_M: tl.constexpr):
    r0, c0 = _tile(N, F, BM, BN, GROUP_M)
    rows, cols = r0 + tl.arange(0, BM), c0 + tl.arange(0, BN)
    g = _gemm_tile(dy_ptr, w2_ptr, rows, cols, N, D, F, F, 1, PREC, BM, BN, BK)  # dL/da = dy W2
    M, _ = _mask_tile(z_ptr, wz_ptr, bits_ptr, rows, c0, N, F, DZ, NB, K, BM, BN, BZ, ZPREC)
    out = (rows[:, None] < N) & (cols[None, :] < F)
    offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
    h, dh = _gelu(tl.load(pre_ptr + offs, mask=out, other=0.0).to(tl.float32))
    tl.store(dpre_ptr + offs, (g * M * dh).to(dpre_ptr.dtype.element_ty), mask=out)
    tl.store(dm_ptr + offs, (g * h).to(dm_ptr.dtype.element_ty), mask=out)


# ----------------------------------------------------------------------------- router gradients
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
        wz = tl.load(wz_ptr + cols[:, None] * DZ + zc[None, :], mask=(cols[:, None] < F) & (zc[None, :] < DZ), other=0.0)
        acc = tl.dot(dm, wz, acc, input_precision=ZPREC)
    tl.store(dz_ptr + (k * N + rows[:, None]).to(tl.int64) * DZ + zc[None, :], acc / K,
             mask=(rows[:, None] < N) & (zc[None, :] < DZ))


@triton.autotune(_router_configs(DWZ_CANDIDATES), key=["N_BUCKET", "F", "DZ", "K"], reset_to_zero=["dwz_ptr"],
                 prune_configs_by=dict(early_config_prune=partial(_prune, DWZ_CANDIDATES)))
@triton.jit
def _dwz_kernel(dm_ptr, bits_ptr, z_ptr, dwz_ptr, N, F, DZ, K, NB, N_BUCKET, ZPREC: tl.constexpr,
                BLOCK_Z: tl.constexpr, BM: tl.constexpr, BF: tl.constexpr):
    # dW_z[cols] = sum_k sum_n dm_k[n, cols]^T z_k[n]. One program = BF neurons and every SPLIT-th
    # block of tokens; the SPLIT partial sums meet in an atomic add (F/BF programs alone are too few).
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
    tl.atomic_add(dwz_ptr + cols[:, None] * DZ + zc[None, :], acc / K, mask=(cols[:, None] < F) & (zc[None, :] < DZ))


# ----------------------------------------------------------------------------- autograd wrapper
def _precision(dtype):
    """tl.dot precision: fp32 inputs get full fp32 dots (no TF32); bf16 GEMMs ignore it, and the
    d_z-deep dots that recompute kept score values then use TF32 (their error is below bf16's)."""
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
    # The scores that decide the selection are IEEE fp32 whatever TF32 setting the caller made
    # (train.py turns TF32 on for everything else): TF32 would move near-ties.
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for k in range(K):
            for r0 in range(0, N, chunk):
                n = min(chunk, N - r0)
                torch.matmul(z[k, r0:r0 + n], W_z.t(), out=scratch[:n])  # m_k = W_z z_k, as the reference
                _select_kernel[(triton.cdiv(n, ROWS),)](scratch, bits[k, r0:], n, Fh, NB, n_keep,
                                                         ROWS=ROWS, BLOCK_F=BLOCK_F, num_warps=8)
    finally:
        torch.set_float32_matmul_precision(precision)
    return bits


def _dwz_grid(N, Fh, BM, BF, device):
    # F/BF programs alone are too few to fill the GPU: split the tokens into up to 4 waves' worth.
    n_f = triton.cdiv(Fh, BF)
    if INTERPRET:
        return (n_f, 1)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return (n_f, max(1, min(triton.cdiv(N, BM), 4 * sms // n_f)))


# One custom op per direction, so torch.compile sees the whole FFN as one node of its graph (no graph
# break) and the autograd link between them is registered with the op. The forward op also returns
# what backward needs (pre, a, the keep bits); inf_ffn hands the user only y and the statistics.
@torch.library.custom_op("infmoe::inf_ffn_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, W1: torch.Tensor, b1: Optional[torch.Tensor], W2: torch.Tensor,
            b2: Optional[torch.Tensor], W_z: torch.Tensor, z: torch.Tensor, n_keep: int
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
            x.new_empty(N, Fh), x.new_empty(N, Fh), x.new_empty(K, N, triton.cdiv(Fh, 8), dtype=torch.uint8))


@torch.library.custom_op("infmoe::inf_ffn_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, W_z: torch.Tensor,
            z: torch.Tensor, pre: torch.Tensor, a: torch.Tensor, bits: torch.Tensor, need: List[bool]
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor]:
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


def inf_ffn(x, W1, b1, W2, b2, W_z, z, top_frac):
    """Fused infinite-MoE FFN. x (N, d), W1 (d_ff, d), b1 (d_ff,) or None, W2 (d, d_ff), b2 (d,) or None,
    W_z (d_ff, d_z), z (K, N, d_z), top_frac in (0, 1]. Returns (y (N, d) in x's dtype,
    counts (d_ff,) float32 = selections per neuron, n_active float32 = non-zeros of M)."""
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("kernel.inf_ffn runs Triton kernels, which need CUDA tensors. For CPU tensors set "
                           "TRITON_INTERPRET=1 in the environment before importing kernel (slow; for tests), "
                           "or use use_kernel='off' (the PyTorch reference path).")
    assert x.dim() == 2 and z.dim() == 3 and z.shape[1] == x.shape[0], "x is (N, d), z is (K, N, d_z)"
    assert 0.0 < top_frac <= 1.0, "top_frac must be in (0, 1]"
    # The casts are autograd ops: gradients come back in each parameter's own dtype.
    dt = x.dtype
    W1, W2, b1, b2 = (None if t is None else t.to(dt).contiguous() for t in (W1, W2, b1, b2))
    n_keep = max(1, int(round(top_frac * W1.shape[0])))
    y, counts, n_active, _, _, _ = _fwd_op(x.contiguous(), W1, b1, W2, b2, W_z.float().contiguous(),
                                           z.float().contiguous(), n_keep)
    return y, counts.detach(), n_active.detach()


# ----------------------------------------------------------------------------- use_kernel=auto
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (5e-2, 5e-2)}  # rtol, atol: the tests' own
_VERDICTS = {}  # (device, dtype) -> did the kernel pass its self-check there


@torch._dynamo.assume_constant_result  # torch.compile runs it once while tracing and keeps the answer
def kernel_ok(device, dtype):
    """use_kernel=auto: may the kernel be used for `dtype` activations on `device` (a string)?

    The first call for a (device, dtype) runs inf_ffn and model.inf_ffn_reference on a small random
    problem and compares the forward and every gradient with the tests' tolerances. On a mismatch or
    an error it warns once, naming what differed and the GPU, and answers False from then on (the
    PyTorch path is used). A GPU, driver or Triton version the kernel was never run on fails here
    rather than in the middle of a training run.
    """
    key = (str(device), dtype)
    if key not in _VERDICTS:
        problem = _self_check(torch.device(device), dtype)
        if problem:
            where = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else device
            warnings.warn(f"kernel.py: the Triton ∞-MoE kernel disagrees with the PyTorch path on {where} "
                          f"({str(dtype)[6:]}, Triton {triton.__version__}): {problem}. Using the PyTorch "
                          f"path (use_kernel=on forces the kernel).", RuntimeWarning, stacklevel=2)
        _VERDICTS[key] = not problem
    return _VERDICTS[key]


def _self_check(device, dtype):
    """'' when inf_ffn matches the reference on a small problem, else what differed."""
    from model import inf_ffn_reference

    # Its own generator: the training run's random stream is untouched. Tiny in the (slow) interpreter.
    g = torch.Generator(device=device).manual_seed(0)
    N, d, d_ff, d_z, K = (16, 16, 32, 8, 2) if INTERPRET else (64, 64, 512, 32, 2)
    r = lambda *s, std=1.0, dt=dtype: (torch.randn(*s, device=device, generator=g) * std).to(dt)
    inputs = [r(N, d), r(d_ff, d, std=d ** -0.5), r(d_ff, std=0.1), r(d, d_ff, std=d_ff ** -0.5),
              r(d, std=0.1), r(d_ff, d_z, std=d_z ** -0.5, dt=torch.float32), r(K, N, d_z, dt=torch.float32)]
    dy = r(N, d)
    names = ["y", "counts", "n_active", "dx", "dW1", "db1", "dW2", "db2", "dW_z", "dz"]
    results = []
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 (train.py turns it on): the kernel's fp32 dots
    try:
        for fn in (inf_ffn_reference, inf_ffn):
            leaves = [t.clone().requires_grad_() for t in inputs]
            with torch.autocast(device.type, enabled=False):
                y, counts, n_active = fn(*leaves, 0.25)
                y.backward(dy)
            results.append([y.detach(), counts.float(), n_active.float()] + [t.grad for t in leaves])
    except Exception as e:  # a launch or compile error is a verdict, not a crash
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    finally:
        torch.set_float32_matmul_precision(precision)
    rtol, atol = TOLERANCES[dtype]
    bad = []
    for name, want, got in zip(names, *results):
        exact = name in ("counts", "n_active")
        if want.shape != got.shape or not torch.allclose(got.float(), want.float(), rtol=0 if exact else rtol,
                                                         atol=0 if exact else atol):
            err = (got.float() - want.float()).abs().max().item() if want.shape == got.shape else float("nan")
            bad.append(f"{name} (max abs error {err:.3g})")
    return ", ".join(bad)


# ----------------------------------------------------------------------------- GPU compile check
# Per-block shared memory (opt-in maximum) of each target, in bytes, and GPUs that have it.
ARCHS = {80: (163 * 1024, "A100"), 86: (99 * 1024, "RTX 3090, A6000"), 89: (99 * 1024, "RTX 4090, L40S"),
         90: (227 * 1024, "H100")}


def _launches(dtype, d, d_ff, d_z, K):
    """Every (kernel, constexprs, num_warps, num_stages, autotuned) inf_ffn can launch at this shape.

    Types follow the real launch: activations and weights in `dtype`, router tensors fp32, keep bits
    uint8, statistics int32; sizes divisible by 16 (as at training shapes) carry that hint.
    """
    a = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    prec = _precision(dtype)
    up = dict(x_ptr=a, w1_ptr=a, b1_ptr=a, z_ptr="fp32", wz_ptr="fp32", bits_ptr="u8", pre_ptr=a, a_ptr=a,
              counts_ptr="i32", nact_ptr="i32")
    down = dict(dy_ptr=a, w2_ptr=a, pre_ptr=a, z_ptr="fp32", wz_ptr="fp32", bits_ptr="u8", dpre_ptr=a,
                dm_ptr=a)
    dz = dict(dm_ptr=a, bits_ptr="u8", wz_ptr="fp32", dz_ptr="fp32")
    dwz = dict(dm_ptr=a, bits_ptr="u8", z_ptr="fp32", dwz_ptr="fp32")
    gemm_ints = ["N", "D", "F", "DZ", "K", "NB", "N_BUCKET"]
    router_ints = ["N", "F", "DZ", "K", "NB", "N_BUCKET"]
    block_z = max(16, triton.next_power_of_2(d_z))
    rows, block_f = _select_meta(d_ff)
    yield _select_kernel, dict(s_ptr="fp32", bits_ptr="u8"), ["n_rows", "F", "NB", "n_keep"], \
        dict(ROWS=rows, BLOCK_F=block_f), [(8, 3)], False
    for kern, table, ptrs, ints, const in (
            (_up_kernel, GEMM_CANDIDATES, up, gemm_ints, dict(HAS_B1=True, PREC=prec, ZPREC=prec)),
            (_down_bwd_kernel, GEMM_CANDIDATES, down, gemm_ints, dict(PREC=prec, ZPREC=prec)),
            (_dz_kernel, DZ_CANDIDATES, dz, router_ints, dict(ZPREC=prec, BLOCK_Z=block_z)),
            (_dwz_kernel, DWZ_CANDIDATES, dwz, router_ints, dict(ZPREC=prec, BLOCK_Z=block_z))):
        for cfg in _launchable(table, kern.configs, dtype, float("inf"), block_z, 90):  # this dtype's
            yield kern.fn, ptrs, ints, {**const, **cfg.kwargs}, [(cfg.num_warps, cfg.num_stages)], True


def _compile_one(fn, ptrs, ints, const, num_warps, num_stages, cap):
    """AOT-compile one kernel for sm_<cap>: (registers, spill bytes, shared bytes), or the error text."""
    import contextlib
    import io
    import re
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**{k: "*" + v for k, v in ptrs.items()}, **{k: "i32" for k in ints},
           **{k: "constexpr" for k in const}}
    hinted = list(ptrs) + [k for k in ints if k not in ("K", "n_keep")]  # K = 2: no 16-divisibility
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in hinted}
    log = io.StringIO()
    # ptxas prints registers and spills (-v) to stdout; a cached binary would skip ptxas, so compile
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope():
        triton.knobs.nvidia.dump_ptxas_log = triton.knobs.compilation.always_compile = True
        try:
            with contextlib.redirect_stdout(log):
                c = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", cap, 32),
                                   options=dict(num_warps=num_warps, num_stages=num_stages))
        except Exception as e:  # a compiler error is a row of the table, not the end of the check
            return str(e).strip().splitlines()[0][:80]
    text = log.getvalue()
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spill, c.metadata.shared


_SHORT = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_check(archs=(80, 86, 89, 90), dtypes=(torch.bfloat16, torch.float32), shapes=(768, 1024),
                  quick=False):
    """Compile every kernel x arch x dtype x config for real GPUs (no GPU needed); print the table.

    quick: one configuration per kernel, the kernels spread over the archs (every kernel and every
    arch at least once: the test suite's subset). Returns the number of problems (0 = clean).
    """
    jobs, seen = [], {}
    for d in shapes:
        for dtype in dtypes:
            for fn, ptrs, ints, const, wst, tuned in _launches(dtype, d, 8 * d, 128, 2):
                for cap in archs:
                    jobs.append((fn, ptrs, ints, const, wst[0], tuned, cap, dtype, d))
    if quick:
        by_kernel = {}
        for j in jobs:
            by_kernel.setdefault(j[0].__name__, []).append(j)
        jobs = [next(j for j in js if j[6] == archs[i % len(archs)] and j[7] == dtypes[-1])
                for i, js in enumerate(by_kernel.values())]
    print(f"{'kernel':<17s} {'arch':<5s} {'dtype':<5s} {'d':>5s}  {'config':<42s} {'regs':>4s} {'spill':>6s} "
          f"{'shared':>8s} {'limit':>7s}  verdict")
    n = fail = spill = over = pruned = 0
    for fn, ptrs, ints, const, (w, s), tuned, cap, dtype, d in jobs:
        key = (fn.__name__, tuple(sorted(ptrs.items())), tuple(sorted(const.items())), w, s, cap)
        if key not in seen:  # d = 768 and 1024 often compile to the same binary
            seen[key] = _compile_one(fn, ptrs, ints, const, w, s, cap)
        res, limit = seen[key], ARCHS[cap][0]
        cfg = " ".join(f"{k}={v}" for k, v in const.items() if k not in ("PREC", "ZPREC", "HAS_B1"))
        cfg += f" w={w} s={s}"
        name, dt = fn.__name__.strip("_").replace("_kernel", ""), _SHORT[dtype]
        if isinstance(res, str):
            fail += 1
            print(f"{name:<17s} sm{cap:<3d} {dt:<5s} {d:5d}  {cfg:<42s} FAILED: {res}")
            continue
        n += 1
        regs, spilled, shared = res
        # the autotuner's pre-filter decides with _shared_bytes; the compiler's figure must agree
        budget = _shared_bytes(const, s, dtype, cap) if tuned else limit
        launchable = budget <= limit
        verdict = "ok"
        if not launchable:
            verdict, pruned = "pruned on this arch", pruned + 1
        elif shared > budget:  # over the arch's limit, or over what the autotune pre-filter assumed
            verdict, over = "OVER SHARED MEMORY" if shared > limit else "OVER ITS ESTIMATE", over + 1
        elif spilled:
            verdict, spill = "SPILLS", spill + 1
        print(f"{name:<17s} sm{cap:<3d} {dt:<5s} {d:5d}  {cfg:<42s} {regs:4d} {spilled:6d} "
              f"{shared / 1024:6.1f}KB {limit // 1024:5d}KB  {verdict}")
    print(f"({pruned} autotune configs need more shared memory than their arch has: pruned before launch"
          f" there, not counted below)")
    print(f"compile-check: {n} compiled, {fail} failed, {spill} spilling, {over} over shared memory")
    return fail + spill + over


# ----------------------------------------------------------------------------- benchmark
def _dense_ffn(x, W1, b1, W2, b2):
    return F.linear(F.gelu(F.linear(x, W1, b1)), W2, b2)


class _Floor(torch.autograd.Function):
    """The work no implementation of the ∞-MoE FFN can skip beyond a dense FFN of width d_ff, and no
    more: forward, the K score products m_k = W_z z_k and each row's threshold; backward, the 2K
    products that carry dL/dm_k into dz_k and dW_z. No mask is built, so the PyTorch path's distance
    from dense + this is what its mask bookkeeping costs. At K = 2, d_z = 128, d = 768 the products
    alone are K d_z / 2d = 17% of the dense FFN's arithmetic."""

    @staticmethod
    def forward(ctx, x, W_z, z, n_keep):
        for k in range(len(z)):
            m = z[k] @ W_z.t()
            torch.ops.infmoe.row_threshold(m, n_keep)
        ctx.save_for_backward(W_z, z, m)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dx):
        W_z, z, dm = ctx.saved_tensors  # any (N, d_ff) matrix will do as dL/dm_k
        dz, dW_z = torch.empty_like(z), torch.zeros_like(W_z)
        for k in range(len(z)):
            torch.mm(dm, W_z, out=dz[k])
            dW_z.addmm_(dm.t(), z[k])
        return dx, dW_z, dz, None


def _floor_ffn(dense_ffn, x, W1, b1, W2, b2, W_z, z, top_frac):
    from model import keep_count
    return dense_ffn(_Floor.apply(x, W_z, z, keep_count(top_frac, W_z.shape[0])), W1, b1, W2, b2)


def keep_freed_memory():
    """Make glibc keep freed memory in the process, as PyTorch's CUDA caching allocator does.

    By default glibc serves every block over 32 MB with its own mmap and unmaps it when freed, so each
    new (N, d_ff) tensor of the benchmark's shape (48 MB) page-faults in again: ~25 ms on the 2-core
    machine, as long as the arithmetic of a few elementwise passes. That is a cost of the allocator,
    not of the ops, and one a GPU never pays; without it the CPU ratios show what the math costs.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h: no mmap'd blocks; return no heap top under 2 GB
        return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def _first(r):
    return r[0] if isinstance(r, tuple) else r


def _saved_mib(fn, args, dy):
    """Activation memory: what autograd keeps for backward beyond the inputs and parameters, MiB."""
    inputs = {t.data_ptr() for t in args if torch.is_tensor(t)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = _first(fn(*args))
    y.backward(dy)
    kept = {t.data_ptr(): t.numel() * t.element_size() for t in saved if t.data_ptr() not in inputs}
    for t in args:
        if torch.is_tensor(t):
            t.grad = None
    return sum(kept.values()) / 2**20


def _peak_mib(fn, args, dy):
    """CUDA: peak memory allocated during one forward+backward beyond what existed before, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _first(fn(*args)).backward(dy)
    torch.cuda.synchronize()
    for t in args:
        if torch.is_tensor(t):
            t.grad = None
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _times(cases, dy, reps):
    """{name: (forward ms, forward+backward ms)} for cases {name: (fn, args)}.

    CUDA: triton's do_bench medians. CPU: the best of `reps` rounds, every case run once per round,
    so that a change in the load of a shared machine hits all cases alike and the ratios hold.
    """
    def step(fn, args, backward):
        if not backward:
            with torch.no_grad():
                return fn(*args)
        _first(fn(*args)).backward(dy)
        for t in args:
            if torch.is_tensor(t):
                t.grad = None

    if dy.is_cuda:
        bench = lambda fn, args, b: triton.testing.do_bench(lambda: step(fn, args, b), rep=reps,
                                                            return_mode="median")
        return {name: (bench(fn, a, False), bench(fn, a, True)) for name, (fn, a) in cases.items()}
    best = {name: [float("inf")] * 2 for name in cases}
    for _ in range(reps):
        for name, (fn, args) in cases.items():
            for b in (False, True):
                t0 = time.perf_counter()
                step(fn, args, b)
                best[name][b] = min(best[name][b], (time.perf_counter() - t0) * 1e3)
    return {name: tuple(t) for name, t in best.items()}


def compile_check_main(argv):
    """`python kernel.py --compile-check [--quick] [--archs=80,86] [--dtypes=bf16,fp32] [--d=768,1024]`"""
    p = argparse.ArgumentParser(description="Compile every Triton kernel for sm80/86/89/90 without a GPU; exit "
                                "0 when nothing the code can launch fails, spills or exceeds shared memory.")
    p.add_argument("--compile-check", action="store_true", required=True)
    p.add_argument("--quick", action="store_true", help="one config per kernel, kernels spread over the archs")
    p.add_argument("--archs", default="80,86,89,90")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--d", default="768,1024", help="model widths; d_ff = 8d, d_z = 128, K = 2")
    args = p.parse_args(argv)
    if INTERPRET:
        raise SystemExit("kernel.py --compile-check: unset TRITON_INTERPRET (the interpreter compiles "
                         "nothing)")
    archs = [int(a) for a in args.archs.split(",")]
    if not set(archs) <= set(ARCHS):
        raise SystemExit(f"kernel.py --archs={args.archs}: expected some of {','.join(map(str, ARCHS))}")
    names = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if not set(args.dtypes.split(",")) <= set(names):
        raise SystemExit(f"kernel.py --dtypes={args.dtypes}: expected bf16 and/or fp32")
    print(f"Triton {triton.__version__}, torch {torch.__version__}; d_ff = 8d, d_z = 128, K = 2")
    return compile_check(archs, [names[t] for t in args.dtypes.split(",")],
                         [int(d) for d in args.d.split(",")], args.quick)


def main():
    if "--compile-check" in sys.argv[1:]:
        raise SystemExit(1 if compile_check_main(sys.argv[1:]) else 0)
    p = argparse.ArgumentParser(description="Latency and memory of the infinite-MoE FFN against dense FFNs "
                                "of width d_ff and 4d: the PyTorch path (model.inf_ffn_reference) on any device, "
                                "the Triton kernel too on CUDA. GPT-2 Small shape; bf16 on CUDA, fp32 on the CPU.")
    p.add_argument("--tokens", type=int, default=None, help="default: 16384 on CUDA, 2048 on the CPU")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--d_ff", type=int, default=6144)
    p.add_argument("--d_z", type=int, default=128)
    p.add_argument("--rates", default="5,10,25,50,100", help="activation rates in percent")
    p.add_argument("--ks", default="1,2,4", help="numbers of samples K")
    p.add_argument("--quick", action="store_true", help="only K=2, r=25%%, shorter timing")
    p.add_argument("--reps", type=int, default=None,
                   help="CUDA: ms per do_bench (default 200); CPU: rounds, best of (default 3)")
    p.add_argument("--plot", default="kernel_bench.png", help="PNG written when matplotlib is installed")
    p.add_argument("--compile", action="store_true", help="time the dense FFNs and the PyTorch path "
                   "under torch.compile (inductor fuses the element-wise passes; the kernel rows stay eager)")
    p.add_argument("--system_malloc", action="store_true", help="CPU: leave glibc's allocator as it is (by "
                   "default freed memory is kept in the process, as on CUDA: see keep_freed_memory)")
    args = p.parse_args()
    if INTERPRET:
        print("kernel.py benchmark: unset TRITON_INTERPRET (the interpreter is for tests, not for timing).")
        return
    from model import inf_ffn_reference

    cuda = torch.cuda.is_available()
    device, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    rates = [25] if args.quick else [int(r) for r in args.rates.split(",")]
    ks = [2] if args.quick else [int(k) for k in args.ks.split(",")]
    reps = args.reps or ((50 if args.quick else 200) if cuda else (2 if args.quick else 3))
    N, d, d_ff, d_z = args.tokens or (16384 if cuda else 2048), args.d, args.d_ff, args.d_z
    gen = torch.Generator(device=device).manual_seed(0)
    def leaf(*shape, std=0.02, dt=dt):
        return (torch.randn(*shape, device=device, generator=gen) * std).to(dt).requires_grad_()

    x, dy = leaf(N, d, std=1.0), torch.randn(N, d, device=device, generator=gen).to(dt)
    ffn = [leaf(d_ff, d), leaf(d_ff), leaf(d, d_ff), leaf(d)]
    W_z = leaf(d_ff, d_z, std=d_z ** -0.5, dt=torch.float32)
    kept = not cuda and not args.system_malloc and sys.platform == "linux" and keep_freed_memory()
    machine = (torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads, "
               f"{'freed memory kept (as on CUDA)' if kept else 'system malloc'} "
               "(on a shared machine absolute times are noisy: compare the ratios)")
    print(f"{machine}: tokens={N} d={d} d_ff={d_ff} d_z={d_z} {str(dt).removeprefix('torch.')}")

    dense_ffn = _dense_ffn
    paths = {"PyTorch": inf_ffn_reference}
    if args.compile:  # the first call of each compiles (a minute or two on a CPU); timing starts after
        dense_ffn = torch.compile(_dense_ffn, dynamic=False)
        paths = {"PyTorch, compiled": torch.compile(inf_ffn_reference, dynamic=False)}
    if cuda:
        paths["Triton"] = inf_ffn
        # correctness at the full shape, K=2, r=25%: kernel and bf16 reference, both against an fp32 reference
        z = leaf(2, N, d_z, std=1.0, dt=torch.float32)
        res = {}
        for name, fn, dtype in (("kernel", inf_ffn, dt), ("reference", inf_ffn_reference, dt),
                                ("fp32", inf_ffn_reference, torch.float32)):
            ins = [t.detach().to(dtype if t.dtype == dt else t.dtype).requires_grad_() for t in (x, *ffn, W_z, z)]
            y = fn(*ins, 0.25)[0]
            y.backward(dy.to(dtype))
            res[name] = [y.detach()] + [t.grad for t in ins]
        names = ["y", "dx", "dW1", "db1", "dW2", "db2", "dW_z", "dz"]
        rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
        print(f"{'relative error (K=2, r=25%)':<28s}" + " ".join(f"{n:>8s}" for n in names))
        for a, b in (("kernel", "reference"), ("kernel", "fp32"), ("reference", "fp32")):
            print(f"{a + ' vs ' + b:<28s}" + " ".join(f"{rel(u, v):8.1e}" for u, v in zip(res[a], res[b])))
        del res, z

    cases = {("dense", d_ff, 0): (dense_ffn, (x, *ffn)),
             ("dense", 4 * d, 0): (dense_ffn, (x, leaf(4 * d, d), leaf(4 * d), leaf(d, 4 * d), leaf(d)))}
    for K in ks:
        z = leaf(K, N, d_z, std=1.0, dt=torch.float32)
        for r in rates:
            for path, fn in paths.items():
                cases[path, K, r] = (fn, (x, *ffn, W_z, z, r / 100))
        cases["floor", K, 25] = (partial(_floor_ffn, dense_ffn), (x, *ffn, W_z, z, 0.25))
    t = _times(cases, dy, reps)
    measured = {name: case for name, case in cases.items() if name[0] != "floor"}
    mem = {name: _saved_mib(fn, a, dy) for name, (fn, a) in measured.items()}
    peak = {name: _peak_mib(fn, a, dy) for name, (fn, a) in measured.items()} if cuda else None

    base, base4, base_mem = t["dense", d_ff, 0], t["dense", 4 * d, 0], mem["dense", d_ff, 0]
    print("\n| FFN | K | r | fwd ms | fwd+bwd ms | fwd / dense d_ff | fwd+bwd / dense d_ff | fwd+bwd / dense 4d "
          "| saved for backward MiB | / dense d_ff |" + (" peak MiB |" if cuda else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for (path, K, r), (f, fb) in t.items():
        label = (f"dense{', compiled' * args.compile}, width {K} | | " if path == "dense"
                 else f"floor: dense d_ff + W_z products + thresholds | {K} | {r}%" if path == "floor"
                 else f"∞-MoE, {path} | {K} | {r}%")
        saved = f"{mem[path, K, r]:.0f} | {mem[path, K, r] / base_mem:.2f}" if path != "floor" else "| "
        print(f"| {label} | {f:.0f} | {fb:.0f} | {f / base[0]:.2f} | {fb / base[1]:.2f} | {fb / base4[1]:.2f} "
              f"| {saved} |" + ((f" {peak[path, K, r]:.0f} |" if path != "floor" else " |") if cuda else ""))
    pt = next(iter(paths))  # the PyTorch path, eager or compiled
    if (pt, 2, 25) in t:
        ref, floor = t[pt, 2, 25], t["floor", 2, 25]
        print(f"\nK=2, r=25%: {pt} path fwd+bwd {ref[1] / base[1]:.2f}x the dense width-d_ff FFN "
              f"(target <= 1.3), {ref[1] / floor[1]:.2f}x the floor (dense + W_z products + thresholds: "
              f"{floor[1] / base[1]:.2f}x); activation memory {mem[pt, 2, 25] / base_mem:.2f}x (target <= 1.5)")
        if cuda:
            ker = t["Triton", 2, 25]
            print(f"Triton kernel: fwd+bwd {ref[1] / ker[1]:.2f}x faster than the PyTorch path (target >= 2), "
                  f"{ker[1] / base[1]:.2f}x the dense width-d_ff FFN (target <= 1.3), peak memory "
                  f"{peak['Triton', 2, 25] / peak[pt, 2, 25]:.2f} of the PyTorch path's (target <= 0.33)")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, j, title in zip(axes, (0, 1), ("forward", "forward + backward")):
        for i, K in enumerate(ks):
            for path, style in zip(paths, ("--o", "-s")):
                ax.plot(rates, [t[path, K, r][j] for r in rates], style, color=f"C{i}", label=f"{path} K={K}")
        for width, ls in ((d_ff, ":"), (4 * d, "-.")):
            ax.axhline(t["dense", width, 0][j], color="gray", ls=ls, label=f"dense FFN width {width}")
        ax.set(xlabel="activation rate r (%)", ylabel="latency (ms)", title=f"{title}, {N} tokens, d={d}, d_ff={d_ff}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
