"""
GPT-2 with one switch for its feed-forward layer (GPTConfig.ffn):

  dense   GPT-2's MLP, hidden 4d
  switch  Switch Transformer: 4 experts of width 2d, top-1 routing
  top2    GShard/Mixtral-style: 4 experts of width 2d, top-2 routing
  inf     ∞-MoE (arXiv 2601.17680): a continuous expert index z ~ N(mu(x), diag sigma^2(x))
          selects a "partly soft" top-N% mask over a d_ff = 8d hidden layer

Everything else is nanoGPT's GPT-2: learned positions, pre-LayerNorm blocks,
causal SDPA attention, tied embeddings, residual projections scaled by 1/sqrt(2 n_layer).
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from statistics import NormalDist

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    gelu_approx: str = "none"   # F.gelu's approximate: none (exact) | tanh (GPT-2's own, set by init_from)
    ffn: str = "dense"          # dense | switch | top2 | inf
    d_ff_mult: int = 0          # FFN hidden width (the whole expert space) in units of n_embd; 0: the
                                # FFN's default (dense 4, switch/top2/inf 8)
    # discrete MoE (switch, top2)
    n_expert: int = 4
    moe_top_k: int = 0            # experts per token; 0: 1 for switch, 2 for top2 (changeable at inference)
    aux_loss_coef: float = 0.01   # alpha, Switch load-balancing loss
    z_loss_coef: float = 0.001    # beta, router z-loss
    # ∞-MoE
    d_z: int = 128              # dimension of the continuous expert index z
    top_frac: float = 0.25      # r: fraction of the d_ff hidden units each sample keeps
    z_samples: int = 2          # K: Monte-Carlo samples of z per token (changeable at inference)
    z_deterministic: bool = False  # use z = mu (no noise): reproducible evaluation and sampling
    use_kernel: str = "auto"    # Triton kernel for ffn=inf: auto (CUDA tensors) | on | off

    def __post_init__(self):
        if self.ffn not in ("dense", "switch", "top2", "inf"):
            raise ValueError(f"GPTConfig.ffn={self.ffn!r}: expected dense, switch, top2 or inf")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 < self.top_frac <= 1.0:
            raise ValueError(f"GPTConfig.top_frac={self.top_frac}: must be in (0, 1]")
        if self.z_samples < 1:
            raise ValueError(f"GPTConfig.z_samples={self.z_samples}: need at least one sample")
        if self.use_kernel not in ("auto", "on", "off"):
            raise ValueError(f"GPTConfig.use_kernel={self.use_kernel!r}: expected auto, on or off")
        if self.gelu_approx not in ("none", "tanh"):
            raise ValueError(f"GPTConfig.gelu_approx={self.gelu_approx!r}: expected none or tanh")
        if self.gelu_approx == "tanh" and self.ffn == "inf":  # inf_ffn_reference and kernel.py: exact GELU
            raise ValueError("GPTConfig: ffn=inf computes the exact GELU only (gelu_approx=none)")
        if self.d_ff_mult < 0:
            raise ValueError(f"GPTConfig.d_ff_mult={self.d_ff_mult}: must be >= 0 (0: the FFN's default)")
        if self.ffn in ("switch", "top2"):
            if self.d_ff % self.n_expert:
                raise ValueError(f"GPTConfig: d_ff={self.d_ff} is not divisible by n_expert={self.n_expert}")
            if not 1 <= self.experts_per_token <= self.n_expert:
                raise ValueError(f"GPTConfig: n_expert={self.n_expert}, moe_top_k={self.moe_top_k} do not allow "
                                 f"{self.experts_per_token} experts per token for ffn={self.ffn}")
            if self.n_embd % 8:  # grouped_mm wants 16-byte aligned rows (bf16: multiples of 8)
                raise ValueError(f"GPTConfig.n_embd={self.n_embd}: switch/top2 need a multiple of 8")

    @property
    def d_ff(self):
        """Width of the FFN's whole hidden (expert) space."""
        return (self.d_ff_mult or {"dense": 4, "switch": 8, "top2": 8, "inf": 8}[self.ffn]) * self.n_embd

    @property
    def experts_per_token(self):
        return self.moe_top_k or (1 if self.ffn == "switch" else 2)

    @property
    def n_keep(self):
        return keep_count(self.top_frac, self.d_ff)


