"""
Zero-shot evaluation of a trained GPT on multiple-choice tasks, scored by log-likelihood:

  hellaswag_eval   HellaSwag in the completion style of llm.c and nanoGPT's hellaswag.py (no
                   dependency; train.py --hellaswag runs it at every evaluation, and under torchrun
                   splits the examples across processes)
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from prepare_fineweb import EOT, get_tokenizer, load_hellaswag


# ----------------------------------------------------------------------------- HellaSwag

def render_example(example, enc, max_len=None):
    """One HellaSwag example -> tokens (4, T), mask (4, T), label.

    Row i is the context followed by " " + ending i (completion style, as llm.c / nanoGPT's
    hellaswag.py); mask is 1 on the ending's tokens. A row longer than max_len (the model's
    block_size) loses tokens from the LEFT, so the ending is scored whole on a shortened context.
    Short rows are padded on the right with EOT: causal attention never looks right, and the mask
    leaves the padding out of the score.
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
    """render_example outputs of several examples -> tokens (4B, T), mask (4B, T), labels (B,)."""
    T = max(tokens.size(1) for tokens, _, _ in rendered)
    tokens = torch.cat([F.pad(t, (0, T - t.size(1)), value=EOT) for t, _, _ in rendered])
    mask = torch.cat([F.pad(m, (0, T - m.size(1))) for _, m, _ in rendered])
    return tokens, mask, torch.tensor([label for _, _, label in rendered])


@torch.no_grad()
def score_endings(model, tokens, mask, ctx):
    """Log-likelihood of each row's masked (ending) tokens: summed and per-token mean, float32 (R,)
    each. Logits at position t predict token t+1, so a row's first token is never scored (it is
    context unless an ending alone fills block_size). Right padding is harmless: causal attention
    never looks right."""
    with ctx:
        logits, _ = model(tokens, tokens)  # given targets, GPT returns every position's logits
    logp = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(),
                            reduction="none")
    m = mask[:, 1:].float()
    total = (logp.view_as(m) * m).sum(1)
    return total, total / m.sum(1).clamp_min(1)


@torch.no_grad()
def hellaswag_eval(model, examples, device, ctx, batch_examples=8, progress=True, rank=0, world=1):
    """Zero-shot HellaSwag accuracy, completion style: each ending is scored by the model's
    log-likelihood of its tokens after the context (llm.c / nanoGPT's hellaswag.py; GPT-2 124M:
    acc 28.6%, acc_norm 29.55%).

      acc       the ending with the highest SUMMED log-likelihood is the label
      acc_norm  the ending with the highest PER-TOKEN AVERAGE log-likelihood is the label

    (The Eleuther harness scores multiple-choice style and its acc_norm divides by the ending's
    length in characters; GPT-2 124M gets 31.1% acc_norm there: compare numbers of one style.)
    Rank r of world scores examples r, r + world, ...; the raw counts correct, correct_norm and n
    are returned too, to be summed across ranks (dist.all_reduce) before dividing. Pass the raw
    model, not DDP/compiled. Runs in eval mode and its own RNG stream (∞-MoE draws noise), then
    restores both.
    """
    enc, device = get_tokenizer(), torch.device(device)
    mine = examples[rank::world]
    correct = correct_norm = 0
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in tqdm(range(0, len(mine), batch_examples), desc="hellaswag", disable=not progress):
            rendered = [render_example(ex, enc, model.config.block_size)
                        for ex in mine[i:i + batch_examples]]
            tokens, mask, labels = (t.to(device) for t in collate(rendered))
            total, mean = score_endings(model, tokens, mask, ctx)
            correct += (total.view(len(rendered), -1).argmax(1) == labels).sum().item()
            correct_norm += (mean.view(len(rendered), -1).argmax(1) == labels).sum().item()
    model.train(was_training)
    n = len(mine)
    return dict(acc=correct / max(n, 1), acc_norm=correct_norm / max(n, 1), n=n,
                correct=correct, correct_norm=correct_norm)


def run_hellaswag(model, cfg, proc):
    """HellaSwag over all ranks: acc and acc_norm from counts summed across processes."""
    examples = load_hellaswag(cfg.hellaswag_path, limit=cfg.hellaswag_limit or None)
    r = hellaswag_eval(model, examples, proc.device, proc.ctx, progress=proc.master,
                       rank=proc.rank, world=proc.world)
    counts = torch.tensor([r["correct"], r["correct_norm"], r["n"]], dtype=torch.float64,
                          device=proc.device)
    if proc.ddp:
        torch.distributed.all_reduce(counts)
    correct, correct_norm, n = counts.tolist()
    return {"hellaswag_acc": correct / n, "hellaswag_acc_norm": correct_norm / n,
            "hellaswag_n": int(n)}
