"""
Train GPT-2 with a dense, switch, top2 or ∞-MoE FFN on llm.c-format token shards.

  python train.py                                   # tiny ∞-MoE on the bundled sample, CPU, minutes
  python train.py --ffn=switch --max_iters=500      # any TrainConfig or GPTConfig field, --key=value
  torchrun --standalone --nproc_per_node=8 train.py --preset=gpt2 --ffn=inf   # the paper's GPT-2 Small run
  python train.py --init_from=resume --max_iters=400                          # continue out/ with its settings
  python train.py --eval_only --init_from=resume --z_samples=4                # evaluate a checkpoint
  python train.py --help                                                      # every option, default, meaning
"""
import ast
import dataclasses
import fcntl
import glob
import hashlib
import inspect
import io
import json
import math
import os
import re
import sys
import textwrap
import time
import tokenize
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import GPT, GPTConfig, load_pretrained, load_source, pretrained_config
from prepare_fineweb import (EOT, HELLASWAG_PATH, DataError, check_dataset, get_tokenizer, load_hellaswag,
                             load_shard, shard_paths)


@dataclass
class TrainConfig:
    out_dir: str = "out"              # checkpoint ckpt.pt, log.jsonl (training), eval.jsonl (--eval_only)
    data_dir: str = "data/sample"     # llm.c shards: *_val_*.bin and *_train_*.bin
    init_from: str = "scratch"        # scratch | resume (out_dir/ckpt.pt and its settings) | gpt2* | PATH
    preset: str = ""                  # gpt2 | gpt2-medium: the paper's model shapes and recipe
    overwrite: bool = False           # scratch run: delete out_dir's ckpt.pt, log.jsonl, eval.jsonl first
    allow_changes: bool = False       # resume: accept another data_dir, batch or optimizer setting
    eval_only: bool = False           # score the checkpoint once (val loss, HellaSwag) and exit
    hellaswag: bool = False           # also score HellaSwag zero-shot at every evaluation
    hellaswag_limit: int = 0          # 0: all 10,042 examples; else the first N (a quick look)
    hellaswag_path: str = HELLASWAG_PATH  # the validation split, fetched by prepare_fineweb.py --hellaswag
    eval_interval: int = 50           # evaluate (and save ckpt.pt) every this many steps
    eval_iters: int = 10              # validation batches; always the same val tokens
    log_interval: int = 10            # print and log the training loss every this many steps
    always_save_checkpoint: bool = True  # false: save only when the val loss improves
    seed: int = 1337                  # of this run's random numbers (process r uses seed + r)
    # data and batch: tokens per optimizer step = batch_size * block_size * grad_accum * world size
    batch_size: int = 8               # sequences per micro-batch and process
    gradient_accumulation_steps: int = 1  # micro-batches per step, summed over all processes
    # AdamW with linear warm-up and cosine decay to min_lr
    learning_rate: float = 1e-3       # peak learning rate, after warm-up
    min_lr: float = 1e-4              # learning rate at the end of the cosine decay
    max_iters: int = 200              # optimizer steps of the whole run
    warmup_iters: int = 20            # steps of linear warm-up
    lr_decay_iters: int = 0           # 0: decay until max_iters
    weight_decay: float = 0.1         # AdamW's, on matrices only (not biases, LayerNorms)
    beta1: float = 0.9                # AdamW's
    beta2: float = 0.95               # AdamW's
    grad_clip: float = 1.0            # clip the gradient's global norm to this; 0: no clipping
    # system
    device: str = ""                  # cpu | cuda | cuda:N; "" picks cuda when available, else cpu
    dtype: str = ""                   # bfloat16 | float32; "" picks bfloat16 on cuda, float32 on cpu
    compile: bool = False             # torch.compile the model
    wandb_log: bool = False           # also send the log records to Weights & Biases (pip install wandb)
    wandb_project: str = "inf-moe"    # W&B project
    wandb_run_name: str = ""          # W&B run name; "": W&B picks one


# Model the default run trains: small enough to learn visibly on a 2-core CPU in a few minutes.
TINY_MODEL = dict(ffn="inf", n_layer=4, n_head=4, n_embd=128, block_size=128, d_z=32)

# The paper's setup (arXiv 2601.17680): FineWeb 10B tokens, seq 1024, 524,288 tokens per step, bf16.
RECIPE = dict(data_dir="data/fineweb10B", batch_size=16, gradient_accumulation_steps=32, learning_rate=6e-4,
              min_lr=6e-5, max_iters=19073, warmup_iters=700, eval_interval=250, eval_iters=20,
              log_interval=10, compile=True)
PRESETS = {
    "gpt2": (RECIPE, dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)),
    "gpt2-medium": (RECIPE, dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024)),
}
INFERENCE_KNOBS = ("z_samples", "z_deterministic", "moe_top_k", "use_kernel", "dropout")  # may differ from a checkpoint's
# Settings that make a resumed training run another run: changed only with --allow_changes.
RUN_DEFINING = ("data_dir", "batch_size", "gradient_accumulation_steps", "learning_rate", "min_lr",
                "warmup_iters", "lr_decay_iters", "weight_decay", "beta1", "beta2", "grad_clip")
