"""
Measures the ∞-MoE FFN's fast paths (fastpath.py, kernel.py), the way nanoGPT's bench.py
measures its model:

  python bench.py                   # latency and memory against dense FFNs of width d_ff and 4d:
                                    # the PyTorch path on any device, the Triton kernel on CUDA
  python bench.py --quick           # K=2, r=25% only
  python bench.py --blocks          # the block mask's path (mask_block = b) against the same
  python bench.py --compile-check   # compile every Triton kernel for sm75-sm90, no GPU needed
  python bench.py --params          # parameters of every FFN, and one layer's activation memory
  python bench.py --gpu             # one GPU's report: kernel accuracy, speed, GPT-2 training
                                    # (gpu_report.py; writes gpu_report.md)

On the CPU the times are noisy on a shared machine: compare the ratios, which are measured within
one run, every case timed once per round.
"""
import argparse
import contextlib
import ctypes
import io
import os
import re
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

import fastpath
import kernel
from model import keep_count
from prepare_fineweb import ArgumentParser, run_main


# ----------------------------------------------------------------------------- benchmark

def dense_ffn(x, W1, b1, W2, b2):
    return F.linear(F.gelu(F.linear(x, W1, b1)), W2, b2)


class _Floor(torch.autograd.Function):
    """The work no implementation of the ∞-MoE FFN can skip beyond a dense FFN of width d_ff, and
    no more: forward, the K score products m_k = W_z z_k and each row's threshold; backward, the 2K
    products that carry dL/dm_k into dz_k and dW_z. No mask is built, so the PyTorch path's
    distance from dense + this is what its mask bookkeeping costs. The products alone are
    K d_z / 2d of the dense FFN's arithmetic."""

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


def floor_ffn(dense, x, W1, b1, W2, b2, W_z, z, top_frac):
    return dense(_Floor.apply(x, W_z, z, keep_count(top_frac, W_z.shape[0])), W1, b1, W2, b2)


def keep_freed_memory():
    """Make glibc keep freed memory in the process, as PyTorch's CUDA caching allocator does.

    By default glibc serves every block over 32 MB with its own mmap and unmaps it when freed, so
    each new (N, d_ff) tensor of the benchmark's shape (48 MB) page-faults in again: a cost of the
    allocator, not of the ops, and one a GPU never pays; without it the CPU ratios show what the
    math costs.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        # malloc.h: no mmap'd blocks; return no heap top under 2 GB
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def _first(r):
    return r[0] if isinstance(r, tuple) else r


def _clear_grads(args):
    for t in args:
        if torch.is_tensor(t):
            t.grad = None


def saved_mib(fn, args, dy):
    """Activation memory: what autograd keeps for backward beyond the inputs and parameters, MiB."""
    inputs = {t.data_ptr() for t in args if torch.is_tensor(t)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = _first(fn(*args))
    y.backward(dy)
    kept = {t.data_ptr(): t.numel() * t.element_size() for t in saved if t.data_ptr() not in inputs}
    _clear_grads(args)
    return sum(kept.values()) / 2**20


def peak_mib(fn, args, dy):
    """CUDA: peak memory allocated during one forward+backward beyond what existed before, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _first(fn(*args)).backward(dy)
    torch.cuda.synchronize()
    _clear_grads(args)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def times(cases, dy, reps, rounds=None):
    """{name: (forward ms, forward+backward ms)} for cases {name: (fn, args)}.

    CUDA: triton's do_bench medians. CPU: the best of `reps` rounds, every case run once per round,
    so that a change in the load of a shared machine hits all cases alike and the ratios hold;
    `rounds`, a dict, gets each round's forward+backward ms of every case.
    """
    def step(fn, args, backward):
        if not backward:
            with torch.no_grad():
                return fn(*args)
        _first(fn(*args)).backward(dy)
        _clear_grads(args)

    if dy.is_cuda:
        from triton.testing import do_bench
        bench = lambda fn, args, b: do_bench(lambda: step(fn, args, b), rep=reps,
                                             return_mode="median")
        return {name: (bench(fn, a, False), bench(fn, a, True)) for name, (fn, a) in cases.items()}
    best = {name: [float("inf")] * 2 for name in cases}
    for _ in range(reps):
        for name, (fn, args) in cases.items():
            for b in (False, True):
                t0 = time.perf_counter()
                step(fn, args, b)
                best[name][b] = min(best[name][b], (time.perf_counter() - t0) * 1e3)
            if rounds is not None:
                rounds.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
    return {name: tuple(t) for name, t in best.items()}


