"""
GPT-2 with one switch for its feed-forward layer (GPTConfig.ffn, a name in FFNS):

  dense     GPT-2's MLP, hidden 4d
  switch    Switch Transformer: 4 experts of width 2d, top-1 routing
  top2      GShard/Mixtral-style: 4 experts of width 2d, top-2 routing
  inf       ∞-MoE (arXiv 2601.17680): a continuous expert index z ~ N(mu(x), diag sigma^2(x))
            selects a "partly soft" top-N% mask over a d_ff = 8d hidden layer
  inf_deep  ∞-MoE over two masked hidden layers of 4d, one z, a W_z and a top fraction per layer

and flags for the paper's open directions, off by default: a deeper router (router_depth), a
mixture-of-Gaussians router (router_mix), the mask before the activation (gate=pre), and
DeepSeek-V3's aux-loss-free balancing for switch/top2 (balance=bias).

Everything else is nanoGPT's GPT-2: learned positions, pre-LayerNorm blocks,
causal SDPA attention, tied embeddings, residual projections scaled by 1/sqrt(2 n_layer).
"""
import contextlib
import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from statistics import NormalDist
from typing import Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024        # context length in tokens
    vocab_size: int = 50257       # GPT-2's BPE vocabulary
    n_layer: int = 12             # transformer blocks
    n_head: int = 12              # attention heads (n_embd must divide by it)
    n_embd: int = 768             # d, the residual stream width
    dropout: float = 0.0          # on embeddings, attention and residual branches; 0 for pretraining
    bias: bool = True             # biases in Linear layers and LayerNorms, as in GPT-2
    gelu_approx: str = "none"     # F.gelu's approximate: none (exact) | tanh (GPT-2's, set by init_from)
    ffn: str = "dense"          # a name in FFNS: dense | switch | top2 | inf | inf_deep
    d_ff_mult: int = 0          # FFN hidden width / n_embd; 0: the FFN's default (dense 4, MoEs 8)
    # discrete MoE (switch, top2)
    n_expert: int = 4             # experts of width d_ff / n_expert
    moe_top_k: int = 0            # experts per token; 0: 1 for switch, 2 for top2 (changeable at inference)
    aux_loss_coef: float = 0.01   # alpha, Switch load-balancing loss
    z_loss_coef: float = 0.001    # beta, router z-loss
    balance: str = "loss"         # loss: Switch's aux loss | bias: DeepSeek-V3's aux-loss-free bias
    balance_rate: float = 1e-3    # gamma: the bias step per optimizer step (balance=bias)
    # ∞-MoE
    d_z: int = 128              # dimension of the continuous expert index z
    top_frac: float = 0.25      # r: fraction of the d_ff hidden units each sample keeps
    z_samples: int = 2          # K: Monte-Carlo samples of z per token (changeable at inference)
    z_deterministic: bool = False  # use z = mu (no noise): reproducible evaluation and sampling
    use_kernel: str = "auto"    # Triton kernel for ffn=inf: auto (CUDA tensors) | on | off
    # ∞-MoE variants beyond the paper; the defaults are the paper's method
    router_depth: int = 1       # linear layers of the router MLP (1: the paper's linear router)
    router_width: int = 0       # hidden width of a deeper router (0: n_embd)
    router_mix: int = 1         # C: Gaussian components of the router (1: the paper's one Gaussian)
    gate: str = "post"          # post: W2 (Act(W1 x) ⊙ M), the paper | pre: W2 Act((W1 x) ⊙ M)
    top_frac2: float = 0.0      # inf_deep: r of the second masked layer (0: top_frac)

    def __post_init__(self):
        if self.ffn not in FFNS:
            raise ValueError(f"GPTConfig.ffn={self.ffn!r}: expected one of {', '.join(FFNS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.d_ff_mult < 0:
            raise ValueError(f"GPTConfig.d_ff_mult={self.d_ff_mult}: must be >= 0 (0: the FFN's default)")
        if not 0.0 < self.top_frac <= 1.0:
            raise ValueError(f"GPTConfig.top_frac={self.top_frac}: must be in (0, 1]")
        if not 0.0 <= self.top_frac2 <= 1.0:
            raise ValueError(f"GPTConfig.top_frac2={self.top_frac2}: must be in (0, 1], or 0: top_frac")
        if self.z_samples < 1:
            raise ValueError(f"GPTConfig.z_samples={self.z_samples}: need at least one sample")
        if self.use_kernel not in ("auto", "on", "off"):
            raise ValueError(f"GPTConfig.use_kernel={self.use_kernel!r}: expected auto, on or off")
        if self.gelu_approx not in ("none", "tanh"):
            raise ValueError(f"GPTConfig.gelu_approx={self.gelu_approx!r}: expected none or tanh")
        if self.gelu_approx == "tanh" and issubclass(FFNS[self.ffn], InfMoE):  # its paths: exact GELU
            raise ValueError(f"GPTConfig: ffn={self.ffn} computes the exact GELU only (gelu_approx=none)")
        if self.router_depth < 1 or self.router_mix < 1 or self.router_width < 0:
            raise ValueError(f"GPTConfig: router_depth={self.router_depth}, router_mix={self.router_mix} "
                             f"must be >= 1 and router_width={self.router_width} >= 0")
        if self.gate not in ("post", "pre"):
            raise ValueError(f"GPTConfig.gate={self.gate!r}: expected post or pre")
        if self.balance not in ("loss", "bias"):
            raise ValueError(f"GPTConfig.balance={self.balance!r}: expected loss or bias")
        check = getattr(FFNS[self.ffn], "check_config", None)  # an FFN's own constraints, if it has any
        if check:
            check(self)

    @property
    def d_ff(self):
        """Width of the FFN's whole hidden (expert) space."""
        return (self.d_ff_mult or FFNS[self.ffn].d_ff_mult) * self.n_embd

    @property
    def n_keep(self):
        return keep_count(self.top_frac, self.d_ff)


def keep_count(top_frac, d_ff):
    """Hidden units one ∞-MoE sample keeps: round(r * d_ff), at least one."""
    return max(1, int(round(top_frac * d_ff)))


def compute_dtype(x):
    """The dtype matmuls on x run in: autocast's when it is on, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def residual(p):
    """Mark p as a projection into the residual stream: GPT-2 scales its init by 1/sqrt(2 n_layer)."""
    p.residual_proj = True
    return p


# ----------------------------------------------------------------------------- attention

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        residual(self.c_proj.weight)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


# ----------------------------------------------------------------------------- FFNs
# Every FFN class states d_ff_mult (its default hidden width / n_embd) and active_params() (the
# parameters one token multiplies with: num_params and MFU add them up); it may set self.aux_loss
# (added to the loss), self.stats (logged), after_step() (called after each optimizer step) and
# check_config(config). Its output projection is marked with residual(). FFNS, below, names them.

class DenseFFN(nn.Module):
    """GPT-2's MLP: W2 GELU(W1 x)."""
    d_ff_mult = 4

    def __init__(self, config):
        super().__init__()
        self.W1 = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.W2 = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)
        residual(self.W2.weight)
        self.approximate = config.gelu_approx
        self.stats = {}

    def forward(self, x):
        return self.W2(F.gelu(self.W1(x), approximate=self.approximate))

    def active_params(self):
        return sum(p.numel() for p in self.parameters())


