"""
Train GPT-2 with a dense, switch, top2 or ∞-MoE FFN on llm.c-format token shards.

  python train.py                                   # tiny ∞-MoE on the bundled sample, CPU, minutes
  python train.py --ffn=switch --max_iters=500      # any TrainConfig/GPTConfig field, --key=value
  torchrun --standalone --nproc_per_node=8 train.py --preset=gpt2 --ffn=inf  # the paper's GPT-2
  python train.py --init_from=resume --max_iters=400              # continue out/ with its settings
  python train.py --eval_only --init_from=resume --z_samples=4    # evaluate a checkpoint
  python train.py --help                                          # every option, default, meaning
"""
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from infra import (SEED_RANGE, Logger, UsageError, check_dtype, check_kernel, check_memory,
                   check_ranges, default_dtype, fork_rng, leave_process_group, load_pretrained,
                   pick_device, prepare_out_dir, pretrained_config, read_flags, reduce_mean,
                   rng_states, save_checkpoint, set_rng_state, start_process, starting_point,
                   usage)
from model import GPT, INFERENCE_KNOBS, GPTConfig
from model import RANGES as MODEL_RANGES
from prepare_fineweb import (HELLASWAG_FILE, HELLASWAG_LOCAL, REPO_DIR, DataError,
                             canonical_path, check_dataset, load_hellaswag, load_shard, run_main,
                             shard_paths)


@dataclass
class TrainConfig:
    out_dir: str = "out"              # ckpt.pt, log.jsonl (training), eval.jsonl (--eval_only)
    data_dir: str = "data/sample"     # llm.c shards *_val_*.bin, *_train_*.bin; default: the repo's
    init_from: str = "scratch"        # scratch | resume (out_dir/ckpt.pt, settings) | gpt2* | PATH
    preset: str = ""                  # gpt2 | gpt2-medium: the paper's model shapes and recipe
    overwrite: bool = False           # scratch run: delete out_dir's ckpt.pt, log.jsonl, eval.jsonl
    allow_changes: bool = False       # resume: accept another data_dir, batch or optimizer setting
    eval_only: bool = False           # score the checkpoint once (val loss, HellaSwag) and exit
    hellaswag: bool = False           # also score HellaSwag zero-shot at every evaluation
    hellaswag_limit: int = 0          # 0: all 10,042 examples; else the first N (a quick look)
    hellaswag_path: str = HELLASWAG_FILE  # prepare_fineweb.py --hellaswag's; default: the repo's
    lm_eval: str = ""                 # --eval_only: lm-evaluation-harness tasks, comma-separated
    lm_eval_include: str = ""         # a directory of task YAMLs for --lm_eval (local tasks)
    lm_eval_limit: int = 0            # 0: every example of each --lm_eval task; else the first N
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
    device: str = ""                  # cpu | cuda | cuda:N | mps; "": cuda if available, else cpu
    dtype: str = ""                   # bfloat16|float16|float32; "": cuda bf16 (<sm80: fp16), fp32
    compile: bool = False             # torch.compile the model
    wandb_log: bool = False           # also send the log records to Weights & Biases (pip install)
    wandb_project: str = "inf-moe"    # W&B project
    wandb_run_name: str = ""          # W&B run name; "": W&B picks one


# The valid values of each numeric option (model.py holds GPTConfig's).
RANGES = {
    "hellaswag_limit": ">= 0", "lm_eval_limit": ">= 0", "eval_interval": ">= 1",
    "eval_iters": ">= 1", "log_interval": ">= 1", "seed": SEED_RANGE, "batch_size": ">= 1",
    "gradient_accumulation_steps": ">= 1", "learning_rate": "> 0", "min_lr": ">= 0",
    "max_iters": ">= 0", "warmup_iters": ">= 0", "lr_decay_iters": ">= 0", "weight_decay": ">= 0",
    "beta1": "[0, 1)", "beta2": "[0, 1)", "grad_clip": ">= 0",
}
# Model the default run trains: small enough to learn visibly on a 2-core CPU in a few minutes.
TINY_MODEL = dict(ffn="inf", n_layer=4, n_head=4, n_embd=128, block_size=128, d_z=32)
# The paper's setup (arXiv 2601.17680): FineWeb 10B tokens, seq 1024, 524,288 tokens/step, bf16.
RECIPE = dict(data_dir="data/fineweb10B", batch_size=16, gradient_accumulation_steps=32,
              learning_rate=6e-4, min_lr=6e-5, max_iters=19073, warmup_iters=700,
              eval_interval=250, eval_iters=20, log_interval=10, compile=True)