def accuracy(x, ffn, W_z, dy, N, d_z, leaf):
    """CUDA, K=2, r=25%: the kernel and the bf16 PyTorch path, each against the fp32 one."""
    z = leaf(2, N, d_z, std=1.0, dt=torch.float32)
    dt = x.dtype
    res = {}
    for name, fn, dtype in (("kernel", kernel.triton_inf_ffn, dt),
                            ("PyTorch path", fastpath.fast_inf_ffn, dt),
                            ("fp32", fastpath.fast_inf_ffn, torch.float32)):
        ins = [t.detach().to(dtype if t.dtype == dt else t.dtype).requires_grad_()
               for t in (x, *ffn, W_z, z)]
        y = fn(*ins, 0.25)[0]
        y.backward(dy.to(dtype))
        res[name] = [y.detach()] + [t.grad for t in ins]
    names = ["y", "dx", "dW1", "db1", "dW2", "db2", "dW_z", "dz"]
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    print(f"{'relative error (K=2, r=25%)':<31s}" + " ".join(f"{n:>8s}" for n in names))
    for a, b in (("kernel", "PyTorch path"), ("kernel", "fp32"), ("PyTorch path", "fp32")):
        errors = " ".join(f"{rel(u, v):8.1e}" for u, v in zip(res[a], res[b]))
        print(f"{a + ' vs ' + b:<31s}" + errors)


def setup(args):
    """Both benchmarks' inputs at args' shape, and the header line naming the machine: (cuda,
    leaf (a maker of random leaf tensors), x, dy, the width-d_ff FFN's weights, N)."""
    cuda = torch.cuda.is_available()
    device, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    N, d, d_ff, d_z = args.tokens or (16384 if cuda else 2048), args.d, args.d_ff, args.d_z
    gen = torch.Generator(device=device).manual_seed(0)

    def leaf(*shape, std=0.02, dt=dt):
        return (torch.randn(*shape, device=device, generator=gen) * std).to(dt).requires_grad_()

    x, dy = leaf(N, d, std=1.0), torch.randn(N, d, device=device, generator=gen).to(dt)
    ffn = [leaf(d_ff, d), leaf(d_ff), leaf(d, d_ff), leaf(d)]
    kept = not cuda and not args.system_malloc and sys.platform == "linux" and keep_freed_memory()
    machine = (torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads, "
               f"{'freed memory kept (as on CUDA)' if kept else 'system malloc'} "
               "(on a shared machine absolute times are noisy: compare the ratios)")
    load = "" if cuda else f", load average {os.getloadavg()[0]:.1f}"
    print(f"{machine}: tokens={N} d={d} d_ff={d_ff} d_z={d_z} {str(dt).removeprefix('torch.')}"
          + load)
    return cuda, leaf, x, dy, ffn, N


def benchmark(args):
    cuda, leaf, x, dy, ffn, N = setup(args)
    d, d_ff, d_z = args.d, args.d_ff, args.d_z
    rates = [25] if args.quick else args.rates or [5, 10, 25, 50, 100]
    ks = [2] if args.quick else args.ks or [1, 2, 4]
    reps = args.reps or ((50 if args.quick else 200) if cuda else (2 if args.quick else 3))
    W_z = leaf(d_ff, d_z, std=d_z ** -0.5, dt=torch.float32)

    dense = dense_ffn
    paths = {"PyTorch": fastpath.fast_inf_ffn}
    if args.compile:  # the first call of each compiles (minutes on a CPU); timing starts after
        dense = torch.compile(dense_ffn, dynamic=False)
        paths = {"PyTorch, compiled": torch.compile(fastpath.fast_inf_ffn, dynamic=False)}
    if cuda:
        paths["Triton"] = kernel.triton_inf_ffn
        accuracy(x, ffn, W_z, dy, N, d_z, leaf)

    dense_4d = (x, leaf(4 * d, d), leaf(4 * d), leaf(d, 4 * d), leaf(d))
    cases = {("dense", d_ff, 0): (dense, (x, *ffn)), ("dense", 4 * d, 0): (dense, dense_4d)}
    for K in ks:
        z = leaf(K, N, d_z, std=1.0, dt=torch.float32)
        for r in rates:
            for path, fn in paths.items():
                cases[path, K, r] = (fn, (x, *ffn, W_z, z, r / 100))
        cases["floor", K, 25] = (partial(floor_ffn, dense), (x, *ffn, W_z, z, 0.25))
    t = times(cases, dy, reps)
    measured = {name: case for name, case in cases.items() if name[0] != "floor"}
    mem = {name: saved_mib(fn, a, dy) for name, (fn, a) in measured.items()}
    peak = {name: peak_mib(fn, a, dy) for name, (fn, a) in measured.items()} if cuda else None
    report(t, mem, peak, paths, args.compile, d_ff, d)
    plot(t, paths, ks, rates, N, d, d_ff, args.plot)