def keep_count(top_frac, d_ff):
    """Hidden units one ∞-MoE sample keeps: round(r * d_ff), at least one."""
    return max(1, int(round(top_frac * d_ff)))


def compute_dtype(x):
    """The dtype matmuls on x run in: autocast's when it is on, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


# ----------------------------------------------------------------------------- attention

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
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

class DenseFFN(nn.Module):
    """GPT-2's MLP: W2 GELU(W1 x)."""

    def __init__(self, config):
        super().__init__()
        self.W1 = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.W2 = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approx
        self.stats = {}

    def forward(self, x):
        return self.W2(F.gelu(self.W1(x), approximate=self.approximate))


class TopKMoE(nn.Module):
    """Discrete MoE, dropless: top-1 (Switch) or top-2 routing over n_expert FFNs of width d_ff / n_expert.

    Tokens are sorted by expert and run through grouped GEMMs whose group offsets stay on the
    device, so there is no host sync and no capacity: every (token, slot) is computed.
    """

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
        self.aux_loss = None
        self.stats = {}

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        N, E, k = x.shape[0], self.n_expert, self.config.experts_per_token
        with torch.autocast(x.device.type, enabled=False):  # router math in float32
            logits = F.linear(x.float(), self.W_r.weight.float())
            p = logits.softmax(dim=-1)
        top_p, top_e = p.topk(k, dim=-1)                       # (N, k)
        if self.config.ffn == "top2":
            top_p = top_p / top_p.sum(-1, keepdim=True)     # top2: renormalised; switch: the raw p_e

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
        self.aux_loss = lb_loss + z_loss
        self.stats = {"load": f.detach(), "lb_loss": lb_loss.detach(), "z_loss": z_loss.detach()}
        return y.view(shape)


def averaged_topk_mask(z, W_z, top_frac):
    """M = (1/K) sum_k TopN%(W_z z_k), keeping the kept scores at their own values (SPEC steps 3-4).

    z: (K, N, d_z) float32. Loops over k so only (N, d_ff) tensors exist, never (K, N, d_ff).
    Tie rule (shared with kernel.py): keep every score >= the n_keep-th largest of its row.
    Returns M (N, d_ff) and counts (d_ff,): how many of the N*K samples selected each unit.
    """
    K, d_ff = z.shape[0], W_z.shape[0]
    n_keep = keep_count(top_frac, d_ff)
    M, counts = 0.0, 0.0
    for k in range(K):
        m = z[k] @ W_z.t()                                     # m_k = W_z z_k   (N, d_ff)
        thr = m.detach().topk(n_keep, dim=-1).values[:, -1:]  # threshold is not differentiated
        keep = m >= thr
        M = M + torch.where(keep, m, 0.0)
        counts = counts + keep.sum(0, dtype=torch.float32)
    return M / K, counts


def inf_ffn_reference(x, W1, b1, W2, b2, W_z, z, top_frac):
    """PyTorch ∞-MoE FFN: y = W2 (GELU(W1 x + b1) ⊙ M) + b2 (SPEC steps 5-6, one W1/W2 pass for all K).

    Same signature and result as kernel.inf_ffn. x: (N, d); z: (K, N, d_z) float32.
    Returns y, counts (d_ff,) and n_active (non-zeros of M), the last two detached statistics.
    """
    with torch.autocast(x.device.type, enabled=False):   # mask scores in float32: fewer exact ties
        M, counts = averaged_topk_mask(z.float(), W_z.float(), top_frac)
    h = F.gelu(F.linear(x, W1, b1))
    y = F.linear(h * M.to(h.dtype), W2, b2)
    return y, counts.detach(), (M != 0).sum(dtype=torch.float32).detach()