# Settings of one invocation, never taken from a checkpoint.
PER_INVOCATION = ("out_dir", "init_from", "preset", "overwrite", "allow_changes", "eval_only")

# Peak dense bf16 tensor FLOP/s per GPU, for MFU; unknown GPUs get no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


class UsageError(ValueError):
    """A bad option, value or file: `python train.py` / `sample.py` print it as one line and exit 2."""


# ----------------------------------------------------------------------------- options

def at_least(lo):
    return (lambda v: v >= lo), f">= {lo}"


def above(lo):
    return (lambda v: v > lo), f"> {lo}"


BELOW_ONE = (lambda v: 0 <= v < 1), "in [0, 1)"
# The valid values of every numeric option: (test, the words an error shows). NaN fails every test.
RANGES = {
    "hellaswag_limit": at_least(0), "eval_interval": at_least(1), "eval_iters": at_least(1),
    "log_interval": at_least(1), "seed": at_least(0), "batch_size": at_least(1),
    "gradient_accumulation_steps": at_least(1), "learning_rate": above(0),
    "min_lr": at_least(0), "max_iters": at_least(0), "warmup_iters": at_least(0), "lr_decay_iters": at_least(0),
    "weight_decay": at_least(0), "beta1": BELOW_ONE, "beta2": BELOW_ONE, "grad_clip": at_least(0),
    # GPTConfig's own checks cover the combinations (n_embd % n_head, moe_top_k <= n_expert, ...)
    "block_size": at_least(1), "vocab_size": at_least(1), "n_layer": at_least(1), "n_head": at_least(1),
    "n_embd": at_least(1), "dropout": BELOW_ONE, "n_expert": at_least(1), "moe_top_k": at_least(0),
    "aux_loss_coef": at_least(0), "z_loss_coef": at_least(0), "d_z": at_least(1),
    "top_frac": ((lambda v: 0 < v <= 1), "in (0, 1]"), "z_samples": at_least(1),
    "d_ff_mult": at_least(0), "balance_rate": at_least(0), "router_depth": at_least(1),
    "router_width": at_least(0), "router_mix": at_least(1),
    "top_frac2": ((lambda v: 0 <= v <= 1), "in [0, 1] (0: top_frac)"),
}


def check_ranges(values, ranges):
    for key, value in values.items():
        if key in ranges and not ranges[key][0](value):
            raise UsageError(f"--{key}={value}: must be {ranges[key][1]}")


def parse_value(key, text, default):
    kind = type(default)
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UsageError(f"--{key}={text}: expected true or false")
    try:
        return kind(text)
    except ValueError:
        raise UsageError(f"--{key}={text}: expected {kind.__name__}") from None


def read_flags(argv, *classes):
    """--key=value strings -> {key: value, typed like the field of the first dataclass that has it}.

    A bare --flag means --flag=true for a boolean and is an error for anything else.
    """
    fields = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, f.default)
    flags = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}: options look like --key=value (see --help)")
        key, eq, text = arg[2:].partition("=")
        if key not in fields:
            raise UsageError(f"unknown option --{key} (known: {', '.join(sorted(fields))})")
        if not eq and type(fields[key]) is not bool:
            raise UsageError(f"--{key} needs a value: --{key}=...")
        flags[key] = parse_value(key, text if eq else "true", fields[key])
    return flags


def parse_args(argv, *configs):
    """Apply --key=value overrides to the first dataclass instance in configs that has the field.
    Returns {key: value} of what was given."""
    flags = read_flags(argv, *(type(c) for c in configs))
    for key, value in flags.items():
        setattr(next(c for c in configs if hasattr(c, key)), key, value)
    return flags


def field_help(cls):
    """{field: the comment on its line} of a dataclass, read from its source: --help's only text."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    return {node.target.id: comments.get(node.lineno, "")
            for node in ast.parse(source).body[0].body if isinstance(node, ast.AnnAssign)}


def usage(doc, *configs):
    """--help: the script's docstring, then every option with its default and meaning. A config built with
    other values than its class's defaults (the default run's TINY_MODEL) shows both."""
    def shown(value):
        if isinstance(value, bool):
            return str(value).lower()
        return value if not isinstance(value, str) or (value and value.isprintable()) else repr(value)

    lines = [doc.strip(), "", "Options, --key=value (a bare --flag means --flag=true), default shown:"]
    for config in configs:
        cls, notes = type(config), field_help(type(config))
        lines.append(f"  {cls.__name__}:")
        for f in dataclasses.fields(config):
            value, note = getattr(config, f.name), notes[f.name]
            if value != f.default:
                note += f" [{cls.__name__} and --preset: {shown(f.default)}]"
            lines.append(f"    {'--' + f.name + '=' + str(shown(value)):<32} {note}")
    return "\n".join(lines)


def pick_device(name):
    """torch.device for --device ("" picks cuda when available, else cpu); refused if absent."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device={name}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device={name}: no CUDA device here (torch {torch.__version__}); use --device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device={name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def check_dtype(dtype):
    if dtype == "float16":
        raise UsageError("--dtype=float16: not supported (it would need a loss scaler); use bfloat16 or float32")
    if dtype not in ("", "bfloat16", "float32"):
        raise UsageError(f"--dtype={dtype}: expected bfloat16 or float32")


