"""
The README's comparison of the FFNs on the bundled sample, rerun by anyone in two commands:

    python compare.py --run     # train every run of the grid not yet finished (~1.5 h on 2 cores)
    python compare.py           # the table (markdown) from runs/*/log.jsonl, and runs/val_loss.png

Every run is the default `python train.py` (the tiny model, 200 steps of 1,024 tokens, data/sample)
with one FFN's flags and a seed: dense, switch, top2 and inf with three seeds each, every variant
with one, and inf's block masks (d_ff = 1024 in 16 or 4 blocks) with three each.
"""
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from infra import UsageError, load_checkpoint, read_flags
from model import GPT, GPTConfig
from prepare_fineweb import ArgumentParser, run_main

SEEDS = (1337, 1338, 1339)
BASELINES = {"dense": "--ffn=dense", "switch": "--ffn=switch", "top2": "--ffn=top2",
             "inf": "--ffn=inf"}
VARIANTS = {"inf, deep router": "--ffn=inf --router_depth=2",
            "inf, mixture router": "--ffn=inf --router_mix=4",
            "inf, pre-activation gate": "--ffn=inf --gate=pre",
            "inf_deep": "--ffn=inf_deep",
            "switch, bias balancing": "--ffn=switch --balance=bias",
            "top2, bias balancing": "--ffn=top2 --balance=bias"}
BLOCKS = {"inf, blocks of 64 (16 blocks)": "--ffn=inf --mask_block=64",  # three seeds, as inf
          "inf, blocks of 256 (4 blocks)": "--ffn=inf --mask_block=256"}


def grid():
    """(label, flags, seed, out_dir name) of every run."""
    runs = [(label, flags, seed) for label, flags in BASELINES.items() for seed in SEEDS]
    runs += [(label, flags, SEEDS[0]) for label, flags in VARIANTS.items()]
    runs += [(label, flags, seed) for label, flags in BLOCKS.items() for seed in SEEDS]
    name = lambda flags, seed: "-".join(f.removeprefix("--ffn=").lstrip("-").replace("=", "_")
                                        for f in flags.split()) + f"-s{seed}"  # inf-gate_pre-s1337
    return [(label, flags, seed, name(flags, seed)) for label, flags, seed in runs]


def read_log(out_dir):
    """The validation curve [(step, val_loss)] and training records of a run's log.jsonl."""
    val, train = [], []
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return val, train
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "val_loss" in rec:
                val.append((rec["step"], rec["val_loss"]))
            elif "tokens_per_s" in rec:
                train.append(rec)
    return val, train


def finished_run(out_dir, flags, seed):
    """(validation curve, training records, checkpoint) of a run that has finished: its checkpoint
    is at its own max_iters and its log evaluated there. None for a run that has not. A checkpoint
    of another FFN, variant or seed than the run's is a UsageError naming it."""
    val, train = read_log(out_dir)
    path = os.path.join(out_dir, "ckpt.pt")
    if not val or not os.path.exists(path):
        return None
    ckpt = load_checkpoint(path)
    defaults = dataclasses.asdict(GPTConfig())
    varied = {k for _, f, _, _ in grid() for k in read_flags(f.split(), GPTConfig)}
    wanted = {**{k: defaults[k] for k in varied}, **read_flags(flags.split(), GPTConfig)}
    saved = {**defaults, **ckpt["model_args"]}
    other = [f"{k}={saved[k]}" for k in sorted(wanted) if saved[k] != wanted[k]]
    if ckpt["config"].get("seed", seed) != seed:
        other.append(f"seed={ckpt['config']['seed']}")
    if other:
        raise UsageError(f"{path} is not this run's ({flags} --seed={seed}): it was trained with "
                         f"{', '.join(other)}; move it out of {out_dir}")
    steps = ckpt["config"]["max_iters"]
    return (val, train, ckpt) if ckpt["iter_num"] == val[-1][0] == steps else None


def run_all(root, jobs):
    """Train the unfinished runs, `jobs` at a time, the CPU's threads split between them. Returns
    the names of those that failed."""
    todo = [r for r in grid() if finished_run(os.path.join(root, r[3]), r[1], r[2]) is None]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    repo = os.path.dirname(os.path.abspath(__file__))
    failed = []

    def one(run):
        label, flags, seed, name = run
        out_dir = os.path.join(root, name)  # absolute for train.py, which runs in the repository
        cmd = [sys.executable, "train.py", *flags.split(), f"--seed={seed}",
               f"--out_dir={os.path.abspath(out_dir)}", "--overwrite"]
        print(" ".join(cmd[1:]), flush=True)
        with open(out_dir + ".txt", "w") as out:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=repo)
        if done.returncode != 0:
            failed.append(f"{out_dir}.txt")
            print(f"failed: {name} (see {out_dir}.txt)", flush=True)

    os.makedirs(root, exist_ok=True)
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))
    return failed


