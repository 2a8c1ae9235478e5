"""
Generate text from a checkpoint that train.py wrote.

  python sample.py                                   # out/ckpt.pt, 3 samples from a newline
  python sample.py --start="To be, or not" --num_samples=1 --max_new_tokens=100
  python sample.py --start=FILE:prompt.txt --z_samples=4        # ∞-MoE: K samples of z per token
  python sample.py --z_deterministic                            # ∞-MoE: z = mu, no routing noise
  python sample.py --init_from=gpt2 --start="Hello, I'm a language model,"   # OpenAI's GPT-2
"""
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from model import GPT, GPTConfig, from_pretrained
from prepare_fineweb import get_tokenizer
from train import parse_args


@dataclass
class SampleConfig:
    out_dir: str = "out"
    init_from: str = "resume"    # resume (out_dir/ckpt.pt) | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | PATH
    start: str = "\n"            # prompt text, or FILE:path to read it from a file
    num_samples: int = 3
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 200             # 0: no top-k filtering
    seed: int = 1337
    device: str = ""             # "" picks cuda when available, else cpu
    dtype: str = ""              # bfloat16 | float32; "" picks bfloat16 on cuda, float32 on cpu
    z_samples: int = 0           # ∞-MoE K at inference; 0 keeps the checkpoint's
    z_deterministic: bool = False
    moe_top_k: int = 0           # switch/top2 experts per token; 0 keeps the checkpoint's


def main(argv=None):
    cfg = SampleConfig()
    parse_args(sys.argv[1:] if argv is None else argv, cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()

    if cfg.init_from == "resume":
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no checkpoint at {path}: train one with `python train.py --out_dir={cfg.out_dir}`")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    else:  # GPT-2 from the Hugging Face Hub, a Hugging Face directory, or a ckpt.pt / out_dir
        model = from_pretrained(cfg.init_from)
    model.set_sampling(z_samples=cfg.z_samples or None, z_deterministic=cfg.z_deterministic,
                       moe_top_k=cfg.moe_top_k or None)
    model.eval().to(device)

    start = cfg.start
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    enc = get_tokenizer()
    ids = enc.encode(start, allowed_special={"<|endoftext|>"})
    if not ids:
        raise ValueError("--start is empty: give at least one token of prompt")
    if max(ids) >= model.config.vocab_size:
        raise ValueError(f"--start has token id {max(ids)}, outside this model's vocab_size {model.config.vocab_size}")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None]

    torch.manual_seed(cfg.seed)
    texts = []
    for _ in range(cfg.num_samples):
        with ctx:
            y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None)
        texts.append(enc.decode(y[0].tolist()))
        print(texts[-1])
        print("---------------")
    return texts


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}")
