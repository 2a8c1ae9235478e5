"""
`python bench.py --gpu`: one command, one report, for a GPU owner's first question: is the ∞-MoE
FFN right and fast on this card? It runs on the torch and Triton it finds, installs and downloads
nothing, and takes about 5-8 minutes (--budget caps it):

  python bench.py --gpu                             # writes gpu_report.md and prints it
  python bench.py --gpu --report=PATH --gpu_batch=4 --budget=600 --compile

  1. machine    the GPU (name, compute capability, memory), torch, Triton, CUDA
  2. accuracy   the Triton kernel (kernel.triton_inf_ffn) against the PyTorch path
                (fastpath.fast_inf_ffn) at GPT-2 Small shape in fp32 and bf16 (fp16 below sm80):
                output, selection (counts, non-zeros of M, keep masks), the seven gradients
  3. speed      both paths against dense FFNs of width d_ff and 4d, forward and forward+backward,
                K in {1, 2}, r in {10, 25}%: bench.times in interleaved rounds, ratios to dense
  4. training   train.py's --preset=gpt2 shape for ~20 steps of train.train_step per FFN (dense,
                switch, top2, inf with use_kernel on and off) on random tokens, each in a process
                of its own: tokens/s, MFU on active parameters, peak memory

Each part is a function of device, dtype and shape, so the tests run them on the CPU at a toy
shape (the kernel in Triton's interpreter); main() only sets the GPU's shapes.
"""
import json
import math
import os
import platform
import subprocess
import sys
import time
from statistics import median

import torch

import bench
import fastpath
import kernel
import train
from fastpath import ieee_fp32
from infra import UsageError, default_dtype, start_process
from model import GPT, GPTConfig, keep_count
from prepare_fineweb import REPO_DIR, ArgumentParser, replacing

GRADS = ["dx", "dW1", "db1", "dW2", "db2", "dW_z", "dz"]  # of x, W1, b1, W2, b2, W_z, z
# Training rows: (ffn, use_kernel); use_kernel matters for inf only
TRAIN_RUNS = (("dense", "off"), ("switch", "off"), ("top2", "off"), ("inf", "off"), ("inf", "on"))


# ----------------------------------------------------------------------------- 1. machine