PRESETS = {
    "gpt2": (RECIPE, dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)),
    "gpt2-medium": (RECIPE, dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024)),
}
# Settings that make a resumed training run another run: changed only with --allow_changes.
RUN_DEFINING = ("data_dir", "batch_size", "gradient_accumulation_steps", "learning_rate", "min_lr",
                "warmup_iters", "lr_decay_iters", "weight_decay", "beta1", "beta2", "grad_clip")
# Settings of one invocation, never taken from a checkpoint.
PER_INVOCATION = ("out_dir", "init_from", "preset", "overwrite", "allow_changes", "eval_only")
# Peak dense bf16 tensor FLOP/s per GPU, for MFU; unknown GPUs get no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(usage(__doc__, TrainConfig(), GPTConfig(**TINY_MODEL)))
        return None
    cfg, model_args, ckpt, changed, source = configure(argv)
    master, world = int(os.environ.get("RANK", 0)) == 0, int(os.environ.get("WORLD_SIZE", 1))
    if master and changed:
        diff = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        print(f"{os.path.join(cfg.out_dir, 'ckpt.pt')}: settings that differ from the "
              f"checkpoint's: {diff}")
    data_start = check_data(cfg, model_args, ckpt, world, master)
    local = HELLASWAG_LOCAL in cfg.lm_eval.split(",")  # the harness's HellaSwag on our file
    if cfg.hellaswag or local:  # read it now: a missing or malformed file is found before training
        try:
            if not load_hellaswag(cfg.hellaswag_path, limit=cfg.hellaswag_limit or None):
                raise DataError(f"{cfg.hellaswag_path}: no HellaSwag examples in it")
        except (FileNotFoundError, DataError) as e:
            raise UsageError(f"--{'hellaswag' if cfg.hellaswag else 'lm_eval'}: {e}") from None
    lock = prepare_out_dir(cfg, ckpt) if master and not cfg.eval_only else None
    try:
        return train(cfg, model_args, ckpt, data_start, source)
    except (KeyboardInterrupt, OSError) as e:  # Ctrl-C, a full disk: one line, saying what is kept
        if lock is None:
            raise
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        kept = (f"{path}, the last checkpoint, is whole: continue with --init_from=resume"
                if os.path.exists(path) else "this run wrote no checkpoint")
        if isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt(kept) from None
        raise SystemExit(f"error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}; "
                         f"{kept}") from None
    finally:
        if lock is not None:
            lock.release()