def starting_point(init_from, out_dir):
    """(checkpoint to resume, source weights): the one place init_from is read. A resumed run has the
    checkpoint; a run from trained weights (GPT-2, a Hugging Face directory, one of our ckpt.pt files or
    out_dirs) has the source's (GPTConfig kwargs, state dict) and starts at step 0; a scratch run neither."""
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
    except FileNotFoundError as e:  # no such source, or the Hub out of reach: the message says what to do
        raise UsageError(str(e)) from None


def configure(argv):
    """(TrainConfig, GPTConfig kwargs, checkpoint or None, {setting: (checkpoint's, now)}).

    A scratch run starts from the defaults (TINY_MODEL, or GPTConfig's with a preset); a run from a
    checkpoint starts from the settings saved in it. Then --preset, then the command line, applied on top.
    """
    flags = read_flags(argv, TrainConfig, GPTConfig)
    if "preset" in flags:
        if flags["preset"] not in PRESETS:
            raise UsageError(f"--preset={flags['preset']}: expected one of {', '.join(PRESETS)}")
        train_over, model_over = PRESETS[flags["preset"]]
        flags = {**train_over, **model_over, **flags}  # a flag after the preset overrides it
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    cfg = TrainConfig(**{k: v for k, v in flags.items() if k in train_fields})
    ckpt, source = starting_point(cfg.init_from, cfg.out_dir)
    if source is not None:  # the source fixes the shape; pretrained_config refuses flags that change it
        base_train = {}
        base_model = pretrained_config(source[0], {k: v for k, v in flags.items() if k in model_fields},
                                       cfg.init_from)
    elif ckpt is None:
        base_train = {}
        base_model = dataclasses.asdict(GPTConfig() if "preset" in flags else GPTConfig(**TINY_MODEL))
    else:
        base_train = {k: v for k, v in ckpt["config"].items() if k in train_fields and k not in PER_INVOCATION}
        base_model = {**dataclasses.asdict(GPTConfig()), **{k: v for k, v in ckpt["model_args"].items()
                                                          if k in model_fields}}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in base_train.items() if k not in flags})
    model_args = {**base_model, **{k: v for k, v in flags.items() if k in model_fields}}

    changed = {}
    if ckpt is not None:
        saved = {**base_train, **base_model}
        changed = {k: (saved[k], v) for k, v in flags.items() if k in saved and saved[k] != v}
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        shape = [k for k in changed if k in model_fields and k not in INFERENCE_KNOBS]
        if shape:
            was = ", ".join(f"--{k}={changed[k][0]}" for k in shape)
            raise UsageError(f"{path} was trained with {was}; only {', '.join(INFERENCE_KNOBS)} may change "
                             f"on resume (for another model, train into another --out_dir)")
        run = [k for k in changed if k in RUN_DEFINING]
        if run and not cfg.eval_only and not cfg.allow_changes:
            was = ", ".join(f"--{k}={changed[k][0]}" for k in run)
            raise UsageError(f"{path} was trained with {was}: resuming with another value makes it another "
                             f"run; add --allow_changes to do it anyway")
        if not cfg.eval_only and cfg.max_iters <= ckpt["iter_num"]:
            raise UsageError(f"{path} is at step {ckpt['iter_num']} and --max_iters={cfg.max_iters}: nothing to "
                             f"train; give a larger --max_iters")
    elif cfg.eval_only and source is None:
        raise UsageError(f"--eval_only scores a trained model: add --init_from=resume to read "
                         f"{os.path.join(cfg.out_dir, 'ckpt.pt')} (or --init_from=gpt2, a directory, a ckpt.pt)")
    check_ranges(dataclasses.asdict(cfg), RANGES)
    check_ranges(model_args, RANGES)
    check_dtype(cfg.dtype)
    GPTConfig(**model_args)  # validate the combination now, with a clear message
    if cfg.wandb_log:
        try:
            import wandb  # noqa: F401  (optional dependency)
        except ImportError:
            raise UsageError("--wandb_log needs the wandb package: pip install wandb") from None
    return cfg, model_args, ckpt, changed, source


# ----------------------------------------------------------------------------- data