class TopKMoE(nn.Module):
    """Switch Transformer, dropless: top-1 routing over n_expert FFNs of width d_ff / n_expert, the
    output scaled by the raw router probability p_e.

    Tokens are sorted by expert and run through grouped GEMMs whose group offsets stay on the
    device, so there is no host sync and no capacity: every (token, slot) is computed.
    balance=bias (DeepSeek-V3, arXiv 2412.19437 Sec. 2.1.2): instead of the aux loss, a per-expert
    bias b is added to p to choose the experts (not to weigh them); after each optimizer step
    b_i += gamma * sign(mean load - load_i). b gets no gradient; it is a buffer, so it is checkpointed.
    """
    d_ff_mult = 8
    top_k, renormalise = 1, False

    @classmethod
    def check_config(cls, config):
        k = config.moe_top_k or cls.top_k
        if not 1 <= k <= config.n_expert:
            raise ValueError(f"GPTConfig: n_expert={config.n_expert}, moe_top_k={config.moe_top_k} do not "
                             f"allow {k} experts per token for ffn={config.ffn}")
        if config.d_ff % config.n_expert:
            raise ValueError(f"GPTConfig: d_ff={config.d_ff} is not divisible by n_expert={config.n_expert}")
        if config.n_embd % 8:  # grouped_mm wants 16-byte aligned rows (bf16: multiples of 8)
            raise ValueError(f"GPTConfig.n_embd={config.n_embd}: switch/top2 need a multiple of 8")

    def __init__(self, config):
        super().__init__()
        E, d, h = config.n_expert, config.n_embd, config.d_ff // config.n_expert
        self.config, self.n_expert = config, E  # config shared with GPT: top-k can change at inference
        self.alpha, self.beta = config.aux_loss_coef, config.z_loss_coef
        self.W_r = nn.Linear(d, E, bias=False)                 # router
        self.W1 = nn.Parameter(torch.randn(E, d, h) * 0.02)    # experts, stored (E, in, out) for grouped_mm
        self.W2 = nn.Parameter(torch.randn(E, h, d) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(E, h)) if config.bias else None
        self.b2 = nn.Parameter(torch.zeros(E, d)) if config.bias else None
        residual(self.W2)
        if config.balance == "bias":
            self.register_buffer("balance_bias", torch.zeros(E))
        self.aux_loss = None
        self.stats = {}

    def experts_per_token(self):
        return self.config.moe_top_k or self.top_k

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        N, E, k = x.shape[0], self.n_expert, self.experts_per_token()
        with torch.autocast(x.device.type, enabled=False):  # router math in float32
            logits = F.linear(x.float(), self.W_r.weight.float())
            p = logits.softmax(dim=-1)
        if self.config.balance == "bias":  # the bias chooses the experts; p alone weighs them
            top_e = (p + self.balance_bias).topk(k, dim=-1).indices
            top_p = p.gather(-1, top_e)
        else:
            top_p, top_e = p.topk(k, dim=-1)                   # (N, k)
        if self.renormalise:
            top_p = top_p / top_p.sum(-1, keepdim=True)

        # group the N*k (token, slot) assignments by expert
        flat_e = top_e.flatten()
        order = flat_e.argsort(stable=True)
        token = order // k
        counts = flat_e.new_zeros(E).scatter_add_(0, flat_e, torch.ones_like(flat_e))  # bincount syncs on CUDA
        offs = counts.cumsum(0).to(torch.int32)
        e_sorted = flat_e[order]

        dt = compute_dtype(x)
        xs = x[token].to(dt)
        h = F.grouped_mm(xs, self.W1.to(dt), offs=offs)
        if self.b1 is not None:
            h = h + self.b1.to(dt)[e_sorted]
        out = F.grouped_mm(F.gelu(h, approximate=self.config.gelu_approx), self.W2.to(dt), offs=offs)
        if self.b2 is not None:
            out = out + self.b2.to(dt)[e_sorted]
        out = out * top_p.flatten()[order, None].to(dt)
        y = torch.zeros_like(x, dtype=dt).index_add_(0, token, out)

        # Switch load balancing: alpha * E * sum_i f_i P_i, and the router z-loss
        f = counts.float() / (N * k)
        P = p.mean(0)
        lb_loss = self.alpha * E * (f * P).sum()
        z_loss = self.beta * torch.logsumexp(logits, dim=-1).square().mean()
        self.aux_loss = z_loss if self.config.balance == "bias" else lb_loss + z_loss
        self.stats = {"load": f.detach(), "lb_loss": lb_loss.detach(), "z_loss": z_loss.detach()}
        return y.view(shape)

    @torch.no_grad()
    def after_step(self):
        """balance=bias: nudge each expert's bias toward equal load, from the last batch's load f."""
        if self.config.balance != "bias" or "load" not in self.stats:
            return
        f = self.stats["load"]
        if dist.is_available() and dist.is_initialized():  # all ranks' load: one bias everywhere
            f = f.clone()
            dist.all_reduce(f)
        self.balance_bias += self.config.balance_rate * torch.sign(f.mean() - f)

    def active_params(self):
        """The router and experts_per_token of the n_expert experts."""
        experts = sum(p.numel() for p in (self.W1, self.W2, self.b1, self.b2) if p is not None)
        return self.W_r.weight.numel() + self.experts_per_token() * experts // self.n_expert