def train(cfg, model_args, ckpt, data_start, source=None):
    """Train the model and return the best val loss; with eval_only, evaluate it once and return
    the record. ckpt: a checkpoint to resume; source: trained weights to start from at step 0."""
    proc = start_process(cfg.device, cfg.dtype)  # rank, device, autocast; DDP under torchrun
    grad_accum = cfg.gradient_accumulation_steps // proc.world
    torch.manual_seed((cfg.seed + proc.rank) % 2**64)  # ranks draw different ∞-MoE noise
    model = GPT(GPTConfig(**model_args))
    # evaluation's noise: the same on every rank, and one draw for all of a run's val losses (a
    # resumed run keeps the seed it started with)
    model.set_sampling(eval_seed=ckpt["config"]["seed"] if ckpt and not cfg.eval_only else cfg.seed)
    if source is not None:  # GPT-2 or another run's weights (upcycled if dense -> MoE)
        load_pretrained(model, *source)
    model.to(proc.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2), proc.device.type)
    # float16's narrow range: the loss is scaled up so that small gradients do not flush to zero,
    # and a step whose gradients overflowed is skipped (nanoGPT's GradScaler). Off otherwise: a
    # disabled scaler passes the loss and the step through untouched.
    scaler = torch.amp.GradScaler(proc.device.type, enabled=proc.dtype == "float16")
    B, T = cfg.batch_size, model.config.block_size
    train_loader = ShardLoader(cfg.data_dir, "train", B, T, proc.rank, proc.world)
    val_loader = ShardLoader(cfg.data_dir, "val", B, T, proc.rank, proc.world)
    iter_num, best_val, saved_step, skipped = resume(ckpt, cfg, model, optimizer, scaler,
                                                     train_loader, data_start, proc)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if proc.ddp:
        model = DDP(model, device_ids=[proc.local_rank] if proc.device.type == "cuda" else None)
    logger = Logger(cfg, proc.master, {**dataclasses.asdict(cfg), **model_args},
                    "eval.jsonl" if cfg.eval_only else "log.jsonl")
    tokens_per_iter = B * T * grad_accum * proc.world
    if proc.master:
        print(describe(raw_model, proc, tokens_per_iter))
    if cfg.eval_only:
        knobs = {k: model_args[k] for k in ("z_samples", "z_deterministic", "moe_top_k")}
        record = evaluation(raw_model, val_loader, cfg, proc, logger, iter_num,
                            {"eval_only": True, "seed": cfg.seed, **knobs})
        if proc.ddp:
            leave_process_group()
        return record

    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    data_state = train_loader.state()  # a checkpoint resumes at the batch read next
    batch = train_loader.next_batch(proc.device)
    clock = Clock(iter_num, cfg.max_iters, tokens_per_iter, flops_per_token(raw_model),
                  peak_flops(proc.device))
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # a resumed run starts at its checkpoint's step, evaluated (and logged) before it was saved
        due = iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters
        if due and iter_num != saved_step:
            val = evaluation(raw_model, val_loader, cfg, proc, logger, iter_num, {"lr": lr})
            stop_unless_finite("validation loss", val["val_loss"], iter_num, saved_step, ckpt_path)
            if iter_num > 0 and (val["val_loss"] < best_val or cfg.always_save_checkpoint):
                best_val = min(best_val, val["val_loss"])
                rngs = rng_states(proc.device, proc.ddp)  # collective: every rank takes part
                if proc.master:
                    save_checkpoint(ckpt_path, {
                        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "model_args": model_args, "config": dataclasses.asdict(cfg),
                        "iter_num": iter_num, "best_val_loss": best_val, "data": data_state,
                        "rng": rngs, **scaler_state(scaler, skipped)})
                saved_step = iter_num
            clock.restart()  # tokens/s leaves the evaluation out
        if iter_num >= cfg.max_iters:
            break

        batch, data_state, loss, aux, grad_norm, skip = train_step(
            model, raw_model, optimizer, scaler, train_loader, batch, grad_accum, cfg, proc)
        if skip is not None:
            skipped += skip
        iter_num += 1
        clock.tick()
        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:  # the host syncs here
            record, eta = step_record(iter_num, lr, loss, aux, grad_norm, clock, raw_model, proc,
                                      skipped)
            stop_unless_finite("training loss", record["loss"], iter_num, saved_step, ckpt_path)
            logger.log(record, log_line(record, cfg.max_iters, eta))
    if proc.ddp:
        leave_process_group()
    return best_val


# ----------------------------------------------------------------------------- the loop's parts

def resume(ckpt, cfg, model, optimizer, scaler, train_loader, data_start, proc):
    """Load a checkpoint's weights; to train on, also its optimizer, loss scaler, data position and
    RNG state. Returns (step, best val loss, the step whose checkpoint is on disk: None if none
    is, the steps the loss scaler skipped so far: a device tensor, None unless float16)."""
    skipped = torch.zeros((), device=proc.device) if scaler.is_enabled() else None
    if ckpt is None:
        return 0, float("inf"), None, skipped
    model.load_state_dict(ckpt["model"])
    if cfg.eval_only:
        return ckpt["iter_num"], ckpt["best_val_loss"], None, skipped
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler.is_enabled() and "scaler" in ckpt:  # a float16 run's (another dtype's has none)
        scaler.load_state_dict(ckpt["scaler"])
        skipped += ckpt["skipped_steps"]
    for group in optimizer.param_groups:  # --allow_changes may have given new AdamW settings
        group["betas"] = (cfg.beta1, cfg.beta2)
        group["weight_decay"] = group["weight_decay"] and cfg.weight_decay  # no-decay group: 0
    train_loader.reset(**data_start)
    if data_start == ckpt["data"]:  # same data, same place: the run continues bit for bit
        rngs = ckpt["rng"]
        set_rng_state(rngs[proc.rank] if proc.rank < len(rngs) else rngs[0], proc.device)
    return ckpt["iter_num"], ckpt["best_val_loss"], ckpt["iter_num"], skipped


