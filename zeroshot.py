"""
Zero-shot evaluation of a trained GPT, scored by log-likelihood:

  hellaswag_eval   HellaSwag in the completion style of llm.c and nanoGPT's hellaswag.py (no
                   dependency; train.py --hellaswag runs it at every evaluation, and under torchrun
                   splits the examples across processes)
  HarnessLM        our GPT as a model of EleutherAI's lm-evaluation-harness (pip install lm-eval),
                   registered as "infmoe": train.py --eval_only --lm_eval=TASKS, the harness's
                   Python API after `import zeroshot`, and its command line as
                   `python zeroshot.py --model infmoe --model_args init_from=out --tasks piqa`

∞-MoE samples its routing noise. Here it is keyed (GPT.forward's seq_ids): a HellaSwag example's
rows by the example's index, a harness request by its task and document, so a score does not
depend on the batch size, the padding or the number of processes.
"""
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from infra import (UsageError, autocast, fork_rng, from_pretrained, read_flags, start_process,
                   starting_point)
from model import GPTConfig
from prepare_fineweb import EOT, HELLASWAG_LOCAL, get_tokenizer, load_hellaswag

try:  # lm-eval is optional: without it HarnessLM is defined but refuses to be built
    import lm_eval.models  # noqa: F401  (the harness's own models, registered before ours)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    model_registry.register("infmoe", target="zeroshot:HarnessLM")  # imported when first asked for
except ImportError:
    TemplateLM = object
LM_EVAL_MISSING = "needs lm-evaluation-harness: pip install lm-eval"


def harness_installed():
    return TemplateLM is not object


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
def token_logprobs(model, inputs, targets, ctx, seq_ids=None):
    """log p(targets[:, t] | inputs[:, :t + 1]) and whether it was the most likely token: float32
    and bool, (R, T) each. seq_ids: the rows' noise keys (GPT.forward)."""
    targets = targets.contiguous()
    with ctx:
        logits, _ = model(inputs, targets, seq_ids=seq_ids)  # given targets: every position
    logits = logits.float()
    logp = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return logp.view_as(targets), logits.argmax(-1) == targets


def score_endings(model, tokens, mask, ctx, seq_ids=None):
    """Log-likelihood of each row's masked (ending) tokens: summed and per-token mean, float32 (R,)
    each. A row's first token is never scored (it is context unless an ending alone fills
    block_size). Right padding is harmless: causal attention never looks right."""
    logp, _ = token_logprobs(model, tokens[:, :-1], tokens[:, 1:], ctx, seq_ids)
    m = mask[:, 1:].float()
    total = (logp * m).sum(1)
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
    are returned too, to be summed across ranks (dist.all_reduce) before dividing. ∞-MoE's noise
    is keyed by the example's index in `examples`, shared by its endings (compared under one draw,
    as a model reading the context once), so the counts depend on neither batch_examples nor
    world. Pass the raw model, not DDP/compiled. Runs in eval mode and its own RNG stream, then
    restores both.
    """
    enc, device = get_tokenizer(), torch.device(device)
    index = torch.arange(rank, len(examples), world)
    mine = examples[rank::world]
    correct = correct_norm = 0
    was_training = model.training
    model.eval()
    with fork_rng(device):
        for i in tqdm(range(0, len(mine), batch_examples), desc="hellaswag", disable=not progress):
            rendered = [render_example(ex, enc, model.config.block_size)
                        for ex in mine[i:i + batch_examples]]
            tokens, mask, labels = (t.to(device) for t in collate(rendered))
            ids = index[i:i + len(rendered)].repeat_interleave(len(tokens) // len(rendered))
            total, mean = score_endings(model, tokens, mask, ctx, ids.to(device))
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


# ----------------------------------------------------------------------- lm-evaluation-harness

def noise_key(*parts):
    """A request's ∞-MoE noise key (GPT.forward's seq_ids): a 64-bit hash of its parts."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def request_key(request, window=0):
    """The key of a harness request: its task and document, so the choices of one question share
    a draw (compared under one noise, as scored by a model that reads the question once), or its
    text when it has no document; window: which rolling window of it."""
    if request.doc_id is None:
        return noise_key(*request.args, window)
    return noise_key(request.task_name, request.doc_id, window)


@dataclass
class HarnessArgs:
    """model_args of `--model infmoe` besides the inference knobs (z_samples, z_deterministic,
    moe_top_k, use_kernel); the harness's own batch_size and device apply."""
    init_from: str = "resume"   # resume (out_dir/ckpt.pt) | a ckpt.pt or out_dir | gpt2* | HF dir
    out_dir: str = "out"        # read by init_from=resume
    dtype: str = ""             # bfloat16 | float16 | float32; "": as train.py's --dtype
    seed: int = 1337            # key of the ∞-MoE noise at evaluation (train.py's --seed)


