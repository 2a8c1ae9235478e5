"""
Starting from trained weights (--init_from in train.py and sample.py):

  starting_point   what init_from names: scratch, resume (out_dir's checkpoint), one of our ckpt.pt
                   files or out_dirs, OpenAI's GPT-2 from the Hugging Face Hub (gpt2, gpt2-medium,
                   ...) or a Hugging Face GPT-2 directory, read without transformers
  from_pretrained  our GPT built from such a source, its shape taken from the source
  upcycle          a dense model turned into switch, top2 or ∞-MoE (sparse upcycling)
"""
import dataclasses
import json
import os
from statistics import NormalDist

import torch

from infra import UsageError, load_checkpoint
from model import GPT, INFERENCE_KNOBS, GPTConfig

HF_GPT2 = {name: f"openai-community/{name}"
           for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


def starting_point(init_from, out_dir):
    """(checkpoint to resume, source weights): the one place init_from is read. A resumed run has
    the checkpoint; a run from trained weights (GPT-2, a Hugging Face directory, one of our ckpt.pt
    files or out_dirs) has the source's (GPTConfig kwargs, state dict) and starts at step 0; a
    scratch run neither."""
    if init_from == "scratch":
        return None, None
    if init_from == "resume":
        return load_checkpoint(os.path.join(out_dir, "ckpt.pt")), None
    path = init_from
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        path = os.path.join(path, "ckpt.pt")  # an out_dir
    if os.path.isfile(path):
        ckpt = load_checkpoint(path)
        return None, (ckpt["model_args"], ckpt["model"])
    try:
        return None, load_source(init_from)  # a GPT-2 name or a Hugging Face directory
    except FileNotFoundError as e:  # no such source, or the Hub out of reach: the message says why
        raise UsageError(str(e)) from None


def load_source(source):
    """A GPT-2 name or a Hugging Face GPT-2 directory -> (GPTConfig kwargs, state dict)."""
    path = download_gpt2(source) if source in HF_GPT2 else source
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        return read_hf_gpt2(path)
    raise FileNotFoundError(f"--init_from={source}: no such checkpoint or directory (expected "
                            f"scratch, resume, {', '.join(HF_GPT2)}, a Hugging Face GPT-2 "
                            f"directory, a ckpt.pt or an out_dir)")


def download_gpt2(name):
    """OpenAI's GPT-2 (config.json + model.safetensors) from the Hugging Face Hub, cached; returns
    the directory."""
    repo = HF_GPT2[name]
    instead = (f"or put {repo}'s config.json and model.safetensors in a directory DIR and pass "
               f"--init_from=DIR")
    try:
        from huggingface_hub import snapshot_download  # optional: only the hub names need it
    except ImportError:
        raise ImportError(f"--init_from={name} downloads from the Hugging Face Hub: pip install "
                          f"huggingface_hub, {instead}") from None
    try:
        return snapshot_download(repo, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # offline (HF_HUB_OFFLINE=1 or no network) and not in the cache
        raise FileNotFoundError(f"--init_from={name}: could not fetch {repo} "
                                f"({type(e).__name__}; offline?), {instead}") from None


def read_hf_gpt2(path):
    """A Hugging Face GPT2LMHeadModel directory -> (GPTConfig kwargs, our state dict).

    Reads config.json and model.safetensors (or pytorch_model.bin) without transformers. GPT-2
    stores its linear layers as Conv1D, weight (in, out): they are transposed into nn.Linear's.
    """
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    where = os.path.join(path, "config.json")
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{where}: model_type={hf.get('model_type')!r}, expected gpt2")
    unsupported = {"activation_function": ("gelu_new", "gelu_pytorch_tanh", "gelu"),
                   "layer_norm_epsilon": (1e-5,), "scale_attn_weights": (True,),
                   "scale_attn_by_inverse_layer_idx": (False,), "tie_word_embeddings": (True,)}
    for key, ok in unsupported.items():
        if hf.get(key, ok[0]) not in ok:
            raise ValueError(f"{where}: {key}={hf[key]!r} is not supported (expected "
                             f"{' or '.join(map(str, ok))})")
    d = hf["n_embd"]
    d_ff = hf.get("n_inner") or 4 * d
    if d_ff % d:
        raise ValueError(f"{where}: n_inner={d_ff} is not a multiple of n_embd={d}")
    exact = hf.get("activation_function", "gelu_new") == "gelu"
    args = dict(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                n_head=hf["n_head"], n_embd=d, bias=True, ffn="dense", d_ff_mult=d_ff // d,
                gelu_approx="none" if exact else "tanh")

    if os.path.exists(os.path.join(path, "model.safetensors")):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path}/model.safetensors needs the safetensors package: "
                              f"pip install safetensors") from None
        hf_state = load_file(os.path.join(path, "model.safetensors"))
    elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
        hf_state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu",
                              weights_only=True, mmap=True)
    else:
        raise FileNotFoundError(f"{path}: has config.json but neither model.safetensors nor "
                                f"pytorch_model.bin")

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
    wte = hf_state.get("transformer.wte.weight", hf_state.get("wte.weight"))
    if head is not None and not torch.equal(head, wte):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight; this GPT ties them")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return args, state