def scaler_state(scaler, skipped):
    """The checkpoint's loss-scaler entries: its scale and growth tracker, and the steps it skipped
    so far (float16 only: a run of another dtype saves what it saved before)."""
    if not scaler.is_enabled():
        return {}
    return {"scaler": scaler.state_dict(), "skipped_steps": int(skipped.item())}


def train_step(model, raw_model, optimizer, scaler, loader, batch, grad_accum, cfg, proc):
    """One optimizer step over grad_accum micro-batches, each next batch read while the GPU works.
    Returns (the next batch, the loader's position at it, summed loss and aux loss, grad norm,
    1 if the loss scaler skipped the step else 0: device tensors; the last None unless float16)."""
    x, y = batch
    loss_sum = torch.zeros((), device=proc.device)
    aux_sum = torch.zeros((), device=proc.device)
    for micro in range(grad_accum):
        if proc.ddp:
            model.require_backward_grad_sync = micro == grad_accum - 1
        with proc.ctx:
            _, loss = model(x, y)
            loss = loss / grad_accum
        if micro == grad_accum - 1:
            data_state = loader.state()
        x, y = loader.next_batch(proc.device)
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
        if raw_model.aux_loss is not None:
            aux_sum += raw_model.aux_loss / grad_accum
    skip = None
    if scaler.is_enabled():
        scaler.unscale_(optimizer)  # the true gradients, to clip; inf/NaN ones found
        # the scaler's own verdict, a device tensor (its public get_scale() would sync): step()
        # below skips exactly when it is 1
        skip = sum(scaler._found_inf_per_device(optimizer).values())
    grad_norm = None
    if cfg.grad_clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)  # optimizer.step(), unless float16 found inf/NaN gradients
    scaler.update()         # float16: the scale halves after a skip, doubles after 2000 good steps
    raw_model.after_step()  # FFN state updated outside the gradient (aux-loss-free balancing)
    optimizer.zero_grad(set_to_none=True)
    return (x, y), data_state, loss_sum, aux_sum, grad_norm, skip


def evaluation(model, val_loader, cfg, proc, logger, iter_num, extra):
    """Val loss, HellaSwag with --hellaswag and the harness's tasks with --lm_eval (eval_only) at
    this step: logged, and returned as a record."""
    record = {"step": iter_num, "val_loss": evaluate(model, val_loader, cfg.eval_iters, proc),
              **extra}
    line = f"step {iter_num}: val loss {record['val_loss']:.4f}"
    if cfg.hellaswag or cfg.lm_eval:
        # imported here, not at the top: zeroshot imports lm-evaluation-harness when it is
        # installed, and with it transformers and datasets, seconds that other runs need not pay
        import zeroshot
    if cfg.hellaswag:
        record.update(zeroshot.run_hellaswag(model, cfg, proc))
        line += (f", hellaswag acc {record['hellaswag_acc']:.4f} acc_norm "
                 f"{record['hellaswag_acc_norm']:.4f} ({record['hellaswag_n']} examples)")
    if cfg.lm_eval:
        scores, table = zeroshot.run_lm_eval(model, cfg, proc)
        record.update(scores)
        line += "\n" + table
    logger.log(record, line)
    return record


def describe(model, proc, tokens_per_iter):
    total, active = model.num_params()
    return (f"{model.config.ffn} GPT: {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active "
            f"per token; {proc.world} process(es) on {proc.device}, {proc.dtype}, "
            f"{tokens_per_iter:,} tokens per step")