class ShardLoader:
    """Reads (x, y) batches of B sequences of T tokens from a split's shards, in order.

    Rank r of W takes the r-th B*T slice of every W*B*T window, so ranks never see the same token.
    The position (shard, offset) is the whole state: saved in checkpoints for an exact resume.
    """

    def __init__(self, data_dir, split, B, T, rank=0, world=1):
        self.files = shard_paths(data_dir, split)
        self.B, self.T, self.rank, self.world = B, T, rank, world
        self.reset()

    def reset(self, shard=0, offset=0):
        self.shard, self.offset = shard, offset
        self.tokens = load_shard(self.files[shard])
        if len(self.tokens) < self.world * self.B * self.T + 1:
            raise ValueError(f"{self.files[shard]}: {len(self.tokens)} tokens is too few for "
                             f"{self.world} x {self.B} x {self.T} tokens per step; lower batch_size or block_size")

    def next_batch(self, device="cpu"):
        B, T = self.B, self.T
        start = self.offset + self.rank * B * T
        buf = torch.from_numpy(self.tokens[start:start + B * T + 1].astype(np.int64))
        self.offset += self.world * B * T
        if self.offset + self.world * B * T + 1 > len(self.tokens):  # next window would not fit: next shard
            self.reset((self.shard + 1) % len(self.files), 0)
        if torch.device(device).type == "cuda":  # pinned memory: the copy overlaps the GPU's work
            buf = buf.pin_memory().to(device, non_blocking=True)
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    def state(self):
        return {"shard": self.shard, "offset": self.offset}


# ----------------------------------------------------------------------------- helpers

def get_lr(it, cfg):
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def flops_per_token(model):
    """Training FLOPs per token from ACTIVE parameters (6N) plus attention (nanoGPT / PaLM estimate)."""
    c = model.config
    n_active = model.num_params()[1] - model.transformer.wpe.weight.numel()
    return 6 * n_active + 12 * c.n_layer * c.n_embd * c.block_size


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def reduce_mean(t, ddp):
    if ddp:
        t = t.clone()
        dist.all_reduce(t)  # SUM: gloo has no AVG
        t /= dist.get_world_size()
    return t


def leave_process_group():
    """All ranks tear the group down together: a rank that left while another was still in gloo was
    seen to SIGABRT it (about 1 run in 25 of the two-process test)."""
    dist.barrier()
    dist.destroy_process_group()


