"""
Generate text from a checkpoint that train.py wrote.

  python sample.py                                   # out/ckpt.pt, 3 samples from a newline
  python sample.py --start="To be, or not" --num_samples=1 --max_new_tokens=100
  python sample.py --start=FILE:README.md --z_samples=4         # ∞-MoE: K samples of z per token
  python sample.py --z_deterministic                            # ∞-MoE: z = mu, no routing noise
  python sample.py --init_from=gpt2 --start="Hello, I'm a language model,"   # OpenAI's GPT-2
  python sample.py --help                                       # every option, default, meaning
"""
import sys
from dataclasses import dataclass

import torch

from infra import (SEED_RANGE, UsageError, autocast, check_dtype, check_kernel, check_ranges,
                   from_pretrained, kernel_runs_here, parse_args, pick_device, starting_point,
                   usage)
from model import CHOICES, GPT, GPTConfig
from prepare_fineweb import get_tokenizer, run_main


@dataclass
class SampleConfig:
    out_dir: str = "out"         # where train.py wrote ckpt.pt
    init_from: str = "resume"    # resume (out_dir/ckpt.pt) | gpt2 | gpt2-medium | ... | PATH
    start: str = "\n"            # prompt text, or FILE:path to read it from a file
    num_samples: int = 3         # samples to draw, one after the other
    max_new_tokens: int = 200    # tokens generated per sample
    temperature: float = 0.8     # divides the logits; 0: greedy (always the most likely token)
    top_k: int = 200             # sample among the k most likely tokens; 0: no top-k filtering
    seed: int = 1337             # of the sampling and the ∞-MoE routing noise
    device: str = ""             # cpu | cuda | cuda:N | mps; "" picks cuda if available, else cpu
    dtype: str = ""              # bfloat16 | float16 | float32; "": as train.py's --dtype=""
    z_samples: int = 0           # ∞-MoE K at inference; 0 keeps the checkpoint's
    z_deterministic: bool = False  # ∞-MoE z = mu (no noise); unless given, the checkpoint's setting
    moe_top_k: int = 0           # switch/top2 experts per token; 0 keeps the checkpoint's
    use_kernel: str = ""         # ∞-MoE kernel auto|on|off; "": as saved (a saved on: auto on CPU)


# The valid values of each numeric option (0 keeps the checkpoint's K or experts per token).
RANGES = {"num_samples": ">= 1", "max_new_tokens": ">= 0", "temperature": ">= 0", "top_k": ">= 0",
          "seed": SEED_RANGE, "z_samples": ">= 0", "moe_top_k": ">= 0"}
# the longest --start=FILE: read; a model sees only the last block_size tokens of a prompt anyway
PROMPT_BYTES = 1 << 20


def read_prompt(start):
    """--start's text: itself, or with FILE:path the contents of that UTF-8 file."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, "rb") as f:
            data = f.read(PROMPT_BYTES + 1)
        if len(data) > PROMPT_BYTES:
            raise UsageError(f"--start=FILE:{path}: longer than {PROMPT_BYTES >> 20} MiB; the "
                             f"model sees only its last block_size tokens: give a shorter file")
        return data.decode("utf-8")
    except OSError as e:
        raise UsageError(f"--start=FILE:{path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--start=FILE:{path}: not UTF-8 text (byte {e.start})") from None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(usage(__doc__, SampleConfig()))
        return None
    cfg = SampleConfig()
    given = parse_args(argv, cfg)
    check_ranges(given, RANGES)
    check_dtype(cfg.dtype)
    if cfg.use_kernel not in ("", *CHOICES["use_kernel"]):
        raise UsageError(f"--use_kernel={cfg.use_kernel}: expected auto, on or off")
    device = pick_device(cfg.device)
    check_kernel(cfg.use_kernel, device)
    _, ctx = autocast(device, cfg.dtype)
    start = read_prompt(cfg.start)

    if cfg.init_from == "scratch":
        raise UsageError("--init_from=scratch: sample.py needs trained weights (resume, gpt2, "
                         "a PATH)")
    ckpt, source = starting_point(cfg.init_from, cfg.out_dir)
    saved = (source[0] if source is not None else ckpt["model_args"]).get("use_kernel", "auto")
    # a checkpoint trained with the kernel on a GPU samples anywhere: auto's rule off CUDA
    kernel = cfg.use_kernel or (saved if saved != "on" or kernel_runs_here(device) else "auto")
    if source is not None:  # GPT-2, a Hugging Face directory, a ckpt.pt or an out_dir
        model = from_pretrained(cfg.init_from, {"use_kernel": kernel}, weights=source)
    else:
        model = GPT(GPTConfig(**{**ckpt["model_args"], "use_kernel": kernel}))
        model.load_state_dict(ckpt["model"])
    if cfg.moe_top_k > model.config.n_expert:
        raise UsageError(f"--moe_top_k={cfg.moe_top_k}: this model has {model.config.n_expert} "
                         f"experts")
    model.set_sampling(z_samples=cfg.z_samples or None, moe_top_k=cfg.moe_top_k or None,
                       z_deterministic=cfg.z_deterministic if "z_deterministic" in given else None)
    model.eval().to(device)

    enc = get_tokenizer()
    ids = enc.encode(start, allowed_special={"<|endoftext|>"})
    if not ids:
        raise UsageError("--start is empty: give at least one token of prompt")
    if max(ids) >= model.config.vocab_size:
        raise UsageError(f"--start has token id {max(ids)}, outside this model's vocab_size "
                         f"{model.config.vocab_size}")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None]

    torch.manual_seed(cfg.seed)
    texts = []
    for _ in range(cfg.num_samples):
        with ctx:  # temperature 0 is greedy: generate() divides by max(temperature, 1e-8)
            y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature,
                               top_k=cfg.top_k or None)
        texts.append(enc.decode(y[0].tolist()))
        print(texts[-1])
        print("---------------")
    return texts


if __name__ == "__main__":
    run_main(main)