def step_record(step, lr, loss, aux, grad_norm, clock, model, proc, skipped=None):
    """The log record of a training step (its ETA apart): losses averaged over the processes, the
    loss without the aux losses (cross-entropy: comparable across FFNs), speed, routing stats;
    float16: the steps the loss scaler skipped so far (inf/NaN gradients), in the run."""
    aux_val = reduce_mean(aux, proc.ddp).item()
    loss_val = reduce_mean(loss, proc.ddp).item() - aux_val
    tokens_per_s, elapsed, eta, mfu = clock.read(step)
    record = {"step": step, "loss": loss_val, "aux_loss": aux_val, "lr": lr,
              "tokens_per_s": tokens_per_s,
              "grad_norm": None if grad_norm is None else grad_norm.item(),
              "elapsed_s": elapsed, **stats_record(model, proc.ddp)}
    if mfu is not None:
        record["mfu"] = mfu
    if skipped is not None:
        record["skipped"] = int(skipped.item())
    return record, eta


def stop_unless_finite(what, value, iter_num, saved_step, ckpt_path):
    """A NaN or infinite loss ends the run, saying which checkpoint, if any, is kept."""
    if math.isfinite(value):
        return
    kept = (f"last good checkpoint (step {saved_step}) kept at {ckpt_path}"
            if saved_step is not None else "no checkpoint was written by this run")
    raise SystemExit(f"error: step {iter_num}: {what} is {value}; stopping, {kept}")


class Clock:
    """The log line's timing: tokens/s over the steps timed since the last line (an evaluation
    restarts the clock), MFU where the GPU's peak is known, time elapsed and the ETA (which count
    evaluations: they are part of the run's time)."""

    def __init__(self, step, max_iters, tokens_per_iter, flops_per_token, peak):
        self.start_step, self.max_iters, self.tokens = step, max_iters, tokens_per_iter
        self.flops, self.peak = flops_per_token, peak
        self.t_start = self.t0 = time.perf_counter()
        self.timed = 0

    def restart(self):
        self.t0, self.timed = time.perf_counter(), 0

    def tick(self):
        self.timed += 1

    def read(self, step):
        """(tokens/s, seconds elapsed, ETA in seconds, MFU or None) at this step."""
        now = time.perf_counter()
        dt = (now - self.t0) / self.timed  # seconds per step, over the steps timed
        self.t0, self.timed = now, 0
        elapsed = now - self.t_start
        eta = elapsed / (step - self.start_step) * (self.max_iters - step)
        mfu = self.flops * self.tokens / dt / self.peak if self.peak else None
        return self.tokens / dt, elapsed, eta, mfu


def log_line(record, max_iters, eta):
    r = record
    line = (f"step {r['step']}/{max_iters}: loss {r['loss']:.4f}, aux {r['aux_loss']:.4f}, "
            f"lr {r['lr']:.2e}, {r['tokens_per_s']:,.0f} tok/s, {hms(r['elapsed_s'])} elapsed, "
            f"ETA {hms(eta)}")
    if "mfu" in r:
        line += f", MFU {100 * r['mfu']:.1f}%"
    if "skipped" in r:
        line += f", skipped {r['skipped']}"
    for key in ("lb_loss", "z_loss", "entropy", "sigma", "active"):
        if key in r:
            line += f", {key} {r[key]:.4g}"
    if "block_load" in r:  # one value per layer
        line += ", block_load " + "/".join(f"{v:.2f}" for v in r["block_load"])
    return line


def get_lr(it, cfg):
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def flops_per_token(model):
    """Training FLOPs per token from ACTIVE parameters (6N) plus attention (nanoGPT / PaLM)."""
    c = model.config
    n_active = model.num_params()[1] - model.transformer.wpe.weight.numel()
    return 6 * n_active + 12 * c.n_layer * c.n_embd * c.block_size


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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


# ----------------------------------------------------------------------------- data

def window(world, B, T):
    """Tokens one step of all processes reads from a shard: B sequences of T each, plus a target."""
    return world * B * T + 1