class InfMoE(nn.Module):
    """∞-MoE FFN: Gaussian router over a continuous expert space, K samples, one masked FFN pass."""
    LOGVAR_BOUND = 6.0  # log sigma^2 in (-6, 6): sigma in (0.05, 20), safe in bf16, never 0 or inf

    def __init__(self, config):
        super().__init__()
        self.config = config  # shared with GPT, so z_samples / z_deterministic can change at inference
        d, d_ff, d_z = config.n_embd, config.d_ff, config.d_z
        self.router = nn.Linear(d, 2 * d_z, bias=config.bias)   # -> (mu, raw log sigma^2)
        # mask scores m = W_z z. With z ~ N(mu, sigma^2 ≈ 1) at init the scores have unit variance, so a
        # kept top-25% score has RMS ≈ 1.36 and the 2d kept units give the output scale of dense GPT-2's
        # 4d units with mask 1 (E[sum m^2] ≈ 2d * 1.86 ≈ 4d): step-0 loss and activations match dense.
        self.W_z = nn.Parameter(torch.randn(d_ff, d_z) / math.sqrt(d_z))
        self.W1 = nn.Linear(d, d_ff, bias=config.bias)
        self.W2 = nn.Linear(d_ff, d, bias=config.bias)
        self.stats = {}

    def use_kernel(self, x):
        mode = self.config.use_kernel
        return mode == "on" or (mode == "auto" and x.is_cuda)

    def forward(self, x, eps=None):
        """x: (..., d). eps: optional fixed N(0, I) noise (K, *x.shape[:-1], d_z); K is read from it."""
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):  # router math in float32
            mu, raw = F.linear(x.float(), self.router.weight.float(),
                               None if self.router.bias is None else self.router.bias.float()).chunk(2, dim=-1)
            logvar = self.LOGVAR_BOUND * torch.tanh(raw / self.LOGVAR_BOUND)  # smooth bound on log sigma^2
            sigma = torch.exp(0.5 * logvar)
            if eps is not None:
                if eps.dim() < 2 or eps.shape[1:] != (*shape[:-1], mu.shape[-1]):
                    raise ValueError(f"eps has shape {tuple(eps.shape)}; expected (K, {', '.join(map(str, shape[:-1]))}, "
                                     f"{mu.shape[-1]}) for x of shape {tuple(shape)}")
                eps = eps.reshape(eps.shape[0], -1, eps.shape[-1]).float()
            elif self.config.z_deterministic:
                eps = torch.zeros(1, *mu.shape, device=x.device)      # z = mu
            else:
                eps = torch.randn(self.config.z_samples, *mu.shape, device=x.device)
            z = mu + sigma * eps                                         # z_k = mu + sigma ⊙ eps_k

        ffn = inf_ffn_reference
        if self.use_kernel(x):
            from kernel import inf_ffn as ffn
        dt = compute_dtype(x)
        W1, W2 = self.W1, self.W2
        b1 = None if W1.bias is None else W1.bias.to(dt)
        b2 = None if W2.bias is None else W2.bias.to(dt)
        y, counts, n_active = ffn(x.to(dt), W1.weight.to(dt), b1, W2.weight.to(dt), b2, self.W_z, z,
                                  self.config.top_frac)

        # routing statistics of this batch, kept on the device (train.py reads them when it logs)
        q = counts / counts.sum()
        self.stats = {
            "entropy": -(q * q.clamp_min(1e-30).log()).sum().detach() / math.log(q.numel()),  # H~(q)
            "sigma": sigma.mean().detach(),
            "active": n_active / (x.shape[0] * self.W_z.shape[0]),     # non-zero share of the averaged mask
        }
        return y.view(shape)


# ----------------------------------------------------------------------------- model