class Top2MoE(TopKMoE):
    """GShard/Mixtral-style: top-2 routing, the two probabilities renormalised to sum to 1."""
    top_k, renormalise = 2, True


# The selection is three custom ops: opaque nodes with a shape-only fake version, so torch.compile
# traces the rest of the ∞-MoE FFN, its hand-written backward included, into one graph. Inside them
# a global flag is toggled and numpy runs, which a compiled graph cannot contain.
@contextlib.contextmanager
def ieee_fp32():
    """Matmuls at full float32 precision, whatever TF32 setting a script chose (train.py allows TF32
    on CUDA; oneDNN can be told to use bf16 on the CPU); the flags are restored after.

    The mask scores are only compared with each other, to pick each row's top N%. TF32 keeps 10
    mantissa bits, so it moves a score by ~1e-3 of its size: enough to swap the units on either side
    of the threshold. The selection would then depend on a global flag, and the Triton kernel and
    this path would keep different units. So the score product always runs at full precision.
    """
    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = cuda.fp32_precision, mkldnn.fp32_precision  # the new API: reading it never errors
    cuda.fp32_precision = mkldnn.fp32_precision = "ieee"
    try:
        yield
    finally:
        cuda.fp32_precision, mkldnn.fp32_precision = saved


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
    """The n_keep-th largest entry of each row of m, shape (N, 1): the value itself, so ties with it
    are all kept by `m >= threshold`.

    Found by selection, not by sorting. On the CPU numpy's partition (a vectorised introselect) is
    ~3x faster than torch's topk, which moves (value, index) pairs. It runs on one core: splitting
    the rows over threads halves it alone, but its threads then fight torch's OpenMP workers, which
    spin-wait after each op (under torch.compile the layer got 1.6x slower). Elsewhere an unsorted
    topk and its minimum (GPUs run topk as a radix select).
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
    Tie rule (shared with kernel.py): keep every score >= the n_keep-th largest of its row.
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
        # kept as 1.0/0.0 first: a comparison writes floats faster than bools (5 vs 9 ms at GPT-2
        # Small's width), and float-only arithmetic is several times faster than mixing in a bool
        torch.ge(m, row_threshold(m, n_keep), out=keep_f)
        keep[k].copy_(keep_f)
        M.addcmul_(m, keep_f, value=1 / K)  # += TopN%(m_k) / K; M starts at +0: it holds no -0.0
        # column sums as a matrix-vector product, 2x faster than sum(0); exact at any matmul precision
        # (TF32, bf16): 0/1 terms and integer sums below 2^24
        counts.addmv_(keep_f.t(), ones)
    return M, counts, keep


@averaged_topk_mask.register_fake
def _(z, W_z, top_frac):
    (K, N, _), d_ff = z.shape, W_z.shape[0]
    return z.new_empty(N, d_ff), z.new_empty(d_ff), z.new_empty(K, N, d_ff, dtype=torch.bool)


BITS = {torch.float32: torch.int32, torch.float64: torch.int64}  # same-size integer views


class _InfFFN(torch.autograd.Function):
    """y = W2 (GELU(W1 x + b1) ⊙ M) + b2 with a hand-written backward.

    Autograd of that expression would keep the pre-activation, h = GELU(pre), M, h ⊙ M and every
    sample's keep mask. This keeps pre, M and the keep masks (K bools per unit) and
    recomputes h from pre: about 1.25x the activation memory of a dense FFN of the same width at
    K = 2, for one extra GELU in the backward.
    """

    @staticmethod
    def forward(ctx, x, W1, b1, W2, b2, W_z, z, top_frac):
        with torch.autocast(x.device.type, enabled=False):  # scores at least float32: fewer exact ties
            dt = torch.promote_types(z.dtype, torch.float32)
            z, W_z = z.to(dt), W_z.to(dt)
            M, counts, keep = averaged_topk_mask(z, W_z, top_frac)
        pre = F.linear(x, W1, b1)
        M_h = M.to(pre.dtype)
        y = F.linear(F.gelu(pre).mul_(M_h), W2, b2)        # h ⊙ M, written over h
        ctx.save_for_backward(x, W1, W2, W_z, z, pre, M_h, keep)
        ctx.has_bias = b1 is not None, b2 is not None
        # non-zeros of M, counted on its bits: the integer count is vectorised, the float one branches
        # on every element (~8x slower on a CPU); M holds no -0.0 (it starts at +0, and +0 + -0 = +0)
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
            # torch.compile it would be merged with it and its result kept for backward (+0.5x memory)
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
                dm.copy_(keep[k].view(torch.uint8)).mul_(dM)   # K dL/dm_k
                if need[6]:
                    torch.mm(dm, W_z, out=dz[k])                # m_k = W_z z_k
                if need[5]:
                    dW_z.addmm_(dm.t(), z[k])
            for g in (dz, dW_z):  # the 1/K, applied to the small results rather than to dM
                if g is not None:
                    g.div_(K)
        return dx, dW1, db1, dW2, db2, dW_z, dz, None


def inf_ffn_reference(x, W1, b1, W2, b2, W_z, z, top_frac):
    """PyTorch ∞-MoE FFN: y = W2 (GELU(W1 x + b1) ⊙ M) + b2, M = (1/K) sum_k TopN%(W_z z_k).

    The Monte-Carlo mean over K samples of z moves inside W2 because the mask multiplies the
    activation: one W1/W2 pass for all K (arXiv 2601.17680). Same signature and result as
    kernel.inf_ffn. x: (N, d); z: (K, N, d_z) float32, its scores computed in IEEE float32.
    Returns y, counts (d_ff,) and n_active (non-zeros of M), the last two detached statistics.

    What makes it fast (same values and gradients as autograd of the equations above): each row's
    threshold by selection, not sorting (row_threshold); M built in place, one sample at a time;
    a hand-written backward (_InfFFN) that keeps pre, M and the K keep masks and recomputes GELU.
    test_model.py's naive_inf_ffn, K separate passes under plain autograd, is its test oracle.
    """
    return _InfFFN.apply(x, W1, b1, W2, b2, W_z, z, top_frac)


def topk_keep(m, n_keep):
    """TopN%(m) of one sample: the n_keep largest scores of each row at their own values, the rest 0,
    with averaged_topk_mask's tie rule. Returns the mask and which entries it keeps."""
    keep = m >= row_threshold(m.detach(), n_keep)
    return torch.where(keep, m, 0.0), keep