class ShardLoader:
    """Reads (x, y) batches of B sequences of T tokens from a split's shards, in order.

    Rank r of W takes the r-th B*T slice of every W*B*T window, so ranks never see the same token.
    The position (shard, offset) is the whole state: saved in checkpoints for an exact resume.
    check_data has made sure that every shard holds a window.
    """

    def __init__(self, data_dir, split, B, T, rank=0, world=1):
        self.files = shard_paths(data_dir, split)
        self.B, self.T, self.rank, self.world = B, T, rank, world
        self.reset()

    def reset(self, shard=0, offset=0):
        self.shard, self.offset = shard, offset
        self.tokens = load_shard(self.files[shard])

    def next_batch(self, device="cpu"):
        B, T = self.B, self.T
        start = self.offset + self.rank * B * T
        buf = torch.from_numpy(self.tokens[start:start + B * T + 1].astype(np.int64))
        self.offset += self.world * B * T
        if self.offset + window(self.world, B, T) > len(self.tokens):  # next one would not fit
            self.reset((self.shard + 1) % len(self.files), 0)
        if torch.device(device).type == "cuda":  # pinned memory: the copy overlaps the GPU's work
            buf = buf.pin_memory().to(device, non_blocking=True)
        else:
            buf = buf.to(device)  # on the CPU buf itself
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    def state(self):
        return {"shard": self.shard, "offset": self.offset}

    def row_ids(self, device="cpu"):
        """Ids of the B rows next_batch returns next: where each starts in the split, shard * 2^40
        + its first token's offset. They key evaluation's ∞-MoE noise (GPT.forward's seq_ids)."""
        start = self.offset + self.rank * self.B * self.T
        rows = start + self.T * torch.arange(self.B, device=device)
        return rows + self.shard * 2 ** 40