class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = {"dense": lambda: DenseFFN(config), "switch": lambda: TopKMoE(config),
                    "top2": lambda: TopKMoE(config), "inf": lambda: InfMoE(config)}[config.ffn]()
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
        self.aux_loss = None  # switch/top2: the last forward's summed aux losses, detached, for logging
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2: scale residual projections
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "mlp.W2.weight", "mlp.W2")):
                nn.init.normal_(p, mean=0.0, std=resid_std)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        """Returns (logits, loss). With targets, loss = cross-entropy (+ MoE aux losses for switch/top2)
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
        if self.config.ffn in ("switch", "top2"):  # each MoE layer adds its own aux loss (Switch convention)
            aux = sum(block.mlp.aux_loss for block in self.transformer.h)
            self.aux_loss = aux.detach()
            loss = loss + aux
        return logits, loss

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
        """(total, active): all parameters, and those one token multiplies with.

        Position embeddings count (nanoGPT leaves them out; we keep them so the numbers add up).
        Active: dense all; switch/top2 the router plus top-k of the experts; inf the router, W_z and
        at most K * n_keep hidden units of W1/W2 (the union of the K masks can only be smaller).
        """
        c = self.config
        total = sum(p.numel() for p in self.parameters())
        if c.ffn == "dense":
            return total, total
        d, b = c.n_embd, int(c.bias)
        if c.ffn in ("switch", "top2"):
            h = c.d_ff // c.n_expert
            idle = (c.n_expert - c.experts_per_token) * (d * h + h * d + b * (h + d))
        else:
            units = min(c.d_ff, c.z_samples * c.n_keep) if not c.z_deterministic else c.n_keep
            idle = (c.d_ff - units) * (2 * d + b)  # a hidden unit owns a row of W1, a column of W2, a b1 entry
        return total, total - c.n_layer * idle

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
MOE_FIELDS = ("ffn", "d_ff_mult", "n_expert", "moe_top_k", "aux_loss_coef", "z_loss_coef",  # an upcycle's own
              "d_z", "top_frac", "z_samples", "z_deterministic", "use_kernel")


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
    """init_from's SOURCE -> (GPTConfig kwargs, state dict): a GPT-2 name, a Hugging Face GPT-2 directory,
    one of our ckpt.pt files or an out_dir holding one (weights and model config only)."""
    path = download_gpt2(source) if source in HF_GPT2 else source
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        return read_hf_gpt2(path)
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init_from={source}: no such checkpoint or directory (expected scratch, resume, "
                                f"{', '.join(HF_GPT2)}, a Hugging Face GPT-2 directory, a ckpt.pt or an out_dir)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # the optimizer state stays on disk
    if not isinstance(ckpt, dict) or "model_args" not in ckpt:
        raise ValueError(f"{path}: not a checkpoint written by train.py (no model_args)")
    return ckpt["model_args"], ckpt["model"]


def from_pretrained(source, overrides=None):
    """GPT from init_from's SOURCE (see load_source), its shape read from the source.

    overrides: GPTConfig fields from the command line. FREE_FIELDS may differ from the source's; block_size
    may be lowered (the position table is cropped, as in nanoGPT); from a dense source another ffn upcycles
    it (see upcycle) and MOE_FIELDS are then free too. Any other field that differs is an error naming it.
    """
    args, state = load_source(source)
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
    T = overrides.get("block_size", args["block_size"])
    state = {**state, "transformer.wpe.weight": state["transformer.wpe.weight"][:T]}
    args["dropout"] = 0.0  # the source's dropout was for its own training; --dropout sets ours

    if not upcycling:
        model = GPT(GPTConfig(**{**args, **overrides}))
        model.load_state_dict(state)
        return model
    ffn, dense_mult = overrides["ffn"], GPTConfig(**args).d_ff // args["n_embd"]  # d_ff_mult 0: the default
    n_expert = overrides.get("n_expert", GPTConfig.n_expert)
    default_mult = dense_mult * n_expert if ffn in ("switch", "top2") else 2 * dense_mult  # inf: the paper's 8d
    exact = {"gelu_approx": "none"} if ffn == "inf" else {}  # inf's paths compute the exact GELU only
    config = GPTConfig(**{**args, "d_ff_mult": default_mult, **exact, **overrides})
    return upcycle(GPT(config), state, dense_mult * config.n_embd)


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
    import os
    import resource

    print("| ffn | GPT-2 Small total | active | GPT-2 Medium total | active |\n|---|---|---|---|---|")
    for ffn in ("dense", "switch", "top2", "inf"):
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
    measure("∞-MoE PyTorch path, d_ff = 8d, K = 2, r = 25%", lambda: InfMoE(GPTConfig(ffn="inf")))
