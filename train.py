"""
Train GPT-2 with a dense, switch, top2 or ∞-MoE FFN on llm.c-format token shards.

  python train.py                                   # tiny ∞-MoE on the bundled sample, CPU, minutes
  python train.py --ffn=switch --max_iters=500      # any TrainConfig or GPTConfig field, --key=value
  torchrun --standalone --nproc_per_node=8 train.py --preset=gpt2 --ffn=inf   # the paper's GPT-2 Small run
  python train.py --eval_only --init_from=resume --z_samples=4                # evaluate a checkpoint
"""
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import GPT, GPTConfig, from_pretrained
from prepare_fineweb import EOT, HELLASWAG_PATH, get_tokenizer, load_hellaswag, load_shard, shard_paths


@dataclass
class TrainConfig:
    out_dir: str = "out"
    data_dir: str = "data/sample"
    init_from: str = "scratch"        # scratch | resume (out_dir/ckpt.pt) | gpt2* | PATH (see from_pretrained)
    preset: str = ""                  # gpt2 | gpt2-medium: the paper's model shapes and recipe
    eval_only: bool = False
    hellaswag: bool = False           # also score HellaSwag zero-shot at every evaluation
    hellaswag_limit: int = 0          # 0: all 10,042 examples; else the first N (a quick look)
    hellaswag_path: str = HELLASWAG_PATH
    eval_interval: int = 50
    eval_iters: int = 10              # validation batches; always the same val tokens
    log_interval: int = 10
    always_save_checkpoint: bool = True
    seed: int = 1337
    # data and batch: tokens per optimizer step = batch_size * block_size * grad_accum * world size
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    # AdamW with linear warm-up and cosine decay to min_lr
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    max_iters: int = 200
    warmup_iters: int = 20
    lr_decay_iters: int = 0           # 0: decay until max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # system
    device: str = ""                  # "" picks cuda when available, else cpu
    dtype: str = ""                   # bfloat16 | float32; "" picks bfloat16 on cuda, float32 on cpu
    compile: bool = False
    wandb_log: bool = False
    wandb_project: str = "inf-moe"
    wandb_run_name: str = ""


# Model the default run trains: small enough to learn visibly on a 2-core CPU in a few minutes.
TINY_MODEL = dict(ffn="inf", n_layer=4, n_head=4, n_embd=128, block_size=128, d_z=32)

# The paper's setup (SPEC.md): FineWeb 10B tokens, seq 1024, 524,288 tokens per step, bf16.
RECIPE = dict(data_dir="data/fineweb10B", batch_size=16, gradient_accumulation_steps=32, learning_rate=6e-4,
              min_lr=6e-5, max_iters=19073, warmup_iters=700, eval_interval=250, eval_iters=20,
              log_interval=10, compile=True)
PRESETS = {
    "gpt2": (RECIPE, dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)),
    "gpt2-medium": (RECIPE, dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024)),
}
INFERENCE_KNOBS = ("z_samples", "z_deterministic", "moe_top_k", "use_kernel", "dropout")  # may differ from a checkpoint's

# Peak dense bf16 tensor FLOP/s per GPU, for MFU; unknown GPUs get no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def parse_value(key, text, default):
    kind = type(default)
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"--{key}={text}: expected true or false")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{key}={text}: expected {kind.__name__}") from None


def parse_args(argv, *configs):
    """Apply --key=value overrides to the first dataclass in configs that has the field.

    A bare --flag means --flag=true. Returns {key: value} of what was given, for callers that care.
    """
    given = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options look like --key=value")
        key, eq, text = arg[2:].partition("=")
        target = next((c for c in configs if key in {f.name for f in dataclasses.fields(c)}), None)
        if target is None:
            names = sorted(f.name for c in configs for f in dataclasses.fields(c))
            raise ValueError(f"unknown option --{key} (known: {', '.join(names)})")
        default = getattr(target, key)
        value = parse_value(key, text if eq else "true", default)
        setattr(target, key, value)
        given[key] = value
    return given


def configure(argv):
    """TrainConfig and GPTConfig kwargs from defaults, an optional preset, then the command line."""
    cfg, model_cfg = TrainConfig(), GPTConfig(**TINY_MODEL)
    preset = [a.split("=", 1)[1] for a in argv if a.startswith("--preset=")]
    if preset:
        if preset[-1] not in PRESETS:
            raise ValueError(f"--preset={preset[-1]}: expected one of {', '.join(PRESETS)}")
        train_over, model_over = PRESETS[preset[-1]]
        cfg = dataclasses.replace(cfg, **train_over)
        model_cfg = GPTConfig(**{**dataclasses.asdict(GPTConfig()), **model_over})
    given = parse_args(argv, cfg, model_cfg)
    model_args = dataclasses.asdict(model_cfg)
    GPTConfig(**model_args)  # validate the combination now, with a clear message
    if cfg.dtype not in ("", "bfloat16", "float32"):
        raise ValueError(f"--dtype={cfg.dtype}: expected bfloat16 or float32")
    return cfg, model_args, {k: v for k, v in given.items() if k in model_args}


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

