"""
GPT-2 with one switch for its feed-forward layer (GPTConfig.ffn, a name in FFNS):

  dense     GPT-2's MLP, hidden 4d
  inf       ∞-MoE (arXiv 2601.17680): a continuous expert index z ~ N(mu(x), diag sigma^2(x))
            selects a "partly soft" top-N% mask over a d_ff = 8d hidden layer
  switch    Switch Transformer: 4 experts of width 2d, top-1 routing
  top2      GShard/Mixtral-style: 4 experts of width 2d, top-2 routing
  inf_deep  ∞-MoE over two masked hidden layers of 4d, one z, a W_z and a top fraction per layer

Reading order: the config, attention, the dense FFN, then ∞-MoE: `inf_ffn` states its FFN as the
paper's equations, `InfMoE` is the layer (router, K samples of z, that FFN). Then switch/top2 and
GPT itself. Below GPT, optional reading: the flags for the paper's open directions (a deeper router,
a mixture-of-Gaussians router, the mask before the activation, inf_deep). The fast paths of the
∞-MoE FFN live in fastpath.py (PyTorch) and kernel.py (Triton); infra.py reads GPT-2 and our
checkpoints, and upcycles a dense model into an MoE.

Everything else is nanoGPT's GPT-2: learned positions, pre-LayerNorm blocks,
causal SDPA attention, tied embeddings, residual projections scaled by 1/sqrt(2 n_layer).
"""
import math
import warnings
from dataclasses import dataclass

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
    dropout: float = 0.0          # on embeddings, attention and residual branches; 0 to pretrain
    bias: bool = True             # biases in Linear layers and LayerNorms, as in GPT-2
    gelu_approx: str = "none"     # F.gelu's approximate: none (exact) | tanh (GPT-2's)
    ffn: str = "dense"          # a name in FFNS: dense | switch | top2 | inf | inf_deep
    d_ff_mult: int = 0          # FFN hidden width / n_embd; 0: the FFN's default (dense 4, MoEs 8)
    # discrete MoE (switch, top2)
    n_expert: int = 4             # experts of width d_ff / n_expert
    moe_top_k: int = 0            # experts per token; 0: 1 for switch, 2 for top2
    aux_loss_coef: float = 0.01   # alpha, Switch load-balancing loss
    z_loss_coef: float = 0.001    # beta, router z-loss
    balance: str = "loss"         # loss: Switch's aux loss | bias: DeepSeek-V3's aux-loss-free bias
    balance_rate: float = 1e-3    # gamma: the bias step per optimizer step (balance=bias)
    # ∞-MoE
    d_z: int = 128              # dimension of the continuous expert index z
    top_frac: float = 0.25      # r: fraction of the d_ff hidden units each sample keeps
    z_samples: int = 2          # K: Monte-Carlo samples of z per token (an inference knob)
    z_deterministic: bool = False  # use z = mu (no noise): reproducible evaluation and sampling
    use_kernel: str = "auto"    # Triton kernel for ffn=inf: auto (CUDA tensors) | on | off
    # ∞-MoE variants beyond the paper; the defaults are the paper's method
    router_depth: int = 1       # linear layers of the router MLP (1: the paper's linear router)
    router_width: int = 0       # hidden width of a deeper router (0: n_embd)
    router_mix: int = 1         # C: Gaussian components of the router (1: the paper's one Gaussian)
    gate: str = "post"          # post: W2 (Act(W1 x) ⊙ M), the paper | pre: W2 Act((W1 x) ⊙ M)
    top_frac2: float = 0.0      # inf_deep: r of the second masked layer (0: top_frac)
    mask_block: int = 1         # b: the inf mask keeps blocks of b units (1: the paper's units)

    def __post_init__(self):
        if self.ffn not in FFNS:
            raise ValueError(f"GPTConfig.ffn={self.ffn!r}: expected one of {', '.join(FFNS)}")
        for key, spec in RANGES.items():
            if not in_range(getattr(self, key), spec):
                raise ValueError(f"GPTConfig.{key}={getattr(self, key)}: must be "
                                 f"{range_words(spec)}")
        for key, choices in CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(f"GPTConfig.{key}={getattr(self, key)!r}: expected "
                                 f"{', '.join(choices[:-1])} or {choices[-1]}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by "
                             f"n_head={self.n_head}")
        if self.gelu_approx == "tanh" and issubclass(FFNS[self.ffn], InfMoE):
            raise ValueError(f"GPTConfig: ffn={self.ffn} computes the exact GELU only "
                             f"(gelu_approx=none)")
        check = getattr(FFNS[self.ffn], "check_config", None)  # an FFN's own constraints, if any
        if check:
            check(self)

    @property
    def d_ff(self):
        """Width of the FFN's whole hidden (expert) space."""
        return (self.d_ff_mult or FFNS[self.ffn].d_ff_mult) * self.n_embd

    @property
    def n_keep(self):
        """Hidden units one ∞-MoE sample keeps (whole blocks of mask_block units)."""
        return keep_count(self.top_frac, self.d_ff // self.mask_block) * self.mask_block


# The valid values of each numeric field, as an interval; every value must also be finite.
RANGES = {
    "block_size": ">= 1", "vocab_size": ">= 1", "n_layer": ">= 1", "n_head": ">= 1",
    "n_embd": ">= 1", "dropout": "[0, 1)", "d_ff_mult": ">= 0", "n_expert": ">= 1",
    "moe_top_k": ">= 0", "aux_loss_coef": ">= 0", "z_loss_coef": ">= 0", "balance_rate": ">= 0",
    "d_z": ">= 1", "top_frac": "(0, 1]", "z_samples": ">= 1", "router_depth": ">= 1",
    "router_width": ">= 0", "router_mix": ">= 1", "top_frac2": "[0, 1]", "mask_block": ">= 1",
}
CHOICES = {"gelu_approx": ("none", "tanh"), "use_kernel": ("auto", "on", "off"),
           "balance": ("loss", "bias"), "gate": ("post", "pre")}
# Fields that change how a trained model is run, not what it is: free to differ from a checkpoint's.
INFERENCE_KNOBS = ("z_samples", "z_deterministic", "moe_top_k", "use_kernel", "dropout")
PER_LAYER_STATS = ("block_load",)  # routing statistics logged per layer, not averaged over layers


def in_range(value, spec):
    """Is value finite and inside spec: ">= a", "> a", or an interval such as "(0, 1]"?"""
    try:
        if not math.isfinite(value):
            return False
    except OverflowError:  # an int beyond float's range
        return False
    if spec.startswith(">"):
        bound = float(spec.lstrip(">= "))
        return value >= bound if spec.startswith(">=") else value > bound
    lo, hi = (int(s) if s.strip().isdigit() else float(s) for s in spec[1:-1].split(","))
    return ((lo <= value if spec[0] == "[" else lo < value)
            and (value <= hi if spec[-1] == "]" else value < hi))


def range_words(spec):
    return spec if spec.startswith(">") else f"in {spec}"


def keep_count(top_frac, d_ff):
    """Hidden units one ∞-MoE sample keeps: round(r * d_ff), at least one."""
    return max(1, int(round(top_frac * d_ff)))


def compute_dtype(x):
    """The dtype matmuls on x run in: autocast's when it is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def residual(p):
    """Mark p as a projection into the residual stream: GPT-2 scales its init by 1/sqrt(2L)."""
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
# check_config(config). Its output projection is marked with residual(). FFNS names them.

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


# ----------------------------------------------------------------------------- ∞-MoE

def inf_ffn(x, W1, b1, W2, b2, W_z, z, top_frac):
    """The ∞-MoE FFN as the paper defines it (arXiv 2601.17680, Sec. 3.2), plain autograd.

    Each of the K samples z_k of the expert index (z: (K, N, d_z); x: (N, d)) selects its own
    expert f(x, z_k) = W2 (GELU(W1 x + b1) ⊙ mask_k) + b2; the output is their mean. Returns y
    and two routing statistics: counts (d_ff,), how many (token, sample) pairs kept each hidden
    unit, and n_active, the non-zeros of the mean mask. This is the definition, not a fast path:
    it keeps K masks for backward. fastpath.py and kernel.py compute the same function fast.

    The block mask (GPTConfig.mask_block = b; beyond the paper, the open problem of its Sec. 6.4):
    W_z has d_ff / b rows, so m_k scores d_ff / b blocks of b consecutive units; a sample keeps
    the top r of the blocks at their values, and unit j gets the value of block j // b. counts
    and n_active then count blocks. A token needs only its kept blocks: fastpath.block_inf_ffn
    computes nothing else. b = 1 is the paper's mask.
    """
    b = W1.shape[0] // W_z.shape[0]                     # units per block of the mask
    n_keep = keep_count(top_frac, W_z.shape[0])
    h = F.gelu(F.linear(x, W1, b1))                     # Act(W1 x): the same for every sample
    y, masks, counts = 0, 0, 0
    for z_k in z:
        m = z_k @ W_z.t()                               # mask scores m_k = W_z z_k
        kth = m.detach().topk(n_keep, dim=-1).values[:, -1:]   # each row's n_keep-th largest
        keep = m >= kth                                 # top-N% (ties with the n_keep-th kept too)
        mask = torch.where(keep, m, 0.0)                # "partly soft": kept at their own values
        mask_units = mask.repeat_interleave(b, dim=-1)  # each block's value on its b units
        y = y + F.linear(h * mask_units.to(h.dtype), W2, b2)  # the expert f(x, z_k)
        masks, counts = masks + mask.detach(), counts + keep.sum(0)
    # Since the mask multiplies the activation, the mean over k moves inside W2:
    # y = W2 (h ⊙ M) + b2 with M = (1/K) sum_k mask_k, one pass whatever K. The fast paths use that.
    return y / len(z), counts.float(), (masks != 0).sum().float()


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


class InfMoE(nn.Module):
    """∞-MoE FFN: Gaussian router over a continuous expert space, K samples, one masked FFN pass."""
    d_ff_mult = 8

    def __init__(self, config):
        super().__init__()
        self.config = config  # shared with GPT: z_samples / z_deterministic can change at inference
        d, d_ff, d_z = config.n_embd, config.d_ff, config.d_z
        self.router = (MixtureRouter if config.router_mix > 1 else GaussianRouter)(config)
        # mask scores m = W_z z. With z ~ N(mu, sigma^2 ≈ 1) at init the scores have unit variance,
        # so a kept top-25% score has RMS ≈ 1.36 and the 2d kept units give the output scale of
        # dense GPT-2's 4d units with mask 1 (E[sum m^2] ≈ 2d * 1.86 ≈ 4d): step-0 loss as dense.
        self.W_z = nn.Parameter(torch.randn(d_ff // config.mask_block, d_z) / math.sqrt(d_z))
        self.W1 = nn.Linear(d, d_ff, bias=config.bias)
        self.W2 = nn.Linear(d_ff, d, bias=config.bias)
        residual(self.W2.weight)
        self.stats = {}

    def forward(self, x, eps=None):
        """x: (..., d). eps: optional fixed N(0, I) noise, (K, *x.shape[:-1], d_z)."""
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):  # router math in float32
            mu, logvar = self.router(x.float())   # (N, d_z); a mixture router: (C, N, d_z)
            sigma = torch.exp(0.5 * logvar)
            N, d_z = mu.shape[-2:]
            if eps is not None:
                if eps.dim() < 2 or eps.shape[1:] != (*shape[:-1], d_z):
                    raise ValueError(f"eps has shape {tuple(eps.shape)}; expected (K, "
                                     f"{', '.join(map(str, shape[:-1]))}, {d_z}) for x of shape "
                                     f"{tuple(shape)}")
                eps = eps.reshape(eps.shape[0], -1, eps.shape[-1]).float()
            elif self.config.z_deterministic:
                eps = torch.zeros(1, N, d_z, device=x.device)      # z = mu
            else:
                eps = torch.randn(self.config.z_samples, N, d_z, device=x.device)
            if mu.dim() == 3:                                     # every component gets each eps_k
                eps = eps[:, None]
            z = (mu + sigma * eps).reshape(-1, N, d_z)            # z_k = mu + sigma ⊙ eps_k

        y, counts, n_active = self.masked_ffn(x.to(compute_dtype(x)), z)

        # routing statistics of this batch, kept on the device (train.py reads them when it logs)
        q = counts / counts.sum()
        self.stats = {
            "entropy": -(q * q.clamp_min(1e-30).log()).sum().detach() / math.log(q.numel()),  # H~
            "sigma": sigma.mean().detach(),
            "active": n_active / (x.shape[0] * q.numel()),   # non-zero share of the averaged mask
            **self.router.stats,
        }
        if self.config.mask_block > 1:  # the busiest block against the mean: what pads cost
            self.stats["block_load"] = (counts.max() / counts.mean()).detach()
        return y.view(shape)

    def masked_ffn(self, x, z):
        """inf_ffn's y = W2 (GELU(W1 x + b1) ⊙ M) + b2, computed by one of the fast paths:
        the block path (mask_block > 1), the Triton kernel or the PyTorch one. gate=pre puts the
        mask inside GELU, which does not commute with the mean over samples: one pass per sample
        (optional part below)."""
        if self.config.gate == "pre":
            self.without_kernel(x, "gate=pre")
            return inf_ffn_per_sample(x, [self.W1, self.W2], [self.W_z], z,
                                      [self.config.top_frac], True)
        import fastpath  # here, not at the top: model.py reads (and imports) without the fast paths
        if self.config.mask_block > 1:
            ffn = fastpath.block_inf_ffn  # computes only the kept blocks
        elif self.use_kernel(x):
            from kernel import triton_inf_ffn as ffn
        else:
            ffn = fastpath.fast_inf_ffn
        dt, W1, W2 = x.dtype, self.W1, self.W2
        b1 = None if W1.bias is None else W1.bias.to(dt)
        b2 = None if W2.bias is None else W2.bias.to(dt)
        return ffn(x, W1.weight.to(dt), b1, W2.weight.to(dt), b2, self.W_z, z, self.config.top_frac)

    def use_kernel(self, x):
        mode = self.config.use_kernel
        if mode == "auto" and x.is_cuda:  # the kernel checks itself once per device and dtype
            import kernel
            return kernel.kernel_ok(str(x.device), compute_dtype(x))
        return mode == "on"

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

    @classmethod
    def check_config(cls, config):
        b, why = config.mask_block, None
        if b > 1 and cls is not InfMoE:
            why = "is for ffn=inf (inf_deep masks units)"
        elif b > 1 and config.gate == "pre":
            why = "needs gate=post (the block path is the one-pass post-activation FFN)"
        elif b > 1 and config.use_kernel == "on":
            why = "runs the block path; the Triton kernel (use_kernel=on) masks units only"
        elif config.d_ff % b:
            why = f"does not divide d_ff={config.d_ff}"
        if why:
            raise ValueError(f"GPTConfig: mask_block={b} {why}")


# ----------------------------------------------------------------------------- switch / top-2

class TopKMoE(nn.Module):
    """Switch Transformer, dropless: top-1 routing over n_expert FFNs of width d_ff / n_expert, the
    output scaled by the raw router probability p_e.

    Tokens are sorted by expert and run through grouped GEMMs whose group offsets stay on the
    device, so there is no host sync and no capacity: every (token, slot) is computed.
    balance=bias (DeepSeek-V3, arXiv 2412.19437 Sec. 2.1.2): instead of the aux loss, a per-expert
    bias b is added to p to choose the experts (not to weigh them); after each optimizer step
    b_i += gamma * sign(mean load - load_i). b gets no gradient; as a buffer it is checkpointed.
    """
    d_ff_mult = 8
    top_k, renormalise = 1, False

    @classmethod
    def check_config(cls, config):
        k = config.moe_top_k or cls.top_k
        if not 1 <= k <= config.n_expert:
            raise ValueError(f"GPTConfig: n_expert={config.n_expert}, moe_top_k={config.moe_top_k} "
                             f"do not allow {k} experts per token for ffn={config.ffn}")
        if config.d_ff % config.n_expert:
            raise ValueError(f"GPTConfig: d_ff={config.d_ff} is not divisible by "
                             f"n_expert={config.n_expert}")
        if config.n_embd % 8:  # grouped_mm wants 16-byte aligned rows (bf16: multiples of 8)
            raise ValueError(f"GPTConfig.n_embd={config.n_embd}: switch/top2 need a multiple of 8")

    def __init__(self, config):
        super().__init__()
        E, d, width = config.n_expert, config.n_embd, config.d_ff // config.n_expert
        self.config, self.n_expert = config, E  # config shared with GPT: top-k is an inference knob
        self.alpha, self.beta = config.aux_loss_coef, config.z_loss_coef
        self.W_r = nn.Linear(d, E, bias=False)                 # router
        # experts, stored (E, in, out) for grouped_mm
        self.W1 = nn.Parameter(torch.randn(E, d, width) * 0.02)
        self.W2 = nn.Parameter(torch.randn(E, width, d) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(E, width)) if config.bias else None
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

        # group the N*k (token, slot) assignments by expert; bincount would sync on CUDA
        flat_e = top_e.flatten()
        order = flat_e.argsort(stable=True)
        token = order // k
        counts = flat_e.new_zeros(E).scatter_add_(0, flat_e, torch.ones_like(flat_e))
        offs = counts.cumsum(0).to(torch.int32)
        e_sorted = flat_e[order]

        dt = compute_dtype(x)
        xs = x[token].to(dt)
        # each row's expert bias as a one-hot product, not b[e_sorted]: an index's gradient adds
        # the rows of an expert in thread order on the CPU, so runs would differ in the last bits
        one_hot = F.one_hot(e_sorted, E).to(dt) if self.b1 is not None else None
        h = F.grouped_mm(xs, self.W1.to(dt), offs=offs)
        if self.b1 is not None:
            h = h + one_hot @ self.b1.to(dt)
        out = F.grouped_mm(F.gelu(h, approximate=self.config.gelu_approx), self.W2.to(dt),
                           offs=offs)
        if self.b2 is not None:
            out = out + one_hot @ self.b2.to(dt)
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
        """balance=bias: nudge each expert's bias toward equal load, from the last batch's load."""
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


# ----------------------------------------------------------------------------- GPT

class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        ffn = FFNS[config.ffn]
        if not callable(getattr(ffn, "active_params", None)):  # num_params and MFU need it
            raise TypeError(f"FFN class {ffn.__name__} (ffn={config.ffn}) must define "
                            f"active_params(): the parameters one token multiplies with")
        self.mlp = ffn(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, eps=None):
        x = x + self.attn(self.ln_1(x))
        h = self.ln_2(x)
        return x + self.dropout(self.mlp(h) if eps is None else self.mlp(h, eps))


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
        self.eval_seed = 0    # key of evaluation's ∞-MoE noise (set_sampling; train.py: --seed)
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

    def forward(self, idx, targets=None, seq_ids=None):
        """Returns (logits, loss). With targets, loss = cross-entropy (+ the FFNs' aux losses, if
        any) and logits cover every position; without, logits of the last position only.
        seq_ids (B,) int64, evaluation's: ids of the rows, which key the ∞-MoE noise (eval_noise);
        None: the noise comes from torch's RNG, as in training."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if seq_ids is not None and seq_ids.shape != (B,):
            raise ValueError(f"seq_ids has shape {tuple(seq_ids.shape)}; expected ({B},)")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, self.eval_noise(layer, seq_ids, T))
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1),
                               ignore_index=-1)
        aux = [getattr(block.mlp, "aux_loss", None) for block in self.transformer.h]
        aux = [a for a in aux if a is not None]
        if aux:  # each MoE layer adds its own aux loss (Switch convention)
            aux = sum(aux)
            self.aux_loss = aux.detach()
            loss = loss + aux
        return logits, loss

    def eval_noise(self, layer, seq_ids, T):
        """One layer's ∞-MoE noise at evaluation, (K, B, T, d_z): eps[k, b, t] a hash of
        (eval_seed, seq_ids[b], t, layer, k) (infra.keyed_normal), so a row's score depends neither
        on the rows batched with it, nor on its padding, nor on what ran before. None (the layer
        draws its own) without seq_ids, for z = mu and in the other FFNs."""
        c, ffn = self.config, self.transformer.h[layer].mlp
        if seq_ids is None or c.z_deterministic or not isinstance(ffn, InfMoE):
            return None
        from infra import keyed_normal  # here, not at the top: infra.py imports this file
        return keyed_normal(self.eval_seed, seq_ids, T, layer, c.z_samples, c.d_z)

    def after_step(self):
        """Call after each optimizer.step(): FFN state set outside the gradient (balance=bias)."""
        for block in self.transformer.h:
            if hasattr(block.mlp, "after_step"):
                block.mlp.after_step()

    def set_sampling(self, z_samples=None, z_deterministic=None, moe_top_k=None,
                     eval_seed=None):
        """Inference knobs: ∞-MoE's K samples of z or z = mu, and the seed of its noise at
        evaluation (forward's seq_ids); switch/top2's experts per token. Every layer reads the
        shared config, so this takes effect at the next forward."""
        if eval_seed is not None:
            self.eval_seed = int(eval_seed)
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
        """Per-layer statistics of the last forward, averaged over layers (PER_LAYER_STATS: one
        value per layer); tensors on the device."""
        layers = [block.mlp.stats for block in self.transformer.h if block.mlp.stats]
        if not layers:
            return {}
        stacked = {key: torch.stack([s[key] for s in layers]) for key in layers[0]}
        return {k: v if k in PER_LAYER_STATS else v.mean(0) for k, v in stacked.items()}

    def num_params(self):
        """(total, active): all parameters, and those one token multiplies with: everything outside
        the FFNs plus what each FFN's active_params() states. Position embeddings count (nanoGPT
        leaves them out; we keep them so the numbers add up)."""
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
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 fused=device_type == "cuda")

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