@torch.no_grad()
def evaluate(model, loader, eval_iters, ctx, ddp, device):
    """Mean validation cross-entropy over the val shard's first eval_iters batches, split across ranks:
    the same eval_iters * batch_size * block_size tokens whatever the number of processes.

    Runs in its own RNG stream so evaluating never changes the training run's random numbers.
    """
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        loader.reset()
        losses = torch.zeros(eval_iters // loader.world, device=device)
        for k in range(len(losses)):
            x, y = loader.next_batch(device)
            with ctx:
                logits, _ = model(x, y)
            losses[k] = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    model.train()
    return reduce_mean(losses.mean(), ddp).item()


# ----------------------------------------------------------------------------- HellaSwag

def render_example(example, enc, max_len=None):
    """One HellaSwag example -> tokens (4, T), mask (4, T), label.

    Row i is the context followed by " " + ending i (completion style, as llm.c / nanoGPT's hellaswag.py);
    mask is 1 on the ending's tokens. A row longer than max_len (the model's block_size) loses tokens from
    the LEFT, so the ending is scored whole on a shortened context. Short rows are padded on the right with
    EOT: causal attention never looks right, and the mask leaves the padding out of the score.
    """
    ctx = enc.encode_ordinary(example["ctx"])
    rows = []
    for ending in example["endings"]:
        end = enc.encode_ordinary(" " + ending)
        rows.append((ctx + end, [0] * len(ctx) + [1] * len(end)))
    if max_len:
        rows = [(t[-max_len:], m[-max_len:]) for t, m in rows]
    T = max(len(t) for t, _ in rows)
    tokens = torch.tensor([t + [EOT] * (T - len(t)) for t, _ in rows], dtype=torch.long)
    mask = torch.tensor([m + [0] * (T - len(m)) for _, m in rows], dtype=torch.long)
    return tokens, mask, example["label"]


def collate(rendered):
    """render_example outputs of several examples -> tokens (4B, T), mask (4B, T), labels (B,): one forward."""
    T = max(tokens.size(1) for tokens, _, _ in rendered)
    tokens = torch.cat([F.pad(t, (0, T - t.size(1)), value=EOT) for t, _, _ in rendered])
    mask = torch.cat([F.pad(m, (0, T - m.size(1))) for _, m, _ in rendered])
    return tokens, mask, torch.tensor([label for _, _, label in rendered])


@torch.no_grad()
def score_endings(model, tokens, mask, ctx):
    """Log-likelihood of each row's masked (ending) tokens: summed and per-token mean, float32 (R,) each.
    Logits at position t predict token t+1, so a row's first token is never scored (it is context unless
    an ending alone fills block_size). Right padding is harmless: causal attention never looks right."""
    with ctx:
        logits, _ = model(tokens, tokens)  # given targets, GPT returns the logits of every position
    logp = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    m = mask[:, 1:].float()
    total = (logp.view_as(m) * m).sum(1)
    return total, total / m.sum(1).clamp_min(1)


@torch.no_grad()
def hellaswag_eval(model, examples, device, ctx, batch_examples=8, progress=True, rank=0, world=1):
    """Zero-shot HellaSwag accuracy, completion style: each ending is scored by the model's log-likelihood
    of its tokens after the context (llm.c / nanoGPT's hellaswag.py; GPT-2 124M: acc 28.6%, acc_norm 29.55%).

      acc       the ending with the highest SUMMED log-likelihood is the label
      acc_norm  the ending with the highest PER-TOKEN AVERAGE log-likelihood is the label

    (The Eleuther harness scores multiple-choice style and its acc_norm divides by the ending's length in
    bytes; GPT-2 124M gets 31.1% acc_norm there, so compare only numbers of the same style.)
    Rank r of world scores examples r, r + world, ...; the raw counts correct, correct_norm and n are
    returned too, to be summed across ranks (dist.all_reduce) before dividing. Pass the raw model, not
    DDP/compiled. Runs in eval mode and its own RNG stream (∞-MoE draws noise), then restores both.
    """
    enc, device = get_tokenizer(), torch.device(device)
    mine = examples[rank::world]
    correct = correct_norm = 0
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in tqdm(range(0, len(mine), batch_examples), desc="hellaswag", disable=not progress):
            rendered = [render_example(ex, enc, model.config.block_size) for ex in mine[i:i + batch_examples]]
            tokens, mask, labels = (t.to(device) for t in collate(rendered))
            total, mean = score_endings(model, tokens, mask, ctx)
            correct += (total.view(len(rendered), -1).argmax(1) == labels).sum().item()
            correct_norm += (mean.view(len(rendered), -1).argmax(1) == labels).sum().item()
    model.train(was_training)
    n = len(mine)
    return dict(acc=correct / max(n, 1), acc_norm=correct_norm / max(n, 1), n=n,
                correct=correct, correct_norm=correct_norm)


def run_hellaswag(model, cfg, device, ctx, master, rank, world, ddp):
    """HellaSwag over all ranks: acc and acc_norm from counts summed across processes."""
    r = hellaswag_eval(model, load_hellaswag(cfg.hellaswag_path, limit=cfg.hellaswag_limit or None), device, ctx,
                       progress=master, rank=rank, world=world)
    counts = torch.tensor([r["correct"], r["correct_norm"], r["n"]], dtype=torch.float64, device=device)
    if ddp:
        dist.all_reduce(counts)
    correct, correct_norm, n = counts.tolist()
    return {"hellaswag_acc": correct / n, "hellaswag_acc_norm": correct_norm / n, "hellaswag_n": int(n)}


# ----------------------------------------------------------------------------- checkpoints and logs

# A checkpoint is a one-line header, then torch.save's bytes; the header holds their SHA-256 and length,
# so a damaged, truncated or empty file is an error naming it, never a silent load.
CKPT_HEADER = re.compile(rb"inf-moe checkpoint sha256=([0-9a-f]{64}) bytes=([0-9]{20})\n")
CKPT_HEADER_BYTES = len(b"inf-moe checkpoint sha256= bytes=\n") + 64 + 20


class HashingWriter:
    """A file-like write() target for torch.save that hashes and counts the bytes on their way to f."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def save_checkpoint(path, ckpt):
    """Write ckpt under this process's own temp name, then rename: a crash (or another run) never leaves a
    half-written file at path, and the previous checkpoint stays intact until the new one is whole."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(bytes(CKPT_HEADER_BYTES))  # placeholder: the digest is known once torch.save is done
        writer = HashingWriter(f)
        torch.save(ckpt, writer)
        f.seek(0)
        f.write(b"inf-moe checkpoint sha256=%s bytes=%020d\n" % (writer.sha.hexdigest().encode(), writer.size))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Body(io.RawIOBase):
    """The file f from byte `start` on, as a file of its own: what torch.load reads, without a copy."""

    def __init__(self, f, start):
        self.f, self.start = f, start
        f.seek(start)

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer):
        return self.f.readinto(buffer)

    def seek(self, pos, whence=io.SEEK_SET):
        return self.f.seek(pos + self.start if whence == io.SEEK_SET else pos, whence) - self.start

    def tell(self):
        return self.f.tell() - self.start