def masked_mlp(x, layers, W_zs, z, top_fracs, pre_gate):
    """∞-MoE FFN one sample at a time, for the variants whose mask does not commute with the average
    over samples (so the one-pass inf_ffn_reference does not apply):

      h_0 = x,  h_l = Act(W_l h_{l-1} + b_l) ⊙ M_l   (pre_gate: Act((W_l h_{l-1} + b_l) ⊙ M_l)),
      M_l = TopN%_{r_l}(W_z,l z_k),  y = (1/K) sum_k W_out h_{L,k} + b_out

    x: (N, d) in the compute dtype; layers: the L masked nn.Linear and the output one; z: (K, N, d_z)
    float32. Returns y, counts (the selections of all L layers' units, concatenated) and n_active (the
    non-zeros of the union of the masks), detached, as inf_ffn_reference. Keeps K * L (N, d_ff) tensors
    for backward: the price of a mask that cannot be averaged first.
    """
    *hidden, out = layers
    counts = [torch.zeros(W_z.shape[0], device=x.device) for W_z in W_zs]
    union = [torch.zeros(x.shape[0], W_z.shape[0], dtype=torch.bool, device=x.device) for W_z in W_zs]
    y = 0.0
    for k in range(z.shape[0]):
        h = x
        for l, (layer, W_z, r) in enumerate(zip(hidden, W_zs, top_fracs)):
            with torch.autocast(x.device.type, enabled=False):  # mask scores in float32, as InfMoE
                M, keep = topk_keep(selection_scores(z[k], W_z.float()), keep_count(r, W_z.shape[0]))
            b = None if layer.bias is None else layer.bias.to(x.dtype)
            a = F.linear(h, layer.weight.to(x.dtype), b)
            M = M.to(a.dtype)
            h = F.gelu(a * M) if pre_gate else F.gelu(a) * M
            counts[l] += keep.sum(0, dtype=torch.float32)
            union[l] |= M != 0
        y = y + F.linear(h, out.weight.to(x.dtype))
    y = y / z.shape[0]
    if out.bias is not None:
        y = y + out.bias.to(x.dtype)
    n_active = sum(u.sum(dtype=torch.float32) for u in union)
    return y, torch.cat(counts).detach(), n_active.detach()


class GaussianRouter(nn.Module):
    """The paper's router (Sec. 3.2): x -> (mu, log sigma^2) of p(z|x) = N(mu(x), diag sigma^2(x)).

    A "small neural network": router_depth linear layers with GELU between, hidden router_width
    (depth 1: the linear map the paper's results use). log sigma^2 is bounded smoothly to (-6, 6):
    sigma in (0.05, 20), safe in bf16, never 0 or inf.
    """
    LOGVAR_BOUND = 6.0

    def __init__(self, config, n_out=None):
        super().__init__()
        width = config.router_width or config.n_embd
        dims = [config.n_embd] + [width] * (config.router_depth - 1) + [n_out or 2 * config.d_z]
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b, bias=config.bias), nn.GELU()]
        self.net = nn.Sequential(*layers[:-1])
        self.stats = {}

    def bound(self, raw):
        return self.LOGVAR_BOUND * torch.tanh(raw / self.LOGVAR_BOUND)

    def forward(self, x):
        mu, raw = self.net(x).chunk(2, dim=-1)
        return mu, self.bound(raw)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        for name in ("weight", "bias"):  # checkpoints from when the router was one nn.Linear
            if prefix + name in state_dict:
                state_dict[prefix + "net.0." + name] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args)


class MixtureRouter(GaussianRouter):
    """p(z|x) = sum_c pi_c(x) N(mu_c(x), diag sigma_c^2(x)): C Gaussians, weights from x (the paper's
    future work, Sec. 6.2). Reparameterisation: the per-component expectation, E[f] = sum_c pi_c
    E_{N_c}[f], one z_c = mu_c + sigma_c eps per component, so pi gets an exact gradient through its
    weights (no sampled component index, no Gumbel-softmax relaxation).

    The weighting costs nothing extra: TopN% is positively homogeneous, TopN%(W_z (a z)) = a TopN%(W_z z)
    for a > 0, so weighting component c's mask by pi_c equals scaling its z by pi_c. The router returns C
    Gaussians scaled by C pi_c, (C, N, d_z) each; their plain average over c is the pi-weighted mixture,
    and the one-pass FFN (and the kernel) runs on the K * C samples unchanged.
    """

    def __init__(self, config):
        super().__init__(config, n_out=config.router_mix * (1 + 2 * config.d_z))
        self.C = config.router_mix

    def forward(self, x):
        out = self.net(x)
        log_pi = out[:, :self.C].log_softmax(dim=-1)                  # (N, C)
        mu, raw = out[:, self.C:].view(len(x), self.C, -1).transpose(0, 1).chunk(2, dim=-1)
        log_a = (math.log(self.C) + log_pi).t()[..., None]            # log(C pi_c), (C, N, 1)
        pi = log_pi.exp().mean(0)
        self.stats = {"mix_entropy": -(pi * pi.clamp_min(1e-30).log()).sum().detach() / math.log(self.C)}
        return mu * log_a.exp(), self.bound(raw) + 2 * log_a          # a mu, log (a sigma)^2


