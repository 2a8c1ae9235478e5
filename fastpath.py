"""
The fast ∞-MoE FFN in PyTorch ops: model.inf_ffn's function with a hand-written backward, on any
device (CPU, CUDA, MPS). kernel.py has the same function in Triton kernels for CUDA.

  fast_inf_ffn    the unit mask (mask_block = 1): use_kernel=off, and wherever the kernel is not
                  used
  block_inf_ffn   the block mask (mask_block = b > 1, W_z of d_ff / b rows): computes only the
                  kept blocks (see its section)

Both compute, for x (N, d) and K samples z (K, N, d_z):

    M = (1/K) sum_k mask_k,  mask_k = where(m_k >= thr_k, m_k, 0),  m_k = z_k W_z^T   (fp32)
    y = (GELU(x W1^T + b1) * M) W2^T + b2

thr_k[n] is the n_keep-th largest entry of row n of m_k, n_keep = max(1, round(top_frac * d_ff)):
every score >= it is kept, so exact ties keep more than n_keep units. Because the mask multiplies
the activation, the K samples cost ONE pass through W1 and W2 (model.inf_ffn says why). The scores
that decide a selection are computed in IEEE fp32 (ieee_fp32), whatever TF32 setting the caller
made, so every path keeps the same units.
"""
import contextlib
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from model import keep_count



@contextlib.contextmanager
def ieee_fp32():
    """Matmuls at full float32 precision, whatever TF32 setting a script chose (train.py allows
    TF32 on CUDA; oneDNN can be told to use bf16 on the CPU); the flags are restored after.

    The mask scores are only compared with each other, to pick each row's top N%. TF32 keeps 10
    mantissa bits, so it moves a score by ~1e-3 of its size: enough to swap the units on either
    side of the threshold. The selection would then depend on a global flag, and the two paths
    would keep different units. So every product that decides a selection runs in here.
    """
    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = cuda.fp32_precision, mkldnn.fp32_precision  # the new API: reading it never errors
    cuda.fp32_precision = mkldnn.fp32_precision = "ieee"
    try:
        yield
    finally:
        cuda.fp32_precision, mkldnn.fp32_precision = saved


# ----------------------------------------------------------------------------- the PyTorch path
# The selection is three custom ops: opaque nodes with a shape-only fake version, so torch.compile
# traces the rest of the FFN, its hand-written backward included, into one graph. Inside them a
# global flag is toggled and numpy runs, which a compiled graph cannot contain.

@torch.library.custom_op("infmoe::selection_scores", mutates_args=())
def selection_scores(z: torch.Tensor, W_z: torch.Tensor) -> torch.Tensor:
    """Mask scores m = z W_z^T in IEEE float32 (float64 for float64 inputs); differentiable."""
    with ieee_fp32():
        return torch.matmul(z, W_z.t())


@selection_scores.register_fake
def _(z, W_z):
    return z.new_empty(z.shape[0], W_z.shape[0])


def _scores_backward(ctx, dm):
    z, W_z = ctx.saved_tensors
    return dm @ W_z, dm.t() @ z