def report(t, mem, peak, paths, compiled, d_ff, d):
    base, base4, base_mem = t["dense", d_ff, 0], t["dense", 4 * d, 0], mem["dense", d_ff, 0]
    print("\n| FFN | K | r | fwd ms | fwd+bwd ms | fwd / dense d_ff | fwd+bwd / dense d_ff "
          "| fwd+bwd / dense 4d | saved for backward MiB | / dense d_ff |"
          + (" peak MiB |" if peak else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if peak else ""))
    for (path, K, r), (f, fb) in t.items():
        floor = path == "floor"
        if path == "dense":
            label = f"dense{', compiled' * compiled}, width {K} | | "
        elif floor:
            label = f"floor: dense d_ff + W_z products + thresholds | {K} | {r}%"
        else:
            label = f"∞-MoE, {path} | {K} | {r}%"
        saved = "| " if floor else f"{mem[path, K, r]:.0f} | {mem[path, K, r] / base_mem:.2f}"
        peaks = ("|" if floor else f"{peak[path, K, r]:.0f} |") if peak else ""
        print(f"| {label} | {f:.0f} | {fb:.0f} | {f / base[0]:.2f} | {fb / base[1]:.2f} "
              f"| {fb / base4[1]:.2f} | {saved} |" + (f" {peaks}" if peak else ""))
    pt = next(iter(paths))  # the PyTorch path, eager or compiled
    if (pt, 2, 25) in t:
        ref, floor = t[pt, 2, 25], t["floor", 2, 25]
        print(f"\nK=2, r=25%: {pt} path fwd+bwd {ref[1] / base[1]:.2f}x the dense width-d_ff FFN "
              f"(target <= 1.3), {ref[1] / floor[1]:.2f}x the floor (dense + W_z products + "
              f"thresholds: {floor[1] / base[1]:.2f}x); activation memory "
              f"{mem[pt, 2, 25] / base_mem:.2f}x (target <= 1.5)")
        if peak:
            ker = t["Triton", 2, 25]
            print(f"Triton kernel: fwd+bwd {ref[1] / ker[1]:.2f}x faster than the PyTorch path "
                  f"(target >= 2), {ker[1] / base[1]:.2f}x the dense width-d_ff FFN (target <= "
                  f"1.3), peak memory {peak['Triton', 2, 25] / peak[pt, 2, 25]:.2f} of the "
                  f"PyTorch path's (target <= 0.33)")