class HarnessLM(TemplateLM):
    """Our GPT for lm-evaluation-harness: the log-likelihood of a continuation (its tokens summed,
    and whether each was the most likely token), of a whole text in the harness's rolling windows,
    and greedy generation. The harness builds it from model_args (HarnessArgs, inference knobs)
    and its own batch_size, max_batch_size and device; in Python pass model= a GPT (its device
    and an autocast context ctx too). Under torchrun each process scores its share of the
    documents and rank 0 gathers the metrics.
    """

    def __init__(self, model=None, batch_size=None, max_batch_size=None, device=None, ctx=None,
                 **model_args):
        if not harness_installed():
            raise UsageError(f"the lm-eval model {LM_EVAL_MISSING}")
        super().__init__()
        if model is None:
            model, device, ctx = self.build(model_args, device)
        elif model_args:
            raise UsageError(f"HarnessLM(model=...) takes no model_args ({', '.join(model_args)})")
        self.model = model.eval()
        self._device = torch.device(device or "cpu")
        self.ctx = ctx if ctx is not None else autocast(self._device, "")[1]
        auto = batch_size is None or str(batch_size).startswith("auto")  # no search: a default
        self.batch_size = int(max_batch_size or 16) if auto else int(batch_size)
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        self.enc, self.pending_keys, self.max_gen_toks = get_tokenizer(), None, 256

    @staticmethod
    def build(model_args, device):
        """(GPT, device, autocast context) from model_args. The harness turns their values into
        Python ones ("inf" into a float); they are read back as text with our options' types."""
        text = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}"
                for k, v in model_args.items()]
        flags = read_flags(text, HarnessArgs, GPTConfig)
        ours = {f.name for f in dataclasses.fields(HarnessArgs)}
        args = HarnessArgs(**{k: v for k, v in flags.items() if k in ours})
        knobs = {k: v for k, v in flags.items() if k not in ours}  # checked by from_pretrained
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            warnings.warn(f"device {device} (the harness's default) but no CUDA here: using cpu")
            device = "cpu"
        proc = start_process(device or "", args.dtype)  # joins the process group under torchrun
        ckpt, source = starting_point(args.init_from, args.out_dir)
        weights = source or (ckpt["model_args"], ckpt["model"])
        try:
            model = from_pretrained(args.init_from, knobs, weights)
        except ValueError as e:
            raise UsageError(str(e)) from None
        model.set_sampling(eval_seed=args.seed)
        return model.to(proc.device), proc.device, proc.ctx

    @property
    def eot_token_id(self):
        return EOT

    @property
    def max_length(self):
        return self.model.config.block_size

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.enc.encode_ordinary(string)

    def tok_decode(self, tokens, **kwargs):
        return self.enc.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm=False):
        """TemplateLM's: each (context, continuation) through _encode_pair (which moves trailing
        spaces of the context into the continuation) to _loglikelihood_tokens, in order."""
        self.pending_keys = [request_key(r) for r in requests]
        return super().loglikelihood(requests, disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        keys, self.pending_keys = self.pending_keys, None
        if keys is None:  # called directly, not through loglikelihood
            keys = [noise_key(*context, "|", *cont) for _, context, cont in requests]
        return self.score([(c, d) for _, c, d in requests], keys, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """A text's log-likelihood, in the harness's windows: the first conditions on EOT, each
        later one on the max_length tokens before it."""
        pairs, owner, keys = [], [], []
        for i, request in enumerate(requests):
            windows = get_rolling_token_windows(self.tok_encode(request.args[0]), EOT,
                                                self.max_length, 1)
            for w, pair in enumerate(map(make_disjoint_window, windows)):
                pairs.append(pair)
                owner.append(i)
                keys.append(request_key(request, w))
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self.score(pairs, keys, disable_tqdm)):
            totals[i] += ll
        return totals

    @torch.no_grad()
    def score(self, pairs, keys, disable_tqdm=False):
        """(log-likelihood, greedy) of each (context tokens, continuation tokens): as the harness
        does, context + continuation is cut to its last max_length + 1 tokens, the model reads all
        but the last and the continuation's tokens are scored. Longest first, in batches padded on
        the right; the noise keys make the result independent of the batching."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out = [None] * len(pairs)
        for b in tqdm(range(0, len(order), self.batch_size), desc="loglikelihood",
                      disable=disable_tqdm or self.rank != 0):
            batch = order[b:b + self.batch_size]
            rows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):] for i in batch]
            T = max(len(r) for r in rows) - 1
            pad = lambda r: r + [EOT] * (T + 1 - len(r))
            tokens = torch.tensor([pad(r) for r in rows], device=self.device)
            mask = torch.zeros(len(rows), T, dtype=torch.bool)
            for j, (r, i) in enumerate(zip(rows, batch)):
                mask[j, len(r) - 1 - len(pairs[i][1]):len(r) - 1] = True
            ids = torch.tensor([keys[i] for i in batch], device=self.device)
            logp, top = token_logprobs(self.model, tokens[:, :-1], tokens[:, 1:], self.ctx, ids)
            mask = mask.to(self.device)
            total = (logp * mask).sum(1).tolist()
            greedy = (top | ~mask).all(1).tolist()
            for j, i in enumerate(batch):
                out[i] = (total[j], greedy[j])
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm=False):
        """Greedy decoding, one request at a time, until a stop string, EOT or max_gen_toks
        (sampling options are ignored: zero-shot tables decode greedily)."""
        texts = []
        for request in tqdm(requests, desc="generate", disable=disable_tqdm or self.rank != 0):
            context, options = request.args
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else until
            ids, new = self.tok_encode(context) or [EOT], []
            key = torch.tensor([request_key(request)], device=self.device)
            for _ in range(options.get("max_gen_toks", self.max_gen_toks)):
                x = torch.tensor([(ids + new)[-self.max_length:]], device=self.device)
                with self.ctx:
                    logits, _ = self.model(x, seq_ids=key)  # without targets: the last position
                token = logits[0, -1].argmax().item()
                if token == EOT:
                    break
                new.append(token)
                if any(u in self.tok_decode(new) for u in until):
                    break
            text = self.tok_decode(new)
            for u in until:
                text = text.split(u)[0]
            texts.append(text)
        return texts

    # data parallel under torchrun: the harness splits the documents and gathers the metrics
    def all_gather(self, tensor):
        parts = [torch.zeros_like(tensor.reshape(-1)) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.reshape(-1))
        return torch.cat(parts)

    def gather_object(self, obj, dst=0):
        gathered = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self):
        dist.barrier()


# ----------------------------------------------------------------------------- train.py --lm_eval



def write_hellaswag_local(directory, data_path):
    """A task YAML in directory: the harness's own hellaswag.yaml (its prompt with the activity
    label, its preprocessing, acc_norm by characters) reading the official validation file at
    data_path (prepare_fineweb.py --hellaswag) instead of the Hugging Face dataset."""
    import lm_eval.tasks
    builtin = os.path.join(os.path.dirname(lm_eval.tasks.__file__), "hellaswag", "hellaswag.yaml")
    with open(os.path.join(directory, HELLASWAG_LOCAL + ".yaml"), "w") as f:
        f.write(f"include: {json.dumps(builtin)}\ntask: {HELLASWAG_LOCAL}\ndataset_path: json\n"
                f"dataset_name: null\ntraining_split: null\ndataset_kwargs:\n  data_files:\n"
                f"    validation: {json.dumps(os.path.abspath(data_path))}\n")


def task_manager(tasks, paths):
    """The harness's TaskManager for these tasks: only the local YAMLs in paths when they hold
    every task (indexing the harness's thousands of built-in tasks takes seconds), else all."""
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {', '.join(paths)}" if paths else ""
        raise UsageError(f"--lm_eval: no task {', '.join(unknown)} in lm-eval {lm_eval.__version__}"
                         f"{where} (`lm-eval ls tasks` lists them)")
    return manager


def run_lm_eval(model, cfg, proc):
    """train.py --lm_eval: the harness on model, zero-shot, its tasks' own metrics. Returns (record,
    table): {"lm_eval": {task: {metric: value, "n": examples}}, "lm_eval_avg": the averages over
    the tasks that report acc}, and the harness's table with the averages below it; on ranks
    other than 0, ({}, "")."""
    tasks = [t for t in cfg.lm_eval.split(",") if t]
    paths = [cfg.lm_eval_include] if cfg.lm_eval_include else []
    with tempfile.TemporaryDirectory() as tmp:
        if HELLASWAG_LOCAL in tasks:
            write_hellaswag_local(tmp, cfg.hellaswag_path)
            paths.append(tmp)
        manager = task_manager(tasks, paths)
        lm = HarnessLM(model=model, batch_size=cfg.batch_size, device=proc.device, ctx=proc.ctx)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                      limit=cfg.lm_eval_limit or None, log_samples=False)
    if out is None:  # not rank 0
        return {}, ""
    scores = {}
    for task, metrics in out["results"].items():
        scores[task] = {k.removesuffix(",none"): float(v) if isinstance(v, (int, float)) else v
                        for k, v in metrics.items() if k not in ("alias", "name", "sample_len")}
        if task in out["n-samples"]:
            scores[task]["n"] = out["n-samples"][task]["effective"]
    with_acc = [scores[t] for t in tasks if "acc" in scores.get(t, {})]
    avg = {"acc": sum(s["acc"] for s in with_acc) / max(len(with_acc), 1),
           "acc_norm_else_acc": sum(s.get("acc_norm", s["acc"]) for s in with_acc)
           / max(len(with_acc), 1), "tasks": len(with_acc)}
    table = (lm_eval.utils.make_table(out) + f"average over the {len(with_acc)} tasks with acc: "
             f"acc {100 * avg['acc']:.2f}, acc_norm where reported (else acc) "
             f"{100 * avg['acc_norm_else_acc']:.2f}")
    return {"lm_eval": scores, "lm_eval_avg": avg, "lm_eval_version": lm_eval.__version__}, table


def main(argv=None):
    """The harness's command line with our model registered: python zeroshot.py --model infmoe
    --model_args init_from=out,z_samples=4 --tasks hellaswag --device cpu (any lm-eval option)."""
    if not harness_installed():
        raise UsageError(f"zeroshot.py {LM_EVAL_MISSING}")
    from lm_eval.__main__ import cli_evaluate
    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # UsageError: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