def load_checkpoint(path):
    """The dict save_checkpoint wrote, on the CPU, once its SHA-256 matches; a UsageError naming path if not.
    The file is hashed in chunks and then read once by torch.load: memory holds the tensors, not the file."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"no checkpoint at {path}") from None
    except OSError as e:
        raise UsageError(f"cannot read checkpoint {path}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = CKPT_HEADER.fullmatch(f.read(CKPT_HEADER_BYTES))
        if head is None:
            raise UsageError(f"{path} ({size} bytes) is not a checkpoint of this train.py: empty, damaged, "
                             f"or written by an older version")
        if size - CKPT_HEADER_BYTES != int(head[2]):
            raise UsageError(f"{path} is truncated or damaged: {size - CKPT_HEADER_BYTES} bytes after its "
                             f"header, which says {int(head[2])}")
        sha = hashlib.sha256()
        while chunk := f.read(1 << 24):
            sha.update(chunk)
        if sha.hexdigest() != head[1].decode():
            raise UsageError(f"{path} is damaged: its contents do not match the checksum written with them")
        return torch.load(Body(f, CKPT_HEADER_BYTES), map_location="cpu", weights_only=True)


def lock_out_dir(out_dir):
    """An exclusive flock on out_dir/.lock, held while the returned file is open: a second run into the same
    out_dir is refused, and the kernel drops the lock when a run ends, even by SIGKILL."""
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise UsageError(f"--out_dir={out_dir} is in use by another run (pid {holder}): wait for it to end, "
                         f"or choose another --out_dir") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def prepare_out_dir(cfg, ckpt):
    """Create and lock out_dir for a training run, and make its files this run's (called on rank 0).

    A scratch run never replaces a checkpoint it did not write, unless --overwrite. A resumed run drops
    log.jsonl's records after the checkpoint's step: they belong to steps it is about to redo.
    """
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        lock = lock_out_dir(cfg.out_dir)
    except OSError as e:
        raise UsageError(f"--out_dir={cfg.out_dir}: {e.strerror}") from None
    try:
        ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
        if ckpt is None and os.path.exists(ckpt_path) and not cfg.overwrite:
            raise UsageError(f"{ckpt_path} already exists: continue that run with --init_from=resume, or start "
                             f"over with --overwrite (deletes it, log.jsonl and eval.jsonl)")
        for tmp in glob.glob(os.path.join(cfg.out_dir, "ckpt.pt.*tmp")) + glob.glob(log_path + ".*.tmp"):
            os.remove(tmp)  # left by a killed run: no live run writes here, we hold the lock
        if ckpt is None:  # a new run: none of the old one's files stay to be mistaken for its own
            for path in (ckpt_path, log_path, os.path.join(cfg.out_dir, "eval.jsonl")):
                if os.path.exists(path):
                    os.remove(path)
        elif os.path.exists(log_path):
            keep = []
            with open(log_path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= ckpt["iter_num"]:
                            keep.append(line)
                    except (ValueError, KeyError, TypeError):
                        pass  # a line cut short by a kill
            with open(log_path + f".{os.getpid()}.tmp", "w") as f:
                f.writelines(keep)
            os.replace(log_path + f".{os.getpid()}.tmp", log_path)
        return lock
    except BaseException:
        lock.close()
        raise


def rng_states(device, ddp):
    """Every rank's RNG state (ranks draw different ∞-MoE noise), gathered for the checkpoint."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if not ddp:
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


class Logger:
    """Prints a line and appends a JSON record to a file in out_dir (rank 0 only); optional W&B."""

    def __init__(self, cfg, master, run_config, name="log.jsonl"):
        self.master, self.path, self.wandb = master, os.path.join(cfg.out_dir, name), None
        if master:  # --eval_only of GPT-2 or another run's weights may name a new out_dir
            os.makedirs(cfg.out_dir, exist_ok=True)
        if master and cfg.wandb_log:
            import wandb  # optional dependency; configure() checked it is installed
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=run_config)

    def log(self, record, line):
        if not self.master:
            return
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(record, step=record["step"])


def stats_record(model, ddp):
    """Routing statistics of the last forward (averaged over layers and ranks) as plain numbers."""
    out = {}
    for key, value in model.routing_stats().items():
        value = reduce_mean(value.float(), ddp)
        out[key] = value.tolist() if value.dim() else value.item()
    return out