# ----------------------------------------------------------------------------- building our model

UPCYCLE_TARGETS = ("switch", "top2", "inf")
# an upcycled MoE's own fields, free to differ from the dense source's
MOE_FIELDS = ("ffn", "d_ff_mult", "n_expert", "moe_top_k", "aux_loss_coef", "z_loss_coef", "d_z",
              "top_frac", "z_samples", "z_deterministic", "use_kernel", "balance", "balance_rate",
              "router_depth", "router_width", "router_mix", "gate")


def pretrained_config(args, overrides, source):
    """GPTConfig kwargs of the model init_from=SOURCE builds from a source of config args.

    overrides: GPTConfig fields from the command line. INFERENCE_KNOBS may differ from the source's;
    block_size may be lowered (the position table is cropped, as in nanoGPT); from a dense source
    another ffn upcycles it (see upcycle) and MOE_FIELDS are then free too. Any other field that
    differs is an error naming it.
    """
    args = dataclasses.asdict(GPTConfig(**args))   # fields an older checkpoint lacks: defaults
    overrides = dict(overrides or {})
    upcycling = args["ffn"] == "dense" and overrides.get("ffn", "dense") != "dense"
    free = set(INFERENCE_KNOBS) | (set(MOE_FIELDS) if upcycling else set()) | {"block_size"}
    clash = {k: args[k] for k, v in overrides.items() if k not in free and args[k] != v}
    if clash:
        given = ", ".join(f"--{k}={overrides[k]}" for k in clash)
        theirs = ", ".join(f"{k}={v}" for k, v in clash.items())
        raise ValueError(f"--init_from={source} fixes the model's shape: {given} differs from its "
                         f"{theirs} (free: {', '.join(INFERENCE_KNOBS)}, a smaller block_size, and "
                         f"upcycling a dense source)")
    if overrides.get("block_size", args["block_size"]) > args["block_size"]:
        raise ValueError(f"--block_size={overrides['block_size']}: --init_from={source} has only "
                         f"{args['block_size']} positions")
    args["dropout"] = 0.0  # the source's dropout was for its own training; --dropout sets ours
    if not upcycling:
        return {**args, **overrides}
    ffn, dense_mult = overrides["ffn"], GPTConfig(**args).d_ff // args["n_embd"]
    if ffn not in UPCYCLE_TARGETS:
        raise ValueError(f"--init_from={source} --ffn={ffn}: a dense model upcycles into "
                         f"{', '.join(UPCYCLE_TARGETS)} only")
    n_expert = overrides.get("n_expert", GPTConfig.n_expert)
    # switch/top2: every expert a copy of the dense MLP; inf: twice its width (the paper's 8d)
    default_mult = dense_mult * n_expert if ffn in ("switch", "top2") else 2 * dense_mult
    exact = {"gelu_approx": "none"} if ffn == "inf" else {}  # inf's paths: the exact GELU only
    return {**args, "d_ff_mult": default_mult, **exact, **overrides}


@torch.no_grad()
def load_pretrained(model, args, state):
    """Fill model, built from pretrained_config(args, ...), with a source's weights: copied, or
    upcycled when the source is dense and the model is not. Returns the model."""
    wpe = state["transformer.wpe.weight"][:model.config.block_size]
    state = {**state, "transformer.wpe.weight": wpe}
    if args["ffn"] == model.config.ffn:
        model.load_state_dict(state)
        return model
    return upcycle(model, state, GPTConfig(**args).d_ff)