class InfMoE(nn.Module):
    """∞-MoE FFN: Gaussian router over a continuous expert space, K samples, one masked FFN pass."""
    d_ff_mult = 8

    def __init__(self, config):
        super().__init__()
        self.config = config  # shared with GPT, so z_samples / z_deterministic can change at inference
        d, d_ff, d_z = config.n_embd, config.d_ff, config.d_z
        self.router = (MixtureRouter if config.router_mix > 1 else GaussianRouter)(config)
        # mask scores m = W_z z. With z ~ N(mu, sigma^2 ≈ 1) at init the scores have unit variance, so a
        # kept top-25% score has RMS ≈ 1.36 and the 2d kept units give the output scale of dense GPT-2's
        # 4d units with mask 1 (E[sum m^2] ≈ 2d * 1.86 ≈ 4d): step-0 loss and activations match dense.
        self.W_z = nn.Parameter(torch.randn(d_ff, d_z) / math.sqrt(d_z))
        self.W1 = nn.Linear(d, d_ff, bias=config.bias)
        self.W2 = nn.Linear(d_ff, d, bias=config.bias)
        residual(self.W2.weight)
        self.stats = {}

    def use_kernel(self, x):
        mode = self.config.use_kernel
        if mode == "auto" and x.is_cuda:  # the kernel checks itself once per device and dtype
            import kernel
            return kernel.kernel_ok(str(x.device), compute_dtype(x))
        return mode == "on"

    def forward(self, x, eps=None):
        """x: (..., d). eps: optional fixed N(0, I) noise (K, *x.shape[:-1], d_z); K is read from it."""
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):  # router math in float32
            mu, logvar = self.router(x.float())   # (N, d_z); a mixture router: (C, N, d_z)
            sigma = torch.exp(0.5 * logvar)
            N, d_z = mu.shape[-2:]
            if eps is not None:
                if eps.dim() < 2 or eps.shape[1:] != (*shape[:-1], d_z):
                    raise ValueError(f"eps has shape {tuple(eps.shape)}; expected (K, {', '.join(map(str, shape[:-1]))}, "
                                     f"{d_z}) for x of shape {tuple(shape)}")
                eps = eps.reshape(eps.shape[0], -1, eps.shape[-1]).float()
            elif self.config.z_deterministic:
                eps = torch.zeros(1, N, d_z, device=x.device)      # z = mu
            else:
                eps = torch.randn(self.config.z_samples, N, d_z, device=x.device)
            if mu.dim() == 3:                                     # every component gets each eps_k
                eps = eps[:, None]
            z = (mu + sigma * eps).reshape(-1, N, d_z)                   # z_k = mu + sigma ⊙ eps_k

        y, counts, n_active = self.masked_ffn(x.to(compute_dtype(x)), z)

        # routing statistics of this batch, kept on the device (train.py reads them when it logs)
        q = counts / counts.sum()
        self.stats = {
            "entropy": -(q * q.clamp_min(1e-30).log()).sum().detach() / math.log(q.numel()),  # H~(q)
            "sigma": sigma.mean().detach(),
            "active": n_active / (x.shape[0] * q.numel()),   # non-zero share of the averaged mask
            **self.router.stats,
        }
        return y.view(shape)

    def masked_ffn(self, x, z):
        """y = W2 (GELU(W1 x + b1) ⊙ M) + b2, M the mask averaged over the samples (Sec. 3.2). gate=pre
        puts the mask inside GELU, which does not commute with the average: one pass per sample."""
        if self.config.gate == "pre":
            self.without_kernel(x, "gate=pre")
            return masked_mlp(x, [self.W1, self.W2], [self.W_z], z, [self.config.top_frac], True)
        ffn = inf_ffn_reference
        if self.use_kernel(x):
            from kernel import inf_ffn as ffn
        dt, W1, W2 = x.dtype, self.W1, self.W2
        b1 = None if W1.bias is None else W1.bias.to(dt)
        b2 = None if W2.bias is None else W2.bias.to(dt)
        return ffn(x, W1.weight.to(dt), b1, W2.weight.to(dt), b2, self.W_z, z, self.config.top_frac)

    def without_kernel(self, x, why):
        if self.config.use_kernel == "on" or x.is_cuda:
            warnings.warn(f"{why}: the Triton kernel computes one post-activation masked layer; "
                          f"running the PyTorch path instead")

    def samples(self):
        """Masks drawn per token: K, or 1 for z = mu, times the router's components."""
        c = self.config
        return (1 if c.z_deterministic else c.z_samples) * c.router_mix

    def active_params(self):
        """The router, W_z and at most samples() x n_keep hidden units of W1/W2 (the union of the
        masks can only be smaller)."""
        c = self.config
        idle = c.d_ff - min(c.d_ff, self.samples() * c.n_keep)
        return sum(p.numel() for p in self.parameters()) - idle * (2 * c.n_embd + int(c.bias))