def plot(t, paths, ks, rates, N, d, d_ff, path):
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
            for name, style in zip(paths, ("--o", "-s")):
                ax.plot(rates, [t[name, K, r][j] for r in rates], style, color=f"C{i}",
                        label=f"{name} K={K}")
        for width, ls in ((d_ff, ":"), (4 * d, "-.")):
            ax.axhline(t["dense", width, 0][j], color="gray", ls=ls,
                       label=f"dense FFN width {width}")
        ax.set(xlabel="activation rate r (%)", ylabel="latency (ms)",
               title=f"{title}, {N} tokens, d={d}, d_ff={d_ff}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def block_accuracy(x, ffn, W_z, dy, leaf, N, d_z):
    """K=2, r=25%: the block path's default layout in the benchmark's dtype against padded bmm in
    fp32, relative errors of y and the seven gradients (on CUDA: bf16 grouped_mm against fp32)."""
    z = leaf(2, N, d_z, std=1.0, dt=torch.float32)
    res = []
    for gemm, dt in (("auto", x.dtype), ("bmm", torch.float32)):
        ins = [t.detach().to(dt if t.dtype == x.dtype else t.dtype).requires_grad_()
               for t in (x, *ffn, W_z, z)]
        y = fastpath.block_inf_ffn(*ins, 0.25, gemm=gemm)[0]
        y.backward(dy.to(dt))
        res.append([y.detach()] + [t.grad for t in ins])
    rel = [((a.float() - b).norm() / b.norm()).item() for a, b in zip(*res)]
    b = len(ffn[0]) // len(W_z)
    print(f"relative error, b={b} K=2 r=25%, {fastpath._gemm(x, 'auto', b)} "
          f"{str(x.dtype)[6:]} against bmm fp32: " + " ".join(
              f"{n} {e:.1e}" for n, e in zip(["y", "dx", "dW1", "db1", "dW2", "db2", "dW_z", "dz"],
                                             rel)))


def block_benchmark(args):
    """`python bench.py --blocks`: the block path (fastpath.block_inf_ffn: mask_block = b, only the
    kept blocks computed) for each b, K and r, next to dense FFNs of width d_ff and 4d and the
    unit-level path (fast_inf_ffn): latency, activation memory, and the share of blocks kept
    (the union of the K masks, which the cost follows)."""
    cuda, leaf, x, dy, ffn, N = setup(args)
    d, d_ff, d_z = args.d, args.d_ff, args.d_z
    ks, rates = args.ks or [1, 2], args.rates or [12.5, 25]
    sizes = [256] if args.quick else args.block_sizes
    layouts = {b: {fastpath._gemm(x, g, b): g for g in args.gemm} for b in sizes}
    reps = args.reps or (50 if cuda else 3)
    cases = {("dense", d_ff, "", 0, 0): (dense_ffn, (x, *ffn)),
             ("dense", 4 * d, "", 0, 0): (dense_ffn, (x, leaf(4 * d, d), leaf(4 * d),
                                                      leaf(d, 4 * d), leaf(d)))}
    W_z = {b: leaf(d_ff // b, d_z, std=d_z ** -0.5, dt=torch.float32) for b in [1] + sizes}
    for K in ks:
        z = leaf(K, N, d_z, std=1.0, dt=torch.float32)
        for r in rates:
            cases["units", 1, "", K, r] = (fastpath.fast_inf_ffn, (x, *ffn, W_z[1], z, r / 100))
            for b in sizes:
                for name, gemm in layouts[b].items():  # "auto" under the name it resolves to
                    cases["blocks", b, name, K, r] = (partial(fastpath.block_inf_ffn, gemm=gemm),
                                                      (x, *ffn, W_z[b], z, r / 100))
    block_accuracy(x, ffn, W_z[sizes[0]], dy, leaf, N, d_z)
    rounds = {}
    t = times(cases, dy, reps, rounds)
    mem = {name: saved_mib(fn, a, dy) for name, (fn, a) in cases.items()}
    with torch.no_grad():
        share = {name: (fn(*a)[2] / (N * a[5].shape[0])).item() for name, (fn, a) in cases.items()
                 if name[0] != "dense"}
    dff, d4 = t["dense", d_ff, "", 0, 0], t["dense", 4 * d, "", 0, 0]
    m_ff, m_4 = mem["dense", d_ff, "", 0, 0], mem["dense", 4 * d, "", 0, 0]
    print("\n| FFN | b | K | r | blocks kept | fwd ms | fwd+bwd ms | fwd / dense 4d | fwd+bwd / "
          "dense d_ff | fwd+bwd / dense 4d | saved for backward MiB | / dense d_ff | / dense 4d |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (kind, b, gemm, K, r), (f, fb) in t.items():
        label = {"dense": f"dense, width {b} | | |", "units": f"∞-MoE, units | 1 | {K} | {r:g}%",
                 "blocks": f"∞-MoE, blocks ({gemm}) | {b} | {K} | {r:g}%"}[kind]
        kept = share.get((kind, b, gemm, K, r))
        m = mem[kind, b, gemm, K, r]
        print(f"| {label} | {'' if kept is None else f'{kept:.3f}'} | {f:.0f} | {fb:.0f} "
              f"| {f / d4[0]:.2f} | {fb / dff[1]:.2f} | {fb / d4[1]:.2f} | {m:.1f} | "
              f"{m / m_ff:.2f} | {m / m_4:.2f} |")
    for K, r, b, goal in ((2, 25.0, 256, "<= 0.8x dense d_ff, <= 1.2x dense 4d"),
                          (1, 12.5, 256, "<= 0.8x dense 4d")):
        first = next(iter(layouts.get(b, [None])))
        if ("blocks", b, first, K, r) in t:
            fb = t["blocks", b, first, K, r][1]
            per_round = sorted(a / c for a, c in zip(rounds["blocks", b, first, K, r][1:],
                                                     rounds["dense", 4 * d, "", 0, 0][1:]))
            per_round = per_round or [fb / d4[1]]  # the first round warms up: left out
            print(f"K={K}, r={r:g}%, b={b} ({first}): fwd+bwd {fb / dff[1]:.2f}x dense d_ff, "
                  f"{fb / d4[1]:.2f}x dense 4d (target {goal}; round by round "
                  f"{per_round[0]:.2f}-{per_round[-1]:.2f}x dense 4d)")


# ----------------------------------------------------------------------------- GPU compile check
# Per-block shared memory (opt-in maximum) of each target, in bytes, and GPUs that have it.
ARCHS = {75: (64 * 1024, "T4, RTX 2080"), 80: (163 * 1024, "A100"),
         86: (99 * 1024, "RTX 3090, A6000"), 89: (99 * 1024, "RTX 4090, L40S"),
         90: (227 * 1024, "H100")}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compiled_for(dtype, cap):
    """Is dtype compiled for sm<cap>? bf16 only on sm80+, which has bf16 tensor cores (train.py
    picks float16 below)."""
    return dtype != torch.bfloat16 or cap >= 80


def launches(dtype, d, d_ff, d_z, K):
    """Every (kernel, constexprs, num_warps, num_stages, autotuned) triton_inf_ffn can launch at
    this shape.

    Types follow the real launch: activations and weights in `dtype`, router tensors fp32, keep
    bits uint8, statistics int32; sizes divisible by 16 (as at training shapes) carry that hint.
    """
    import triton
    a = DTYPE_NAMES[dtype]
    prec = kernel._precision(dtype)
    up = dict(x_ptr=a, w1_ptr=a, b1_ptr=a, z_ptr="fp32", wz_ptr="fp32", bits_ptr="u8", pre_ptr=a,
              a_ptr=a, counts_ptr="i32", nact_ptr="i32")
    down = dict(dy_ptr=a, w2_ptr=a, pre_ptr=a, z_ptr="fp32", wz_ptr="fp32", bits_ptr="u8",
                dpre_ptr=a, dm_ptr=a)
    dz = dict(dm_ptr=a, bits_ptr="u8", wz_ptr="fp32", dz_ptr="fp32")
    dwz = dict(dm_ptr=a, bits_ptr="u8", z_ptr="fp32", dwz_ptr="fp32")
    gemm_ints = ["N", "D", "F", "DZ", "K", "NB", "N_BUCKET"]
    router_ints = ["N", "F", "DZ", "K", "NB", "N_BUCKET"]
    block_z = max(16, triton.next_power_of_2(d_z))
    rows, block_f = kernel._select_meta(d_ff)
    yield kernel._select_kernel, dict(s_ptr="fp32", bits_ptr="u8"), \
        ["n_rows", "F", "NB", "n_keep"], dict(ROWS=rows, BLOCK_F=block_f), [(8, 3)], False
    gemm = dict(PREC=prec, ZPREC=prec)
    router = dict(ZPREC=prec, BLOCK_Z=block_z)
    for kern, table, ptrs, ints, const in (
            (kernel._up_kernel, kernel.GEMM_CANDIDATES, up, gemm_ints, dict(HAS_B1=True, **gemm)),
            (kernel._down_bwd_kernel, kernel.GEMM_CANDIDATES, down, gemm_ints, gemm),
            (kernel._dz_kernel, kernel.DZ_CANDIDATES, dz, router_ints, router),
            (kernel._dwz_kernel, kernel.DWZ_CANDIDATES, dwz, router_ints, router)):
        # this dtype's candidates
        for cfg in kernel._launchable(table, kern.configs, dtype, float("inf"), block_z, 90):
            yield (kern.fn, ptrs, ints, {**const, **cfg.kwargs},
                   [(cfg.num_warps, cfg.num_stages)], True)


def compile_one(fn, ptrs, ints, const, num_warps, num_stages, cap):
    """AOT-compile one kernel for sm_<cap>: (registers, spill bytes, shared bytes, whether it uses
    tensor-core instructions), or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**{k: "*" + v for k, v in ptrs.items()}, **{k: "i32" for k in ints},
           **{k: "constexpr" for k in const}}
    hinted = list(ptrs) + [k for k in ints if k not in ("K", "n_keep")]  # K = 2: not 16-divisible
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in hinted}
    log = io.StringIO()
    # ptxas prints registers and spills (-v) to stdout; a cached binary would skip ptxas, so compile
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope():
        triton.knobs.nvidia.dump_ptxas_log = triton.knobs.compilation.always_compile = True
        try:
            with contextlib.redirect_stdout(log):
                c = triton.compile(ASTSource(fn, sig, const, attrs),
                                   target=GPUTarget("cuda", cap, 32),
                                   options=dict(num_warps=num_warps, num_stages=num_stages))
        except Exception as e:  # a compiler error is a row of the table, not the end of the check
            return str(e).strip().splitlines()[0][:80]
    text = log.getvalue()
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    tensor_cores = "mma" in c.asm["ptx"]  # mma.sync (sm80+), wgmma (sm90)
    return regs, spill, c.metadata.shared, tensor_cores


def compile_check(archs=tuple(ARCHS), dtypes=(torch.bfloat16, torch.float16, torch.float32),
                  shapes=(768, 1024), quick=False):
    """Compile every kernel x arch x dtype x config for real GPUs (no GPU needed); print the table.

    bf16 is left out below sm80 (compiled_for).
    Below sm80 Triton compiles the dots to CUDA-core FMAs (the `tc` column) and use_kernel=auto
    takes the PyTorch path, so spills there are listed but are not problems.
    quick: one configuration per kernel, the kernels spread over the archs and dtypes (every kernel
    and every arch at least once: the test suite's subset). Returns the number of problems.
    """
    jobs, seen = [], {}
    for d in shapes:
        for dtype in dtypes:
            for fn, ptrs, ints, const, wst, tuned in launches(dtype, d, 8 * d, 128, 2):
                for cap in archs:
                    if compiled_for(dtype, cap):
                        jobs.append((fn, ptrs, ints, const, wst[0], tuned, cap, dtype, d))
    if quick:
        by_kernel = {}
        for j in jobs:
            by_kernel.setdefault(j[0].__name__, []).append(j)
        jobs = []
        for i, js in enumerate(by_kernel.values()):
            on_arch = [j for j in js if j[6] == archs[i % len(archs)]]
            jobs.append(next((j for j in on_arch if j[7] == dtypes[i % len(dtypes)]), on_arch[0]))
    print(f"{'kernel':<17s} {'arch':<5s} {'dtype':<5s} {'d':>5s}  {'config':<42s} {'regs':>4s} "
          f"{'spill':>6s} {'shared':>8s} {'limit':>7s} tc  verdict")
    n = fail = spill = over = pruned = slow_spill = 0
    for fn, ptrs, ints, const, (w, s), tuned, cap, dtype, d in jobs:
        key = (fn.__name__, tuple(sorted(ptrs.items())), tuple(sorted(const.items())), w, s, cap)
        if key not in seen:  # d = 768 and 1024 often compile to the same binary
            seen[key] = compile_one(fn, ptrs, ints, const, w, s, cap)
        res, limit = seen[key], ARCHS[cap][0]
        cfg = " ".join(f"{k}={v}" for k, v in const.items() if k not in ("PREC", "ZPREC", "HAS_B1"))
        cfg += f" w={w} s={s}"
        name, dt = fn.__name__.strip("_").replace("_kernel", ""), DTYPE_NAMES[dtype]
        if isinstance(res, str):
            fail += 1
            print(f"{name:<17s} sm{cap:<3d} {dt:<5s} {d:5d}  {cfg:<42s} FAILED: {res}")
            continue
        n += 1
        regs, spilled, shared, tc = res
        # the autotuner's pre-filter decides with _shared_bytes; the compiler's figure must agree
        budget = kernel._shared_bytes(const, s, dtype, cap) if tuned else limit
        verdict = "ok"
        if budget > limit:
            verdict, pruned = "pruned on this arch", pruned + 1
        elif shared > budget:  # over the arch's limit, or over what the autotune pre-filter assumed
            verdict = "OVER SHARED MEMORY" if shared > limit else "OVER ITS ESTIMATE"
            over += 1
        elif spilled and cap < kernel.MIN_SM:
            verdict, slow_spill = "spills (auto: PyTorch path here)", slow_spill + 1
        elif spilled:
            verdict, spill = "SPILLS", spill + 1
        tcs = "-" if name == "select" else "yes" if tc else "no"  # select has no dot
        print(f"{name:<17s} sm{cap:<3d} {dt:<5s} {d:5d}  {cfg:<42s} {regs:4d} {spilled:6d} "
              f"{shared / 1024:6.1f}KB {limit // 1024:5d}KB {tcs:<3s} {verdict}")
    print(f"({pruned} autotune configs need more shared memory than their arch has: pruned before "
          f"launch there, not counted below)")
    if slow_spill:
        print(f"({slow_spill} configs spill below sm80, where use_kernel=auto does not launch the "
              f"kernel: not counted below)")
    print(f"compile-check: {n} compiled, {fail} failed, {spill} spilling, {over} over shared "
          f"memory")
    return fail + spill + over


# ----------------------------------------------------------------------------- parameters, memory

def params_and_memory():
    """`python bench.py --params`: total and active parameters of every FFN at GPT-2 Small and
    Medium width, and the memory one FFN layer keeps for backward (the README's tables)."""
    from model import FFNS, GPT, DenseFFN, GPTConfig, InfMoE
    print("| ffn | GPT-2 Small total | active | GPT-2 Medium total | active |\n"
          "|---|---|---|---|---|")
    for ffn in FFNS:
        row = []
        for L, H, d in ((12, 12, 768), (24, 16, 1024)):
            with torch.device("meta"):
                model = GPT(GPTConfig(ffn=ffn, n_layer=L, n_head=H, n_embd=d))
            row += [f"{n / 1e6:.1f}M" for n in model.num_params()]
        print(f"| {ffn} | " + " | ".join(row) + " |")
    if not hasattr(os, "fork"):
        print("\n(the memory table needs os.fork: not on this platform)")
        return
    print("\n| layer (GPT-2 Small width, fp32, CPU) | tokens | saved for backward "
          "| peak RSS growth fwd+bwd |\n|---|---|---|---|")
    measure("dense FFN, d_ff = 4d", lambda: DenseFFN(GPTConfig(ffn="dense")))
    measure("dense FFN, d_ff = 8d", lambda: DenseFFN(GPTConfig(ffn="dense", d_ff_mult=8)))
    measure("∞-MoE PyTorch path, d_ff = 8d, K = 2, r = 25%", lambda: InfMoE(GPTConfig(ffn="inf")))


def measure(name, make_layer, N=4096):
    """One layer's activation memory and peak RSS growth, in a forked child so that its peak RSS is
    this layer's alone (a fresh high-water mark). The parent does no tensor math before forking: an
    OpenMP pool started there would hang the child."""
    import resource
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
    print(f"| {name} | {N} | {sum(acts.values()) / 2**20:.0f} MiB | {peak / 2**10:.0f} MiB |",
          flush=True)
    os._exit(0)


# ----------------------------------------------------------------------------- command line

def integers(lo, hi=None, one=False):
    """An argparse type: comma-separated integers in [lo, hi] (one=True: a single one)."""
    def parse(text):
        try:
            values = [int(v) for v in ([text] if one else text.split(","))]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected "
                                             f"{'an integer' if one else 'integers, 1,2,...'}"
                                             ) from None
        for v in values:
            if v < lo or (hi is not None and v > hi):
                raise argparse.ArgumentTypeError(f"{v} is not between {lo} and {hi}" if hi else
                                                 f"{v} is below {lo}")
        return values[0] if one else values
    return parse


def percents(text):
    """An argparse type: comma-separated percentages in (0, 100], whole ones as ints (25 -> 25)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected percentages, 10,25,...") from None
    for v in values:
        if not 0 < v <= 100:
            raise argparse.ArgumentTypeError(f"{v:g} is not in (0, 100]")
    return [int(v) if v.is_integer() else v for v in values]


def choices(*names):
    """An argparse type: comma-separated names, each one of names."""
    def parse(text):
        values = text.split(",")
        for v in values:
            if v not in names:
                raise argparse.ArgumentTypeError(f"{v!r}: expected {', '.join(names)}")
        return values
    return parse


def compile_check_main(argv):
    """`python bench.py --compile-check [--quick] [--archs=75,80] [--dtypes=fp16,fp32] [--d=768]`"""
    p = ArgumentParser(description="Compile every Triton kernel for sm75-sm90 without a GPU; "
                       "exit 0 when nothing the code can launch fails, spills or exceeds shared "
                       "memory.")
    p.add_argument("--compile-check", action="store_true", required=True)
    p.add_argument("--quick", action="store_true",
                   help="one config per kernel, kernels spread over the archs")
    p.add_argument("--archs", default=",".join(map(str, ARCHS)), type=integers(0))
    p.add_argument("--dtypes", default=",".join(DTYPE_NAMES.values()))
    p.add_argument("--d", default="768,1024", type=integers(1),
                   help="model widths; d_ff = 8d, d_z = 128, K = 2")
    args = p.parse_args(argv)
    if not set(args.archs) <= set(ARCHS):
        p.error(f"--archs={','.join(map(str, args.archs))}: expected some of "
                f"{','.join(map(str, ARCHS))}")
    names = {v: k for k, v in DTYPE_NAMES.items()}
    if not set(args.dtypes.split(",")) <= set(names):
        p.error(f"--dtypes={args.dtypes}: expected some of {','.join(names)}")
    dtypes = [names[t] for t in args.dtypes.split(",")]
    if not any(compiled_for(t, cap) for t in dtypes for cap in args.archs):
        p.error(f"--dtypes={args.dtypes} --archs={','.join(map(str, args.archs))}: bf16 is "
                f"compiled on sm80 and up only (below, train.py picks float16)")
    if kernel.INTERPRET:
        p.error("unset TRITON_INTERPRET (the interpreter compiles nothing)")
    import triton
    print(f"Triton {triton.__version__}, torch {torch.__version__}; d_ff = 8d, d_z = 128, K = 2")
    return compile_check(args.archs, dtypes, args.d, args.quick)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--compile-check" in argv:
        raise SystemExit(1 if compile_check_main(argv) else 0)
    if argv == ["--params"]:
        return params_and_memory()
    if "--gpu" in argv:
        import gpu_report  # here: it imports train.py, which the other benchmarks do not need
        return gpu_report.main(argv)
    p = ArgumentParser(description="Latency and memory of the infinite-MoE FFN against dense FFNs "
                       "of width d_ff and 4d: the PyTorch path (fastpath.fast_inf_ffn) on any "
                       "device, the Triton kernel too on CUDA. GPT-2 Small shape; bf16 on CUDA, "
                       "fp32 on the CPU.")
    p.add_argument("--tokens", type=integers(1, one=True), default=None,
                   help="default: 16384 on CUDA, 2048 on CPU")
    p.add_argument("--d", type=integers(1, one=True), default=768)
    p.add_argument("--d_ff", type=integers(1, one=True), default=6144)
    p.add_argument("--d_z", type=integers(1, one=True), default=128)
    p.add_argument("--rates", type=percents, help="activation rates in percent (default "
                   "5,10,25,50,100; --blocks: 12.5,25)")
    p.add_argument("--ks", type=integers(1), help="numbers of samples K (default 1,2,4; "
                   "--blocks: 1,2)")
    p.add_argument("--quick", action="store_true", help="only K=2, r=25%%, shorter timing "
                   "(--blocks: only b=256)")
    p.add_argument("--blocks", action="store_true", help="time the block path "
                   "(fastpath.block_inf_ffn, mask_block=b) against dense FFNs and the unit-level "
                   "path")
    p.add_argument("--block_sizes", default=[64, 128, 256, 512], type=integers(1),
                   help="--blocks: units per block b (default 64,128,256,512)")
    p.add_argument("--gemm", default=["auto"], type=choices("auto", "grouped", "bmm"),
                   help="--blocks: the block path's row layouts: auto, grouped, bmm "
                   "(comma-separated)")
    p.add_argument("--reps", type=integers(1, one=True), default=None,
                   help="CUDA: ms per do_bench (default 200); CPU: rounds, best of (default 3)")
    p.add_argument("--plot", default="kernel_bench.png",
                   help="PNG written when matplotlib is installed")
    p.add_argument("--compile", action="store_true", help="time the dense FFNs and the PyTorch "
                   "path under torch.compile (inductor fuses the element-wise passes; the kernel "
                   "rows stay eager)")
    p.add_argument("--system_malloc", action="store_true", help="CPU: leave glibc's allocator as "
                   "it is (by default freed memory is kept in the process, as on CUDA: see "
                   "keep_freed_memory)")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):  # known before, not after
        p.error(f"--plot={args.plot}: no directory {os.path.dirname(os.path.abspath(args.plot))}")
    if kernel.INTERPRET:
        p.error("unset TRITON_INTERPRET (the interpreter is for tests, not for timing)")
    (block_benchmark if args.blocks else benchmark)(args)


if __name__ == "__main__":
    run_main(main)