@torch.no_grad()
def evaluate(model, loader, eval_iters, proc):
    """Mean validation cross-entropy over the val shard's first eval_iters batches, split across
    ranks: the same eval_iters * batch_size * block_size tokens whatever the number of processes.

    ∞-MoE's noise is keyed by where each sequence starts in the split (ShardLoader.row_ids), so
    the loss is the same for any batch size and number of processes; it runs in its own RNG stream,
    so evaluating never changes the training run's random numbers.
    """
    model.eval()
    with fork_rng(proc.device):
        loader.reset()
        losses = torch.zeros(eval_iters // loader.world, device=proc.device)
        for k in range(len(losses)):
            ids = loader.row_ids(proc.device)
            x, y = loader.next_batch(proc.device)
            with proc.ctx:
                logits, _ = model(x, y, seq_ids=ids)
            losses[k] = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    model.train()
    return reduce_mean(losses.mean(), proc.ddp).item()


# ----------------------------------------------------------------------------- configuration
# Defaults that are paths in this repository (the bundled sample; where prepare_fineweb.py puts
# FineWeb and HellaSwag), by their spellings: read from the repository wherever train.py is
# started. A path given on the command line stays as given, relative to the working directory.
BUNDLED = {"data_dir": (TrainConfig.data_dir, RECIPE["data_dir"]),
           "hellaswag_path": (TrainConfig.hellaswag_path,)}


def in_repository(values, given):
    """values with each BUNDLED path that is not in `given` (the command line's) and is spelled as
    a default (the default, a preset's, or as a checkpoint of an older version saved it) made the
    repository's."""
    return {**values, **{k: os.path.join(REPO_DIR, values[k]) for k, spellings in BUNDLED.items()
                         if k in values and k not in given and values[k] in spellings}}


def configure(argv):
    """(TrainConfig, GPTConfig kwargs, checkpoint to resume or None, {setting: (checkpoint's,
    now)}, source weights or None), every value checked.

    A scratch run starts from the defaults (TINY_MODEL, or GPTConfig's with a preset); a run from a
    checkpoint starts from the settings saved in it. Then --preset, then the command line on top.
    """
    flags = read_flags(argv, TrainConfig, GPTConfig)
    given = set(flags)
    if "preset" in flags:
        if flags["preset"] not in PRESETS:
            raise UsageError(f"--preset={flags['preset']}: expected one of {', '.join(PRESETS)}")
        train_over, model_over = PRESETS[flags["preset"]]
        flags = {**train_over, **model_over, **flags}  # a flag after the preset overrides it
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    model_flags = {k: v for k, v in flags.items() if k in model_fields}
    cfg = TrainConfig(**{k: v for k, v in flags.items() if k in train_fields})
    ckpt, source = starting_point(cfg.init_from, cfg.out_dir)
    base_train = {}
    if source is not None:  # the source fixes the shape; pretrained_config refuses other shapes
        try:
            base_model = pretrained_config(source[0], model_flags, cfg.init_from)
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif ckpt is None:
        base_model = dataclasses.asdict(GPTConfig() if "preset" in flags else
                                        GPTConfig(**TINY_MODEL))
    else:
        ckpt["config"] = in_repository(ckpt["config"], ())
        base_train = {k: v for k, v in ckpt["config"].items()
                      if k in train_fields and k not in PER_INVOCATION}
        base_model = {**dataclasses.asdict(GPTConfig()),
                      **{k: v for k, v in ckpt["model_args"].items() if k in model_fields}}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in base_train.items() if k not in flags})
    cfg = TrainConfig(**in_repository(dataclasses.asdict(cfg), given))
    model_args = {**base_model, **model_flags}

    changed = {}
    if ckpt is not None:
        saved, now = {**base_train, **base_model}, {**dataclasses.asdict(cfg), **model_args}
        same = lambda k: (canonical_path(saved[k]) == canonical_path(now[k]) if k in BUNDLED
                          else saved[k] == now[k])  # a path: the directory, however it is spelled
        changed = {k: (saved[k], now[k]) for k in flags if k in saved and not same(k)}
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        shape = [k for k in changed if k in model_fields and k not in INFERENCE_KNOBS]
        if shape:
            was = ", ".join(f"--{k}={changed[k][0]}" for k in shape)
            raise UsageError(f"{path} was trained with {was}; only {', '.join(INFERENCE_KNOBS)} "
                             f"may change on resume (for another model, train into another "
                             f"--out_dir)")
        run = [k for k in changed if k in RUN_DEFINING]
        if run and not cfg.eval_only and not cfg.allow_changes:
            was = ", ".join(f"--{k}={changed[k][0]}" for k in run)
            raise UsageError(f"{path} was trained with {was}: resuming with another value makes it "
                             f"another run; add --allow_changes to do it anyway")
        if not cfg.eval_only and cfg.max_iters <= ckpt["iter_num"]:
            raise UsageError(f"{path} is at step {ckpt['iter_num']} and --max_iters="
                             f"{cfg.max_iters}: nothing to train; give a larger --max_iters")
    elif cfg.eval_only and source is None:
        raise UsageError(f"--eval_only scores a trained model: add --init_from=resume to read "
                         f"{os.path.join(cfg.out_dir, 'ckpt.pt')} (or --init_from=gpt2, a "
                         f"directory, a ckpt.pt)")
    check_ranges(dataclasses.asdict(cfg), RANGES)
    check_ranges(model_args, MODEL_RANGES)
    if cfg.min_lr > cfg.learning_rate and not cfg.eval_only:
        raise UsageError(f"--min_lr={cfg.min_lr} is above --learning_rate={cfg.learning_rate}: the "
                         f"cosine schedule decays from learning_rate down to min_lr")
    check_dtype(cfg.dtype)
    try:
        GPTConfig(**model_args)  # the combination (n_embd % n_head, moe_top_k <= n_expert, ...)
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_system(cfg, model_args, int(os.environ.get("WORLD_SIZE", 1)))
    if cfg.wandb_log:
        try:
            import wandb  # noqa: F401  (optional dependency)
        except ImportError:
            raise UsageError("--wandb_log needs the wandb package: pip install wandb") from None
    check_lm_eval(cfg)
    return cfg, model_args, ckpt, changed, source