def from_pretrained(source, overrides=None, weights=None):
    """GPT from init_from's SOURCE, its shape read from the source: weights = (GPTConfig kwargs,
    state dict) already read (starting_point), else load_source(source)."""
    args, state = weights or load_source(source)
    model = GPT(GPTConfig(**pretrained_config(args, overrides, source)))
    return load_pretrained(model, args, state)


def expected_mask_value(top_frac):
    """E[M_j], the mean mask value of one hidden unit at initialisation (any K: M averages K masks).

    A fresh router gives mu ≈ 0, sigma ≈ 1, so z ~ N(0, I); W_z's rows have norm ≈ 1, so each score
    m_j = W_z[j] . z is ~ N(0, 1). A sample keeps the top r of the scores, those above the (1 - r)
    quantile t, at their own values: E[m 1{m > t}] = phi(t), the standard normal density at t
    (0.318 for r = 25%).
    """
    if not 0.0 < top_frac < 1.0:
        raise ValueError(f"top_frac={top_frac}: upcycling into ffn=inf needs 0 < top_frac < 1")
    normal = NormalDist()
    return normal.pdf(normal.inv_cdf(1.0 - top_frac))


@torch.no_grad()
def upcycle(model, dense_state, d_dense):
    """Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): fill `model`, a freshly
    initialised switch/top2/inf GPT, from a dense GPT's state dict of hidden width d_dense.
    Embeddings, attention, norms and b2 are copied; routers and W_z keep their fresh initialisation.

      switch/top2  every expert is a full copy of the dense MLP (needs d_ff = n_expert * d_dense).
                   top2's renormalised weights sum to 1, so at step 0 it computes exactly the dense
                   model; switch computes each FFN output times the chosen expert's probability.
      inf          hidden unit j is dense unit j mod d_dense (needs d_ff a multiple of it: R copies
                   each), and W2 is divided by R * E[M_j]: averaged over the routing noise and the
                   fresh W_z, the FFN output equals the dense one (expected_mask_value). Per
                   token it is the dense FFN with its units re-weighted at random (mean 1), so
                   step-0 loss is above the source's.
    """
    c = model.config
    if c.ffn in ("switch", "top2") and c.d_ff != c.n_expert * d_dense:
        raise ValueError(f"upcycling into {c.ffn}: each of the {c.n_expert} experts copies the "
                         f"dense MLP, so d_ff_mult must be {c.n_expert * d_dense // c.n_embd} "
                         f"(got {c.d_ff_mult})")
    if c.ffn == "inf" and c.d_ff % d_dense:
        raise ValueError(f"upcycling into inf: d_ff_mult={c.d_ff_mult} must be a multiple of the "
                         f"dense source's {d_dense // c.n_embd}")
    rest = {k: v for k, v in dense_state.items() if ".mlp." not in k}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    if unexpected or any(".mlp." not in k for k in missing):
        raise ValueError(f"upcycling: the dense source does not match the model "
                         f"({(missing + unexpected)[:3]} ...)")
    for i, block in enumerate(model.transformer.h):
        prefix = f"transformer.h.{i}.mlp."
        src = {k[len(prefix):]: v for k, v in dense_state.items() if k.startswith(prefix)}
        W1, b1, W2, b2 = src["W1.weight"], src.get("W1.bias"), src["W2.weight"], src.get("W2.bias")
        mlp = block.mlp
        if c.ffn in ("switch", "top2"):   # experts stored (E, in, out): nn.Linear's transposes
            mlp.W1.copy_(W1.t().expand_as(mlp.W1))
            mlp.W2.copy_(W2.t().expand_as(mlp.W2))
            if mlp.b1 is not None:
                mlp.b1.copy_(b1.expand_as(mlp.b1))
                mlp.b2.copy_(b2.expand_as(mlp.b2))
        else:
            unit = torch.arange(c.d_ff) % d_dense            # hidden unit j copies dense unit j mod
            scale = 1.0 / ((c.d_ff // d_dense) * expected_mask_value(c.top_frac))
            mlp.W1.weight.copy_(W1[unit])
            mlp.W2.weight.copy_(W2[:, unit] * scale)
            if mlp.W1.bias is not None:
                mlp.W1.bias.copy_(b1[unit])
                mlp.W2.bias.copy_(b2)
    return model