def hms(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------- main

def check_data(cfg, model_args, ckpt, world, master):
    """The whole dataset checked before the first step: every shard's header, size and token range
    (prepare_fineweb.check_dataset), that each shard holds one step's batch, that the val split holds
    eval_iters batches (evaluation never wraps around to re-score tokens), and that a resumed run's saved
    data position lies inside the train shards. Returns the train loader's start position."""
    try:
        dataset = check_dataset(cfg.data_dir, model_args["vocab_size"])
    except DataError as e:
        raise UsageError(str(e)) from None
    if master and not dataset["manifest"]:
        print(f"warning: {cfg.data_dir} has no manifest.json from prepare_fineweb.py, so whether its shards are "
              f"complete is unknown; each shard was checked on its own")
    B, T = cfg.batch_size, model_args["block_size"]
    window = world * B * T  # tokens one step of all processes reads from a shard, plus one target
    for path, n in dataset["train"] + dataset["val"]:
        if n < window + 1:
            raise UsageError(f"{path}: {n} tokens, fewer than one batch needs ({world} x {B} x {T} + 1); "
                             f"lower --batch_size or --block_size")
    val_batches = world * sum((n - 1) // window for _, n in dataset["val"])
    if val_batches < cfg.eval_iters:
        raise UsageError(f"--eval_iters={cfg.eval_iters}: the val split of {cfg.data_dir} holds only {val_batches} "
                         f"batches of {B} x {T} tokens; lower --eval_iters or --batch_size")
    if ckpt is None or cfg.eval_only or ckpt["config"]["data_dir"] != cfg.data_dir:
        return {"shard": 0, "offset": 0}  # a new data_dir (--allow_changes) is read from its start
    shard, offset = ckpt["data"]["shard"], ckpt["data"]["offset"]
    if shard >= len(dataset["train"]) or offset + window + 1 > dataset["train"][shard][1]:
        raise UsageError(f"{os.path.join(cfg.out_dir, 'ckpt.pt')} stopped at train shard {shard}, token {offset}, "
                         f"which the train shards in {cfg.data_dir} do not have: were they remade?")
    return ckpt["data"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(usage(__doc__, TrainConfig(), GPTConfig(**TINY_MODEL)))
        return None
    cfg, model_args, ckpt, changed, source = configure(argv)
    master, world = int(os.environ.get("RANK", 0)) == 0, int(os.environ.get("WORLD_SIZE", 1))
    if master and changed:
        print(f"{os.path.join(cfg.out_dir, 'ckpt.pt')}: settings that differ from the checkpoint's: "
              + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
    device = pick_device(cfg.device)
    if (model_args["ffn"] == "inf" and model_args["use_kernel"] == "on" and device.type != "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1"):
        raise UsageError(f"--use_kernel=on needs a CUDA device for its Triton kernels, not {device}; "
                         f"use --use_kernel=off (or auto) here")
    data_start = check_data(cfg, model_args, ckpt, world, master)
    if cfg.hellaswag:  # read it now, so a missing or malformed file is found before training, not after
        try:
            if not load_hellaswag(cfg.hellaswag_path, limit=cfg.hellaswag_limit or None):
                raise DataError(f"{cfg.hellaswag_path}: no HellaSwag examples in it")
        except (FileNotFoundError, DataError) as e:
            raise UsageError(f"--hellaswag: {e}") from None
    lock = prepare_out_dir(cfg, ckpt) if master and not cfg.eval_only else None
    try:
        return train(cfg, model_args, ckpt, data_start, source)
    finally:
        if lock is not None:
            lock.close()


def train(cfg, model_args, ckpt, data_start, source=None):
    """Train the model and return the best val loss; with eval_only, evaluate it once and return the record.
    ckpt: a checkpoint to resume; source: trained weights to start from at step 0 (see starting_point)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
        rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    else:
        rank, local_rank, world = 0, 0, 1
    master = rank == 0
    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if ddp else (device.index or 0))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    # torch.compile's shape function for grouped_mm accepts bf16 only; eager float32 runs on the CPU
    # and on CUDA (there through torch's one-matmul-per-expert fallback: slow, see README).
    if dtype == "float32" and model_args["ffn"] in ("switch", "top2") and cfg.compile:
        raise ValueError(f"--ffn={model_args['ffn']} with --compile needs --dtype=bfloat16: torch.compile "
                         f"traces grouped_mm in bf16 only (float32 runs without --compile)")
    if cfg.gradient_accumulation_steps % world:  # it counts micro-batches of all processes together
        raise ValueError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by "
                         f"the {world} processes")
    grad_accum = cfg.gradient_accumulation_steps // world
    if cfg.eval_iters % world:
        raise ValueError(f"--eval_iters={cfg.eval_iters} is not divisible by the {world} processes")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    # model, optimizer, and where to start
    torch.manual_seed(cfg.seed + rank)  # ranks draw different ∞-MoE noise
    model = GPT(GPTConfig(**model_args))
    if source is not None:  # GPT-2 or another run's weights (upcycled if dense -> MoE); a fresh optimizer
        load_pretrained(model, *source)
    model.to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    iter_num, best_val, saved_step = 0, float("inf"), None
    train_loader = ShardLoader(cfg.data_dir, "train", cfg.batch_size, model.config.block_size, rank, world)
    val_loader = ShardLoader(cfg.data_dir, "val", cfg.batch_size, model.config.block_size, rank, world)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        iter_num, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        if not cfg.eval_only:
            saved_step = iter_num
            optimizer.load_state_dict(ckpt["optimizer"])
            for group in optimizer.param_groups:  # --allow_changes may have given new AdamW settings
                group["betas"] = (cfg.beta1, cfg.beta2)
                group["weight_decay"] = group["weight_decay"] and cfg.weight_decay  # the no-decay group keeps 0
            train_loader.reset(**data_start)
            if data_start == ckpt["data"]:  # same data, same place: the run continues bit for bit
                set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0], device)
        del ckpt
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    logger = Logger(cfg, master, {**dataclasses.asdict(cfg), **model_args},
                    "eval.jsonl" if cfg.eval_only else "log.jsonl")
    total, active = raw_model.num_params()
    tokens_per_iter = cfg.batch_size * raw_model.config.block_size * grad_accum * world
    if master:
        print(f"{model_args['ffn']} GPT: {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token; "
              f"{world} process(es) on {device}, {dtype}, "
              f"{tokens_per_iter:,} tokens per step")

    def run_eval(extra):
        record = {"step": iter_num, "val_loss": evaluate(raw_model, val_loader, cfg.eval_iters, ctx, ddp, device),
                  **extra}
        line = f"step {iter_num}: val loss {record['val_loss']:.4f}"
        if cfg.hellaswag:
            record.update(run_hellaswag(raw_model, cfg, device, ctx, master, rank, world, ddp))
            line += (f", hellaswag acc {record['hellaswag_acc']:.4f} acc_norm {record['hellaswag_acc_norm']:.4f}"
                     f" ({record['hellaswag_n']} examples)")
        logger.log(record, line)
        return record

    if cfg.eval_only:
        knobs = {k: model_args[k] for k in ("z_samples", "z_deterministic", "moe_top_k")}
        record = run_eval({"eval_only": True, **knobs})
        if ddp:
            leave_process_group()
        return record

    flops_tok, peak = flops_per_token(raw_model), peak_flops(device)
    data_state = train_loader.state()  # a checkpoint resumes at the batch read next
    x, y = train_loader.next_batch(device)
    start_iter = iter_num
    t_start = t0 = time.perf_counter()
    timed = 0  # steps since t0: tokens/s counts only these (evaluations reset the clock)

    def stopping(what, value):
        kept = (f"last good checkpoint (step {saved_step}) kept at {ckpt_path}" if saved_step is not None else
                f"no checkpoint was written by this run")
        return SystemExit(f"error: step {iter_num}: {what} is {value}; stopping, {kept}")

    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # a resumed run starts at its checkpoint's step, evaluated (and logged) before that was saved
        if (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and iter_num != saved_step:
            val = run_eval({"lr": lr})["val_loss"]
            if not math.isfinite(val):
                raise stopping("validation loss", val)
            if iter_num > 0 and (val < best_val or cfg.always_save_checkpoint):
                best_val = min(best_val, val)
                rngs = rng_states(device, ddp)  # collective: every rank takes part
                if master:
                    save_checkpoint(ckpt_path, {
                        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "model_args": model_args, "config": dataclasses.asdict(cfg), "iter_num": iter_num,
                        "best_val_loss": best_val, "data": data_state, "rng": rngs})
                saved_step = iter_num
            t0, timed = time.perf_counter(), 0
        if iter_num >= cfg.max_iters:
            break

        # one optimizer step over grad_accum micro-batches; prefetch the next batch while the GPU works
        loss_sum, aux_sum = torch.zeros((), device=device), torch.zeros((), device=device)
        for micro in range(grad_accum):
            if ddp:
                model.require_backward_grad_sync = micro == grad_accum - 1
            with ctx:
                _, loss = model(x, y)
                loss = loss / grad_accum
            if micro == grad_accum - 1:
                data_state = train_loader.state()
            x, y = train_loader.next_batch(device)
            loss.backward()
            loss_sum += loss.detach()
            if raw_model.aux_loss is not None:
                aux_sum += raw_model.aux_loss / grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
        optimizer.step()
        raw_model.after_step()  # FFN state updated outside the gradient (aux-loss-free balancing)
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        timed += 1

        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            aux_val = reduce_mean(aux_sum, ddp).item()  # host syncs happen at log time only
            loss_val = reduce_mean(loss_sum, ddp).item() - aux_val  # cross-entropy, comparable across FFNs
            if not math.isfinite(loss_val):
                raise stopping("training loss", loss_val)
            now = time.perf_counter()
            dt, t0, timed = (now - t0) / timed, now, 0  # seconds per step, over the steps timed
            elapsed = now - t_start  # this process's, evaluations included: the ETA extrapolates it
            eta = elapsed / (iter_num - start_iter) * (cfg.max_iters - iter_num)
            record = {"step": iter_num, "loss": loss_val, "aux_loss": aux_val, "lr": lr, "tokens_per_s": tokens_per_iter / dt,
                      "grad_norm": None if grad_norm is None else grad_norm.item(), "elapsed_s": elapsed,
                      **stats_record(raw_model, ddp)}
            line = (f"step {iter_num}/{cfg.max_iters}: loss {loss_val:.4f}, aux {aux_val:.4f}, lr {lr:.2e}, "
                    f"{record['tokens_per_s']:,.0f} tok/s, {hms(elapsed)} elapsed, ETA {hms(eta)}")
            if peak:
                record["mfu"] = flops_tok * tokens_per_iter / dt / peak
                line += f", MFU {100 * record['mfu']:.1f}%"
            for key in ("lb_loss", "z_loss", "entropy", "sigma", "active"):
                if key in record:
                    line += f", {key} {record[key]:.4g}"
            logger.log(record, line)
    if ddp:
        leave_process_group()
    return best_val


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError, DataError) as e:  # UsageError, data, optional packages
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