selection_scores.register_autograd(
    _scores_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


@torch.library.custom_op("infmoe::row_threshold", mutates_args=())
def row_threshold(m: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The n_keep-th largest entry of each row of m, shape (N, 1): the value itself, so ties with
    it are all kept by `m >= threshold`.

    Found by selection, not by sorting. On the CPU numpy's partition (a vectorised introselect),
    which moves values only, where torch's topk moves (value, index) pairs. It runs on one core:
    its own threads would fight torch's OpenMP workers, which spin-wait after each op. Elsewhere an
    unsorted topk and its minimum (GPUs run topk as a radix select).
    """
    if m.device.type != "cpu":
        return m.topk(n_keep, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    return torch.from_numpy(np.partition(m.numpy(), -n_keep, axis=-1)[:, -n_keep, None].copy())


@row_threshold.register_fake
def _(m, n_keep):
    return m.new_empty(m.shape[0], 1)


@torch.library.custom_op("infmoe::averaged_topk_mask", mutates_args=())
def averaged_topk_mask(z: torch.Tensor, W_z: torch.Tensor, top_frac: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M = (1/K) sum_k TopN%(m_k), m_k = W_z z_k: each sample keeps its round(r d_ff) largest
    scores at their own values and zeroes the rest (arXiv 2601.17680, the "partly soft" mask).

    z: (K, N, d_z). Loops over k so only (N, d_ff) float tensors exist, never (K, N, d_ff).
    Returns M (N, d_ff), counts (d_ff,): how many of the N*K samples selected each unit, and
    keep (K, N, d_ff) bool: which units each sample kept (one byte per unit and sample).
    """
    K, N, d_ff = z.shape[0], z.shape[1], W_z.shape[0]
    n_keep = keep_count(top_frac, d_ff)
    M, counts, ones = z.new_zeros(N, d_ff), z.new_zeros(d_ff), z.new_ones(N)
    m, keep_f = z.new_empty(N, d_ff), z.new_empty(N, d_ff)  # buffers reused by every sample
    keep = torch.empty(K, N, d_ff, dtype=torch.bool, device=z.device)
    for k in range(K):
        with ieee_fp32():
            torch.matmul(z[k], W_z.t(), out=m)                  # m_k = W_z z_k
        # kept as 1.0/0.0 first: a comparison writes floats faster than bools, and float-only
        # arithmetic is faster than arithmetic that mixes in a bool
        torch.ge(m, row_threshold(m, n_keep), out=keep_f)
        keep[k].copy_(keep_f)
        M.addcmul_(m, keep_f, value=1 / K)  # += TopN%(m_k) / K; M starts at +0: it holds no -0.0
        # column sums as a matrix-vector product, faster than sum(0), and exact at any matmul
        # precision (TF32, bf16): 0/1 terms and integer sums below 2^24
        counts.addmv_(keep_f.t(), ones)
    return M, counts, keep


@averaged_topk_mask.register_fake
def _(z, W_z, top_frac):
    (K, N, _), d_ff = z.shape, W_z.shape[0]
    return z.new_empty(N, d_ff), z.new_empty(d_ff), z.new_empty(K, N, d_ff, dtype=torch.bool)


BITS = {torch.float32: torch.int32, torch.float64: torch.int64}  # same-size integer views


class _FastInfFFN(torch.autograd.Function):
    """y = W2 (GELU(W1 x + b1) ⊙ M) + b2 with a hand-written backward.

    Autograd of that expression would keep the pre-activation, h = GELU(pre), M, h ⊙ M and every
    sample's keep mask. This keeps pre, M and the keep masks (K bools per unit) and recomputes h
    from pre: about 1.25x the activation memory of a dense FFN of the same width at K = 2, for one
    extra GELU in the backward.
    """

    @staticmethod
    def forward(ctx, x, W1, b1, W2, b2, W_z, z, top_frac):
        with torch.autocast(x.device.type, enabled=False):  # scores at least fp32: fewer exact ties
            dt = torch.promote_types(z.dtype, torch.float32)
            z, W_z = z.to(dt), W_z.to(dt)
            M, counts, keep = averaged_topk_mask(z, W_z, top_frac)
        pre = F.linear(x, W1, b1)
        M_h = M.to(pre.dtype)
        y = F.linear(F.gelu(pre).mul_(M_h), W2, b2)        # h ⊙ M, written over h
        ctx.save_for_backward(x, W1, W2, W_z, z, pre, M_h, keep)
        ctx.has_bias = b1 is not None, b2 is not None
        # non-zeros of M, counted on its bits: the integer count is vectorised, the float one
        # branches on every element; M holds no -0.0 (it starts at +0, and +0 + -0 = +0)
        n_active = torch.count_nonzero(M.view(BITS[M.dtype])).float()
        ctx.mark_non_differentiable(counts, n_active)
        return y, counts, n_active

    @staticmethod
    def backward(ctx, dy, _dcounts, _dn_active):
        x, W1, W2, W_z, z, pre, M, keep = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = dW1 = db1 = dW2 = db2 = dW_z = dz = None
        dy = dy.to(pre.dtype)
        da = dy @ W2                          # dL/d(h ⊙ M)
        h = F.gelu(pre)
        dM = da * h                           # dL/dM
        if need[3]:
            # h ⊙ M again, written over h. Not h.mul_(M): that is the forward's very op, so under
            # torch.compile it would be merged with it and its result kept for backward
            dW2 = dy.t() @ torch.mul(M, h, out=h)
        if need[4] and ctx.has_bias[1]:
            db2 = dy.sum(0)
        # dL/dpre = (dL/dh) GELU'(pre), written over h: on the CPU fresh memory costs page faults
        dpre = torch.ops.aten.gelu_backward.grad_input(da.mul_(M), pre, grad_input=h)
        if need[0]:
            dx = dpre @ W1
        if need[1]:
            dW1 = dpre.t() @ x
        if need[2] and ctx.has_bias[0]:
            db1 = dpre.sum(0)
        if need[5] or need[6]:
            # M = (1/K) sum_k TopN%(m_k): each m_k gets dL/dM / K on the units it kept, 0 elsewhere
            K = len(keep)
            dM = dM.to(z.dtype)
            dm = da if da.dtype == dM.dtype else torch.empty_like(dM)  # da is no longer needed
            dz = torch.empty_like(z) if need[6] else None
            dW_z = torch.zeros_like(W_z) if need[5] else None
            for k in range(K):
                dm.copy_(keep[k]).mul_(dM)   # K dL/dm_k
                if need[6]:
                    torch.mm(dm, W_z, out=dz[k])                # m_k = W_z z_k
                if need[5]:
                    dW_z.addmm_(dm.t(), z[k])
            for g in (dz, dW_z):  # the 1/K, applied to the small results rather than to dM
                if g is not None:
                    g.div_(K)
        return dx, dW1, db1, dW2, db2, dW_z, dz, None


def fast_inf_ffn(x, W1, b1, W2, b2, W_z, z, top_frac):
    """The ∞-MoE FFN in PyTorch ops, on any device: model.inf_ffn's values and gradients.
    x: (N, d); z: (K, N, d_z) float32, its scores computed in IEEE float32. Returns y, counts
    (d_ff,) and n_active (non-zeros of M), the last two detached statistics.

    What makes it fast: one W1/W2 pass for all K samples; each row's threshold by selection, not
    sorting (row_threshold); M built in place, one sample at a time; a hand-written backward
    (_FastInfFFN) that keeps pre, M and the K keep masks and recomputes GELU.
    """
    return _FastInfFFN.apply(x, W1, b1, W2, b2, W_z, z, top_frac)


# ----------------------------------------------------------------------------- the block path
# mask_block = b > 1 (model.inf_ffn's block form): a sample keeps whole blocks of b units, so a
# token needs only the union U of its samples' kept blocks. That is a dropless MoE of d_ff/b
# experts of width b: gather the (block, token) pairs of U, run each block's rows through its
# slices of W1 and W2 with GELU and the mask value between (grouped GEMMs), add the rows back into
# their tokens. No (N, d_ff) tensor exists and the cost follows |U|, not d_ff. Rows are laid out
#   grouped  back to back, block by block: F.grouped_mm over the blocks' end rows
#   bmm      each block padded to the busiest block's C rows: one batched GEMM

def _gemm(x, gemm, b):
    """gemm="auto": grouped_mm where it is one kernel (CUTLASS: sm90/sm100, bf16) or a loop on the
    host anyway (the CPU), and its rows of d and b values are 16-byte aligned as it demands;
    otherwise padded bmm (grouped_mm's CUDA fallback reads the group ends on the host in every
    GEMM: a sync each)."""
    if gemm != "auto":
        return gemm
    one_kernel = not x.is_cuda or (torch.cuda.get_device_capability(x.device)[0] in (9, 10)
                                   and x.dtype == torch.bfloat16)
    return "grouped" if one_kernel and x.shape[1] % 8 == 0 and b % 8 == 0 else "bmm"


def _gmm(a, w, ends, bias=None, blk=None):
    """Rows of group g of a (R, p) times w[g] (p, q), + bias[g]: (R, q). ends None: G groups of
    R/G padded rows (bmm); else each group's end row (grouped_mm; blk: each row's group)."""
    G = len(w)
    if ends is None:
        a = a.view(G, -1, a.shape[1])
        out = torch.bmm(a, w) if bias is None else torch.baddbmm(bias.view(G, 1, -1), a, w)
        return out.view(-1, w.shape[2])
    out = F.grouped_mm(a, w, offs=ends)
    return out if bias is None else out.add_(bias.view(G, -1)[blk])


def _block_weights(W1, W2, G):
    """Views of W1 (d_ff, d) and W2 (d, d_ff) as G blocks, no copies: for pre = x W1_g^T, out = a
    W2_g^T, da = dout W2_g and dx = dpre W1_g. Each is row- or column-major per block, as
    grouped_mm wants."""
    D, b = W1.shape[1], W1.shape[0] // G
    W1g, W2g = W1.view(G, b, D), W2.view(D, G, b).transpose(0, 1)
    return W1g.transpose(1, 2), W2g.transpose(1, 2), W2g, W1g


def _gmm_t(a, b, ends, G):
    """Per group: a_g^T b_g summed over its rows, (G, p, q): the weight gradients."""
    if ends is None:
        return torch.bmm(a.view(G, -1, a.shape[1]).transpose(1, 2), b.view(G, -1, b.shape[1]))
    return F.grouped_mm(a.t(), b, offs=ends)


def _block_rows(keep, M, padded):
    """The rows to compute, from the keep decisions (K, N, G): rows (R,), each row's token, block
    by block (padded: C rows per block, pads on token 0); Mval (R,), each row's mask value (pads:
    0); pairs (2, P), for each pair of U its row and its index t * G + g into (N, G)."""
    union = keep.any(0)                                          # U: (N, G)
    per_block = union.sum(0)
    P, C = torch.stack([per_block.sum(), per_block.max()]).tolist()  # the one host sync
    blk, tok = torch.nonzero_static(union.t(), size=P).unbind(1)  # sorted by block
    row = torch.arange(P, device=M.device)
    if padded:
        row += blk * C - (per_block.cumsum(0) - per_block)[blk]  # its slot in its block's C rows
    R = len(per_block) * C if padded else P
    flat = tok * union.shape[1] + blk
    return (tok.new_zeros(R).index_copy_(0, row, tok),
            M.new_zeros(R).index_copy_(0, row, M.view(-1)[flat]), torch.stack([row, flat]))


def _ends(keep, gemm):
    return None if gemm == "bmm" else keep.any(0).sum(0).cumsum(0).to(torch.int32)


@torch.library.custom_op("infmoe::block_ffn_fwd", mutates_args=())
def _block_fwd(x: torch.Tensor, W1: torch.Tensor, b1: Optional[torch.Tensor], W2: torch.Tensor,
               b2: Optional[torch.Tensor], W_z: torch.Tensor, z: torch.Tensor, top_frac: float,
               gemm: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, counts, n_active, and for backward: pre (R, b), Mval, rows, pairs, keep."""
    (G, _), D, gemm = W_z.shape, x.shape[1], _gemm(x, gemm, W1.shape[0] // W_z.shape[0])
    with torch.autocast(x.device.type, enabled=False):
        dt = torch.promote_types(z.dtype, torch.float32)  # scores at least fp32, as fast_inf_ffn
        M, counts, keep = averaged_topk_mask(z.to(dt), W_z.to(dt), top_frac)  # over (N, G) blocks
        rows, Mval, pairs = _block_rows(keep, M, gemm == "bmm")
        ends, (W1g_t, W2g_t, _, _) = _ends(keep, gemm), _block_weights(W1, W2, G)
        pre = _gmm(x.index_select(0, rows), W1g_t, ends, b1, pairs[1] % G)  # gathered W1 x + b1
        a = F.gelu(pre).mul_(Mval.to(x.dtype)[:, None])           # GELU(pre) * the mask value
        out = _gmm(a, W2g_t, ends)                                # (R, d)
        y = out.new_zeros(len(M), D).index_add_(0, rows, out)     # scatter (pads add zeros)
        if b2 is not None:
            y += b2
    return y, counts, torch.count_nonzero(M).float(), pre, Mval, rows, pairs, keep


def _rows_count():
    """A data-dependent size for the fake version: how many rows the path computes. Those tensors
    flow only into _block_bwd, so they need not break the graph as dynamo's default has it for
    such sizes (capture_dynamic_output_shape_ops); torch's own device-mesh op makes its size so."""
    env = torch.library.get_ctx()._shape_env
    if env is None:
        return torch.library.get_ctx().new_dynamic_size()
    n = env.create_unbacked_symint()
    torch.fx.experimental.symbolic_shapes._constrain_range_for_size(n)
    return n


@_block_fwd.register_fake
def _(x, W1, b1, W2, b2, W_z, z, top_frac, gemm):
    R, P, (G, _), (K, N, _) = _rows_count(), _rows_count(), W_z.shape, z.shape
    dt, i64 = dict(dtype=torch.promote_types(z.dtype, torch.float32)), dict(dtype=torch.int64)
    return (x.new_empty(N, W2.shape[0]), x.new_empty(G, **dt), x.new_empty((), dtype=torch.float32),
            x.new_empty(R, W1.shape[0] // G), x.new_empty(R, **dt), x.new_empty(R, **i64),
            x.new_empty(2, P, **i64), x.new_empty(K, N, G, dtype=torch.bool))


@torch.library.custom_op("infmoe::block_ffn_bwd", mutates_args=())
def _block_bwd(dy: torch.Tensor, x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor,
               W_z: torch.Tensor, z: torch.Tensor, pre: torch.Tensor, Mval: torch.Tensor,
               rows: torch.Tensor, pairs: torch.Tensor, keep: torch.Tensor, gemm: str,
               need: List[bool]) -> List[torch.Tensor]:
    """(dx, dW1, db1, dW2, db2, dW_z, dz); those `need` does not ask for are empty."""
    (G, _), (Fh, D), K, gemm = W_z.shape, W1.shape, len(keep), _gemm(x, gemm, len(pre[0]))
    grads = [x.new_empty(0) for _ in range(7)]
    with torch.autocast(x.device.type, enabled=False):
        ends, (_, _, W2g, W1g) = _ends(keep, gemm), _block_weights(W1, W2, G)
        dY = dy.index_select(0, rows)                                   # gather
        da = _gmm(dY, W2g, ends)                                        # dL/da, a = h * mask
        h = F.gelu(pre)
        dmask = torch.mul(da, h, out=torch.empty_like(h)).sum(1)        # dL/d(each row's mask)
        m = Mval.to(pre.dtype)[:, None]
        if need[3]:
            grads[3] = _gmm_t(dY, h.mul_(m), ends, G).transpose(0, 1).reshape(D, Fh)
        dpre = torch.ops.aten.gelu_backward.grad_input(da.mul_(m), pre, grad_input=h)
        if need[0]:
            dxr = _gmm(dpre, W1g, ends)
            grads[0] = dxr.new_zeros(x.shape).index_add_(0, rows, dxr)
        if need[1]:
            grads[1] = _gmm_t(dpre, x.index_select(0, rows), ends, G).view(Fh, D)
        if need[2]:  # per block: the sum of its rows
            grads[2] = (dpre.view(G, -1, dpre.shape[1]).sum(1) if ends is None else
                        dpre.new_zeros(G, dpre.shape[1]).index_add_(0, pairs[1] % G, dpre)).view(Fh)
        if need[4]:
            grads[4] = dy.sum(0)
        if need[5] or need[6]:  # as fast_inf_ffn's backward, on the (N, G) blocks
            dM = z.new_zeros(keep[0].numel()).index_copy_(0, pairs[1], dmask[pairs[0]].to(z.dtype))
            dm = keep.to(z.dtype).mul_(dM.view(keep[0].shape))           # K dL/dm_k
            if need[6]:
                grads[6] = torch.matmul(dm, W_z).div_(K)
            if need[5]:
                grads[5] = (dm.flatten(0, 1).t() @ z.flatten(0, 1)).div_(K)
    return grads


@_block_bwd.register_fake
def _(dy, x, W1, W2, W_z, z, pre, Mval, rows, pairs, keep, gemm, need):
    shapes = [x, W1, W1[:, 0], W2, W2[:, 0], W_z, z]
    return [torch.empty_like(t) if n else x.new_empty(0) for t, n in zip(shapes, need)]


def _block_setup(ctx, inputs, output):
    x, W1, b1, W2, b2, W_z, z, _, ctx.gemm = inputs
    ctx.save_for_backward(x, W1, W2, W_z, z, *output[3:])
    ctx.has_bias = b1 is not None, b2 is not None
    ctx.set_materialize_grads(False)


def _block_backward(ctx, dy, *_):
    need = list(ctx.needs_input_grad[:7])
    need[2], need[4] = need[2] and ctx.has_bias[0], need[4] and ctx.has_bias[1]
    if dy is None or not any(need):
        return (None,) * 9
    grads = _block_bwd(dy.contiguous(), *ctx.saved_tensors, ctx.gemm, need)
    return (*(g if n else None for g, n in zip(grads, need)), None, None)


_block_fwd.register_autograd(_block_backward, setup_context=_block_setup)


def block_inf_ffn(x, W1, b1, W2, b2, W_z, z, top_frac, gemm="auto"):
    """The ∞-MoE FFN with a block mask (W_z: (d_ff / b, d_z), b > 1), computing only the kept
    blocks: model.inf_ffn's values and gradients, fast_inf_ffn's signature. gemm: "grouped",
    "bmm" or "auto" (see _gemm). Keeps for backward the pre-activations of the computed rows
    (|U| b values, plus bmm's pads), the mask value and token of each row, and the keep bits."""
    y, counts, n_active, *_ = _block_fwd(x.contiguous(), W1.contiguous(), b1, W2.contiguous(), b2,
                                         W_z, z, top_frac, gemm)
    return y, counts.detach(), n_active.detach()