class DeepInfMoE(InfMoE):
    """∞-MoE over two masked hidden layers driven by one z, a W_z and a top fraction r per layer (the
    "shared z, per-layer heads" extension; not in the paper):

      y = W2 (Act(W_mid (Act(W1 x) ⊙ M1)) ⊙ M2),  M_l = TopN%_{r_l}(W_z,l z),  averaged over K samples

    Stacked masks compound: a sample uses about r1 * r2 of W_mid (6% at r = 25% for both), so the
    second layer's r (top_frac2) defaults to the first's and is best kept larger. Both hidden layers
    are d_ff wide (default 4d: W_mid alone is 16 d^2).
    """
    d_ff_mult = 4

    def __init__(self, config):
        super().__init__(config)
        self.W_z2 = nn.Parameter(torch.randn(config.d_ff, config.d_z) / math.sqrt(config.d_z))
        self.W_mid = nn.Linear(config.d_ff, config.d_ff, bias=config.bias)
        self.top_fracs = [config.top_frac, config.top_frac2 or config.top_frac]

    def masked_ffn(self, x, z):
        self.without_kernel(x, "ffn=inf_deep")
        return masked_mlp(x, [self.W1, self.W_mid, self.W2], [self.W_z, self.W_z2], z, self.top_fracs,
                          pre_gate=self.config.gate == "pre")

    def active_params(self):
        c = self.config
        u1, u2 = (min(c.d_ff, self.samples() * keep_count(r, c.d_ff)) for r in self.top_fracs)
        d, b, n = c.n_embd, int(c.bias), c.d_ff
        masked = n * (d + b) + n * n + n * b + n * d          # W1 and b1, W_mid and b_mid, W2
        active = u1 * (d + b) + u1 * u2 + u2 * b + u2 * d
        return sum(p.numel() for p in self.parameters()) - masked + active


# --ffn name -> FFN class. A new FFN: one class (see the top of this section) and one line here.
FFNS = {"dense": DenseFFN, "switch": TopKMoE, "top2": Top2MoE, "inf": InfMoE, "inf_deep": DeepInfMoE}


# ----------------------------------------------------------------------------- model

class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        ffn = FFNS[config.ffn]
        if not callable(getattr(ffn, "active_params", None)):  # num_params and MFU need it: never guess
            raise TypeError(f"FFN class {ffn.__name__} (ffn={config.ffn}) must define active_params(): "
                            f"the parameters one token multiplies with")
        self.mlp = ffn(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.aux_loss = None  # the last forward's summed FFN aux losses (switch/top2), detached
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2: scale residual projections
        for p in self.parameters():
            if getattr(p, "residual_proj", False):  # marked by residual()
                nn.init.normal_(p, mean=0.0, std=resid_std)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        """Returns (logits, loss). With targets, loss = cross-entropy (+ the FFNs' aux losses, if any)
        and logits cover every position; without, logits of the last position only (generation)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        aux = [getattr(block.mlp, "aux_loss", None) for block in self.transformer.h]
        aux = [a for a in aux if a is not None]
        if aux:  # each MoE layer adds its own aux loss (Switch convention)
            aux = sum(aux)
            self.aux_loss = aux.detach()
            loss = loss + aux
        return logits, loss

    def after_step(self):
        """Call after each optimizer.step(): FFN state updated outside the gradient (balance=bias)."""
        for block in self.transformer.h:
            if hasattr(block.mlp, "after_step"):
                block.mlp.after_step()

    def set_sampling(self, z_samples=None, z_deterministic=None, moe_top_k=None):
        """Inference knobs: ∞-MoE's K samples of z or z = mu; switch/top2's experts per token.
        Every layer reads the shared config, so this takes effect at the next forward."""
        if moe_top_k is not None:
            if not 0 <= moe_top_k <= self.config.n_expert:
                raise ValueError(f"moe_top_k={moe_top_k}: must be between 0 (default) and n_expert")
            self.config.moe_top_k = moe_top_k
        if z_samples is not None:
            if z_samples < 1:
                raise ValueError(f"z_samples={z_samples}: need at least one sample")
            self.config.z_samples = z_samples
        if z_deterministic is not None:
            self.config.z_deterministic = bool(z_deterministic)

    def routing_stats(self):
        """Per-layer statistics of the last forward, averaged over layers; tensors on the device."""
        layers = [block.mlp.stats for block in self.transformer.h if block.mlp.stats]
        if not layers:
            return {}
        return {key: torch.stack([s[key] for s in layers]).mean(0) for key in layers[0]}

    def num_params(self):
        """(total, active): all parameters, and those one token multiplies with: everything outside the
        FFNs plus what each FFN's active_params() states. Position embeddings count (nanoGPT leaves them
        out; we keep them so the numbers add up)."""
        total = sum(p.numel() for p in self.parameters())
        ffns = [block.mlp for block in self.transformer.h]
        ffn_total = sum(p.numel() for f in ffns for p in f.parameters())
        active = total - ffn_total + sum(f.active_params() for f in ffns)
        return total, active

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on >= 2-D weights only (matrices, embeddings, experts, W_z)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Append max_new_tokens sampled tokens to idx (B, T). Call model.eval() first."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


# ----------------------------------------------------------------------------- starting from a trained model

HF_GPT2 = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
FREE_FIELDS = ("dropout", "z_samples", "z_deterministic", "moe_top_k", "use_kernel")  # never fixed by a source
UPCYCLE_TARGETS = ("switch", "top2", "inf")
MOE_FIELDS = ("ffn", "d_ff_mult", "n_expert", "moe_top_k", "aux_loss_coef", "z_loss_coef",  # an upcycle's own
              "d_z", "top_frac", "z_samples", "z_deterministic", "use_kernel", "balance", "balance_rate",
              "router_depth", "router_width", "router_mix", "gate")


def download_gpt2(name):
    """OpenAI's GPT-2 (config.json + model.safetensors) from the Hugging Face Hub, cached; returns the directory."""
    repo = HF_GPT2[name]
    instead = f"or put {repo}'s config.json and model.safetensors in a directory DIR and pass --init_from=DIR"
    try:
        from huggingface_hub import snapshot_download  # optional: only the hub names need it
    except ImportError:
        raise ImportError(f"--init_from={name} downloads from the Hugging Face Hub: pip install huggingface_hub, "
                          f"{instead}") from None
    try:
        return snapshot_download(repo, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # offline (HF_HUB_OFFLINE=1 or no network) and not in the cache
        raise FileNotFoundError(f"--init_from={name}: could not fetch {repo} ({type(e).__name__}; offline?), "
                                f"{instead}") from None


def read_hf_gpt2(path):
    """A Hugging Face GPT2LMHeadModel directory -> (GPTConfig kwargs, our state dict).

    Reads config.json and model.safetensors (or pytorch_model.bin) without transformers. GPT-2 stores its
    linear layers as Conv1D, weight (in, out): they are transposed into nn.Linear's (out, in).
    """
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    where = os.path.join(path, "config.json")
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{where}: model_type={hf.get('model_type')!r}, expected gpt2")
    unsupported = {"activation_function": ("gelu_new", "gelu_pytorch_tanh", "gelu"), "layer_norm_epsilon": (1e-5,),
                   "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
                   "tie_word_embeddings": (True,)}
    for key, ok in unsupported.items():
        if hf.get(key, ok[0]) not in ok:
            raise ValueError(f"{where}: {key}={hf[key]!r} is not supported (expected {' or '.join(map(str, ok))})")
    d = hf["n_embd"]
    d_ff = hf.get("n_inner") or 4 * d
    if d_ff % d:
        raise ValueError(f"{where}: n_inner={d_ff} is not a multiple of n_embd={d}")
    args = dict(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                n_head=hf["n_head"], n_embd=d, bias=True, ffn="dense", d_ff_mult=d_ff // d,
                gelu_approx="none" if hf.get("activation_function", "gelu_new") == "gelu" else "tanh")

    if os.path.exists(os.path.join(path, "model.safetensors")):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path}/model.safetensors needs the safetensors package: pip install safetensors") from None
        hf_state = load_file(os.path.join(path, "model.safetensors"))
    elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
        hf_state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True,
                              mmap=True)
    else:
        raise FileNotFoundError(f"{path}: has config.json but neither model.safetensors nor pytorch_model.bin")

    state = {}
    for key, value in hf_state.items():
        key = key.removeprefix("transformer.")   # OpenAI's original files have no prefix
        if key.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight")):
            continue                              # causal-mask buffers of old files; the tied head
        if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            value = value.t()                     # Conv1D (in, out) -> nn.Linear (out, in)
        key = key.replace("mlp.c_fc.", "mlp.W1.").replace("mlp.c_proj.", "mlp.W2.")
        state["transformer." + key] = value.float().contiguous()
    head = hf_state.get("lm_head.weight")
    if head is not None and not torch.equal(head, hf_state.get("transformer.wte.weight", hf_state.get("wte.weight"))):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight; this GPT ties them")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return args, state