def machine(device):
    """[(what, value)]: the device, torch, Triton and CUDA versions."""
    rows = []
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        rows.append(("GPU", f"{p.name}, compute capability {p.major}.{p.minor}, "
                            f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs"))
        rows.append(("CUDA", f"{torch.version.cuda} (torch's build), driver {driver_version()}"))
    else:
        rows.append(("device", f"CPU, {torch.get_num_threads()} threads ({platform.machine()})"))
    rows.append(("torch", torch.__version__))
    rows.append(("Triton", kernel.triton.__version__ or "not installed"))
    rows.append(("Python", platform.python_version()))
    return rows


def driver_version():
    try:  # torch does not say; nvidia-smi ships with the driver
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- 2. accuracy

def relative_error(a, b):
    """max|a - b| / max|b|: one number for a whole tensor, whatever its shape (allclose's
    elementwise bound fails at large shapes on the near-zero elements of a sum's result)."""
    a, b = a.double(), b.double()
    top = b.abs().max().item()
    err = (a - b).abs().max().item()
    return err / top if top else (0.0 if err == 0 else math.inf)


def on_grid(t, d_z):
    """t rounded onto a power-of-two grid: integers of at most lim = sqrt(2^24 / d_z) (and 2^10)
    units, 4 standard deviations spanning the grid. Every product of two such values and every
    partial sum of d_z of them is then an integer below 2^24 units: exact in fp32 in any
    summation order, and tf32 (11 significant bits) holds the values exactly. So both paths
    compute the same scores and must keep the same units: a difference is an error, not a tie."""
    lim = min(2 ** 10, math.isqrt(2 ** 24 // d_z))
    scale = 2.0 ** math.floor(math.log2(lim / (4 * t.float().std().item())))
    return (t * scale).round().clamp(-lim, lim) / scale


def ffn_inputs(device, shape, K, seed=0, grid=False):
    """x, W1, b1, W2, b2 (fp32, unit-variance activations) and the router's W_z and z."""
    N, d, d_ff, d_z = shape
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s, std=1.0: torch.randn(*s, device=device, generator=g) * std  # noqa: E731
    ts = [r(N, d), r(d_ff, d, std=d ** -0.5), r(d_ff, std=0.1), r(d, d_ff, std=d_ff ** -0.5),
          r(d, std=0.1), r(d_ff, d_z, std=d_z ** -0.5), r(K, N, d_z)]
    if grid:
        ts[5:] = [on_grid(t, d_z) for t in ts[5:]]
    return ts, r(N, d)


def torch_keep(z, W_z, top_frac):
    """The PyTorch path's keep masks (K, N, d_ff) bool."""
    return fastpath.averaged_topk_mask(z, W_z, top_frac)[2]


def kernel_keep(z, W_z, top_frac):
    """The kernel's keep masks (K, N, d_ff) bool, unpacked from its selection kernel's bits."""
    d_ff = W_z.shape[0]
    bits = kernel._select(z.contiguous(), W_z.contiguous(), keep_count(top_frac, d_ff))
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :d_ff].bool()


def near_tie_bound(z, W_z):
    """Per row of z (R, d_z): how far apart two fp32 scores z W_z^T can be, in exact arithmetic,
    and still rank the other way in some summation order: twice the d_z u sum|z_i w_i| bound on
    a d_z-term fp32 dot product's error (u = 2^-24), at the row's largest such sum."""
    return 2 * z.shape[-1] * 2.0 ** -24 * (z.abs() @ W_z.abs().t()).amax(-1, keepdim=True)


def mask_check(z, W_z, top_frac, keeps=(kernel_keep, torch_keep), max_rows=4096):
    """(differing entries, all entries, differing entries that are not near-ties) between the two
    keep masks. A near-tie: the unit's exact score lies within near_tie_bound of the row's exact
    n_keep-th largest (float64, on the first max_rows rows that differ)."""
    a, b = (f(z, W_z, top_frac) for f in keeps)
    diff = a != b
    n_diff = int(diff.sum())
    far = 0
    if n_diff:
        k, n = diff.any(-1).nonzero(as_tuple=True)
        k, n = k[:max_rows], n[:max_rows]
        zr, Wd = z[k, n].double(), W_z.double()
        m = zr @ Wd.t()
        thr = m.topk(keep_count(top_frac, W_z.shape[0]), dim=-1).values[:, -1:]
        far = int((diff[k, n] & ((m - thr).abs() > near_tie_bound(zr, Wd))).sum())
    return n_diff, diff.numel(), far


def run_path(fn, inputs, dy, dtype, top_frac):
    """fn's y, counts, n_active and seven gradients, activations and weights in dtype."""
    leaves = [t.to(dtype if i < 5 else t.dtype, copy=True).requires_grad_()
              for i, t in enumerate(inputs)]
    with ieee_fp32(), torch.autocast(inputs[0].device.type, enabled=False):
        y, counts, n_active = fn(*leaves, top_frac)
        y.backward(dy.to(dtype))
    return {"y": y.detach(), "counts": counts, "n_active": n_active,
            **{g: t.grad for g, t in zip(GRADS, leaves)}}


def accuracy(device, shape, dtypes, K=2, top_frac=0.25, fn=None, ref=None, keeps=None):
    """Rows (dtype, quantity, measured, bound, ok) of the kernel (fn) against the PyTorch path
    (ref) at shape (N, d, d_ff, d_z). The masks: on grid-valued router inputs (on_grid) they must
    be equal; on Gaussian ones they may differ at near-ties only. The outputs and gradients, on
    the grid inputs (the same units kept), within kernel.TOLERANCES' rtol as max|a-b|/max|b|;
    counts and n_active exactly. A path that raises is a failing row, not the end of the report."""
    fn, ref = fn or kernel.triton_inf_ffn, ref or fastpath.fast_inf_ffn
    keeps = keeps or (kernel_keep, torch_keep)
    rows = []
    for grid, what in ((True, "grid-valued router inputs"), (False, "Gaussian router inputs")):
        try:
            (*_, W_z, z), _ = ffn_inputs(device, shape, K, seed=1, grid=grid)
            n_diff, total, far = mask_check(z, W_z, top_frac, keeps)
            got = f"{n_diff:,} of {total:,} differ ({n_diff / total:.1e})"
            if grid:
                rows.append(("fp32 scores", f"keep masks, {what}", got, "equal", n_diff == 0))
            else:
                got += f", {far} not at a near-tie" if n_diff else ""
                rows.append(("fp32 scores", f"keep masks, {what}", got, "near-ties only",
                             far == 0))
        except Exception as e:  # a compile or launch error is a row of the report
            rows.append(("fp32 scores", f"keep masks, {what}", error_text(e), "", False))
    inputs, dy = ffn_inputs(device, shape, K, grid=True)
    for dtype in dtypes:
        name, rtol = bench.DTYPE_NAMES[dtype], kernel.TOLERANCES[dtype][0]
        try:
            a, b = (run_path(f, inputs, dy, dtype, top_frac) for f in (fn, ref))
        except Exception as e:
            rows.append((name, "kernel and PyTorch path", error_text(e), "", False))
            continue
        for q in ("y", "counts", "n_active", *GRADS):
            if q in ("counts", "n_active"):
                wrong = int((a[q] != b[q]).sum())
                rows.append((name, q, "equal" if not wrong else f"{wrong} differ", "equal",
                             not wrong))
            else:
                err = relative_error(a[q], b[q])
                rows.append((name, q, f"{err:.1e}", f"{rtol:.0e}", err <= rtol))
    return rows


def error_text(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


# ----------------------------------------------------------------------------- 3. speed

def speed(device, dtype, shape, ks=(1, 2), rates=(10, 25), rounds=5, reps=None, paths=None):
    """Latency of dense FFNs of width d_ff and 4d and of each path in `paths` ({name: fn}, default
    the PyTorch path and the kernel) at shape (N, d, d_ff, d_z), K in ks, r (%) in rates.

    bench.times measures every case once per round (CUDA: do_bench's median of `reps` ms, with
    its warm-up and CUDA events); a first round is run and dropped, then `rounds` more. Returns
    ({case: [(fwd ms, fwd+bwd ms) per round]}, {case: peak MiB fwd+bwd (CUDA)}, {path: error of
    a path left out because it failed}). Cases: ("dense", width, 0) and (path, K, r)."""
    N, d, d_ff, d_z = shape
    cuda = device.type == "cuda"
    paths = paths or {"PyTorch": fastpath.fast_inf_ffn, "kernel": kernel.triton_inf_ffn}
    g = torch.Generator(device=device).manual_seed(0)

    def leaf(*s, std=1.0, dt=dtype):
        return (torch.randn(*s, device=device, generator=g) * std).to(dt).requires_grad_()

    x, dy = leaf(N, d), leaf(N, d).detach()
    ffns = {w: (leaf(w, d, std=d ** -0.5), leaf(w, std=0.1), leaf(d, w, std=w ** -0.5),
                leaf(d, std=0.1)) for w in dict.fromkeys((d_ff, 4 * d))}
    W_z = leaf(d_ff, d_z, std=d_z ** -0.5, dt=torch.float32)
    z = {K: leaf(K, N, d_z, dt=torch.float32) for K in ks}
    failed = {}
    for name, fn in list(paths.items()):  # a path that fails here is left out, with its error
        try:
            bench._first(fn(x, *ffns[d_ff], W_z, z[ks[-1]], rates[-1] / 100)).backward(dy)
            bench._clear_grads((x, *ffns[d_ff], W_z, z[ks[-1]]))
        except Exception as e:
            failed[name] = error_text(e)
            del paths[name]
    cases = {("dense", w, 0): (bench.dense_ffn, (x, *ffns[w])) for w in ffns}
    for K in ks:
        for r in rates:
            for name, fn in paths.items():
                cases[name, K, r] = (fn, (x, *ffns[d_ff], W_z, z[K], r / 100))
    reps = reps or (40 if cuda else 1)
    per_round = [bench.times(cases, dy, reps) for _ in range(rounds + 1)][1:]
    times = {c: [t[c] for t in per_round] for c in cases}
    peak = {c: bench.peak_mib(fn, a, dy) for c, (fn, a) in cases.items()} if cuda else {}
    return times, peak, failed


def spread(values):
    """'median (min–max)' of a list of ratios."""
    return f"{median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


# ----------------------------------------------------------------------------- 4. training

class RandomTokens:
    """train.ShardLoader's interface (next_batch, state) over uniformly random tokens, drawn on the
    device: a step's speed does not depend on which tokens it reads, and the GPU machine may have
    no dataset."""

    def __init__(self, B, T, vocab_size, device, seed=0):
        self.B, self.T, self.vocab_size, self.device = B, T, vocab_size, device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def next_batch(self, device=None):
        buf = torch.randint(self.vocab_size, (self.B * self.T + 1,), device=self.device,
                            generator=self.gen)
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def state(self):
        return {}


def train_speed(model_args, device, batch_size, steps, compile=False, dtype=""):
    """`steps` optimizer steps of train.py's train_step on GPT(model_args) (the paper's recipe:
    AdamW, its learning rate, gradient clipping; bf16 autocast on CUDA unless dtype says), the
    first quarter of them warm-up (autotuning, compiling), untimed. Returns a dict: tokens/s,
    MFU (None where train.peak_flops knows no peak, or not bf16), peak memory GiB (CUDA), the
    last step's loss, parameters."""
    proc = start_process(str(device), dtype)  # TF32 on CUDA, as a training run has it
    torch.manual_seed(0)
    cfg = train.TrainConfig(**{**train.RECIPE, "batch_size": batch_size, "compile": compile,
                               "gradient_accumulation_steps": 1})
    raw = GPT(GPTConfig(**model_args)).to(proc.device)
    model = torch.compile(raw) if compile else raw
    optimizer = raw.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                         (cfg.beta1, cfg.beta2), proc.device.type)
    loader = RandomTokens(batch_size, raw.config.block_size, raw.config.vocab_size, proc.device)
    scaler = torch.amp.GradScaler(proc.device.type, enabled=proc.dtype == "float16")
    batch, warmup = loader.next_batch(), max(1, steps // 4)
    for step in range(steps):
        if step == warmup:
            synchronize(proc.device)
            t0 = time.perf_counter()
        batch, _, loss, aux, _, _ = train.train_step(model, raw, optimizer, scaler, loader, batch,
                                                     1, cfg, proc)
    synchronize(proc.device)
    tokens_per_s = (steps - warmup) * batch_size * raw.config.block_size / (
        time.perf_counter() - t0)
    peak = train.peak_flops(proc.device) if proc.dtype == "bfloat16" else None
    total, active = raw.num_params()
    return {"tokens_per_s": tokens_per_s, "loss": (loss - aux).item(),
            "mfu": train.flops_per_token(raw) * tokens_per_s / peak if peak else None,
            "peak_gib": (torch.cuda.max_memory_allocated(proc.device) / 2 ** 30
                         if proc.device.type == "cuda" else None),
            "params": total, "active": active, "timed_steps": steps - warmup,
            "dtype": proc.dtype}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(model_args, device, batch_size, steps, compile=False, dtype=""):
    """train_speed, with an error as {"error": one line} (out of memory says what to lower)."""
    try:
        return train_speed(model_args, torch.device(device), batch_size, steps, compile, dtype)
    except torch.cuda.OutOfMemoryError:
        return {"error": f"out of memory at --gpu_batch={batch_size}: try a smaller one"}
    except Exception as e:
        return {"error": error_text(e)}


def child():
    """A training row's own process (`python -c ...`, argv[1] = train_one's arguments as JSON):
    its result as JSON, the last line of its output."""
    print("\n" + json.dumps(train_one(**json.loads(sys.argv[1]))), flush=True)


def train_isolated(job, timeout):
    """train_one in a process of its own, so that one model's memory, autotune state and TF32
    settings do not reach the next; killed (it is ours) after `timeout` seconds."""
    code = f"import sys; sys.path.insert(0, {REPO_DIR!r}); import gpu_report; gpu_report.child()"
    try:
        out = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True,
                             text=True, timeout=timeout, cwd=REPO_DIR)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s: the time budget ran out"}
    lines = out.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        err = [line for line in out.stderr.splitlines() if line.strip()]
        return {"error": f"exit status {out.returncode}: {err[-1][:160] if err else 'no output'}"}


def training(base_args, device, batch_size, steps, deadline, runs=TRAIN_RUNS, compile=False,
             dtype="", isolate=True):
    """[(ffn, use_kernel, result)] for each run: train_one's result, in a process of its own
    (isolate) or in this one; a run that would start with less than 20 s of the budget left (the
    time.monotonic() `deadline`) is not started."""
    rows = []
    for ffn, use_kernel in runs:
        left = deadline - time.monotonic()
        job = dict(model_args={**base_args, "ffn": ffn, "use_kernel": use_kernel},
                   device=str(device), batch_size=batch_size, steps=steps, compile=compile,
                   dtype=dtype)
        if left < 20:
            res = {"error": "not run: the time budget was spent"}
        else:
            print(f"training {ffn}{', use_kernel=' + use_kernel if ffn == 'inf' else ''}...",
                  flush=True)
            res = train_isolated(job, left) if isolate else train_one(**job)
        rows.append((ffn, use_kernel, res))
    return rows


# ----------------------------------------------------------------------------- the report

def table(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def machine_md(rows):
    return "## Machine\n\n" + table(["", ""], rows)


def accuracy_md(rows, shape, K, top_frac):
    N, d, d_ff, d_z = shape
    return (f"## The kernel against the PyTorch path\n\n"
            f"`kernel.triton_inf_ffn` against `fastpath.fast_inf_ffn`: {N:,} tokens, d={d}, "
            f"d_ff={d_ff}, d_z={d_z}, K={K}, r={top_frac:.0%}, one forward and backward. Outputs "
            f"and gradients: `max|a-b| / max|b|`, one number per tensor whatever its shape, "
            f"bounded by the dtype's rtol in `kernel.TOLERANCES` (the bound column: tight in fp32, "
            f"where both paths compute in IEEE fp32; loose in bf16 and fp16, whose GEMMs round in "
            f"other places in the two paths). They run on router inputs on a power-of-two grid "
            f"(`on_grid`), where every score is exact in any summation order: both paths must "
            f"keep the same units, so counts and n_active must be equal. The selection decides on "
            f"fp32 scores in either dtype. On Gaussian router inputs the two keep masks may differ "
            f"where two scores lie within an fp32 rounding of each other (`near_tie_bound`: the "
            f"kernel multiplies the rows in chunks, in another order); any other difference "
            f"fails.\n\n"
            + table(["dtype", "quantity", "measured", "bound", "verdict"],
                    [(dt, q, got, bound, "ok" if ok else "**FAILED**")
                     for dt, q, got, bound, ok in rows]))


def speed_md(times, peak, failed, shape, dtype, paths_order=("PyTorch", "kernel")):
    N, d, d_ff, d_z = shape
    rounds = len(next(iter(times.values())))
    base = {w: times["dense", w, 0] for w in (d_ff, 4 * d)}
    rows = []
    for case, ts in times.items():
        name, K, r = case
        label = ((f"dense, width {K}", "", "") if name == "dense" else
                 (f"∞-MoE, {name}", K, f"{r}%"))
        cols = [f"{median([t[j] for t in ts]):.3g}" for j in (0, 1)]
        ratios = [spread([t[j] / b[j] for t, b in zip(ts, base[w])])
                  for j in (0, 1) for w in (d_ff, 4 * d)]
        rows.append((*label, cols[0], ratios[0], ratios[1], cols[1], ratios[2], ratios[3],
                     f"{peak[case]:.0f}" if case in peak else "n/a"))
    text = (f"## Speed of one FFN layer\n\n{N:,} tokens, d={d}, d_ff={d_ff}, d_z={d_z}, "
            f"{bench.DTYPE_NAMES[dtype]}. Times: medians over {rounds} rounds, every case "
            f"measured once per round (`bench.times`: on CUDA triton's `do_bench`, CUDA events "
            f"after a warm-up; a first round is dropped); ratios: median (min–max) of the "
            f"rounds' ratios to the "
            f"dense FFN of width d_ff = {d_ff} and of width 4d = {4 * d}, measured in the same "
            f"round. Peak: memory allocated during one forward+backward beyond its inputs.\n\n"
            + table(["FFN", "K", "r", "fwd ms", "fwd / dense d_ff", "fwd / dense 4d",
                     "fwd+bwd ms", "fwd+bwd / dense d_ff", "fwd+bwd / dense 4d", "peak MiB"],
                    rows))
    for name, err in failed.items():
        text += f"\n\n{name}: not timed, it failed: {err}"
    return text


def training_md(rows, device, model_args, batch_size, steps, compile, isolate=True):
    peak = train.peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    mfu = (f"MFU: `train.flops_per_token` (6 × active parameters + attention) × tokens/s over "
           f"{peak / 1e12:.0f} TFLOP/s, the dense bf16 peak `train.PEAK_FLOPS` gives {name}"
           if peak else f"MFU not shown: {name} is not in `train.PEAK_FLOPS` (unknown GPU)"
           if device.type == "cuda" else "MFU not shown on the CPU")
    dense = next((r["tokens_per_s"] for f, _, r in rows if f == "dense" and "error" not in r),
                 None)
    out = []
    for ffn, use_kernel, r in rows:
        label = (ffn, use_kernel if ffn == "inf" else "")
        if "error" in r:
            out.append((*label, "", "", r["error"], "", "", "", ""))
            continue
        out.append((*label, f"{r['params'] / 1e6:.4g}M", f"{r['active'] / 1e6:.4g}M",
                    f"{r['tokens_per_s']:,.0f}",
                    f"{r['tokens_per_s'] / dense:.2f}" if dense else "",
                    f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "—",
                    f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a",
                    f"{r['loss']:.3f}"))
    dtypes = {r["dtype"] for _, _, r in rows if "dtype" in r}
    c = GPTConfig(**model_args)
    preset = model_args == train.PRESETS["gpt2"][1]
    return (f"## Training{', GPT-2 Small shape (`train.py --preset=gpt2`)' * preset}\n\n"
            f"{c.n_layer} layers, d={c.n_embd}, sequences of {c.block_size} tokens. "
            f"`train.train_step` (AdamW at the preset's learning rate, gradient clipping 1.0"
            f"{', ' + '/'.join(sorted(dtypes)) if dtypes else ''}, "
            f"{'torch.compile' if compile else 'eager, no torch.compile'}) on random tokens "
            f"(speed does not depend on them), {batch_size} × {c.block_size} tokens per step, "
            f"{steps} steps per model{', each in a process of its own' * isolate}; tokens/s "
            f"over the last {steps - max(1, steps // 4)} (the first ones autotune and warm "
            f"up). {mfu}. Peak memory: `torch.cuda.max_memory_allocated` over the run. Loss: the "
            f"last step's cross-entropy (random tokens: about ln {c.vocab_size} = "
            f"{math.log(c.vocab_size):.1f}).\n\n"
            + table(["ffn", "use_kernel", "parameters", "active", "tokens/s", "/ dense", "MFU",
                     "peak GiB", "loss"], out))


def summary(acc, times, rows, d_ff, d, K=2, r=25):
    """The report's first lines: the checks' verdict, the K=2, r=25% layer against dense, the
    ∞-MoE training runs against dense."""
    bad = [f"{dt} {q}" for dt, q, _, _, ok in acc if not ok]
    verdict = f"all {len(acc)} checks pass" if not bad else "FAILED: " + ", ".join(bad)
    lines = [f"- accuracy: {verdict}"]
    for name in ("kernel", "PyTorch"):
        if times and (name, K, r) in times:
            ts, base, base4 = times[name, K, r], times["dense", d_ff, 0], times["dense", 4 * d, 0]
            lines.append(f"- one layer, {name}{' path' * (name == 'PyTorch')}, K={K}, r={r}%: "
                         f"fwd+bwd {median([t[1] / b[1] for t, b in zip(ts, base)]):.2f}x dense "
                         f"d_ff, {median([t[1] / b[1] for t, b in zip(ts, base4)]):.2f}x dense 4d")
    tps = {(f, k): res["tokens_per_s"] for f, k, res in rows if "error" not in res}
    if ("dense", "off") in tps:
        for kern in ("on", "off"):
            if ("inf", kern) in tps:
                lines.append(f"- training GPT-2 Small, inf with use_kernel={kern}: "
                             f"{tps['inf', kern]:,.0f} tokens/s, "
                             f"{tps['inf', kern] / tps['dense', 'off']:.2f}x dense")
    return "\n".join(lines)


def build_report(device, shape, acc_dtypes, speed_dtype, base_args, batch_size, steps,
                 deadline, command, K=2, top_frac=0.25, ks=(1, 2), rates=(10, 25), rounds=5,
                 reps=None, paths=None, runs=TRAIN_RUNS, compile=False, isolate=True,
                 train_dtype=""):
    """The report's markdown: every part at these shapes on `device`; training runs start only
    while time.monotonic() is before `deadline`. paths: speed's (default: PyTorch path, kernel)."""
    t0 = time.monotonic()
    info = machine(device)
    print("checking the kernel against the PyTorch path...", flush=True)
    acc = accuracy(device, shape, acc_dtypes, K, top_frac)
    parts = [machine_md(info), accuracy_md(acc, shape, K, top_frac)]
    times = None
    if time.monotonic() < deadline:
        print("timing one layer...", flush=True)
        times, peak, failed = speed(device, speed_dtype, shape, ks, rates, rounds, reps, paths)
        parts.append(speed_md(times, peak, failed, shape, speed_dtype))
    else:
        parts.append("## Speed of one FFN layer\n\nnot run: the time budget was spent")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the training processes get the memory the timing held
    rows = training(base_args, device, batch_size, steps, deadline, runs, compile, train_dtype,
                    isolate)
    parts.append(training_md(rows, device, base_args, batch_size, steps, compile, isolate))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    head = (f"# ∞-MoE on {name}\n\n`{command}`, {time.strftime('%Y-%m-%d')}, "
            f"{time.monotonic() - t0:.0f} s.\n\n"
            + summary(acc, times, rows, shape[2], shape[1], K, round(100 * top_frac)))
    return "\n\n".join([head] + parts) + "\n"


def write_report(path, text):
    """path holds text, whole or not at all (a temporary file renamed)."""
    with replacing(path, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- command line

def gpu_batch(total_bytes):
    """Sequences of 1024 tokens per training step, by the GPU's memory: the ∞-MoE PyTorch path at
    batch 8 is estimated (not measured) at about 14 GiB, from what it keeps per layer."""
    gib = total_bytes / 2 ** 30
    return 8 if gib >= 22 else 4 if gib >= 11 else 2


def main(argv):
    p = ArgumentParser(description="One report for one GPU: the Triton kernel against the "
                       "PyTorch path (accuracy, speed) and GPT-2 Small training speed per FFN.")
    p.add_argument("--gpu", action="store_true", required=True)
    p.add_argument("--report", default="gpu_report.md", help="the markdown file written")
    p.add_argument("--gpu_batch", type=bench.integers(0, one=True), default=0,
                   help="training: sequences of 1024 tokens per step (default 0: 8, 4 or 2 by "
                   "the GPU's memory)")
    p.add_argument("--steps", type=bench.integers(2, one=True), default=20,
                   help="training steps per model, a quarter of them warm-up")
    p.add_argument("--tokens", type=bench.integers(1, one=True), default=8192,
                   help="tokens of the accuracy check and the timing (8 x 1024, one micro-batch)")
    p.add_argument("--budget", type=bench.integers(60, one=True), default=480,
                   help="seconds; training runs that would start after it are left out")
    p.add_argument("--compile", action="store_true", help="train under torch.compile (a minute "
                   "or more per model)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise UsageError(f"bench.py --gpu needs a CUDA GPU, and torch {torch.__version__} sees "
                         f"none here; `python bench.py` times the PyTorch path on this machine")
    if kernel.INTERPRET:
        p.error("unset TRITON_INTERPRET (the interpreter is for tests, not for timing)")
    folder = os.path.dirname(os.path.abspath(args.report))
    if not os.path.isdir(folder):  # known before the run, not after
        p.error(f"--report={args.report}: no directory {folder}")
    start = time.monotonic()
    device = torch.device("cuda", torch.cuda.current_device())
    base = {**train.PRESETS["gpt2"][1]}
    c = GPTConfig(ffn="inf", **base)
    # the half precision train.py defaults to: bf16 on sm80+, fp16 below (T4, V100)
    half = getattr(torch, default_dtype(device))
    text = build_report(
        device, (args.tokens, c.n_embd, c.d_ff, c.d_z), [torch.float32, half], half,
        base, args.gpu_batch or gpu_batch(torch.cuda.get_device_properties(device).total_memory),
        args.steps, start + args.budget, "python bench.py " + " ".join(argv), c.z_samples,
        c.top_frac, compile=args.compile, train_dtype="")
    write_report(args.report, text)
    print(f"\n{text}\n(written to {args.report})")