def summarise(root):
    """{label: dict(flags, seeds, steps, final val losses, curves, tokens/s, active params)} of the
    finished runs."""
    rows = {}
    for label, flags, seed, name in grid():
        run = finished_run(os.path.join(root, name), flags, seed)
        if run is None:
            continue
        val, train, ckpt = run
        row = rows.setdefault(label, dict(flags=flags, seeds=[], final=[], curves=[], tok_s=[]))
        row["seeds"].append(seed)
        row["steps"] = val[-1][0]
        row["final"].append(val[-1][1])
        row["curves"].append(val)
        # the median over the log lines: one slowed by something else on the machine moves it little
        row["tok_s"].append(statistics.median(r["tokens_per_s"] for r in train) if train else None)
        if train and "block_load" in train[-1]:  # the last step's, per layer
            row.setdefault("block_load", []).append(train[-1]["block_load"])
        if "active" not in row:
            row["active"] = GPT(GPTConfig(**ckpt["model_args"])).num_params()[1]
    return rows


def table(rows):
    steps = next(iter(rows.values()))["steps"]
    lines = [f"| FFN | flags | seeds | val loss at step {steps} | spread (max − min) | tokens/s "
             "| active params |",
             "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        n, mean = len(r["final"]), statistics.mean(r["final"])
        spread = f"{max(r['final']) - min(r['final']):.4f}" if n > 1 else ""
        loss = f"{mean:.4f}" + (f" ({', '.join(f'{v:.4f}' for v in r['final'])})" if n > 1 else "")
        speeds = [t for t in r["tok_s"] if t is not None]  # none: a log without training records
        speed = f"{statistics.mean(speeds):,.0f}" if speeds else ""
        lines.append(f"| {label} | `{r['flags']}` | {n} | {loss} | {spread} | {speed} | "
                     f"{r['active'] / 1e6:.2f}M |")
    return "\n".join(lines)


def plot(rows, path):
    """Validation loss against step: each baseline's seed mean with its min-max band, variants
    dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, r in rows.items():  # seeds paired by step, at the steps every seed evaluated
        steps = sorted(set.intersection(*({s for s, _ in c} for c in r["curves"])))
        by_step = [[dict(c)[s] for c in r["curves"]] for s in steps]
        mean = [statistics.mean(vs) for vs in by_step]
        for a in (ax, zoom):
            line, = a.plot(steps, mean, "-" if label in BASELINES else "--", marker="o", ms=3,
                           label=f"{label} ({len(r['curves'])} seed{'s' * (len(r['curves']) > 1)})")
            if len(r["curves"]) > 1:
                a.fill_between(steps, [min(vs) for vs in by_step], [max(vs) for vs in by_step],
                               color=line.get_color(), alpha=0.2)
    late = [v for r in rows.values() for c in r["curves"] for s, v in c if s >= 100]
    zoom.set_xlim(95, 205)
    zoom.set_ylim(min(late) - 0.05, max(late) + 0.05)
    for a, title in ((ax, "validation loss"), (zoom, "steps 100-200")):
        a.set_xlabel("step (1,024 tokens each)")
        a.set_title(title)
        a.grid(alpha=0.3)
    ax.set_ylabel("val loss (nats/token)")
    zoom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--run", action="store_true", help="first train the runs that have not finished")
    p.add_argument("--jobs", type=int, default=1,
                   help="--run: runs at a time (each gets cores/jobs threads)")
    p.add_argument("--runs_dir", default="runs", help="one out_dir per run in here")
    p.add_argument("--plot", default="", help="PNG to write (default: RUNS_DIR/val_loss.png)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs={args.jobs}: expected >= 1")
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        p.error(f"--plot={args.plot}: no directory {os.path.dirname(os.path.abspath(args.plot))}")
    failed = run_all(args.runs_dir, args.jobs) if args.run else []
    rows = summarise(args.runs_dir)
    if rows:
        print(table(rows))
        for label, r in rows.items():
            if "block_load" in r:
                loads = [f"{statistics.mean(v):.2f}" for v in zip(*r["block_load"])]
                print(f"{label}: block load at the last logged step (busiest block / mean, per "
                      f"layer, mean of the seeds): {' / '.join(loads)}")
        path = args.plot or os.path.join(args.runs_dir, "val_loss.png")
        if plot(rows, path):
            print(f"wrote {path}")
    if failed:  # a run that failed once started: exit status 1, as train.py's own
        raise SystemExit(f"error: {len(failed)} runs failed; their output: {', '.join(failed)}")
    if not rows:
        raise UsageError(f"no finished run in {args.runs_dir}/ (python compare.py --run trains "
                         f"them)")


if __name__ == "__main__":
    run_main(main)