def load_source(source):
    """init_from's SOURCE -> (GPTConfig kwargs, state dict): a GPT-2 name or a Hugging Face GPT-2 directory.
    (train.py and sample.py read our own checkpoints, ckpt.pt or an out_dir, and pass their weights on.)"""
    path = download_gpt2(source) if source in HF_GPT2 else source
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        return read_hf_gpt2(path)
    raise FileNotFoundError(f"--init_from={source}: no such checkpoint or directory (expected scratch, resume, "
                            f"{', '.join(HF_GPT2)}, a Hugging Face GPT-2 directory, a ckpt.pt or an out_dir)")


def pretrained_config(args, overrides, source):
    """GPTConfig kwargs of the model init_from=SOURCE builds from a source of config args.

    overrides: GPTConfig fields from the command line. FREE_FIELDS may differ from the source's; block_size
    may be lowered (the position table is cropped, as in nanoGPT); from a dense source another ffn upcycles
    it (see upcycle) and MOE_FIELDS are then free too. Any other field that differs is an error naming it.
    """
    args = dataclasses.asdict(GPTConfig(**args))   # fields an older checkpoint lacks take their defaults
    overrides = dict(overrides or {})
    upcycling = args["ffn"] == "dense" and overrides.get("ffn", "dense") != "dense"
    free = set(FREE_FIELDS) | (set(MOE_FIELDS) if upcycling else set()) | {"block_size"}
    clash = {k: args[k] for k, v in overrides.items() if k not in free and args[k] != v}
    if clash:
        given = ", ".join(f"--{k}={overrides[k]}" for k in clash)
        theirs = ", ".join(f"{k}={v}" for k, v in clash.items())
        raise ValueError(f"--init_from={source} fixes the model's shape: {given} differs from its {theirs} "
                         f"(free: {', '.join(FREE_FIELDS)}, a smaller block_size, and upcycling a dense source)")
    if overrides.get("block_size", args["block_size"]) > args["block_size"]:
        raise ValueError(f"--block_size={overrides['block_size']}: --init_from={source} has only "
                         f"{args['block_size']} positions")
    args["dropout"] = 0.0  # the source's dropout was for its own training; --dropout sets ours
    if not upcycling:
        return {**args, **overrides}
    ffn, dense_mult = overrides["ffn"], GPTConfig(**args).d_ff // args["n_embd"]  # d_ff_mult 0: the default
    if ffn not in UPCYCLE_TARGETS:
        raise ValueError(f"--init_from={source} --ffn={ffn}: a dense model upcycles into "
                         f"{', '.join(UPCYCLE_TARGETS)} only")
    n_expert = overrides.get("n_expert", GPTConfig.n_expert)
    default_mult = dense_mult * n_expert if ffn in ("switch", "top2") else 2 * dense_mult  # inf: the paper's 8d
    exact = {"gelu_approx": "none"} if ffn == "inf" else {}  # inf's paths compute the exact GELU only
    return {**args, "d_ff_mult": default_mult, **exact, **overrides}


@torch.no_grad()
def load_pretrained(model, args, state):
    """Fill model, built from pretrained_config(args, ...), with a source's weights: copied, or upcycled
    when the source is dense and the model is not. Returns the model."""
    state = {**state, "transformer.wpe.weight": state["transformer.wpe.weight"][:model.config.block_size]}
    if args["ffn"] == model.config.ffn:
        model.load_state_dict(state)
        return model
    return upcycle(model, state, GPTConfig(**args).d_ff)


def from_pretrained(source, overrides=None, weights=None):
    """GPT from init_from's SOURCE, its shape read from the source: weights = (GPTConfig kwargs, state
    dict) already read (our own checkpoints), else load_source(source)."""
    args, state = weights or load_source(source)
    model = GPT(GPTConfig(**pretrained_config(args, overrides, source)))
    return load_pretrained(model, args, state)