# =============================================================================================
# Optional reading. Everything above is the method and its baselines; below are the flags for
# the paper's open directions, off by default (upcycling a trained dense model: infra.py).
# =============================================================================================

# ----------------------------------------------------------------------------- ∞-MoE variants

class MixtureRouter(GaussianRouter):
    """p(z|x) = sum_c pi_c(x) N(mu_c(x), diag sigma_c^2(x)): C Gaussians, weights from x (the
    paper's future work, Sec. 6.2). Reparameterisation: the per-component expectation, E[f] =
    sum_c pi_c E_{N_c}[f], one z_c = mu_c + sigma_c eps per component, so pi gets an exact gradient
    through its weights (no sampled component index, no Gumbel-softmax relaxation).

    The weighting costs nothing extra: TopN% is positively homogeneous, TopN%(W_z (a z)) =
    a TopN%(W_z z) for a > 0, so weighting component c's mask by pi_c equals scaling its z by pi_c.
    The router returns C Gaussians scaled by C pi_c, (C, N, d_z) each; their plain average over c
    is the pi-weighted mixture, and the one-pass FFN (and the kernel) runs on the K * C samples.
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
        self.stats = {"mix_entropy": -(pi * pi.clamp_min(1e-30).log()).sum().detach()
                      / math.log(self.C)}
        return mu * log_a.exp(), self.bound(raw) + 2 * log_a          # a mu, log (a sigma)^2


def inf_ffn_per_sample(x, layers, W_zs, z, top_fracs, pre_gate):
    """∞-MoE FFN one sample at a time, for the variants whose mask does not commute with the mean
    over samples (so the one-pass form of inf_ffn does not apply):

      h_0 = x,  h_l = Act(W_l h_{l-1} + b_l) ⊙ M_l   (pre_gate: Act((W_l h_{l-1} + b_l) ⊙ M_l)),
      M_l = TopN%_{r_l}(W_z,l z_k),  y = (1/K) sum_k W_out h_{L,k} + b_out

    x: (N, d) in the compute dtype; layers: the L masked nn.Linear and the output one; z: (K, N,
    d_z) float32. Returns y, counts (the selections of all L layers' units, concatenated) and
    n_active (the non-zeros of the union of the masks), detached, as inf_ffn. Keeps K * L (N, d_ff)
    tensors for backward: the price of a mask that cannot be averaged first.
    """
    from fastpath import row_threshold, selection_scores  # the scores in IEEE fp32, as InfMoE's
    *hidden, out = layers
    counts = [torch.zeros(W_z.shape[0], device=x.device) for W_z in W_zs]
    union = [torch.zeros(x.shape[0], W_z.shape[0], dtype=torch.bool, device=x.device)
             for W_z in W_zs]
    y = 0.0
    for k in range(z.shape[0]):
        h = x
        for l, (layer, W_z, r) in enumerate(zip(hidden, W_zs, top_fracs)):
            with torch.autocast(x.device.type, enabled=False):  # mask scores in float32
                m = selection_scores(z[k], W_z.float())
                keep = m >= row_threshold(m.detach(), keep_count(r, W_z.shape[0]))
                M = torch.where(keep, m, 0.0)
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


class DeepInfMoE(InfMoE):
    """∞-MoE over two masked hidden layers driven by one z, a W_z and a top fraction r per layer
    (the "shared z, per-layer heads" extension; not in the paper):

      y = W2 (Act(W_mid (Act(W1 x) ⊙ M1)) ⊙ M2),  M_l = TopN%_{r_l}(W_z,l z),  mean over K samples

    Stacked masks compound: a sample uses about r1 * r2 of W_mid (6% at r = 25% for both), so the
    second layer's r (top_frac2) defaults to the first's and is best kept larger. Both hidden
    layers are d_ff wide (default 4d: W_mid alone is 16 d^2).
    """
    d_ff_mult = 4

    def __init__(self, config):
        super().__init__(config)
        self.W_z2 = nn.Parameter(torch.randn(config.d_ff, config.d_z) / math.sqrt(config.d_z))
        self.W_mid = nn.Linear(config.d_ff, config.d_ff, bias=config.bias)
        self.top_fracs = [config.top_frac, config.top_frac2 or config.top_frac]

    def masked_ffn(self, x, z):
        self.without_kernel(x, "ffn=inf_deep")
        return inf_ffn_per_sample(x, [self.W1, self.W_mid, self.W2], [self.W_z, self.W_z2], z,
                                  self.top_fracs, pre_gate=self.config.gate == "pre")

    def active_params(self):
        c = self.config
        u1, u2 = (min(c.d_ff, self.samples() * keep_count(r, c.d_ff)) for r in self.top_fracs)
        d, b, n = c.n_embd, int(c.bias), c.d_ff
        masked = n * (d + b) + n * n + n * b + n * d          # W1 and b1, W_mid and b_mid, W2
        active = u1 * (d + b) + u1 * u2 + u2 * b + u2 * d
        return sum(p.numel() for p in self.parameters()) - masked + active


# --ffn name -> FFN class. A new FFN: one class (see the top of the FFN section) and one line here.
FFNS = {"dense": DenseFFN, "switch": TopKMoE, "top2": Top2MoE, "inf": InfMoE,
        "inf_deep": DeepInfMoE}