def save_checkpoint(path, ckpt):
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact


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
    """Prints a line and appends a JSON record to out_dir/log.jsonl (rank 0 only); optional W&B."""

    def __init__(self, cfg, master, run_config):
        self.master, self.path, self.wandb = master, os.path.join(cfg.out_dir, "log.jsonl"), None
        if master and cfg.wandb_log:
            import wandb  # optional dependency
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


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg, model_args, model_given = configure(sys.argv[1:] if argv is None else argv)

    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
        rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    else:
        rank, local_rank, world = 0, 0, 1
    master = rank == 0
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if ddp else (device.index or 0))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    if dtype == "float32" and model_args["ffn"] in ("switch", "top2") and (cfg.compile or device.type == "cuda"):
        raise ValueError(f"--ffn={model_args['ffn']} with --compile or on CUDA needs --dtype=bfloat16: "
                         f"grouped_mm takes bf16 there (float32 works eagerly on the CPU)")
    if cfg.gradient_accumulation_steps % world:  # it counts micro-batches of all processes together
        raise ValueError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by "
                         f"the {world} processes")
    grad_accum = cfg.gradient_accumulation_steps // world
    if cfg.eval_iters % world:
        raise ValueError(f"--eval_iters={cfg.eval_iters} is not divisible by the {world} processes")
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    # model, optimizer, and where to start
    ckpt = None
    if cfg.init_from == "resume":
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--init_from=resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        clash = {k: v for k, v in model_given.items() if k not in INFERENCE_KNOBS and ckpt["model_args"][k] != v}
        if clash:
            raise ValueError(f"{ckpt_path} was trained with different {', '.join(clash)}; only "
                             f"{', '.join(INFERENCE_KNOBS)} may change on resume")
        model_args = {**ckpt["model_args"], **{k: model_given[k] for k in model_given if k in INFERENCE_KNOBS}}
    torch.manual_seed(cfg.seed + rank)  # ranks draw different ∞-MoE noise
    if cfg.init_from in ("scratch", "resume"):
        model = GPT(GPTConfig(**model_args)).to(device)
    else:  # weights from GPT-2 or another checkpoint, shape from its config; a fresh optimizer at step 0
        model = from_pretrained(cfg.init_from, model_given).to(device)
        model_args = dataclasses.asdict(model.config)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    iter_num, best_val = 0, float("inf")
    train_loader = ShardLoader(cfg.data_dir, "train", cfg.batch_size, model.config.block_size, rank, world)
    val_loader = ShardLoader(cfg.data_dir, "val", cfg.batch_size, model.config.block_size, rank, world)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        iter_num, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        if not cfg.eval_only:
            optimizer.load_state_dict(ckpt["optimizer"])
            train_loader.reset(**ckpt["data"])
            set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0], device)
        del ckpt
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    logger = Logger(cfg, master, {**dataclasses.asdict(cfg), **model_args})
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
            dist.destroy_process_group()
        return record

    flops_tok, peak = flops_per_token(raw_model), peak_flops(device)
    data_state = train_loader.state()  # a checkpoint resumes at the batch read next
    x, y = train_loader.next_batch(device)
    t0 = time.time()
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            val = run_eval({"lr": lr})["val_loss"]
            if not math.isfinite(val):
                raise SystemExit(f"step {iter_num}: validation loss is {val}; stopping, {ckpt_path} kept as it was")
            if iter_num > 0 and (val < best_val or cfg.always_save_checkpoint):
                best_val = min(best_val, val)
                rngs = rng_states(device, ddp)  # collective: every rank takes part
                if master:
                    save_checkpoint(ckpt_path, {
                        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "model_args": model_args, "config": dataclasses.asdict(cfg), "iter_num": iter_num,
                        "best_val_loss": best_val, "data": data_state, "rng": rngs})
            t0 = time.time()
        if iter_num == cfg.max_iters:
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
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1

        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            aux_val = reduce_mean(aux_sum, ddp).item()  # host syncs happen at log time only
            loss_val = reduce_mean(loss_sum, ddp).item() - aux_val  # cross-entropy, comparable across FFNs
            if not math.isfinite(loss_val):
                raise SystemExit(f"step {iter_num}: training loss is {loss_val}; stopping, "
                                 f"last good checkpoint kept at {ckpt_path}")
            dt = (time.time() - t0) / cfg.log_interval
            t0 = time.time()
            record = {"step": iter_num, "loss": loss_val, "aux_loss": aux_val, "lr": lr, "tokens_per_s": tokens_per_iter / dt,
                      "grad_norm": None if grad_norm is None else grad_norm.item(), **stats_record(raw_model, ddp)}
            line = f"step {iter_num}: loss {loss_val:.4f}, aux {aux_val:.4f}, lr {lr:.2e}, {record['tokens_per_s']:,.0f} tok/s"
            if peak:
                record["mfu"] = flops_tok * tokens_per_iter / dt / peak
                line += f", MFU {100 * record['mfu']:.1f}%"
            for key in ("lb_loss", "z_loss", "entropy", "sigma", "active"):
                if key in record:
                    line += f", {key} {record[key]:.4g}"
            logger.log(record, line)
    if ddp:
        dist.destroy_process_group()
    return best_val


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}")