def expected_mask_value(top_frac):
    """E[M_j], the mean mask value of one hidden unit at initialisation (any K: M averages K masks).

    A fresh router gives mu ≈ 0, sigma ≈ 1, so z ~ N(0, I); W_z's rows have norm ≈ 1, so each score
    m_j = W_z[j] . z is ~ N(0, 1). A sample keeps the top r of the scores, those above the (1 - r) quantile t,
    at their own values: E[m 1{m > t}] = phi(t), the standard normal density at t (0.318 for r = 25%).
    """
    if not 0.0 < top_frac < 1.0:
        raise ValueError(f"top_frac={top_frac}: upcycling into ffn=inf needs 0 < top_frac < 1")
    normal = NormalDist()
    return normal.pdf(normal.inv_cdf(1.0 - top_frac))


@torch.no_grad()
def upcycle(model, dense_state, d_ff_dense):
    """Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): fill `model`, a freshly initialised
    switch/top2/inf GPT, from a dense GPT's state dict of hidden width d_ff_dense. Embeddings, attention,
    norms and b2 are copied; routers and W_z keep their fresh initialisation.

      switch/top2  every expert is a full copy of the dense MLP (needs d_ff = n_expert * d_ff_dense). top2's
                   renormalised weights sum to 1, so at step 0 it computes exactly the dense model; switch
                   computes each FFN output times the chosen expert's router probability.
      inf          hidden unit j is dense unit j mod d_ff_dense (needs d_ff a multiple of it: R copies each),
                   and W2 is divided by R * E[M_j]: averaged over the routing noise and the fresh W_z, the
                   FFN output equals the dense one (expected_mask_value). Per token it is the dense FFN
                   with its units re-weighted at random (mean 1), so step-0 loss is above the source's.
    """
    c, h = model.config, d_ff_dense
    if c.ffn in ("switch", "top2") and c.d_ff != c.n_expert * h:
        raise ValueError(f"upcycling into {c.ffn}: each of the {c.n_expert} experts copies the dense MLP, so "
                         f"d_ff_mult must be {c.n_expert * h // c.n_embd} (got {c.d_ff_mult})")
    if c.ffn == "inf" and c.d_ff % h:
        raise ValueError(f"upcycling into inf: d_ff_mult={c.d_ff_mult} must be a multiple of the dense "
                         f"source's {h // c.n_embd}")
    rest = {k: v for k, v in dense_state.items() if ".mlp." not in k}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    if unexpected or any(".mlp." not in k for k in missing):
        raise ValueError(f"upcycling: the dense source does not match the model ({(missing + unexpected)[:3]} ...)")
    for i, block in enumerate(model.transformer.h):
        src = {k.split(".mlp.")[1]: v for k, v in dense_state.items() if k.startswith(f"transformer.h.{i}.mlp.")}
        W1, b1, W2, b2 = src["W1.weight"], src.get("W1.bias"), src["W2.weight"], src.get("W2.bias")
        mlp = block.mlp
        if c.ffn in ("switch", "top2"):   # experts stored (E, in, out): the transposes of nn.Linear's weights
            mlp.W1.copy_(W1.t().expand_as(mlp.W1))
            mlp.W2.copy_(W2.t().expand_as(mlp.W2))
            if mlp.b1 is not None:
                mlp.b1.copy_(b1.expand_as(mlp.b1))
                mlp.b2.copy_(b2.expand_as(mlp.b2))
        else:
            unit = torch.arange(c.d_ff) % h                       # hidden unit j copies dense unit j mod h
            scale = 1.0 / ((c.d_ff // h) * expected_mask_value(c.top_frac))
            mlp.W1.weight.copy_(W1[unit])
            mlp.W2.weight.copy_(W2[:, unit] * scale)
            if mlp.W1.bias is not None:
                mlp.W1.bias.copy_(b1[unit])
                mlp.W2.bias.copy_(b2)
    return model


if __name__ == "__main__":
    # `python model.py`: the parameter table and the memory one ∞-MoE layer keeps for backward (README)
    import resource

    print("| ffn | GPT-2 Small total | active | GPT-2 Medium total | active |\n|---|---|---|---|---|")
    for ffn in FFNS:
        row = []
        for L, H, d in ((12, 12, 768), (24, 16, 1024)):
            with torch.device("meta"):
                row += [f"{n / 1e6:.1f}M" for n in GPT(GPTConfig(ffn=ffn, n_layer=L, n_head=H, n_embd=d)).num_params()]
        print(f"| {ffn} | " + " | ".join(row) + " |")

    def measure(name, make_layer, N=4096):
        """Run in a forked child so its peak RSS is this layer's alone (fresh high-water mark). The parent
        does no tensor math before forking: an OpenMP pool started there would hang the child."""
        if os.fork():
            os.wait()
            return
        torch.manual_seed(0)
        layer = make_layer()
        params = {p.data_ptr() for p in layer.parameters()}
        x = torch.randn(N, layer.W1.in_features)
        saved = []
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = layer(x)
        y.square().mean().backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
        acts = {t.data_ptr(): t.numel() * t.element_size() for t in saved if t.data_ptr() not in params}
        print(f"| {name} | {N} | {sum(acts.values()) / 2**20:.0f} MiB | {peak / 2**10:.0f} MiB |")
        os._exit(0)

    print("\n| layer (GPT-2 Small width, fp32, CPU) | tokens | saved for backward | peak RSS growth fwd+bwd |\n|---|---|---|---|")
    measure("dense FFN, d_ff = 4d", lambda: DenseFFN(GPTConfig(ffn="dense")))
    measure("dense FFN, d_ff = 8d", lambda: DenseFFN(GPTConfig(ffn="dense", d_ff_mult=8)))
    measure("∞-MoE PyTorch path, d_ff = 8d, K = 2, r = 25%", lambda: InfMoE(GPTConfig(ffn="inf")))