def check_system(cfg, model_args, world):
    """What the device, the dtype and the number of processes allow."""
    device = pick_device(cfg.device)
    if model_args["ffn"] == "inf":
        check_kernel(model_args["use_kernel"], device)
    dtype = cfg.dtype or default_dtype(device)
    # torch.compile's shape function for grouped_mm accepts bf16 only; eager float32 and float16
    # run on the CPU and on CUDA (there through torch's one-matmul-per-expert fallback: slow, see
    # README)
    if dtype != "bfloat16" and model_args["ffn"] in ("switch", "top2") and cfg.compile:
        raise UsageError(f"--ffn={model_args['ffn']} with --compile needs --dtype=bfloat16: "
                         f"torch.compile traces grouped_mm in bf16 only ({dtype} runs without "
                         f"--compile)")
    if device.type == "mps" and world > 1:
        raise UsageError(f"--device={cfg.device} runs one process: torchrun's {world} processes "
                         f"need CUDA (or the CPU)")
    if cfg.gradient_accumulation_steps % world and not cfg.eval_only:  # counts all processes'
        raise UsageError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not "
                         f"divisible by the {world} processes")
    if cfg.eval_iters % world:
        raise UsageError(f"--eval_iters={cfg.eval_iters} is not divisible by the {world} processes")
    check_memory(model_args, cfg.batch_size, device, training=not cfg.eval_only)


def check_lm_eval(cfg):
    """--lm_eval scores a trained model once, with lm-eval installed; --lm_eval_include is a
    directory. The task names are checked by the harness's index, when it runs."""
    if not cfg.lm_eval:
        if cfg.lm_eval_include or cfg.lm_eval_limit:
            raise UsageError("--lm_eval_include and --lm_eval_limit go with --lm_eval=TASKS")
        return
    if not cfg.eval_only:
        raise UsageError(f"--lm_eval={cfg.lm_eval} runs the harness on a trained model: add "
                         f"--eval_only (during training, --hellaswag scores HellaSwag)")
    import zeroshot  # (see evaluation)
    if not zeroshot.harness_installed():
        raise UsageError(f"--lm_eval {zeroshot.LM_EVAL_MISSING}")
    if cfg.lm_eval_include and not os.path.isdir(cfg.lm_eval_include):
        raise UsageError(f"--lm_eval_include={cfg.lm_eval_include}: no such directory")


def check_data(cfg, model_args, ckpt, world, master):
    """The whole dataset checked before the first step: every shard's header, size and token range
    (prepare_fineweb.check_dataset), that each shard holds one step's window, that the val split
    holds eval_iters batches (evaluation never wraps around to re-score tokens), and that a resumed
    run's saved data position lies inside the train shards. Returns the loader's start position."""
    try:
        dataset = check_dataset(cfg.data_dir, model_args["vocab_size"])
    except DataError as e:
        raise UsageError(str(e)) from None
    if master and not dataset["manifest"]:
        print(f"warning: {cfg.data_dir} has no manifest.json from prepare_fineweb.py, so whether "
              f"its shards are complete is unknown; each shard was checked on its own")
    B, T = cfg.batch_size, model_args["block_size"]
    need = window(world, B, T)
    for path, n in dataset["train"] + dataset["val"]:
        if n < need:
            raise UsageError(f"{path}: {n} tokens, fewer than one batch needs ({world} x {B} x {T} "
                             f"+ 1); lower --batch_size or --block_size")
    val_batches = world * sum((n - 1) // (need - 1) for _, n in dataset["val"])
    if val_batches < cfg.eval_iters:
        raise UsageError(f"--eval_iters={cfg.eval_iters}: the val split of {cfg.data_dir} holds "
                         f"only {val_batches} batches of {B} x {T} tokens; lower --eval_iters or "
                         f"--batch_size")
    if ckpt is None or cfg.eval_only or (canonical_path(ckpt["config"]["data_dir"])
                                         != canonical_path(cfg.data_dir)):
        return {"shard": 0, "offset": 0}  # a new data_dir (--allow_changes) is read from its start
    shard, offset = ckpt["data"]["shard"], ckpt["data"]["offset"]
    if shard >= len(dataset["train"]) or offset + need > dataset["train"][shard][1]:
        raise UsageError(f"{os.path.join(cfg.out_dir, 'ckpt.pt')} stopped at train shard {shard}, "
                         f"token {offset}, which the train shards in {cfg.data_dir} do not have: "
                         f"were they remade?")
    return ckpt["data"]


if __name__ == "__main__":
    run_main(main)
