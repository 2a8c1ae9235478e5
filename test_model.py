"""Test suite: CPU only, `python -m pytest -q test_model.py`. Triton kernels run under
TRITON_INTERPRET=1."""
import dataclasses
import errno
import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
import warnings
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
# tests only: a small random GPT-2 to compare with; the harness zeroshot.py plugs into (its tasks
# module, which tests patch, is otherwise imported only when a test happens to reach it first)
import lm_eval
import lm_eval.tasks
from transformers import GPT2Config, GPT2LMHeadModel

import bench
import compare
import fastpath
import gpu_report
import infra
import kernel
import prepare_fineweb
import sample
import train
import model as model_py  # the module; tests name their GPT instances `model`
from infra import UsageError, expected_mask_value, from_pretrained, load_checkpoint
from fastpath import averaged_topk_mask, fast_inf_ffn, selection_scores
from model import GPT, GPTConfig, InfMoE, inf_ffn
from prepare_fineweb import (EOT, DataError, download_hellaswag, get_tokenizer, load_hellaswag,
                             load_shard, shard_paths, write_shard)
import zeroshot
from zeroshot import collate, hellaswag_eval, render_example, score_endings

FFNS = list(model_py.FFNS)


# ====================================================================== helpers and fixtures

REPO = Path(__file__).resolve().parent


# ---- tiny models, and the inputs of an ∞-MoE FFN

def tiny(ffn, **kw):
    cfg = dict(ffn=ffn, n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97, d_z=8)
    cfg.update(kw)
    return GPTConfig(**cfg)


def tiny_model(ffn="dense", seed=0, **kw):
    """The tiny model every model test uses: 2 layers of width 32, vocabulary 97 unless told."""
    torch.manual_seed(seed)
    return GPT(tiny(ffn, **kw))


def make_inputs(N, d, d_ff, d_z, K, bias, seed=0, dtype=torch.float32, block=1):
    """block: units per block of the mask, so W_z has d_ff / block rows."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0, dt=dtype: (
        (torch.randn(*s, generator=g) * scale).to(dt).requires_grad_())
    return dict(x=r(N, d), W1=r(d_ff, d, scale=d ** -0.5), b1=r(d_ff, scale=0.1) if bias else None,
                W2=r(d, d_ff, scale=d_ff ** -0.5), b2=r(d, scale=0.1) if bias else None,
                W_z=r(d_ff // block, d_z, scale=d_z ** -0.5, dt=torch.float32),
                z=r(K, N, d_z, dt=torch.float32))


def run(fn, inp, top_frac, dy):
    leaves = {k: v for k, v in inp.items() if v is not None and v.requires_grad}
    for v in leaves.values():
        v.grad = None
    y, counts, n_active = fn(*(inp[k] for k in ("x", "W1", "b1", "W2", "b2", "W_z", "z")), top_frac)
    y.backward(dy)
    return y.detach(), counts, n_active, {k: v.grad.clone() for k, v in leaves.items()}


# ---- tiny training runs on a synthetic dataset

def write_llmc_shard(path, tokens):
    """llm.c's shard format, written here independently of prepare_fineweb."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, 1, len(tokens)]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


@pytest.fixture
def shards(tmp_path):
    """A learnable token stream: one random 40-token phrase repeated, in a val and two train
    shards."""
    rng = np.random.default_rng(0)
    phrase = rng.integers(0, 97, 40)
    stream = np.tile(phrase, 400)
    data = tmp_path / "data"
    data.mkdir()
    write_llmc_shard(data / "syn_val_000000.bin", stream[:4000])
    write_llmc_shard(data / "syn_train_000001.bin", stream[:7000])
    write_llmc_shard(data / "syn_train_000002.bin", stream[7:9000])
    return data


def tiny_run(data, out, *extra):
    return [f"--data_dir={data}", f"--out_dir={out}", "--vocab_size=97", "--n_layer=1",
            "--n_head=2", "--n_embd=32", "--block_size=32", "--d_z=8", "--batch_size=4",
            "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3",
            *extra]


def read_log(out, name="log.jsonl"):
    return [json.loads(line) for line in open(Path(out) / name)]


def trained(shards, out, *extra):
    """A 2-step tiny ∞-MoE run into out (checkpoint at step 2); returns the path of its ckpt.pt."""
    train.main(tiny_run(shards, out, "--ffn=inf", "--max_iters=2", "--eval_interval=2", *extra))
    return out / "ckpt.pt"


@pytest.fixture
def no_model(monkeypatch):
    """Bad input must be refused before any model is built."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")
    monkeypatch.setattr(train, "GPT", refuse)
    monkeypatch.setattr(sample, "GPT", refuse)


# ---- a small HellaSwag file

# six examples whose right ending continues a pattern the context shows; the wrong endings are
# the other examples' right endings, so all four are equally familiar and only the context tells
# them apart
FIXTURE = [
    ("the cat sat on the mat. the cat sat on the", "mat."),
    ("one two three four. one two three", "four."),
    ("red green blue. red green", "blue."),
    ("alpha beta gamma delta. alpha beta gamma", "delta."),
    ("I like apples and pears. I like apples and", "pears."),
    ("the sun rises in the east. the sun rises in the", "east."),
]


def write_fixture(path):
    with open(path, "w") as f:
        for i, (ctx, right) in enumerate(FIXTURE):
            wrong = [FIXTURE[(i + k) % len(FIXTURE)][1] for k in (1, 2, 3)]
            label = i % 4
            endings = wrong[:label] + [right] + wrong[label:]
            f.write(json.dumps({"ctx": ctx, "endings": endings, "label": label}) + "\n")


# ---- a small random GPT-2 of transformers

SAMPLE_VAL = REPO / "data" / "sample" / "sample_val_000000.bin"


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A small random transformers GPT-2 (GPT-2's vocabulary and gelu_new), saved as the Hub stores
    it. Weights of std 0.1, not 0.02: pre-activations of order 1, where exact GELU and gelu_new
    differ (~1e-3)."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                    initializer_range=0.1))
    hf.eval()
    with torch.no_grad():  # non-zero biases and norms, so a mix-up of any of them shows
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(path)
    return hf, path


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


# ---- a full disk, Ctrl-C in the middle of a write

def failing_writes(monkeypatch, nth, error):
    """The nth temporary file written through prepare_fineweb.replacing (shards, manifests,
    checkpoints) raises error at its first write: a full disk, or Ctrl-C there."""
    real, opened = open, [0]

    class Failing:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise error

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, *args, **kwargs):
        f = real(path, *args, **kwargs)
        if not str(path).endswith(".tmp"):
            return f
        opened[0] += 1
        return Failing(f) if opened[0] == nth else f

    monkeypatch.setattr(prepare_fineweb, "open", fake_open, raising=False)


def disk_full():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ====================================================================== model.py

# ---- whole model

@pytest.mark.parametrize("ffn", FFNS)
def test_forward_backward_and_initial_loss(ffn):
    model = tiny_model(ffn)
    idx, targets = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 16, 97)
    assert abs(loss.item() - math.log(97)) < 0.1   # near-uniform predictions at init
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"
    logits, loss = model(idx)
    assert logits.shape == (4, 1, 97) and loss is None


@pytest.mark.parametrize("ffn", FFNS)
def test_causality(ffn):
    model = tiny_model(ffn).eval()
    idx = torch.randint(0, 97, (2, 16))
    t = 9
    idx2 = idx.clone()
    idx2[:, t + 1:] = torch.randint(0, 97, (2, 16 - t - 1))
    torch.manual_seed(1)  # same ∞-MoE noise for both passes
    a, _ = model(idx, idx)
    torch.manual_seed(1)
    b, _ = model(idx2, idx2)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="ffn='moe'"):
        GPTConfig(ffn="moe")
    with pytest.raises(ValueError, match="top_frac"):
        GPTConfig(ffn="inf", top_frac=1.5)
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=100, n_head=12)


# ---- the FFN registry

# Recorded with the model.py of commit 4f43f7f (before the registry), by the same computation as
# below: the default FFNs must stay bit-identical (same parameter init order and values, same
# noise draws).
# ffn: (loss, logits[1, -1, :3], sum |grad W1| of layer 0, sum of all parameters)
BEFORE_REGISTRY = {
    "dense": (4.5826945304870605,
              [0.013887088745832443, -0.05675721541047096, 0.07699025422334671],
              12.741249084472656, 163.48829070851207),
    "switch": (4.60293436050415,
               [-0.04560556635260582, -0.05754594877362251, -0.0173189677298069],
               3.501310348510742, 163.18279123678803),
    "top2": (4.604064464569092,
             [-0.042648881673812866, -0.05057494342327118, -0.009007296524941921],
             9.218091011047363, 163.18279123678803),
    "inf": (4.6025590896606445,
            [-0.006124934647232294, -0.013159485533833504, 0.12845948338508606],
            13.444576263427734, 150.97548807039857),
}


@pytest.mark.parametrize("ffn", list(BEFORE_REGISTRY))
def test_default_ffns_unchanged_by_the_registry(ffn):
    net = tiny_model(ffn)
    idx = torch.arange(24).view(2, 12) * 7 % 97
    torch.manual_seed(1)
    logits, loss = net(idx, idx.roll(-1, 1))
    loss.backward()
    W1 = net.transformer.h[0].mlp.W1
    grad = (W1.weight.grad if isinstance(W1, nn.Linear) else W1.grad).abs().sum().item()
    got = (loss.item(), logits[1, -1, :3].tolist(), grad,
           sum(p.sum().item() for p in net.parameters()))
    want = BEFORE_REGISTRY[ffn]
    for a, b in zip(got, want):  # tolerances only for other CPUs' summation orders
        torch.testing.assert_close(torch.tensor(a, dtype=torch.float64),
                                   torch.tensor(b, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_old_router_keys_load():
    """Checkpoints from before the router module (router.weight / router.bias) load into
    router.net.0."""
    old = tiny_model("inf", seed=1)
    sd = {k.replace("router.net.0.", "router."): v for k, v in old.state_dict().items()}
    assert "transformer.h.0.mlp.router.weight" in sd
    new = tiny_model("inf", seed=2)
    new.load_state_dict(sd)
    for a, b in zip(old.parameters(), new.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ffn", FFNS)
def test_residual_projections_found_by_marker(ffn):
    net = tiny_model(ffn, n_layer=4)
    marked = {n for n, p in net.named_parameters() if getattr(p, "residual_proj", False)}
    assert marked == {f"transformer.h.{i}.{m}" for i in range(4)
                      for m in ("attn.c_proj.weight",
                                "mlp.W2" if ffn in ("switch", "top2") else "mlp.W2.weight")}
    for name, p in net.named_parameters():  # GPT-2: std 0.02 / sqrt(2 n_layer) = 0.0071 for those
        if name in marked:
            assert abs(p.std().item() / (0.02 / math.sqrt(8)) - 1) < 0.15, name


def test_aux_losses_are_summed_from_whichever_layers_have_them():
    idx = torch.randint(0, 97, (2, 16))
    for ffn in ("switch", "inf"):
        net = tiny_model(ffn)
        torch.manual_seed(1)
        logits, loss = net(idx, idx)
        ce = F.cross_entropy(logits.flatten(0, 1), idx.flatten())
        aux = [b.mlp.aux_loss for b in net.transformer.h
               if getattr(b.mlp, "aux_loss", None) is not None]
        assert len(aux) == (2 if ffn == "switch" else 0)
        torch.testing.assert_close(loss, ce + sum(aux))
        assert (net.aux_loss is None) == (ffn == "inf")


# ---- ∞-MoE

def router_by_hand(layer, x):
    """mu, log sigma^2 of the paper's linear router: one matrix, the second half bounded by
    6 tanh(./6)."""
    lin = layer.router.net[0]
    out = x @ lin.weight.t() + (0 if lin.bias is None else lin.bias)
    d_z = layer.W_z.shape[1]
    return out[:, :d_z], 6.0 * torch.tanh(out[:, d_z:] / 6.0)


def naive_inf_moe(layer, x, eps):
    """K separate expert passes f(x, z_k), averaged; the top-N% mask built by index
    (arXiv 2601.17680 Sec. 3.2: z_k = mu + sigma eps_k, mask_k = TopN%(W_z z_k),
    W2 (GELU(W1 x) ⊙ mask_k))."""
    d_ff = layer.W_z.shape[0]
    n_keep = round(layer.config.top_frac * d_ff)
    mu, logvar = router_by_hand(layer, x)
    ys = []
    for k in range(eps.shape[0]):
        z = mu + torch.exp(0.5 * logvar) * eps[k]
        scores = z @ layer.W_z.t()
        idx = scores.topk(n_keep, dim=-1).indices
        mask = torch.zeros_like(scores).scatter(1, idx, scores.gather(1, idx))
        ys.append(layer.W2(F.gelu(layer.W1(x)) * mask))
    return sum(ys) / len(ys)


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_inf_moe_matches_naive_k_pass_reference(K, bias):
    layer = tiny_model("inf", seed=K, bias=bias).transformer.h[0].mlp
    x = torch.randn(2, 5, 32)
    eps = torch.randn(K, 2, 5, 8)
    y = layer(x, eps=eps)
    ref = naive_inf_moe(layer, x.view(10, 32), eps.view(K, 10, 8)).view(2, 5, 32)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_gradients_reach_router_mu_logvar_wz_w1_w2():
    layer = tiny_model("inf").transformer.h[0].mlp
    layer(torch.randn(3, 4, 32)).square().sum().backward()
    d_z = 8
    g = layer.router.net[0].weight.grad
    assert g[:d_z].abs().sum() > 0, "mu head got no gradient"
    assert g[d_z:].abs().sum() > 0, "log sigma^2 head got no gradient"
    for p in (layer.W_z, layer.W1.weight, layer.W2.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_deterministic_mode_and_k_at_inference():
    model = tiny_model("inf").eval()
    layer = model.transformer.h[0].mlp
    x = torch.randn(2, 6, 32)
    model.set_sampling(z_deterministic=True)
    y1, y2 = layer(x), layer(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(y1, layer(x, eps=torch.zeros(1, 2, 6, 8)))
    model.set_sampling(z_samples=4, z_deterministic=False)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    torch.testing.assert_close(y, layer(x, eps=torch.randn(4, 2, 6, 8)))  # K = 4 draws of noise
    with pytest.raises(ValueError, match="z_samples"):
        model.set_sampling(z_samples=0)
    with pytest.raises(ValueError, match=r"expected \(K, 2, 6, 8\)"):
        layer(x, eps=torch.randn(2, 12, 8))  # right size, wrong shape


def test_logvar_is_bounded():
    layer = tiny_model("inf").transformer.h[0].mlp
    with torch.no_grad():
        layer.router.net[0].weight.mul_(1e4)  # absurd router outputs
    layer(torch.randn(4, 32))
    sigma = layer.stats["sigma"]
    assert math.exp(-3) <= sigma.item() <= math.exp(3) and torch.isfinite(sigma)


def test_no_float_k_by_tokens_by_dff_tensor_is_kept_for_backward():
    # the K samples' masks are averaged before the FFN: backward keeps one (N, d_ff) float mask and
    # the K keep decisions as bools (one byte each), never K float masks
    layer = tiny_model("inf", n_embd=16, n_head=2).transformer.h[0].mlp
    K, N, d_ff = 3, 40, 128
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(torch.randn(N, 16), eps=torch.randn(K, N, 8)).sum().backward()
    big = [(s, dt) for s, dt in saved if math.prod(s) >= K * N * d_ff]
    assert big == [((K, N, d_ff), torch.bool)], saved


def test_inf_init_matches_dense_activation_scale():
    torch.manual_seed(0)
    x = F.layer_norm(torch.randn(4096, 256), (256,))
    cfg = dict(n_embd=256, n_head=4)
    dense = GPT(tiny("dense", **cfg)).transformer.h[0].mlp
    inf = GPT(tiny("inf", d_z=128, **cfg)).transformer.h[0].mlp
    rms = lambda t: t.pow(2).mean().sqrt().item()
    ratio_k1 = rms(inf(x, eps=torch.randn(1, 4096, 128))) / rms(dense(x))
    ratio_k2 = rms(inf(x, eps=torch.randn(2, 4096, 128))) / rms(dense(x))
    assert 0.7 < ratio_k1 < 1.4, ratio_k1
    assert 0.5 < ratio_k2 < 1.4, ratio_k2


def test_routing_stats_entropy_against_hand_computation():
    layer = tiny_model("inf").transformer.h[0].mlp
    x, eps = torch.randn(10, 32), torch.randn(2, 10, 8)
    layer(x, eps=eps)
    # recompute q by hand from the selected index sets
    mu, logvar = router_by_hand(layer, x)
    sigma = torch.exp(0.5 * logvar)
    hits = torch.zeros(256)
    for k in range(2):
        idx = ((mu + sigma * eps[k]) @ layer.W_z.t()).topk(64, dim=-1).indices
        hits += torch.bincount(idx.flatten(), minlength=256).float()
    with torch.no_grad():  # the path's own counts of the same selections
        _, counts, _ = fast_inf_ffn(x, layer.W1.weight, layer.W1.bias, layer.W2.weight,
                                    layer.W2.bias, layer.W_z, mu + sigma * eps, 0.25)
    assert torch.equal(counts, hits)
    q = hits / hits.sum()
    H = -(q[q > 0] * q[q > 0].log()).sum() / math.log(256)
    assert abs(layer.stats["entropy"].item() - H.item()) < 1e-5
    assert abs(layer.stats["sigma"].item() - sigma.mean().item()) < 1e-6


@pytest.mark.parametrize("ffn, kw", [("inf", {}), ("inf", {"router_mix": 2}), ("inf_deep", {})])
def test_evaluation_noise_follows_the_row_not_the_batch(ffn, kw):
    """With seq_ids a row's logits are the same alone, in any batch and padded to any length (its
    noise is keyed by its id and positions), the RNG is untouched, and eval_seed changes them."""
    model = tiny_model(ffn, **kw).eval()
    model.set_sampling(z_samples=3, eval_seed=11)
    idx, ids = torch.randint(0, 97, (3, 12)), torch.tensor([7, -2, 2 ** 50])
    rng = torch.get_rng_state()
    batched = model(idx, idx, seq_ids=ids)[0]
    assert torch.equal(torch.get_rng_state(), rng)
    for b in range(3):
        alone = model(idx[b:b + 1, :9], idx[b:b + 1, :9], seq_ids=ids[b:b + 1])[0]
        torch.testing.assert_close(alone[0], batched[b, :9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(idx[[2, 0]], idx[[2, 0]], seq_ids=ids[[2, 0]])[0],
                               batched[[2, 0]], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(idx, idx, seq_ids=ids + 1)[0], batched, atol=1e-3)
    model.set_sampling(eval_seed=12)
    assert not torch.allclose(model(idx, idx, seq_ids=ids)[0], batched, atol=1e-3)
    # the noise a layer is handed is the keyed normal, K samples of d_z
    eps = model.eval_noise(1, ids, 12)
    assert torch.equal(eps, infra.keyed_normal(12, ids, 12, 1, 3, 8))
    model.set_sampling(z_deterministic=True)  # z = mu: no noise to key
    assert model.eval_noise(1, ids, 12) is None
    with pytest.raises(ValueError, match=r"seq_ids has shape \(2,\); expected \(3,\)"):
        model(idx, seq_ids=ids[:2])


def test_block_mask_options_are_checked():
    with pytest.raises(ValueError, match=r"^GPTConfig: mask_block=48 does not divide d_ff=256$"):
        tiny("inf", mask_block=48)
    for kw, words in [(dict(ffn="inf_deep"), "is for ffn=inf"),
                      (dict(ffn="inf", gate="pre"), "needs gate=post"),
                      (dict(ffn="inf", use_kernel="on"), "runs the block path; the Triton kernel")]:
        with pytest.raises(ValueError, match=f"^GPTConfig: mask_block=16 {re.escape(words)}"):
            tiny(mask_block=16, **kw)
    with pytest.raises(ValueError, match="mask_block=0: must be >= 1"):
        tiny("inf", mask_block=0)
    assert tiny("inf", mask_block=256).n_keep == 256  # one block: every token keeps it
    assert tiny("inf", mask_block=64).n_keep == 64 and tiny("inf").n_keep == 64
    assert tiny("dense", mask_block=48).d_ff == 128  # not an ∞-MoE option: ignored elsewhere


@pytest.mark.parametrize("K,deterministic", [(1, False), (2, False), (3, False), (1, True)])
def test_block_mask_layer_is_k_naive_block_experts(K, deterministic):
    """mask_block = 16 over d_ff = 256: 16 blocks, each sample keeps the 4 highest-scoring blocks
    of W_z z_k at their values on all 16 of their units; z = mu for z_deterministic."""
    model = tiny_model("inf", seed=K, mask_block=16)
    model.set_sampling(z_samples=K, z_deterministic=deterministic)
    layer = model.transformer.h[0].mlp
    assert layer.W_z.shape == (16, 8)
    x = torch.randn(12, 32)
    eps = torch.zeros(1, 12, 8) if deterministic else torch.randn(K, 12, 8)
    mu, logvar = router_by_hand(layer, x)
    ref = 0
    for e in eps:
        s = (mu + torch.exp(0.5 * logvar) * e) @ layer.W_z.t()
        top = s.topk(4, dim=-1).indices
        mask = torch.zeros(12, 256)
        for t in range(12):
            for blk in top[t].tolist():
                mask[t, 16 * blk:16 * blk + 16] = s[t, blk]
        ref = ref + layer.W2(F.gelu(layer.W1(x)) * mask) / len(eps)
    torch.manual_seed(0)
    y = layer(x) if deterministic else layer(x, eps=eps)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_block_load_is_the_busiest_block_against_the_mean_per_layer():
    model = tiny_model("inf", mask_block=32)  # 8 blocks, 2 kept per sample
    model(torch.randint(0, 97, (2, 16)))
    stats = model.routing_stats()
    per_layer = [block.mlp.stats for block in model.transformer.h]
    assert stats["block_load"].shape == (2,) and stats["entropy"].dim() == 0  # not averaged
    layer = model.transformer.h[0].mlp
    x, eps = torch.randn(10, 32), torch.randn(2, 10, 8)
    layer(x, eps=eps)
    mu, logvar = router_by_hand(layer, x)
    hits = torch.zeros(8)
    for k in range(2):
        idx = ((mu + torch.exp(0.5 * logvar) * eps[k]) @ layer.W_z.t()).topk(2, dim=-1).indices
        hits += torch.bincount(idx.flatten(), minlength=8).float()
    # 10 tokens x 2 samples x 2 blocks = 40 selections over 8 blocks: a mean of 5
    assert layer.stats["block_load"].item() == pytest.approx(hits.max().item() / 5)
    assert torch.equal(stats["block_load"], torch.stack([s["block_load"] for s in per_layer]))
    assert "block_load" not in tiny_model("inf").transformer.h[0].mlp.stats  # b = 1: as before


# ---- the ∞-MoE equations (inf_ffn)

def index_inf_ffn(x, W1, b1, W2, b2, W_z, z, top_frac):
    """model.inf_ffn's definition computed another way: K separate expert passes f(x, z_k) =
    W2 (GELU(W1 x + b1) ⊙ mask_k) + b2, averaged, with mask_k built by index: the n_keep largest
    scores of each row scattered at their own values (random scores: no ties); with fewer rows
    in W_z than units, a block mask: unit j takes the value of block j // b. Returns y, counts
    and n_active like inf_ffn."""
    n_keep = max(1, round(top_frac * W_z.shape[0]))
    block_of = torch.arange(W1.shape[0]) // (W1.shape[0] // W_z.shape[0])
    ys, masks, counts = [], [], 0
    for k in range(z.shape[0]):
        m = z[k] @ W_z.t()
        idx = m.detach().sort(dim=-1, descending=True).indices[:, :n_keep]
        masks.append(torch.zeros_like(m).scatter(1, idx, m.gather(1, idx)))
        counts = counts + torch.zeros(m.shape[1]).index_add_(0, idx.flatten(),
                                                             torch.ones(idx.numel()))
        unit_mask = masks[-1][:, block_of].to(x.dtype)
        ys.append(F.linear(F.gelu(F.linear(x, W1, b1)) * unit_mask, W2, b2))
    return sum(ys) / len(ys), counts, (sum(masks) != 0).sum().float()


@pytest.mark.parametrize("K,bias,top_frac,block", [(1, True, 0.25, 1), (3, False, 0.1, 1),
                                                   (2, True, 1.0, 1), (2, True, 0.25, 3),
                                                   (3, False, 0.5, 12)])
def test_inf_ffn_states_the_k_pass_definition(K, bias, top_frac, block):
    # the oracle of every fast path, itself against the definition computed by index
    inp = make_inputs(N=23, d=10, d_ff=36, d_z=5, K=K, bias=bias, seed=20 + K, block=block)
    dy = torch.randn(23, 10, generator=torch.Generator().manual_seed(4))
    (y, counts, n_active, grads), (y0, counts0, n_active0, grads0) = (
        run(inf_ffn, inp, top_frac, dy), run(index_inf_ffn, inp, top_frac, dy))
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    assert torch.equal(counts, counts0) and n_active.item() == n_active0.item()
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


# ---- switch / top-2

def moe_case(ffn, **kw):
    """4 tokens whose router logits are set by hand: x[:, :4] = logits, W_r picks those columns."""
    layer = tiny_model(ffn, n_embd=16, n_head=2, **kw).transformer.h[0].mlp
    with torch.no_grad():
        layer.W_r.weight.copy_(torch.cat([torch.eye(4), torch.zeros(4, 12)], 1))
    x = torch.randn(4, 16)
    x[:, :4] = torch.tensor([[2.0, 0.5, 0, -1], [1.0, 0.2, 0.1, 0], [0, 3.0, 1.0, 0.5],
                             [0, 0.3, 2.0, 1.0]])
    return layer, x


def expert(layer, e, x):
    h = F.gelu(x @ layer.W1[e] + layer.b1[e])
    return h @ layer.W2[e] + layer.b2[e]


def softmax_row(row):
    ex = [math.exp(v) for v in row]
    return [v / sum(ex) for v in ex]


def test_switch_routing_and_balancing_loss_by_hand():
    layer, x = moe_case("switch")
    y = layer(x)
    logits = x[:, :4].tolist()
    p = [softmax_row(r) for r in logits]
    chosen = [0, 0, 1, 2]
    for t in range(4):
        torch.testing.assert_close(y[t], p[t][chosen[t]] * expert(layer, chosen[t], x[t]),
                                   rtol=1e-5, atol=1e-6)
    f = [0.5, 0.25, 0.25, 0.0]
    P = [sum(p[t][i] for t in range(4)) / 4 for i in range(4)]
    lb = 0.01 * 4 * sum(fi * Pi for fi, Pi in zip(f, P))
    zl = 0.001 * sum(math.log(sum(math.exp(v) for v in r)) ** 2 for r in logits) / 4
    assert abs(layer.stats["lb_loss"].item() - lb) < 1e-6
    assert abs(layer.aux_loss.item() - (lb + zl)) < 1e-6
    torch.testing.assert_close(layer.stats["load"], torch.tensor(f))


def test_top2_routing_and_balancing_loss_by_hand():
    layer, x = moe_case("top2")
    y = layer(x)
    p = [softmax_row(r) for r in x[:, :4].tolist()]
    pairs = [(0, 1), (0, 1), (1, 2), (2, 3)]
    for t, (a, b) in enumerate(pairs):
        wa, wb = p[t][a] / (p[t][a] + p[t][b]), p[t][b] / (p[t][a] + p[t][b])
        ref = wa * expert(layer, a, x[t]) + wb * expert(layer, b, x[t])
        torch.testing.assert_close(y[t], ref, rtol=1e-5, atol=1e-6)
    f = [2 / 8, 3 / 8, 2 / 8, 1 / 8]
    P = [sum(p[t][i] for t in range(4)) / 4 for i in range(4)]
    assert abs(layer.stats["lb_loss"].item() - 0.01 * 4 * sum(a * b for a, b in zip(f, P))) < 1e-6


def test_moe_drops_no_token():
    """All tokens routed to one expert each still get their full expert output: no capacity limit
    (a capacity factor of 1.25 would keep 1.25 * 4 / 4 = 1 of the 4 tokens for top-1)."""
    layer, x = moe_case("switch")
    x[:, :4] = torch.tensor([5.0, 0, 0, 0])
    y = layer(x)
    p0 = softmax_row([5.0, 0, 0, 0])[0]
    for t in range(4):
        torch.testing.assert_close(y[t], p0 * expert(layer, 0, x[t]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.stats["load"], torch.tensor([1.0, 0, 0, 0]))


@pytest.mark.parametrize("ffn", ["switch", "top2"])
def test_moe_bias_gradients_are_exact_and_the_same_every_time(ffn):
    """db1, db2 are each expert's sum over its rows (by hand, in float64), and bit for bit the same
    on every backward: an indexed bias would sum an expert's rows in thread order on the CPU."""
    torch.manual_seed(0)
    layer = tiny_model(ffn, n_embd=64, n_head=2).transformer.h[0].mlp
    with torch.no_grad():
        for b in (layer.b1, layer.b2):
            b.normal_(0, 0.1)
    x, dy = torch.randn(1024, 64), torch.randn(1024, 64)
    layer(x).backward(dy)
    W1, b1, W2 = (t.detach().double() for t in (layer.W1, layer.b1, layer.W2))
    p = F.linear(x, layer.W_r.weight).softmax(-1).detach()
    top_p, top_e = p.topk(layer.experts_per_token(), dim=-1)
    if layer.renormalise:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    db1, db2 = torch.zeros_like(b1), torch.zeros_like(layer.b2, dtype=torch.float64)
    for w, e in zip(top_p.t(), top_e.t()):  # each token's j-th expert, all tokens at once
        pre = (torch.einsum("nd,ndf->nf", x.double(), W1[e]) + b1[e]).requires_grad_()
        F.gelu(pre).sum().backward()  # pre.grad = GELU'(pre)
        g = w.double()[:, None] * dy.double()
        db2.index_add_(0, e, g)
        db1.index_add_(0, e, torch.einsum("nd,nfd->nf", g, W2[e]) * pre.grad)
    torch.testing.assert_close(layer.b1.grad.double(), db1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.b2.grad.double(), db2, rtol=1e-4, atol=1e-5)
    seen = set()
    for _ in range(25):
        layer.zero_grad()
        layer(x).backward(dy)
        seen.add(layer.b1.grad.numpy().tobytes() + layer.b2.grad.numpy().tobytes())
    assert len(seen) == 1

# ---- the variant flags: router depth and mixture, gate, inf_deep, aux-loss-free balancing

def index_mask(scores, r):
    """TopN% built by index: the round(r * d_ff) largest scores of each row at their values, the
    rest 0."""
    idx = scores.topk(max(1, round(r * scores.shape[-1])), dim=-1).indices
    return torch.zeros_like(scores).scatter(1, idx, scores.gather(1, idx))


def naive_expert(x, z, hidden, W_zs, rs, out, pre):
    """One expert f(x, z): each hidden layer masked by its own W_z head, then the output layer.
    A W_z of fewer rows than units scores blocks: each block's value on its units."""
    h = x
    for lin, W_z, r in zip(hidden, W_zs, rs):
        a, mask = lin(h), index_mask(z @ W_z.t(), r)
        mask = mask.repeat_interleave(lin.out_features // W_z.shape[0], dim=-1)
        h = F.gelu(a * mask) if pre else F.gelu(a) * mask
    return out(h)


@pytest.mark.parametrize("flags", [dict(ffn="inf", router_depth=3, router_width=16),
                                   dict(ffn="inf", router_depth=2, mask_block=16),
                                   dict(ffn="inf", gate="pre"),
                                   dict(ffn="inf_deep", top_frac2=0.5),
                                   dict(ffn="inf_deep", gate="pre")])
def test_variant_matches_naive_k_pass(flags):
    """Deep router, pre-activation gate, deep ∞-MoE FFN: the layer equals K separate naive
    experts."""
    layer = tiny_model(**flags).transformer.h[0].mlp
    x, eps = torch.randn(10, 32), torch.randn(3, 10, 8)
    lins = [m for m in layer.router.net if isinstance(m, nn.Linear)]
    assert len(lins) == flags.get("router_depth", 1)
    h = x
    for lin in lins[:-1]:  # the router MLP by hand: Linear, GELU, ..., Linear
        h = F.gelu(h @ lin.weight.t() + lin.bias)
    out = h @ lins[-1].weight.t() + lins[-1].bias
    mu, sigma = out[:, :8], torch.exp(0.5 * 6 * torch.tanh(out[:, 8:] / 6))
    deep, pre = flags["ffn"] == "inf_deep", flags.get("gate") == "pre"
    hidden, W_zs = (([layer.W1, layer.W_mid], [layer.W_z, layer.W_z2]) if deep
                    else ([layer.W1], [layer.W_z]))
    rs = [0.25, flags.get("top_frac2", 0.25)]
    ref = sum(naive_expert(x, mu + sigma * eps[k], hidden, W_zs, rs, layer.W2, pre)
              for k in range(3)) / 3
    torch.testing.assert_close(layer(x, eps=eps), ref, rtol=1e-5, atol=1e-6)
    n_units = sum(W_z.shape[0] for W_z in W_zs)
    assert abs(layer.stats["active"].item() * 10 * n_units - sum(
        (torch.stack([index_mask((mu + sigma * eps[k]) @ W_z.t(), r)
                      for k in range(3)]) != 0).any(0).sum().item()
        for W_z, r in zip(W_zs, rs))) < 0.5  # the non-zero share of every layer's union of masks


@pytest.mark.parametrize("block", [1, 32])
def test_mixture_router_matches_weighted_components(block):
    """C = 3 Gaussians: y = sum_c pi_c (1/K) sum_k f(x, mu_c + sigma_c eps_k), pi = softmax of the
    router's first C outputs; pi gets a gradient. Also with a block mask."""
    C, K = 3, 2
    layer = tiny_model("inf", router_mix=C, mask_block=block).transformer.h[0].mlp
    x, eps = torch.randn(10, 32), torch.randn(K, 10, 8)
    lin = layer.router.net[0]
    out = x @ lin.weight.t() + lin.bias  # [C mixture logits | mu_0, raw_0 | mu_1, raw_1 | ...]
    pi = out[:, :C].softmax(-1)
    ref = 0
    for c in range(C):
        o = out[:, C + 16 * c: C + 16 * (c + 1)]
        mu, sigma = o[:, :8], torch.exp(0.5 * 6 * torch.tanh(o[:, 8:] / 6))
        for k in range(K):
            ref = ref + pi[:, c:c + 1] * naive_expert(x, mu + sigma * eps[k], [layer.W1],
                                                      [layer.W_z], [0.25], layer.W2, False) / K
    y = layer(x, eps=eps)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    q = pi.mean(0)
    assert abs(layer.stats["mix_entropy"].item()
               - (-(q * q.log()).sum() / math.log(C)).item()) < 1e-6
    (y * torch.randn_like(y)).sum().backward()
    # the weights learn
    assert lin.weight.grad[:C].abs().sum() > 0 and lin.bias.grad[:C].abs().sum() > 0


@pytest.mark.parametrize("ffn", ["switch", "top2"])
def test_aux_loss_free_balancing_by_hand(ffn):
    """DeepSeek-V3: experts chosen by top-k of p + b, weighted by p; after a step
    b_i += gamma sign(1/E - f_i)."""
    layer, x = moe_case(ffn, balance="bias", balance_rate=0.1)
    b = [-1.0, 0.0, 0.0, 0.5]
    with torch.no_grad():
        layer.balance_bias.copy_(torch.tensor(b))
    y = layer(x)
    logits = x[:, :4].tolist()
    k = 1 if ffn == "switch" else 2
    counts = [0] * 4
    for t in range(4):
        p = softmax_row(logits[t])
        chosen = sorted(range(4), key=lambda e: -(p[e] + b[e]))[:k]
        w = [p[e] / (sum(p[c] for c in chosen) if k == 2 else 1.0) for e in chosen]
        torch.testing.assert_close(y[t],
                                   sum(wi * expert(layer, e, x[t]) for wi, e in zip(w, chosen)),
                                   rtol=1e-5, atol=1e-6)
        for e in chosen:
            counts[e] += 1
    # the bias moved tokens: without it expert 3 gets none (switch) or one (top2)
    assert counts[3] >= 3
    f = [n / (4 * k) for n in counts]
    torch.testing.assert_close(layer.stats["load"], torch.tensor(f))
    zl = 0.001 * sum(math.log(sum(math.exp(v) for v in r)) ** 2 for r in logits) / 4
    assert abs(layer.aux_loss.item() - zl) < 1e-6  # no balancing loss in the gradient
    layer.after_step()
    sign = lambda v: (v > 0) - (v < 0)
    torch.testing.assert_close(layer.balance_bias,
                               torch.tensor([bi + 0.1 * sign(0.25 - fi) for bi, fi in zip(b, f)]))
    assert ("balance_bias" in layer.state_dict()
            and not any(p is layer.balance_bias for p in layer.parameters()))


# ---- parameter counts

def formula_params(ffn, L, d, V=50257, T=1024, E=4, d_z=128, K=2, r=0.25, mult=0, depth=1, C=1,
                   b=1):
    """Independent count: embeddings + per layer (2 LN, attention, FFN) + final LN; biases on.
    mult: hidden width / d (0: the FFN's default); depth, C: the ∞-MoE router's layers (width d),
    components; b: units per block of the ∞-MoE mask."""
    attn = d * 3 * d + 3 * d + d * d + d
    ln = 2 * d
    shared = V * d + T * d + L * (2 * ln + attn) + ln
    out = 2 * d_z if C == 1 else C * (2 * d_z + 1)  # mu, log sigma^2 (and a weight) per component
    router = (depth - 1) * (d * d + d) + (d + 1) * out
    if ffn == "dense":
        n = (mult or 4) * d
        ffn_total = ffn_active = 2 * d * n + n + d
    elif ffn in ("switch", "top2"):
        h, k = (mult or 8) * d // E, 1 if ffn == "switch" else 2
        one = 2 * d * h + h + d
        ffn_total, ffn_active = d * E + E * one, d * E + k * one
    elif ffn == "inf":
        d_ff = (mult or 8) * d
        fixed = router + d_ff // b * d_z + d                  # router, W_z, b2
        units = min(d_ff, K * C * round(r * d_ff / b) * b)  # K * C masks of round(r d_ff) units
        ffn_total, ffn_active = fixed + d_ff * (2 * d + 1), fixed + units * (2 * d + 1)
    else:  # inf_deep: x -(W1)-> n -(W_mid)-> n -(W2)-> d, a W_z per hidden layer
        n = (mult or 4) * d
        fixed = router + 2 * n * d_z + d
        u = min(n, K * C * round(r * n))                      # both layers keep u units
        ffn_total = fixed + n * (d + 1) + n * n + n + n * d
        ffn_active = fixed + u * (d + 1) + u * u + u + u * d
    return shared + L * ffn_total, shared + L * ffn_active


@pytest.mark.parametrize("ffn", FFNS)
@pytest.mark.parametrize("size", [(12, 12, 768), (24, 16, 1024)])
def test_param_counts_match_formula(ffn, size):
    L, H, d = size
    with torch.device("meta"):
        model = GPT(GPTConfig(ffn=ffn, n_layer=L, n_head=H, n_embd=d))
    assert model.num_params() == formula_params(ffn, L, d)
    if ffn == "dense" and d == 768:
        assert model.num_params()[0] == 124_439_808  # GPT-2 Small, the famous "124M"


@pytest.mark.parametrize("ffn, kw, formula", [
    ("dense", dict(d_ff_mult=2), dict(mult=2)),
    ("top2", dict(d_ff_mult=4), dict(mult=4)),
    ("inf", dict(router_depth=2, router_mix=3), dict(depth=2, C=3)),
    ("inf", dict(router_mix=2, d_ff_mult=16), dict(C=2, mult=16)),
    ("inf", dict(mask_block=256), dict(b=256)),       # 24 blocks, 6 kept per sample
    ("inf", dict(mask_block=2048, z_samples=3), dict(b=2048, K=3)),  # 3 blocks, 1 per sample
    ("inf_deep", dict(d_ff_mult=2), dict(mult=2))])
def test_param_counts_of_the_flags(ffn, kw, formula):
    with torch.device("meta"):
        model = GPT(GPTConfig(ffn=ffn, n_layer=12, n_head=12, n_embd=768, **kw))
    assert model.num_params() == formula_params(ffn, 12, 768, **formula)


def test_an_ffn_must_state_its_active_params(monkeypatch):
    class Gated(nn.Module):  # a forker's new FFN that forgot active_params
        d_ff_mult = 4

        def __init__(self, config):
            super().__init__()
            self.W = nn.Linear(config.n_embd, config.n_embd)

        def forward(self, x):
            return self.W(x)

    monkeypatch.setitem(model_py.FFNS, "gated", Gated)
    with pytest.raises(TypeError, match="Gated.*active_params"):
        tiny_model("gated")
    monkeypatch.setattr(Gated, "active_params", lambda self: 7, raising=False)
    net = tiny_model("gated")
    total, active = net.num_params()
    assert total - active == 2 * (32 * 32 + 32 - 7)  # two layers, each its own statement


# ---- upcycling

def test_upcycled_switch_is_dense_times_router_probability(hf_gpt2, tmp_path):
    """Every expert copies GPT-2's MLP, so switch = transformers' GPT-2 with each MLP output scaled
    by the top router probability of its own layer (computed here from the router weights
    alone)."""
    hf, path = hf_gpt2
    model = from_pretrained(str(path), {"ffn": "switch"}).eval()
    assert model.config.d_ff_mult == 16 and model.config.n_expert == 4  # 4 experts of GPT-2's 4d
    with torch.no_grad():
        for block in model.transformer.h:  # a router that prefers some experts, so p_max varies
            block.mlp.W_r.weight.normal_(0, 1.0)
    hooks = [hf.transformer.h[i].mlp.register_forward_hook(
        lambda mod, inp, out, W_r=block.mlp.W_r.weight:
            out * (inp[0] @ W_r.t()).softmax(-1).amax(-1, True))
        for i, block in enumerate(model.transformer.h)]
    idx = torch.randint(0, 50257, (2, 32))
    try:
        expected = hf_logits(hf, idx)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        ours, _ = model(idx, idx)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, hf_logits(hf, idx), atol=1e-3)  # the scaling is visible
    with pytest.raises(ValueError, match="d_ff_mult must be 16"):
        from_pretrained(str(path), {"ffn": "switch", "d_ff_mult": 8})
    weights = dataclasses.asdict(model.config), model.state_dict()
    # upcycling is from dense
    with pytest.raises(ValueError, match="--ffn=inf differs from its ffn=switch"):
        from_pretrained("s.pt", {"ffn": "inf"}, weights=weights)


@pytest.mark.parametrize("top_frac", [0.1, 0.25, 0.5])
def test_expected_mask_value_against_monte_carlo(top_frac):
    torch.manual_seed(0)
    d_ff, d_z = 1024, 128
    W_z = torch.randn(d_ff, d_z) / math.sqrt(d_z)  # InfMoE's initialisation
    # z ~ N(0, I): mu = 0, sigma = 1
    M, _, _ = averaged_topk_mask(torch.randn(2, 2000, d_z), W_z, top_frac)
    assert M.mean().item() == pytest.approx(expected_mask_value(top_frac), rel=0.02)
    with pytest.raises(ValueError, match="top_frac"):
        expected_mask_value(1.0)


@pytest.mark.parametrize("n", [4, 16, 24])
def test_expected_mask_value_of_few_blocks_against_monte_carlo(n):
    # a block mask scores n blocks, not thousands of units: the top k of n normals, whose mean
    # is below the many-scores limit (by 19% for the largest of 4). Orthonormal rows of W_z give
    # exactly independent N(0, 1) scores; InfMoE's random rows (norms ≈ 1) come close.
    torch.manual_seed(0)
    z = torch.randn(100000, 128)
    kept = lambda W_z: ((z @ W_z.t()).topk(max(1, round(0.25 * n)), dim=-1).values.sum(-1).mean()
                        .item() / n)
    orthonormal = torch.linalg.qr(torch.randn(128, n))[0].t()
    assert expected_mask_value(0.25, n) == pytest.approx(kept(orthonormal), rel=0.01)
    fresh = InfMoE(tiny("inf", d_z=128, n_embd=n, mask_block=8)).W_z  # d_ff = 8n: n blocks
    assert expected_mask_value(0.25, n) == pytest.approx(kept(fresh), rel=0.05)
    assert expected_mask_value(0.25, n) < expected_mask_value(0.25) - 0.01
    assert expected_mask_value(0.25, 6144) == pytest.approx(expected_mask_value(0.25), rel=1e-3)


@pytest.mark.parametrize("block", [1, 64])
def test_upcycled_inf_is_the_dense_ffn_on_average(hf_gpt2, block):
    """inf upcycled from GPT-2 (d_ff = 8d: each dense unit twice): averaged over many z samples its
    FFN output is close to the dense MLP's, one sample is far from it; router and W_z keep their
    fresh init. Also with a block mask of 4 blocks (unit j in block j // 64)."""
    hf, path = hf_gpt2
    torch.manual_seed(3)
    model = from_pretrained(str(path), {"ffn": "inf", "d_z": 128, "mask_block": block})
    torch.manual_seed(3)
    fresh = GPT(model.config)  # the same draws: router and W_z must be left as initialised
    layer, dense = model.transformer.h[0].mlp, hf.transformer.h[0].mlp
    assert torch.equal(layer.W_z, fresh.transformer.h[0].mlp.W_z)
    assert all(torch.equal(a, b) for a, b in zip(layer.router.parameters(),
                                                 fresh.transformer.h[0].mlp.router.parameters()))
    x = torch.randn(64, 32)
    with torch.no_grad():
        want = (F.gelu(x @ dense.c_fc.weight + dense.c_fc.bias) @ dense.c_proj.weight
                + dense.c_proj.bias)
        model.set_sampling(z_samples=512)
        mean = layer(x)
        model.set_sampling(z_samples=1)
        one = layer(x)
    hidden = (want - dense.c_proj.bias).norm()  # the part that goes through the hidden units
    err = lambda y: ((y - want).norm() / hidden).item()  # noqa: E731
    # measured 0.14 and 1.3: unbiased up to the spread of E[M_j] over units (W_z's row norms,
    # mu != 0); without the 1 / (2 E[M_j]) scale the mean would be off by 36% more
    assert err(mean) < 0.25 and err(one) > 0.8
    # and its scale: the mean's gain along the dense output (measured 0.99 and, 4 blocks, 1.06;
    # 0.85 with the many-units E[M_j] for the 4 blocks)
    h = want - dense.c_proj.bias
    assert abs(((mean - dense.c_proj.bias) * h).sum() / (h * h).sum() - 1) < 0.08


# ====================================================================== train.py

# ---- training

@pytest.mark.parametrize("ffn", FFNS)
def test_training_loss_decreases(shards, tmp_path, ffn):
    train.main(tiny_run(shards, tmp_path / "out", f"--ffn={ffn}", "--max_iters=30",
                        "--eval_interval=30"))
    log = read_log(tmp_path / "out")
    losses = [r["loss"] for r in log if "loss" in r]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(losses) == 30 and all(r["step"] for r in log if "loss" in r)
    assert losses[-1] < losses[0] - 1.0 and vals[-1] < vals[0] - 1.0
    assert (tmp_path / "out" / "ckpt.pt").exists()
    if ffn.startswith("inf"):
        assert {"entropy", "sigma", "active"} <= set(log[-2])
    if ffn in ("switch", "top2"):
        assert len(log[-2]["load"]) == 4 and log[-2]["aux_loss"] > 0


def test_resume_is_exact(shards, tmp_path):
    common = ["--ffn=inf", "--eval_interval=4", "--lr_decay_iters=8",
              "--gradient_accumulation_steps=2"]
    train.main(tiny_run(shards, tmp_path / "a", *common, "--max_iters=8"))
    train.main(tiny_run(shards, tmp_path / "b", *common, "--max_iters=4"))
    train.main(tiny_run(shards, tmp_path / "b", *common, "--max_iters=8", "--init_from=resume"))
    full = {r["step"]: r["loss"] for r in read_log(tmp_path / "a") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in read_log(tmp_path / "b") if "loss" in r}
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in range(5, 9)] == [full[s] for s in range(5, 9)]  # bit-identical


# ---- float16: a loss scaler (GradScaler), its skipped steps counted

TIMING = ("tokens_per_s", "elapsed_s", "mfu")  # the only fields two identical runs may differ in


def scaler_with(monkeypatch, **kw):
    """train.py's GradScaler built with these settings (init_scale, growth_interval): a scale
    that overflows on purpose."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, **kw))


def test_float16_trains_with_a_loss_scaler(shards, tmp_path, capsys):
    train.main(tiny_run(shards, tmp_path / "out", "--dtype=float16", "--max_iters=24",
                        "--eval_interval=24"))
    log = read_log(tmp_path / "out")
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1.0
    assert all(r["skipped"] == 0 for r in log if "loss" in r)  # 2^16, the default scale, fits
    printed = capsys.readouterr().out
    assert "on cpu, float16" in printed and "step 24/24: " in printed and ", skipped 0" in printed


def test_float16_overflow_skips_the_step_and_counts_it(shards, tmp_path, monkeypatch, capsys):
    """A loss scale of 2^60 overflows every float16 gradient: no step is taken (the weights are
    the initial ones, AdamW holds no state), each is counted, and the scale halves each time."""
    scaler_with(monkeypatch, init_scale=2.0 ** 60)
    out = tmp_path / "out"
    train.main(tiny_run(shards, out, "--dtype=float16", "--max_iters=3", "--eval_interval=3"))
    assert [r["skipped"] for r in read_log(out) if "loss" in r] == [1, 2, 3]
    assert "step 3/3: " in capsys.readouterr().out.split(", skipped 3")[0]
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["skipped_steps"] == 3 and ckpt["scaler"]["scale"] == 2.0 ** 57
    assert ckpt["optimizer"]["state"] == {}
    torch.manual_seed(1337)  # --seed: the run's initial weights
    initial = GPT(GPTConfig(**ckpt["model_args"])).state_dict()
    assert all(torch.equal(ckpt["model"][k], v) for k, v in initial.items())


def test_float16_resume_is_exact_with_the_scalers_state(shards, tmp_path, monkeypatch):
    """The scale doubles every 2 good steps until a gradient overflows; the resumed run must
    continue from the saved scale and growth tracker to skip the same steps."""
    scaler_with(monkeypatch, init_scale=2.0 ** 19, growth_interval=2)
    common = ["--dtype=float16", "--eval_interval=4", "--lr_decay_iters=8"]
    train.main(tiny_run(shards, tmp_path / "a", *common, "--max_iters=8"))
    train.main(tiny_run(shards, tmp_path / "b", *common, "--max_iters=4"))
    train.main(tiny_run(shards, tmp_path / "b", *common, "--max_iters=8", "--init_from=resume"))
    full, resumed = ([{k: v for k, v in r.items() if k not in TIMING}
                      for r in read_log(tmp_path / d)] for d in "ab")
    skips = {r["step"]: r["skipped"] for r in full if "loss" in r}
    assert skips[8] > skips[4], "no step skipped after the checkpoint: the test tests nothing"
    assert resumed == full


def test_float16_evaluates_and_samples(shards, tmp_path):
    out = tmp_path / "out"
    trained(shards, out)
    evaluate = lambda *a: train.main(tiny_run(shards, out, "--init_from=resume", "--eval_only",
                                              *a))["val_loss"]
    v32, v16 = evaluate(), evaluate("--dtype=float16")
    assert v16 != v32 and abs(v16 - v32) < 0.02  # float16's rounding, not another model
    texts = sample.main([f"--out_dir={out}", "--start=!", "--num_samples=1",
                         "--max_new_tokens=4", "--dtype=float16"])
    assert texts[0].startswith("!") and len(texts[0]) > 1


def test_eval_only_with_k_and_deterministic(shards, tmp_path):
    out = tmp_path / "out"
    train.main(tiny_run(shards, out, "--ffn=inf", "--max_iters=4", "--eval_interval=4"))
    v1 = train.main(tiny_run(shards, out, "--init_from=resume", "--eval_only",
                             "--z_deterministic"))["val_loss"]
    v2 = train.main(tiny_run(shards, out, "--init_from=resume", "--eval_only",
                             "--z_deterministic"))["val_loss"]
    v4 = train.main(tiny_run(shards, out, "--init_from=resume", "--eval_only",
                             "--z_samples=4"))["val_loss"]
    assert v1 == v2 and math.isfinite(v4)
    assert read_log(out, "eval.jsonl")[-1]["z_samples"] == 4
    with pytest.raises(ValueError, match="n_embd"):
        train.main(tiny_run(shards, out, "--init_from=resume", "--eval_only", "--n_embd=64"))


def test_val_loss_does_not_depend_on_the_batch_size(shards, tmp_path):
    """∞-MoE's sampled val loss over the same 8 sequences: 8 batches of 1 = 1 batch of 8 (each
    sequence's noise keyed by where it starts); another --seed is another draw."""
    out = tmp_path / "out"
    trained(shards, out)
    val = lambda *a: train.main(tiny_run(shards, out, "--init_from=resume", "--eval_only",
                                         "--z_samples=3", *a))["val_loss"]
    one, eight = val("--batch_size=1", "--eval_iters=8"), val("--batch_size=8", "--eval_iters=1")
    assert abs(one - eight) < 1e-6 * one, (one, eight)
    assert abs(val("--batch_size=8", "--eval_iters=1", "--seed=5") - eight) > 1e-4
    assert read_log(out, "eval.jsonl")[-1]["seed"] == 5


@pytest.mark.parametrize("damage, message", [("truncate", "truncated"), ("magic", "magic")])
def test_bad_shard_names_the_file(shards, tmp_path, damage, message):
    bad = shards / "syn_train_000001.bin"
    raw = bytearray(bad.read_bytes())
    bad.write_bytes(raw[:-10] if damage == "truncate" else b"\x00\x00\x00\x00" + raw[4:])
    with pytest.raises(ValueError, match=message) as err:
        train.main(tiny_run(shards, tmp_path / "out", "--max_iters=2"))
    assert str(bad) in str(err.value)


def test_ddp_two_processes_match_one(shards, tmp_path):
    """2 gloo processes x 1 micro-batch each == 1 process x 2 micro-batches: same global batch,
    same loss."""
    args = ["--ffn=switch", "--max_iters=3", "--eval_interval=3", "--gradient_accumulation_steps=2",
            "--device=cpu"]
    train.main(tiny_run(shards, tmp_path / "one", *args))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", *tiny_run(shards, tmp_path / "two", *args)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    one = [r for r in read_log(tmp_path / "one") if "loss" in r]
    two = [r for r in read_log(tmp_path / "two") if "loss" in r]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["aux_loss"] - b["aux_loss"]) < 1e-6
    assert abs(read_log(tmp_path / "one")[-1]["val_loss"]
               - read_log(tmp_path / "two")[-1]["val_loss"]) < 1e-5


def test_train_with_aux_loss_free_balancing(shards, tmp_path):
    """train.py calls after_step: the checkpoint holds the bias, a sum of +-gamma steps, and the
    log the load."""
    out = tmp_path / "out"
    train.main(tiny_run(shards, out, "--ffn=switch", "--balance=bias", "--balance_rate=0.01",
                        "--max_iters=3", "--eval_interval=3"))
    bias = load_checkpoint(out / "ckpt.pt")["model"]["transformer.h.0.mlp.balance_bias"]
    steps = bias / 0.01
    assert (bias.abs().sum() > 0 and torch.allclose(steps, steps.round(), atol=1e-4)
            and steps.abs().max() <= 3)
    assert len(read_log(out)[-2]["load"]) == 4


def test_train_with_a_block_mask_logs_block_load_per_layer(shards, tmp_path, capsys):
    """--mask_block=64 over d_ff = 256: 4 blocks; the log holds each layer's busiest block against
    the mean (between 1 and 4), the checkpoint the option, and it evaluates from there."""
    out = tmp_path / "out"
    train.main(tiny_run(shards, out, "--mask_block=64", "--n_layer=2", "--max_iters=2",
                        "--eval_interval=2"))
    steps = [r for r in read_log(out) if "loss" in r]
    assert all(len(r["block_load"]) == 2 and all(1 <= v <= 4 for v in r["block_load"])
               for r in steps)
    assert re.search(r"block_load \d\.\d\d/\d\.\d\d", capsys.readouterr().out)
    assert load_checkpoint(out / "ckpt.pt")["model_args"]["mask_block"] == 64
    train.main(tiny_run(shards, out, "--n_layer=2", "--eval_only", "--init_from=resume"))
    assert "val_loss" in read_log(out, "eval.jsonl")[-1]


def test_tokens_per_s_counts_the_steps_timed(shards, tmp_path, monkeypatch, capsys):
    """A fake clock: 1 s per training forward, 100 s per evaluation. Every logged rate is then
    1 step/s, though evaluations fall between log lines; elapsed counts both."""
    clock = [0.0]
    forward, evaluate = GPT.forward, train.evaluate

    def timed_forward(self, idx, targets=None, **kw):
        clock[0] += self.training
        return forward(self, idx, targets, **kw)

    def timed_evaluate(*args):
        clock[0] += 100
        return evaluate(*args)

    monkeypatch.setattr(GPT, "forward", timed_forward)
    monkeypatch.setattr(train, "evaluate", timed_evaluate)
    monkeypatch.setattr(train.time, "perf_counter", lambda: clock[0])
    train.main(tiny_run(shards, tmp_path / "out", "--max_iters=6", "--eval_interval=2",
                        "--log_interval=3"))
    records = [r for r in read_log(tmp_path / "out") if "loss" in r]
    assert [r["tokens_per_s"] for r in records] == [4 * 32 / 1.0] * 2  # batch 4 x block 32 per step
    # evaluations at steps 0, 2 and 4
    assert [r["elapsed_s"] for r in records] == [3 + 200, 6 + 300]
    assert "step 3/6:" in capsys.readouterr().out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train.main(tiny_run(shards, out, "--max_iters=2", "--eval_interval=2"))
    forward, calls = GPT.forward, [0]

    def poisoned(self, idx, targets=None, **kw):  # the 4th training forward returns a NaN loss
        logits, loss = forward(self, idx, targets, **kw)
        calls[0] += self.training
        return logits, (loss * float("nan") if calls[0] == 4 and self.training else loss)

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(SystemExit, match="training loss is nan"):
        train.main(tiny_run(shards, out, "--init_from=resume", "--max_iters=10",
                            "--eval_interval=2"))
    ckpt = load_checkpoint(out / "ckpt.pt")  # written at step 4, before the NaN at step 6
    assert ckpt["iter_num"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nan_before_the_first_checkpoint_says_there_is_none(shards, tmp_path, monkeypatch):
    forward = GPT.forward
    def poisoned(self, idx, targets=None, **kw):  # every training forward returns a NaN loss
        logits, loss = forward(self, idx, targets, **kw)
        return logits, loss * float("nan") if self.training else loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(SystemExit,
                       match="training loss is nan; stopping, no checkpoint was written"):
        train.main(tiny_run(shards, tmp_path / "out", "--max_iters=4", "--eval_interval=2"))
    assert not (tmp_path / "out" / "ckpt.pt").exists()


# ---- bad options: one-line errors

def test_bad_options_are_named(shards, tmp_path):
    with pytest.raises(ValueError, match="--bogus"):
        train.main(["--bogus=1"])
    with pytest.raises(ValueError, match="--max_iters=ten"):
        train.main(["--max_iters=ten"])
    with pytest.raises(ValueError, match="--compile=maybe"):
        train.main(["--compile=maybe"])
    with pytest.raises(ValueError, match="ffn='moe'"):
        train.main(["--ffn=moe"])
    with pytest.raises(ValueError, match="--preset=gpt3"):
        train.main(["--preset=gpt3"])
    with pytest.raises(ValueError, match="needs --dtype=bfloat16"):
        train.main([f"--data_dir={shards}", f"--out_dir={tmp_path / 'out'}", "--eval_iters=2",
                    "--ffn=top2", "--compile", "--device=cpu", "--dtype=float32"])
    res = subprocess.run([sys.executable, "train.py", "--learning_rat=1"], capture_output=True,
                         text=True, cwd=REPO, timeout=600)
    assert res.returncode != 0 and "unknown option --learning_rat" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_train_options_fail_before_building_a_model(shards, tmp_path, monkeypatch, no_model):
    out = tmp_path / "out"
    (tmp_path / "a_file").write_text("")
    short = tmp_path / "short"
    shutil.copytree(shards, short)
    write_llmc_shard(short / "syn_train_000003.bin", np.arange(100) % 97)  # < 4 x 32 + 1 tokens
    cases = [  # (argv after tiny_run's, words the one-line error must contain)
        (["--n_head=0"], "--n_head=0: must be >= 1"),
        (["--eval_interval=0"], "--eval_interval=0: must be >= 1"),
        (["--log_interval=0"], "--log_interval=0"),
        (["--batch_size=-1"], "--batch_size=-1"),
        (["--batch_size=0"], "--batch_size=0"),
        (["--eval_iters=0"], "--eval_iters=0"),
        (["--gradient_accumulation_steps=0"], "--gradient_accumulation_steps=0"),
        (["--max_iters=-1"], "--max_iters=-1"),
        (["--hellaswag_limit=-1"], "--hellaswag_limit=-1"),
        (["--lm_eval_limit=-1"], "--lm_eval_limit=-1"),
        (["--lm_eval=piqa"], "--lm_eval=piqa runs the harness on a trained model: add --eval_only"),
        (["--lm_eval_include=data/lm_eval"], "go with --lm_eval=TASKS"),
        (["--learning_rate=nan"], "--learning_rate=nan"),
        (["--beta2=1"], "--beta2=1.0: must be in [0, 1)"),
        (["--device=cuda"], "--device=cuda: no CUDA device"),
        (["--device=gpu"], "--device=gpu"),
        (["--dtype=half"], "--dtype=half: expected bfloat16, float16 or float32"),
        (["--init_from=bogus"], "--init_from=bogus"),
        (["--out_dir"], "--out_dir needs a value"),
        (["--preset"], "--preset needs a value"),
        (["--eval_only"], "--init_from=resume"),
        ([f"--out_dir={tmp_path / 'a_file'}"], "--out_dir="),
        (["--wandb_log"], "pip install wandb"),
        (["--hellaswag", f"--hellaswag_path={tmp_path / 'a_file'}"],
         "a_file: no HellaSwag examples"),
        (["--hellaswag", f"--hellaswag_path={tmp_path / 'none.jsonl'}"], "no HellaSwag data at"),
        # 4000 val tokens hold 31 batches of 4 x 32
        (["--eval_iters=40"], "--eval_iters=40: the val split"),
        (["--vocab_size=50"], "syn_train_000001.bin: token id"),
        ([f"--data_dir={short}"], "syn_train_000003.bin: 100 tokens"),
        ([f"--data_dir={tmp_path / 'nowhere'}"], "nowhere: no such directory"),
        # values that cannot train, refused before anything is created
        (["--learning_rate=inf"], "--learning_rate=inf: must be > 0"),
        (["--aux_loss_coef=inf"], "--aux_loss_coef=inf: must be >= 0"),
        (["--min_lr=0.01"], "--min_lr=0.01 is above --learning_rate=0.003"),
        (["--seed=99999999999999999999999"], "--seed=99999999999999999999999: must be in [0, "
                                             "18446744073709551615]"),
        (["--seed=18446744073709551616"], "--seed=18446744073709551616: must be in"),
        (["--n_layer=1000000"], "--n_layer=1000000 --n_embd=32"),
        (["--block_size=1000000", "--batch_size=1", "--vocab_size=50257"],  # 400 GB of logits
         "--block_size=1000000 --batch_size=1"),
        (["--mask_block=0"], "--mask_block=0: must be >= 1"),
        (["--mask_block=3"], "GPTConfig: mask_block=3 does not divide d_ff=256"),
        (["--ffn=inf_deep", "--mask_block=2"], "GPTConfig: mask_block=2 is for ffn=inf"),
    ]
    # `import wandb` fails, as when it is not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    for argv, words in cases:
        with pytest.raises(UsageError) as err:
            train.main(tiny_run(shards, out, *argv))
        assert words in str(err.value) and "\n" not in str(err.value), (argv, str(err.value))
    assert not out.exists()  # nothing was written
    monkeypatch.delenv("TRITON_INTERPRET")  # the kernel would need a GPU
    with pytest.raises(UsageError, match="--use_kernel=on needs a CUDA device"):
        train.main(tiny_run(shards, out, "--use_kernel=on"))


def test_one_line_error_and_exit_status_2(shards, tmp_path):
    for script, argv, words in [("train.py", tiny_run(shards, tmp_path, "--eval_iters=0"),
                                 "--eval_iters=0"),
                                ("sample.py", ["--top_k=-5"], "--top_k=-5"),
                                ("prepare_fineweb.py", ["--input", "nowhere"], "nowhere")]:
        res = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True,
                             cwd=REPO, timeout=600)
        assert res.returncode == 2 and res.stderr.startswith("error: ") and words in res.stderr
        assert res.stderr.count("\n") == 1, res.stderr


# ---- checkpoints, out_dir and resume

def test_damaged_checkpoint_is_refused_everywhere(shards, tmp_path):
    ckpt = trained(shards, tmp_path / "out")
    raw = ckpt.read_bytes()
    assert load_checkpoint(ckpt)["iter_num"] == 2
    middle = len(raw) // 2
    damages = {"7 bytes overwritten": raw[:middle] + b"\xff" * 7 + raw[middle + 7:],
               "truncated": raw[:middle], "empty": b""}
    readers = {"resume": lambda: train.main(tiny_run(shards, tmp_path / "out", "--init_from=resume",
                                                     "--max_iters=4")),
               "eval_only": lambda: train.main(tiny_run(shards, tmp_path / "out",
                                                        "--init_from=resume", "--eval_only")),
               "sample": lambda: sample.main([f"--out_dir={tmp_path / 'out'}", "--start=!"])}
    for damage, data in damages.items():
        ckpt.write_bytes(data)
        for reader, call in readers.items():
            with pytest.raises(UsageError, match=str(ckpt)):
                call()
        assert ckpt.read_bytes() == data, damage  # refused, not overwritten


def test_scratch_run_never_overwrites_a_checkpoint(shards, tmp_path):
    ckpt = trained(shards, tmp_path / "out")
    before = ckpt.read_bytes()
    with pytest.raises(UsageError, match="--init_from=resume.*--overwrite"):
        train.main(tiny_run(shards, tmp_path / "out", "--max_iters=2", "--eval_interval=2"))
    assert ckpt.read_bytes() == before
    train.main(tiny_run(shards, tmp_path / "out", "--max_iters=3", "--eval_interval=3",
                        "--overwrite"))
    assert load_checkpoint(ckpt)["iter_num"] == 3
    # the old log is gone
    assert [r["step"] for r in read_log(tmp_path / "out") if "loss" in r] == [1, 2, 3]


def test_out_dir_lock_refuses_a_live_run_and_not_a_killed_one(shards, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c",  # the lock as any filelock user takes it
                               "import filelock, sys, time; lock = filelock.FileLock("
                               "sys.argv[1], timeout=0); lock.acquire(); print('held', flush=True)"
                               "; time.sleep(120)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UsageError, match="is in use by another run"):
            train.main(tiny_run(shards, out, "--max_iters=1"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    (out / "ckpt.pt.4242.tmp").write_bytes(b"half a checkpoint")  # as a killed run leaves it
    train.main(tiny_run(shards, out, "--max_iters=1", "--eval_interval=1"))
    assert (load_checkpoint(out / "ckpt.pt")["iter_num"] == 1
            and not (out / "ckpt.pt.4242.tmp").exists())


def test_resume_past_max_iters_stops_with_an_error(shards, tmp_path):
    trained(shards, tmp_path / "out")
    for max_iters in (1, 2):
        with pytest.raises(UsageError, match=f"at step 2 and --max_iters={max_iters}"):
            train.main(tiny_run(shards, tmp_path / "out", "--init_from=resume",
                                f"--max_iters={max_iters}"))


def test_resume_takes_the_checkpoints_settings(shards, tmp_path, capsys):
    """Resumed with only --out_dir, --init_from and --max_iters, a run continues bit-identically:
    data_dir, batch, schedule and model come from the checkpoint (the defaults would read
    data/sample, and fail)."""
    common = ["--ffn=inf", "--eval_interval=2", "--lr_decay_iters=4", "--eval_iters=3"]
    train.main(tiny_run(shards, tmp_path / "a", *common, "--max_iters=4"))
    train.main(tiny_run(shards, tmp_path / "b", *common, "--max_iters=2"))
    capsys.readouterr()
    # the checkpoint's RNG state is restored: the seed changes nothing
    train.main([f"--out_dir={tmp_path / 'b'}", "--init_from=resume", "--max_iters=4",
                "--z_samples=2", "--seed=7"])
    printed = capsys.readouterr().out
    assert "settings that differ from the checkpoint's: max_iters 2 -> 4, seed 1337 -> 7" in printed
    full, resumed = ([(r["step"], r.get("loss"), r.get("val_loss"))
                      for r in read_log(tmp_path / run)]
                     for run in "ab")
    assert resumed == full  # steps 3 and 4 bit-identical
    saved = train.main([f"--out_dir={tmp_path / 'b'}", "--init_from=resume", "--eval_only",
                        "--z_deterministic"])
    given = train.main(tiny_run(shards, tmp_path / "a", *common, "--init_from=resume",
                                "--eval_only", "--z_deterministic"))
    assert saved["val_loss"] == given["val_loss"]  # the saved data_dir, eval_iters, batch and model


def test_resume_refuses_changes_that_make_another_run(shards, tmp_path):
    out = tmp_path / "out"
    trained(shards, out)
    other = tmp_path / "other"
    shutil.copytree(shards, other)
    for flag, words in [(f"--data_dir={other}", f"--data_dir={shards}"),
                        ("--batch_size=2", "--batch_size=4"),
                        ("--learning_rate=1e-2", "--learning_rate=0.003"),
                        ("--d_z=4", "--d_z=8")]:
        with pytest.raises(UsageError, match="was trained with " + words):
            train.main([f"--out_dir={out}", "--init_from=resume", "--max_iters=3", flag])
    # scoring: fine
    train.main([f"--out_dir={out}", "--init_from=resume", "--eval_only", f"--data_dir={other}"])
    train.main([f"--out_dir={out}", "--init_from=resume", "--max_iters=3", f"--data_dir={other}",
                "--allow_changes"])
    assert load_checkpoint(out / "ckpt.pt")["config"]["data_dir"] == str(other)


def test_resume_with_remade_shards_is_an_error(shards, tmp_path):
    out = tmp_path / "out"
    # 2 x 1024 tokens read
    trained(shards, out, "--batch_size=16", "--block_size=64", "--eval_iters=1")
    write_llmc_shard(shards / "syn_train_000001.bin", np.arange(1500) % 97)  # remade, shorter
    with pytest.raises(UsageError, match="stopped at train shard 0, token 2048.*remade"):
        train.main([f"--out_dir={out}", "--init_from=resume", "--max_iters=4"])


def test_log_holds_each_step_once_after_a_resume(shards, tmp_path):
    out = tmp_path / "out"
    train.main(tiny_run(shards, out, "--max_iters=4", "--eval_interval=2"))
    # as a run killed after its last checkpoint leaves the log
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 9.0}\n{"step": 6, "loss"')
    train.main(tiny_run(shards, out, "--init_from=resume", "--max_iters=6", "--eval_interval=2"))
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in log if "val_loss" in r] == [0, 2, 4, 6]
    assert 9.0 not in [r["loss"] for r in log if "loss" in r]


def test_scratch_run_keeps_an_eval_log_without_overwrite(shards, tmp_path):
    """B4, the README's order of commands: --eval_only of another checkpoint writes out/eval.jsonl;
    a scratch run into out then refuses, naming it, and --overwrite deletes it."""
    ckpt = trained(shards, tmp_path / "src")
    out = tmp_path / "out"
    train.main(tiny_run(shards, out, f"--init_from={ckpt}", "--eval_only"))
    before = (out / "eval.jsonl").read_bytes()
    with pytest.raises(UsageError) as err:
        train.main(tiny_run(shards, out, "--max_iters=1", "--eval_interval=1"))
    assert (str(out / "eval.jsonl") in str(err.value) and "--overwrite" in str(err.value)
            and "\n" not in str(err.value))
    assert (out / "eval.jsonl").read_bytes() == before
    train.main(tiny_run(shards, out, "--max_iters=1", "--eval_interval=1", "--overwrite"))
    assert not (out / "eval.jsonl").exists() and (out / "ckpt.pt").exists()


def test_overwrite_deletes_nothing_before_every_option_is_checked(shards, tmp_path):
    """--overwrite with an upcycling error found only when the weights were loaded: the error now
    comes first, and ckpt.pt and log.jsonl are still there."""
    dense = tmp_path / "dense"
    train.main(tiny_run(shards, dense, "--ffn=dense", "--max_iters=1", "--eval_interval=1"))
    out = tmp_path / "out"
    trained(shards, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UsageError, match="d_ff_mult must be 16"):
        train.main(tiny_run(shards, out, f"--init_from={dense}", "--ffn=switch", "--d_ff_mult=8",
                            "--overwrite", "--max_iters=1"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(shards, tmp_path,
                                                                        monkeypatch):
    out = tmp_path / "out"
    failing_writes(monkeypatch, 2, disk_full())  # the checkpoint at step 4; step 2's is written
    with pytest.raises(SystemExit) as e:
        train.main(tiny_run(shards, out, "--max_iters=4", "--eval_interval=2"))
    assert str(e.value) == (f"error: {out / 'ckpt.pt'}: No space left on device; "
                            f"{out / 'ckpt.pt'}, the last checkpoint, is whole: continue with "
                            f"--init_from=resume")
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 2
    assert not list(out.glob("*.tmp"))


def test_ctrl_c_is_one_line_and_keeps_the_checkpoint(shards, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", *tiny_run(shards, out, "--max_iters=100000",
                                                 "--eval_interval=2")]
    # SIGINT as a terminal sends it (a shell's background job would otherwise ignore it)
    child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in child.stdout:
            if line.startswith("step 3/"):  # the checkpoint of step 2 is written
                break
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"interrupted: {out / 'ckpt.pt'}, the last checkpoint, is "
                                    f"whole: continue with --init_from=resume")
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] >= 2 and not list(out.glob("*.tmp"))


def test_bundled_defaults_are_the_repositorys_wherever_train_py_runs(tmp_path, monkeypatch):
    """Started from another directory, train.py reads the bundled data/sample; a checkpoint of an
    older version, which saved the default as "data/sample", still resumes; the same directory
    spelled another way is no change of data_dir; a path given is relative to the working
    directory."""
    monkeypatch.chdir(tmp_path)
    small = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--d_z=8",
             "--batch_size=4", "--eval_iters=1", "--eval_interval=1"]
    train.main(small + ["--max_iters=1", "--out_dir=out"])
    path = tmp_path / "out" / "ckpt.pt"
    ckpt = load_checkpoint(path)
    assert ckpt["config"]["data_dir"] == str(REPO / "data" / "sample")
    ckpt["config"].update(data_dir="data/sample",
                          hellaswag_path="data/hellaswag/hellaswag_val.jsonl")
    infra.save_checkpoint(str(path), ckpt)
    train.main(["--out_dir=out", "--init_from=resume", "--max_iters=2"])
    assert load_checkpoint(path)["data"] != ckpt["data"]  # it read on from where it stopped
    monkeypatch.chdir(REPO)
    train.main([f"--out_dir={tmp_path / 'out'}", "--init_from=resume", "--max_iters=3",
                "--data_dir=./data/sample"])
    assert load_checkpoint(path)["iter_num"] == 3
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=f"data/sample: no such directory .*{tmp_path}"):
        train.main(small + ["--max_iters=1", "--out_dir=out2", "--data_dir=data/sample"])
    assert not (tmp_path / "out2").exists()


# ====================================================================== sample.py

def test_sample_prints_text_from_a_trained_checkpoint(shards, tmp_path, capsys):
    out = tmp_path / "out"
    train.main(tiny_run(shards, out, "--ffn=inf", "--max_iters=2", "--eval_interval=2"))
    prompt = "!"  # GPT-2 id 0: inside the tiny model's 97-token vocabulary
    texts = sample.main([f"--out_dir={out}", f"--start={prompt}", "--num_samples=2",
                         "--max_new_tokens=5", "--z_samples=3"])
    assert len(texts) == 2 and all(t.startswith(prompt) and len(t) > len(prompt) for t in texts)
    with pytest.raises(ValueError, match="vocab_size 97"):
        sample.main([f"--out_dir={out}", "--start=Hello"])
    with pytest.raises(UsageError, match="no checkpoint"):
        sample.main([f"--out_dir={tmp_path / 'nowhere'}"])


def test_bad_sample_options(tmp_path, no_model):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    cases = [
        (["--temperature=-1"], "--temperature=-1.0: must be >= 0"),
        (["--top_k=-5"], "--top_k=-5"),
        (["--num_samples=0"], "--num_samples=0"),
        (["--dtype=fp16"], "--dtype=fp16: expected bfloat16, float16 or float32"),
        (["--device=cuda"], "--device=cuda"),
        (["--out_dir"], "--out_dir needs a value"),
        ([f"--start=FILE:{tmp_path}"], f"--start=FILE:{tmp_path}: Is a directory"),
        ([f"--start=FILE:{tmp_path / 'latin1.txt'}"], "latin1.txt: not UTF-8"),
        ([f"--start=FILE:{tmp_path / 'missing.txt'}"], "missing.txt: No such file"),
        ([f"--out_dir={tmp_path}"], f"no checkpoint at {tmp_path / 'ckpt.pt'}"),
        (["--start=FILE:/dev/zero"], "--start=FILE:/dev/zero: longer than 1 MiB"),
        (["--seed=18446744073709551616"], "--seed=18446744073709551616: must be in [0, "),
        (["--use_kernel=maybe"], "--use_kernel=maybe: expected auto, on or off"),
    ]
    for argv, words in cases:
        with pytest.raises(UsageError) as err:
            sample.main(argv)
        assert words in str(err.value), (argv, str(err.value))


def test_sample_keeps_the_checkpoints_z_deterministic(shards, tmp_path, monkeypatch):
    trained(shards, tmp_path / "out", "--z_deterministic")
    seen, generate = [], GPT.generate
    monkeypatch.setattr(GPT, "generate",
                        lambda self, *a, **k: seen.append(self.config.z_deterministic)
                        or generate(self, *a, **k))
    for argv in ([], ["--z_deterministic=false"]):
        sample.main([f"--out_dir={tmp_path / 'out'}", "--start=!", "--num_samples=1",
                     "--max_new_tokens=2", *argv])
    assert seen == [True, False]


def test_sample_runs_a_use_kernel_on_checkpoint_on_the_cpu(shards, tmp_path, monkeypatch):
    """B5: a checkpoint saved with use_kernel=on (trained on a GPU) samples on a CPU without
    Triton's interpreter, on the PyTorch path; --use_kernel=on itself is refused there."""
    path = trained(shards, tmp_path / "out")
    ckpt = load_checkpoint(path)
    ckpt["model_args"]["use_kernel"] = "on"
    infra.save_checkpoint(str(path), ckpt)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(kernel, "INTERPRET", False)
    argv = [f"--out_dir={tmp_path / 'out'}", "--start=!", "--num_samples=1", "--max_new_tokens=2"]
    assert len(sample.main(argv)) == 1
    with pytest.raises(UsageError, match="--use_kernel=on needs a CUDA device"):
        sample.main(argv + ["--use_kernel=on"])


# ====================================================================== prepare_fineweb.py

# ---- tokenizer, input formats and shards

# 4 documents of the bundled sample's public-domain text
TEXTS = REPO / "data" / "fixture_texts.jsonl"


# 2K-14K characters each
SHORT_DOCS = ["phoenix_and_the_turtle", "passionate_pilgrim", "lovers_complaint"]


def real_docs():
    """A few real documents, in file order, plus edge cases a tokenizer pipeline could get wrong."""
    docs = [r["text"] for r in map(json.loads, TEXTS.open(encoding="utf-8"))
            if r["id"] in SHORT_DOCS]
    assert len(docs) == len(SHORT_DOCS)
    # many short documents too (the stanzas of one poem), so tokenising takes many parallel tasks;
    # an empty document, and one with the EOT marker as plain text (must not become 50256)
    return (docs + [p for p in docs[1].split("\n\n") if p][:40]
            + ["", "naïve café <|endoftext|> ✓ 日本語\n\n"])


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)),
                    encoding="utf-8")
    return path


def read_shard_independently(path):
    """llm.c's format, read without prepare_fineweb: 256 int32 header, then uint16 tokens."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[0] == 20240520 and header[1] == 1 and not header[3:].any()
    assert os.path.getsize(path) == 256 * 4 + 2 * int(header[2])
    return np.fromfile(path, dtype=np.uint16, offset=256 * 4)


def check_shards(out_dir, prefix, shard_size, docs, val_size=None):
    names = sorted(p.name for p in Path(out_dir).iterdir()
                   if p.name not in ("manifest.json", ".lock"))
    expected_names = [f"{prefix}_val_000000.bin"] + [f"{prefix}_train_{i:06d}.bin"
                                                     for i in range(1, len(names))]
    assert names == sorted(expected_names)  # no .tmp files left either
    shards = [read_shard_independently(Path(out_dir) / n) for n in expected_names]
    assert len(shards[0]) == (val_size or shard_size)
    assert all(len(s) == shard_size for s in shards[1:-1]) and 0 < len(shards[-1]) <= shard_size
    check_manifest(out_dir, expected_names, shards)
    tokens = np.concatenate(shards)
    enc = get_tokenizer()
    expected = np.concatenate([[EOT] + enc.encode_ordinary(d) for d in docs]).astype(np.uint16)
    np.testing.assert_array_equal(tokens, expected)
    # decode: every document comes back exactly, in order, each preceded by EOT
    assert tokens[0] == EOT
    starts = np.flatnonzero(tokens == EOT)
    assert len(starts) == len(docs)
    ends = list(starts[1:]) + [len(tokens)]
    assert [enc.decode(tokens[s + 1:e].tolist()) for s, e in zip(starts, ends)] == docs


def check_manifest(out_dir, names, shards):
    """manifest.json marks the dataset complete and lists each shard, its size and where its last
    document stands (documents begun so far = EOTs so far; tokens of the last one since its EOT)."""
    manifest = json.loads((Path(out_dir) / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert ([(s["name"], s["tokens"]) for s in manifest["shards"]]
            == [(n, len(t)) for n, t in zip(names, shards)])
    tokens = np.concatenate(shards)
    for s, end in zip(manifest["shards"], np.cumsum([len(t) for t in shards])):
        eots = np.flatnonzero(tokens[:end] == EOT)
        assert (s["docs"], s["tail"]) == (len(eots), end - eots[-1])


def run_main_error(argv):
    with pytest.raises(DataError) as e:
        prepare_fineweb.main(argv)
    return str(e.value)


def test_tokenizer_known_ids_offline(tmp_path):
    assert get_tokenizer() is get_tokenizer()  # cached
    assert get_tokenizer().encode_ordinary("hello world") == [31373, 995]
    assert get_tokenizer().encode("<|endoftext|>", allowed_special="all") == [EOT]
    # a fresh process, no TIKTOKEN_CACHE_DIR, no usable network, an empty temp dir: loads from
    # data/tiktoken/
    env = {k: v for k, v in os.environ.items()
           if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")
           and k.lower() not in ("no_proxy", "all_proxy")}
    env.update({k: "http://127.0.0.1:9"
                for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")})
    # tiktoken's default cache lives under the temp dir: make it an empty one
    env["TMPDIR"] = str(tmp_path)
    code = ("import os; from prepare_fineweb import get_tokenizer as g; "
            "print(g().encode_ordinary('hello world'), 'TIKTOKEN_CACHE_DIR' in os.environ)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # and the user's environment is left as it was
    assert r.stdout.split("\n")[0] == "[31373, 995] False"


def test_round_trip_real_text(tmp_path, monkeypatch):
    docs = real_docs()
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    # many small tasks (> the in-flight window): order must hold
    monkeypatch.setattr(prepare_fineweb, "CHUNK_CHARS", 500)
    paths = prepare_fineweb.main(["--input", str(src), "--out_dir", str(tmp_path / "a"),
                                  "--prefix", "t", "--shard_size", "1000", "--workers", "2"])
    assert (len(paths) > 3 and Path(paths[0]).name == "t_val_000000.bin"
            and Path(paths[-1]).name == f"t_train_{len(paths) - 1:06d}.bin")
    check_shards(tmp_path / "a", "t", 1000, docs)
    assert (shard_paths(tmp_path / "a", "val") == [paths[0]]
            and shard_paths(tmp_path / "a", "train") == paths[1:])
    for p in paths:
        np.testing.assert_array_equal(load_shard(p), read_shard_independently(p))


def test_cli_subprocess(tmp_path):
    docs = real_docs()
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    cmd = [sys.executable, str(REPO / "prepare_fineweb.py"), "--input", str(src),
           "--out_dir", str(tmp_path / "b"), "--shard_size", "777", "--workers", "1"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    check_shards(tmp_path / "b", "docs", 777, docs)  # default prefix: the input file's stem
    # a user error: non-zero exit, one clear line naming the file, no traceback
    r = subprocess.run(cmd[:3] + [str(tmp_path / "nope.jsonl")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "nope.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_local_formats(tmp_path):
    # .txt is one whole document; .json holds a list; .jsonl one object per line; all in argument
    # order
    (tmp_path / "a.txt").write_text("First line.\n\nSecond paragraph.\n", encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps([{"text": "json one"}, {"text": "json two"}]),
                                     encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", ["jsonl one", "jsonl two"])
    docs = ["First line.\n\nSecond paragraph.\n", "json one", "json two", "jsonl one", "jsonl two"]
    prepare_fineweb.main(["--input"] + [str(tmp_path / n) for n in ("a.txt", "b.json", "c.jsonl")]
         + ["--out_dir", str(tmp_path / "out"), "--prefix", "f", "--shard_size", "5",
            "--workers", "2"])
    check_shards(tmp_path / "out", "f", 5, docs)


def test_parquet(tmp_path):
    docs = ["parquet one", "parquet two", "three"]
    pq.write_table(pa.table({"id": [1, 2, 3], "text": docs}), tmp_path / "d.parquet")
    prepare_fineweb.main(["--input", str(tmp_path / "d.parquet"),
                          "--out_dir", str(tmp_path / "out"),
                          "--shard_size", "4", "--workers", "1"])
    check_shards(tmp_path / "out", "d", 4, docs)
    pq.write_table(pa.table({"body": docs}), tmp_path / "nocol.parquet")
    msg = run_main_error(["--input", str(tmp_path / "nocol.parquet"),
                          "--out_dir", str(tmp_path / "out2")])
    assert "nocol.parquet" in msg and "text" in msg


def test_bad_shards(tmp_path):
    good = tmp_path / "x_train_000001.bin"
    write_shard(str(good), np.arange(100, dtype=np.uint16))
    data = good.read_bytes()
    assert not (tmp_path / "x_train_000001.bin.tmp").exists()
    cases = {"truncated": data[:-2], "too short": data[:100], "magic": b"\0" * 4 + data[4:],
             "version": data[:4] + np.int32(2).tobytes() + data[8:]}
    for what, content in cases.items():
        bad = tmp_path / f"bad_{what.replace(' ', '_')}.bin"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=what) as e:
            load_shard(str(bad))
        assert str(bad) in str(e.value)
    with pytest.raises(AssertionError):
        write_shard(str(tmp_path / "big.bin"), np.array([70000]))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError) as e:
        shard_paths(str(tmp_path / "nothing"), "val")
    assert ("nothing" in str(e.value) and "val" in str(e.value)
            and "prepare_fineweb.py" in str(e.value))


def test_small_input_keeps_most_for_training(tmp_path, capsys):
    docs = real_docs()
    src = write_jsonl(tmp_path / "mine.jsonl", docs)
    total = sum(1 + len(get_tokenizer().encode_ordinary(d)) for d in docs)
    # the README's example on a small file, default --shard_size (100M): 10% val, the rest one train
    # shard
    prepare_fineweb.main(["--input", str(src), "--out_dir", str(tmp_path / "mine"),
                          "--workers", "2"])
    assert f"{total // 10:,} go to validation" in capsys.readouterr().out
    check_shards(tmp_path / "mine", "mine", 10**8, docs, val_size=total // 10)
    info = check_dataset(str(tmp_path / "mine"), 50257)
    assert [n for _, n in info["train"]] == [total - total // 10]
    # smaller than val + one train shard: the rest after 10% val is cut into shards as usual
    prepare_fineweb.main(["--input", str(src), "--out_dir", str(tmp_path / "s"), "--workers", "2",
                          "--val_tokens", str(total), "--shard_size", str(total // 3)])
    check_shards(tmp_path / "s", "mine", total // 3, docs, val_size=total // 10)
    # a big enough input: val is exactly --val_tokens
    prepare_fineweb.main(["--input", str(src), "--out_dir", str(tmp_path / "v"), "--workers", "2",
                          "--val_tokens", "700", "--shard_size", "1000"])
    check_shards(tmp_path / "v", "mine", 1000, docs, val_size=700)
    # the README's example then trains: train.py finds train and val shards there
    train.main([f"--data_dir={tmp_path / 'mine'}", f"--out_dir={tmp_path / 'out'}", "--n_layer=1",
                "--n_head=2", "--n_embd=32", "--block_size=32", "--d_z=8", "--batch_size=2",
                "--eval_iters=1", "--max_iters=1", "--eval_interval=1"])
    assert (tmp_path / "out" / "ckpt.pt").exists()
    # one token cannot be split
    (tmp_path / "one.jsonl").write_text('{"text": ""}\n')
    msg = run_main_error(["--input", str(tmp_path / "one.jsonl"),
                          "--out_dir", str(tmp_path / "one")])
    assert "1 tokens" in msg and "too few" in msg


# ---- manifest and check_dataset

check_dataset = prepare_fineweb.check_dataset


def shard_files(out_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(out_dir).iterdir())}


def manifest_of(out_dir):
    return json.loads((Path(out_dir) / "manifest.json").read_text())


def test_check_dataset_accepts_the_bundled_sample():
    info = check_dataset(str(REPO / "data" / "sample"), 50257)
    assert info["manifest"] is True and len(info["val"]) == 1 and len(info["train"]) == 7
    for path, n in info["val"] + info["train"]:
        tokens = read_shard_independently(path)
        assert n == len(tokens) and tokens.max() < 50257
    assert sum(n for _, n in info["val"] + info["train"]) == 1_848_677  # the README's 1.85M tokens


@pytest.mark.parametrize("damage, names, message", [
    ("token_id", "syn_train_000002.bin", "token id 97 is out of range for vocab_size 97"),
    ("truncated", "syn_train_000002.bin", "truncated"),
    ("magic", "syn_val_000000.bin", "magic"),
    ("empty", "syn_train_000001.bin", "0 tokens"),
    ("incomplete", "manifest.json", "incomplete"),
    ("unlisted", "syn_train_000003.bin", "not part of the dataset"),
    ("missing", "syn_train_000002.bin", "listed in"),
    ("resized", "syn_train_000001.bin", "lists 7000"),
    ("bad_manifest", "manifest.json", "unreadable manifest"),
    ("no_train", "", "no train shards"),  # names the directory
])
def test_check_dataset_names_the_file(shards, damage, names, message):
    listing = [("syn_val_000000.bin", 4000), ("syn_train_000001.bin", 7000),
               ("syn_train_000002.bin", 8993)]
    info = check_dataset(str(shards), 97)  # the fixture's shards, written by an independent writer
    assert info == {"train": [(str(shards / n), k) for n, k in listing[1:]],
                    "val": [(str(shards / listing[0][0]), 4000)], "manifest": False}
    manifest = {"complete": True, "shards": [{"name": n, "tokens": k} for n, k in listing]}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert check_dataset(str(shards), 97)["manifest"] is True
    last = shards / "syn_train_000002.bin"
    if damage == "token_id":
        write_llmc_shard(last, np.r_[np.zeros(50, int), 97, np.zeros(8942, int)])
    elif damage == "truncated":
        last.write_bytes(last.read_bytes()[:-1])
    elif damage == "magic":
        path = shards / "syn_val_000000.bin"
        path.write_bytes(b"\1" + path.read_bytes()[1:])
    elif damage == "empty":
        write_llmc_shard(shards / "syn_train_000001.bin", [])
        manifest["shards"][1]["tokens"] = 0
    elif damage == "incomplete":
        manifest["complete"] = False
    elif damage == "unlisted":
        write_llmc_shard(shards / "syn_train_000003.bin", [1, 2, 3])
    elif damage == "missing":
        last.unlink()
    elif damage == "resized":
        write_llmc_shard(shards / "syn_train_000001.bin", np.zeros(6999, int))
    elif damage == "no_train":
        for path in shards.glob("*_train_*"):
            path.unlink()
    (shards / "manifest.json").write_text(
        "{not json" if damage == "bad_manifest" else json.dumps(manifest))
    with pytest.raises(DataError, match=message) as e:
        check_dataset(str(shards), 97)
    assert str(shards / names) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case, message", [
    ("pattern", "no such directory"),  # B1: not a glob pattern: d* is not d1 and d2
    ("brackets", None),  # B1: a directory named like a pattern is that directory
    ("shard_named_dir", "a directory, not a shard"),  # B9
    ("missing", "no such directory"),
    ("file", "not a directory"),
    ("loop", "symbolic links"),
])
def test_data_dir_is_a_path(shards, tmp_path, case, message):
    data = {"pattern": tmp_path / "d*", "brackets": tmp_path / "run[1]", "missing": tmp_path / "no",
            "file": tmp_path / "f", "loop": tmp_path / "loop", "shard_named_dir": shards}[case]
    if case == "pattern":
        for twin in ("d1", "d2"):
            shutil.copytree(shards, tmp_path / twin)
    elif case == "brackets":
        shutil.copytree(shards, data)
    elif case == "file":
        data.write_text("")
    elif case == "loop":
        os.symlink(data, data)
    elif case == "shard_named_dir":
        (shards / "syn_train_000009.bin").mkdir()
    if message is None:
        info = check_dataset(str(data), 97)
        assert [os.path.basename(p) for p, _ in info["val"] + info["train"]] == [
            "syn_val_000000.bin", "syn_train_000001.bin", "syn_train_000002.bin"]
        return
    with pytest.raises(DataError, match=message) as e:
        check_dataset(str(data), 97)
    where = shards / "syn_train_000009.bin" if case == "shard_named_dir" else data
    # the right next step: not "create shards there" (prepare_fineweb) for a path that is wrong
    assert (str(where) in str(e.value) and "\n" not in str(e.value)
            and "prepare_fineweb" not in str(e.value))


# ---- bad input

def test_bad_input(tmp_path):
    out = ["--out_dir", str(tmp_path / "out"), "--workers", "2"]
    (tmp_path / "empty.jsonl").write_text("")
    msg = run_main_error(["--input", str(tmp_path / "empty.jsonl")] + out)
    assert "empty.jsonl" in msg and "no documents" in msg
    (tmp_path / "empty.txt").write_text("")
    assert "empty.txt" in run_main_error(["--input", str(tmp_path / "empty.txt")] + out)
    (tmp_path / "notext.jsonl").write_text('{"text": "fine"}\n'
                                           '{"id": 7, "content": "no text field"}\n')
    msg = run_main_error(["--input", str(tmp_path / "notext.jsonl")] + out)
    assert "notext.jsonl" in msg and "line 2" in msg and "text" in msg
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    msg = run_main_error(["--input", str(tmp_path / "broken.jsonl")] + out)
    assert "broken.jsonl" in msg and "line 2" in msg
    assert "missing.jsonl" in run_main_error(["--input", str(tmp_path / "missing.jsonl")] + out)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00garbage\x80")
    assert "binary.txt" in run_main_error(["--input", str(tmp_path / "binary.txt")] + out)
    (tmp_path / "data.csv").write_text("text\nhello\n")
    assert "data.csv" in run_main_error(["--input", str(tmp_path / "data.csv")] + out)


def test_json_and_utf8_errors_name_the_line(tmp_path):
    out = ["--out_dir", str(tmp_path / "out"), "--workers", "1"]
    cases = {"list.json": (b'[\n {"text": "a"},\n {"text": "b"}\n {"text": "c"}\n]\n',
                           "line 4: invalid JSON"),
             "lines.json": (b'{"text": "a"}\n{"text": "b"}\n{"text": \n', "line 3: invalid JSON"),
             "bytes.jsonl": (b'{"text": "a"}\n{"text": "b\xff"}\n', "line 2: not UTF-8"),
             "bytes.txt": (b"one\ntwo\n\xc3(\n", "line 3: not UTF-8")}
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        msg = run_main_error(["--input", str(tmp_path / name)] + out)
        assert f"{tmp_path / name}, {expected}" in msg and "\n" not in msg
    # JSON lines named .json still work
    (tmp_path / "ok.json").write_bytes(b'{"text": "a"}\n{"text": "b"}\n')
    prepare_fineweb.main(["--input", str(tmp_path / "ok.json"), "--shard_size", "2"] + out)
    check_shards(tmp_path / "out", "ok", 2, ["a", "b"])


def test_bad_last_line_leaves_the_dataset_incomplete(tmp_path, monkeypatch, capsys):
    # small tasks: shards are written before the error
    monkeypatch.setattr(prepare_fineweb, "CHUNK_CHARS", 500)
    docs = real_docs()
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + '{"text": "cut off',
                   encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--input", str(src), "--out_dir", str(out), "--shard_size", "1000", "--workers", "2"]
    msg = run_main_error(argv)
    assert msg.count("\n") == 0 and f"{src}, line {len(docs) + 1}: invalid JSON" in msg
    assert len(list(out.glob("docs_train_*.bin"))) > 3  # finished shards on disk, but...
    assert manifest_of(out)["complete"] is False
    with pytest.raises(DataError, match="incomplete"):
        check_dataset(str(out), 50257)
    # fixed input: another file (size, mtime), so the unfinished run's shards are redone from the
    # start
    write_jsonl(src, docs)
    capsys.readouterr()
    prepare_fineweb.main(argv)
    assert "starting over" in capsys.readouterr().out
    check_shards(out, "docs", 1000, docs)
    check_dataset(str(out), 50257)
    # the dataset is complete now: another input or setting never silently replaces it
    msg = run_main_error(argv[:-4] + ["--shard_size", "2000", "--workers", "2"])
    assert str(out) in msg and "shard_size" in msg and "delete" in msg
    write_jsonl(src, docs[:-1])
    assert "source" in run_main_error(argv)
    check_shards(out, "docs", 1000, docs)


def test_prepare_bad_options_write_nothing(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.txt").write_text("some text")
    base = ["--input", str(tmp_path / "a.txt"), "--out_dir", str(tmp_path / "out")]
    for flag, value in (("--shard_size", "0"), ("--val_tokens", "-5"),
                        ("--shard_size", str(2**31))):
        with pytest.raises(SystemExit):
            prepare_fineweb.main(base + [flag, value])
        assert flag in capsys.readouterr().err
    for prefix in ("a_val", "x/y", "my_train_set"):
        assert "--prefix" in run_main_error(base + ["--prefix", prefix])
    assert not (tmp_path / "out").exists()  # nothing written for a bad command
    (tmp_path / "file").write_text("not a directory")
    msg = run_main_error(base[:2] + ["--out_dir", str(tmp_path / "file")])
    assert str(tmp_path / "file") in msg and "\n" not in msg
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: import fails
    monkeypatch.setattr(prepare_fineweb, "DATA_DIR", str(tmp_path / "data"))
    assert "pip install datasets" in run_main_error([])
    assert not (tmp_path / "data").exists()


def test_an_input_named_with_a_dot_makes_shards_train_py_sees(tmp_path):
    """B8: .notes.jsonl's shards are notes_*.bin, not hidden files; a --prefix starting with '.' is
    refused; and hidden shards written before are seen."""
    src = write_jsonl(tmp_path / ".notes.jsonl", ["some notes " * 20, "more notes " * 20])
    prepare_fineweb.main(["--input", str(src), "--out_dir", str(tmp_path / "n"), "--workers", "1"])
    info = check_dataset(str(tmp_path / "n"), 50257)
    assert [os.path.basename(p) for p, _ in info["val"] + info["train"]] == [
        "notes_val_000000.bin", "notes_train_000001.bin"]
    msg = run_main_error(["--input", str(src), "--prefix", ".x", "--out_dir", str(tmp_path / "x")])
    assert "--prefix" in msg and not (tmp_path / "x").exists()
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    write_llmc_shard(hidden / ".old_val_000000.bin", [1, 2, 3])
    write_llmc_shard(hidden / ".old_train_000001.bin", [4, 5, 6])
    assert len(check_dataset(str(hidden), 97)["train"]) == 1


# ---- resume

def test_resume(tmp_path, capsys):
    docs = real_docs()
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    argv = ["--input", str(src), "--out_dir", str(tmp_path / "r"), "--prefix", "r",
            "--shard_size", "1500", "--workers", "2"]
    paths = prepare_fineweb.main(argv)
    assert len(paths) >= 5
    files = sorted((tmp_path / "r").iterdir())
    original = {f: f.read_bytes() for f in files}
    stat = lambda f: (os.stat(f).st_mtime_ns, os.stat(f).st_ino)
    before = {f: stat(f) for f in files}
    # a rerun of a complete dataset, same inputs and settings: says so, writes nothing
    capsys.readouterr()
    assert prepare_fineweb.main(argv) == paths
    assert "already complete" in capsys.readouterr().out
    assert {f: stat(f) for f in files} == before
    # damage after the fact: shard 2 truncated, the last shard gone (and a stray .tmp):
    # shards 0 and 1 are kept untouched, the rest written again, identical to the first run
    Path(paths[2]).write_bytes(original[Path(paths[2])][:-10])
    Path(paths[3] + ".tmp").write_bytes(b"half a shard")
    os.remove(paths[-1])
    assert prepare_fineweb.main(argv) == paths
    assert "resuming: 2 finished shards kept" in capsys.readouterr().out
    assert all(stat(paths[i]) == before[Path(paths[i])] for i in (0, 1))
    assert {f: f.read_bytes() for f in sorted((tmp_path / "r").iterdir())
            if f.suffix != ".tmp"} == original
    check_shards(tmp_path / "r", "r", 1500, docs)


def crash_after(monkeypatch, n_shards):
    """Make the n+1-th shard write die half way, as a kill would: a partial .tmp, no manifest
    update."""
    write, calls = prepare_fineweb.write_shard, [0]

    def dying_write(path, tokens):
        calls[0] += 1
        if calls[0] > n_shards:
            Path(path + ".tmp").write_bytes(b"\0" * 100)
            raise KeyboardInterrupt
        write(path, tokens)

    monkeypatch.setattr(prepare_fineweb, "write_shard", dying_write)


def test_killed_run_resumes_to_the_same_shards(tmp_path, monkeypatch, capsys):
    docs = real_docs()
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    argv = lambda d: ["--input", str(src), "--out_dir", str(tmp_path / d), "--shard_size", "1200",
                      "--workers", "2"]
    prepare_fineweb.main(argv("whole"))
    with monkeypatch.context() as m:
        crash_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            prepare_fineweb.main(argv("killed"))
    assert [s["name"] for s in manifest_of(tmp_path / "killed")["shards"]] == \
        ["docs_val_000000.bin", "docs_train_000001.bin", "docs_train_000002.bin"]
    kept = np.concatenate([read_shard_independently(tmp_path / "whole" / f"docs_{s}.bin")
                           for s in ("val_000000", "train_000001", "train_000002")])
    capsys.readouterr()
    prepare_fineweb.main(argv("killed"))
    # whole documents before the one the 3rd shard ends in
    skipped = np.count_nonzero(kept == EOT) - 1
    assert (f"resuming: 3 finished shards kept; their {skipped:,} whole documents are skipped"
            in capsys.readouterr().out)
    assert shard_files(tmp_path / "killed") == shard_files(tmp_path / "whole")  # manifest included


# ---- Hugging Face datasets

def test_hugging_face_source_uses_same_pipeline(tmp_path, monkeypatch):
    # no network here: a stand-in `datasets` module records the call and streams rows like FineWeb's
    import types
    calls = []
    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return iter([{"text": "row one", "id": "a"}, {"text": "row two", "id": "b"}])
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    # the default out_dir is in the repository's data/, wherever the command is run
    monkeypatch.setattr(prepare_fineweb, "DATA_DIR", str(tmp_path / "repo" / "data"))
    monkeypatch.chdir(tmp_path)
    prepare_fineweb.main(["--dataset", "fineweb-edu", "--subset", "sample-100BT",
                          "--shard_size", "3", "--workers", "2"])
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-100BT", "train", True)]
    check_shards(tmp_path / "repo" / "data" / "fineweb-edu100B", "fineweb", 3,
                 ["row one", "row two"])


def test_hugging_face_resume_skips_finished_documents(tmp_path, monkeypatch):
    # FineWeb's stand-in streams documents; the resumed run streams different text for the documents
    # the finished shards hold: the result equals one uninterrupted run only if those are not
    # re-tokenised
    import types
    docs = real_docs()
    stream = [docs]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda *a, **k: iter([{"text": d} for d in stream[0]])))
    argv = lambda d: ["--out_dir", str(tmp_path / d), "--shard_size", "1200", "--workers", "2"]
    prepare_fineweb.main(argv("whole"))
    with monkeypatch.context() as m:
        crash_after(m, 6)
        with pytest.raises(KeyboardInterrupt):
            prepare_fineweb.main(argv("killed"))
    skipped = manifest_of(tmp_path / "killed")["shards"][-1]["docs"] - 1
    assert skipped >= 3
    stream[0] = ["never tokenised"] * skipped + docs[skipped:]
    prepare_fineweb.main(argv("killed"))
    assert shard_files(tmp_path / "killed") == shard_files(tmp_path / "whole")


def test_hugging_face_offline_is_one_line_and_leaves_no_complete_dataset(tmp_path, monkeypatch):
    import types

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb' on the Hub "
                              "(LocalEntryNotFoundError)")

    def drops_mid_stream(*a, **k):
        yield from ({"text": f"row {i} " * 50} for i in range(20))
        raise TimeoutError("read timed out")

    # small tasks: shards are written before the error
    monkeypatch.setattr(prepare_fineweb, "CHUNK_CHARS", 500)
    out = ["--out_dir", str(tmp_path / "fw"), "--shard_size", "300", "--workers", "1"]
    for load, error in ((offline, "ConnectionError"), (drops_mid_stream, "TimeoutError")):
        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load))
        msg = run_main_error(out)
        assert (msg.count("\n") == 0 and "HuggingFaceFW/fineweb (sample-10BT)" in msg
                and error in msg)
        assert "--input" in msg and ".parquet" in msg
    assert (manifest_of(tmp_path / "fw")["complete"] is False
            and len(manifest_of(tmp_path / "fw")["shards"]) > 2)


# ---- HellaSwag files

def test_missing_file(tmp_path):
    path = str(tmp_path / "nowhere" / "hellaswag_val.jsonl")
    with pytest.raises(FileNotFoundError) as e:
        load_hellaswag(path)
    assert path in str(e.value) and "python prepare_fineweb.py --hellaswag" in str(e.value)


def test_download_unreachable(tmp_path):
    path = str(tmp_path / "hs" / "hellaswag_val.jsonl")
    url = "http://127.0.0.1:9/x"
    with pytest.raises(DataError) as e:
        download_hellaswag(path, url=url, timeout=5)
    msg = str(e.value)
    assert url in msg and path in msg and "python prepare_fineweb.py --hellaswag" in msg
    assert not (tmp_path / "hs" / "hellaswag_val.jsonl").exists()


def test_download_existing_file_is_kept(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    write_fixture(path)
    # no network touched
    assert download_hellaswag(str(path), url="http://127.0.0.1:9/x") == str(path)


def test_malformed_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_fixture(path)
    with open(path, "a") as f:
        f.write('{"ctx": "x", "endings": ["a", "b"], "label": 0}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 7"):
        load_hellaswag(str(path))
    path.write_text("not json\n")
    with pytest.raises(DataError, match=r"line 1"):
        load_hellaswag(str(path))


def test_hellaswag_empty_or_malformed_names_file_and_line(tmp_path):
    path = tmp_path / "hs.jsonl"
    for content, expected in ((b"", "no HellaSwag examples"), (b"\n\n", "no HellaSwag examples"),
                              (b'{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": 0}\n'
                               b'{"ctx": "b",\n',
                               "line 2: invalid JSON"),
                              (b'{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": 9}\n',
                               "line 1: not a HellaSwag"),
                              (b'\n{"ctx": "\xff"}\n', "line 2: not UTF-8")):
        path.write_bytes(content)
        with pytest.raises(DataError, match=expected) as e:
            load_hellaswag(str(path))
        assert str(path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="prepare_fineweb.py --hellaswag"):
        load_hellaswag(str(tmp_path))  # a directory


# ---- out_dir: whose shards, one run at a time

def offline_datasets(monkeypatch):
    import types

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb' on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))


def test_prepare_never_overwrites_or_disowns_shards_it_did_not_write(shards, tmp_path,
                                                                      monkeypatch):
    """B2: shards without a manifest (modded-nanogpt's, in prepare_fineweb's out_dir) are refused,
    named, by an offline FineWeb run and by local text of the same prefix; nothing changes. With a
    manifest, a shard it does not list is not prepare_fineweb's either."""
    offline_datasets(monkeypatch)
    before = shard_files(shards)
    src = write_jsonl(tmp_path / "t.jsonl", ["some text " * 30] * 20)
    for argv in (["--out_dir", str(shards), "--prefix", "syn"],
                 ["--input", str(src), "--out_dir", str(shards), "--prefix", "syn"]):
        msg = run_main_error(argv)
        assert ("did not write" in msg and str(shards / "syn_val_000000.bin") in msg
                and "\n" not in msg), msg
        assert shard_files(shards) == before  # no manifest, lock or shard written
    assert check_dataset(str(shards), 97)["manifest"] is False  # train.py still reads them
    ours = tmp_path / "ours"
    argv = ["--input", str(src), "--out_dir", str(ours), "--shard_size", "200", "--workers", "1"]
    prepare_fineweb.main(argv)
    shutil.copy(shards / "syn_train_000002.bin", ours / "other_train_000001.bin")
    write_jsonl(src, ["other text " * 30] * 20)  # another input: an unfinished run would restart
    mine = shard_files(ours)
    msg = run_main_error(argv)
    assert "did not write" in msg and str(ours / "other_train_000001.bin") in msg
    assert shard_files(ours) == mine


def test_a_second_run_into_one_out_dir_is_refused(tmp_path, monkeypatch):
    """B3: prepare_fineweb.py holds a lock on out_dir while it writes: a second run is refused,
    naming out_dir, and writes nothing."""
    import filelock
    src = write_jsonl(tmp_path / "t.jsonl", ["some text " * 30] * 20)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--input", str(src), "--out_dir", str(out), "--shard_size", "100", "--workers", "1"]
    with filelock.FileLock(str(out / ".lock"), timeout=0):
        msg = run_main_error(argv)
        assert "in use" in msg and str(out) in msg and "\n" not in msg
    assert os.listdir(out) == [".lock"]
    held, write = [], prepare_fineweb.write_shard

    def probing_write(path, tokens):  # the first run's writes, while a second tries to start
        try:
            filelock.FileLock(str(out / ".lock"), timeout=0).acquire()
            held.append(False)
        except filelock.Timeout:
            held.append(True)
        write(path, tokens)

    monkeypatch.setattr(prepare_fineweb, "write_shard", probing_write)
    prepare_fineweb.main(argv)
    assert len(held) > 3 and all(held)


# ---- errors: one line, one exit status, nothing left behind

@pytest.mark.parametrize("script, argv, words", [
    (prepare_fineweb, ["--shard_size", "0"], "--shard_size"),
    (prepare_fineweb, ["--workers", "0"], "--workers"),
    (prepare_fineweb, ["--input", "nowhere.jsonl"], "nowhere.jsonl: no such readable file"),
    (train, ["--bogus=1"], "unknown option --bogus"),
    (sample, ["--top_k=-5"], "--top_k=-5"),
    (compare, ["--jobs=0"], "--jobs=0"),
    (compare, ["--plot=/nowhere/x.png"], "--plot=/nowhere/x.png: no directory /nowhere"),
    (bench, ["--rates=abc"], "argument --rates: 'abc'"),
    (bench, ["--rates=150"], "argument --rates: 150 is not in (0, 100]"),
    (bench, ["--ks=0"], "argument --ks: 0"),
    (bench, ["--tokens=-1"], "argument --tokens: -1"),
    (bench, ["--tokens=0"], "argument --tokens: 0"),
    (bench, ["--d_z=0"], "argument --d_z: 0"),
    (bench, ["--reps=0"], "argument --reps: 0"),
    (bench, ["--plot=/nowhere/x.png"], "--plot=/nowhere/x.png: no directory /nowhere"),
    (bench, ["--compile-check", "--archs=abc"], "argument --archs: 'abc'"),
    (bench, ["--compile-check", "--archs=70"], "--archs=70: expected some of 75,80,86,89,90"),
    (bench, ["--compile-check", "--archs=75", "--dtypes=bf16"],
     "--dtypes=bf16 --archs=75: bf16 is compiled on sm80 and up only"),
    (bench, ["--compile-check", "--dtypes=fp8"], "--dtypes=fp8: expected some of bf16,fp16,fp32"),
    (bench, ["--compile-check", "--d=0"], "argument --d: 0"),
])
def test_every_script_exits_2_with_one_line(script, argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        prepare_fineweb.run_main(lambda: script.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err, err


def test_prepare_errors_name_the_file_and_leave_no_temporary_file(tmp_path, monkeypatch, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", real_docs())
    out = tmp_path / "out"
    argv = ["--input", str(src), "--out_dir", str(out), "--shard_size", "1000"]
    # a read-only /dev/shm: multiprocessing cannot start; one worker needs none, nothing is written
    with monkeypatch.context() as m:
        m.setattr(prepare_fineweb.mp, "Pool", lambda *a, **k: (_ for _ in ()).throw(
            OSError(errno.EROFS, "Read-only file system")))
        msg = run_main_error(argv + ["--workers", "2"])
        assert "/dev/shm" in msg and "--workers 1" in msg and not out.exists()
    # a full disk at the 3rd shard (the 4th file written, after the manifest): exit status 1, the
    # shard named; the finished shards stay listed; then Ctrl-C as the rerun writes that shard
    for nth, error, status, words in (
            (4, disk_full(), 1, f"error: {out / 'd_train_000002.bin'}: No space left on device"),
            (2, KeyboardInterrupt(), 130, f"interrupted: {out / 'manifest.json'} lists the 2 "
                                          f"shards finished")):
        with monkeypatch.context() as m:
            failing_writes(m, nth, error)
            with pytest.raises(SystemExit) as e:
                prepare_fineweb.run_main(lambda: prepare_fineweb.main(argv + ["--workers", "1"]))
        err = capsys.readouterr().err
        assert e.value.code == status and err.splitlines()[-1].startswith(words), err
        assert not list(out.glob("*.tmp")) and len(manifest_of(out)["shards"]) == 2
    prepare_fineweb.main(argv + ["--workers", "1"])
    assert "resuming: 2 finished shards kept" in capsys.readouterr().out
    check_shards(out, "d", 1000, real_docs())


def test_prepare_knows_an_input_however_it_is_spelled(tmp_path, monkeypatch, capsys):
    """data/x.jsonl, ./data/x.jsonl and the absolute path are one input: an unfinished dataset
    resumes (also from a manifest of an older version, which recorded the path as spelled)."""
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "x.jsonl", real_docs())
    monkeypatch.chdir(tmp_path)
    argv = lambda src: ["--input", src, "--out_dir", "out", "--shard_size", "1200",
                        "--workers", "1"]
    with monkeypatch.context() as m:
        crash_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            prepare_fineweb.main(argv("data/x.jsonl"))
    manifest = manifest_of("out")
    manifest["settings"]["source"]["inputs"][0]["path"] = "data/x.jsonl"
    Path("out/manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    prepare_fineweb.main(argv("./data/x.jsonl"))
    assert "resuming: 3 finished shards kept" in capsys.readouterr().out
    prepare_fineweb.main(argv(str(tmp_path / "data" / "x.jsonl")))
    assert "already complete" in capsys.readouterr().out


def test_tiny_shards_do_not_rewrite_the_manifest_per_shard(tmp_path, monkeypatch):
    calls, write = [], prepare_fineweb.write_manifest
    monkeypatch.setattr(prepare_fineweb, "write_manifest",
                        lambda *a, **k: calls.append(a[2][:]) or write(*a, **k))
    src = write_jsonl(tmp_path / "d.jsonl", ["a few words of text"] * 40)
    paths = prepare_fineweb.main(["--input", str(src), "--out_dir", str(tmp_path / "out"),
                                  "--shard_size", "1", "--workers", "1"])
    assert len(paths) > 200 and len(calls) < 20  # once per shard before
    assert len(check_dataset(str(tmp_path / "out"), 50257)["train"]) == len(paths) - 1


def test_a_parquet_of_numbers_and_a_blank_txt_are_refused(tmp_path):
    out = ["--out_dir", str(tmp_path / "out"), "--workers", "1"]
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    msg = run_main_error(["--input", str(tmp_path / "ints.parquet")] + out)
    assert "ints.parquet: its 'text' column holds int64, not strings" in msg
    (tmp_path / "blank.txt").write_text("  \n\t\n\n")  # as a .jsonl of blank lines
    msg = run_main_error(["--input", str(tmp_path / "blank.txt")] + out)
    assert "blank.txt: no documents" in msg and not (tmp_path / "out").exists()


# ====================================================================== fastpath.py

# ---- the fast PyTorch path (fast_inf_ffn) and its selection ops

def test_top_fraction_keeps_exactly_n_at_their_values():
    torch.manual_seed(0)
    d_ff, d_z, r = 50, 6, 0.3
    z, W_z = torch.randn(1, 7, d_z), torch.randn(d_ff, d_z)
    M, counts, _ = averaged_topk_mask(z, W_z, r)
    scores = z[0] @ W_z.t()
    n_keep = 15  # round(0.3 * 50)
    assert ((M != 0).sum(-1) == n_keep).all()
    kept = M != 0
    torch.testing.assert_close(M[kept], scores[kept])
    # the kept entries are the largest ones: every kept score beats every dropped score in its row
    assert (scores.masked_fill(~kept, float("inf")).min(-1).values >
            scores.masked_fill(kept, -float("inf")).max(-1).values).all()
    assert counts.sum().item() == 7 * n_keep


def fast_and_naive(inp, top_frac, dy):
    """The fast path and its oracle, model.inf_ffn (the paper's K-pass equations)."""
    return run(fast_inf_ffn, inp, top_frac, dy), run(inf_ffn, inp, top_frac, dy)


@pytest.mark.parametrize("K,bias,top_frac", [(1, True, 0.25), (2, True, 0.25), (3, False, 0.1),
                                             (4, True, 0.5), (2, False, 1.0)])
def test_fast_path_matches_naive_k_pass(K, bias, top_frac):
    inp = make_inputs(N=29, d=12, d_ff=40, d_z=6, K=K, bias=bias, seed=10 + K)
    dy = torch.randn(29, 12, generator=torch.Generator().manual_seed(2))
    (y, counts, n_active, grads), (y0, counts0, n_active0, grads0) = fast_and_naive(
        inp, top_frac, dy)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    assert torch.equal(counts, counts0) and counts.sum() == K * 29 * max(1, round(top_frac * 40))
    assert n_active.item() == n_active0.item()
    assert grads.keys() == grads0.keys() == {k for k, v in inp.items() if v is not None}
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_fast_path_ties_by_hand():
    # m = z W_z^T with W_z = I is the integer score table itself (exact in fp32). d_ff = 8, r = 25%:
    # n_keep = 2. Sample 0, row 0: [5, 3, 3, 1, 3, 0, -2, 3] -> 2nd largest 3 -> keep the 5 and
    # four 3s. Sample 0, row 1: all 2 -> keep all eight. Sample 1, row 0:
    # [0, 0, 0, 1, -1, -1, -1, -1] -> keep the 1 and the three zeros (kept, though worth 0);
    # row 1: [4, -1, ..., -1] -> 2nd largest -1 -> all eight.
    s0 = torch.tensor([[5., 3, 3, 1, 3, 0, -2, 3], [2.] * 8])
    s1 = torch.tensor([[0., 0, 0, 1, -1, -1, -1, -1], [4., -1, -1, -1, -1, -1, -1, -1]])
    inp = make_inputs(N=2, d=5, d_ff=8, d_z=8, K=2, bias=True)
    inp["z"], inp["W_z"] = torch.stack([s0, s1]).requires_grad_(), torch.eye(8).requires_grad_()
    keep0 = torch.tensor([[1, 1, 1, 0, 1, 0, 0, 1], [1] * 8], dtype=torch.bool)
    keep1 = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8], dtype=torch.bool)
    M, counts, keep = averaged_topk_mask(inp["z"].detach(), inp["W_z"].detach(), 0.25)
    assert torch.equal(keep[0], keep0) and torch.equal(keep[1], keep1)
    torch.testing.assert_close(M, (torch.where(keep0, s0, 0.0) + torch.where(keep1, s1, 0.0)) / 2)
    assert counts.tolist() == (keep0.sum(0) + keep1.sum(0)).float().tolist()
    dy = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    (y, counts, n_active, grads), (y0, _, _, grads0) = fast_and_naive(inp, 0.25, dy)
    torch.testing.assert_close(y, y0)
    # row 0: units 0-4 and 7; row 1: all eight
    assert n_active.item() == (M != 0).sum().item() == 14
    # sample 1's kept zeros add nothing to M but pass gradient to their scores
    # (W_z = I: dz_1 = dL/dm_1)
    assert (grads["z"][1, 0, :3] != 0).all() and (grads["z"][1, 0, 4:] == 0).all()
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("K", [1, 3])
def test_fast_path_gradcheck_float64(K):
    # float64 inputs keep the scores in float64, so finite differences check every gradient,
    # those of W_z and z included (random scores: the selection does not flip within eps)
    inp = make_inputs(N=6, d=5, d_ff=12, d_z=4, K=K, bias=True, seed=K, dtype=torch.float64)
    inp["W_z"] = inp["W_z"].detach().double().requires_grad_()
    inp["z"] = inp["z"].detach().double().requires_grad_()
    args = [inp[k] for k in ("x", "W1", "b1", "W2", "b2", "W_z", "z")]
    assert torch.autograd.gradcheck(lambda *a: fast_inf_ffn(*a, 0.4)[0], args)


def saved_for_backward(fn, inp):
    """{address: bytes} of what autograd keeps for fn's backward beyond its inputs."""
    inputs = {t.data_ptr() for t in inp.values() if t is not None}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fn(*(inp[k] for k in ("x", "W1", "b1", "W2", "b2", "W_z", "z")), 0.25)[0]
    y.sum().backward()
    return {t.data_ptr(): t.numel() * t.element_size() for t in saved if t.data_ptr() not in inputs}


def test_fast_path_keeps_at_most_1_5x_a_dense_ffn_for_backward():
    # activation memory against a dense FFN of the same width, which keeps its pre-activation and
    # its activation: 2 fp32 tokens x d_ff tensors
    kept = saved_for_backward(fast_inf_ffn, make_inputs(N=64, d=16, d_ff=96, d_z=8, K=2, bias=True))
    assert sum(kept.values()) <= 1.5 * 2 * 64 * 96 * 4, kept


def test_inductor_gives_the_fast_path_eager_values_and_memory():
    # torch.compile's default backend fuses the path's element-wise passes and chooses afresh what
    # to keep for backward: the same values and gradients as eager, and no more than 1.5x a dense
    # FFN's memory (it used to keep the forward's GELU(pre) ⊙ M as well: 1.75x)
    torch._dynamo.reset()
    inp = make_inputs(N=64, d=16, d_ff=96, d_z=8, K=2, bias=True, seed=4)
    dy = torch.randn(64, 16, generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(fast_inf_ffn, dynamic=False)
    (y, counts, n_active, grads), (y0, counts0, n_active0, grads0) = (
        run(compiled, inp, 0.25, dy), run(fast_inf_ffn, inp, 0.25, dy))
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    assert torch.equal(counts, counts0) and n_active.item() == n_active0.item()
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    kept = saved_for_backward(compiled, inp)
    torch._dynamo.reset()
    assert sum(kept.values()) <= 1.5 * 2 * 64 * 96 * 4, kept


def test_selection_custom_ops_pass_opcheck():
    # torch's own check of a custom op: schema, fake (meta) shapes and strides against the real op,
    # autograd registration, and tracing by AOTAutograd (what inductor relies on)
    torch.manual_seed(0)
    z, W_z = torch.randn(3, 10, 4), torch.randn(16, 4)
    m = torch.randn(10, 16)
    torch.library.opcheck(torch.ops.infmoe.selection_scores,
                          (z[0].requires_grad_(), W_z.requires_grad_()))
    torch.library.opcheck(torch.ops.infmoe.row_threshold, (m, 4))
    torch.library.opcheck(torch.ops.infmoe.averaged_topk_mask, (z.detach(), W_z.detach(), 0.25))


def test_selection_scores_run_in_ieee_fp32_and_restore_the_flags(monkeypatch):
    # a script that allowed TF32 / bf16 matmuls (train.py uses the legacy allow_tf32 flag) gets its
    # flags back, and the score product itself runs with both backends at "ieee"
    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    seen, matmul = [], torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda *a, **kw: seen.append(
        (cuda.fp32_precision, mkldnn.fp32_precision)) or matmul(*a, **kw))
    old = cuda.allow_tf32, mkldnn.fp32_precision
    try:
        cuda.allow_tf32, mkldnn.fp32_precision = True, "bf16"
        z, W_z = torch.randn(5, 3), torch.randn(7, 3)
        torch.testing.assert_close(selection_scores(z, W_z),
                                   (z.double() @ W_z.double().t()).float())
        assert seen == [("ieee", "ieee")]
        assert cuda.allow_tf32 is True and mkldnn.fp32_precision == "bf16"
    finally:
        cuda.allow_tf32, mkldnn.fp32_precision = old


# ---- the block path (block_inf_ffn): mask_block > 1, only the kept blocks computed

def dense_block_masked_ffn(x, W1, b1, W2, b2, W_z, z, top_frac):
    """The block mask expanded to units, then a dense masked FFN by autograd: each sample keeps
    every block scoring at least its n_keep-th largest block score (ties all kept), at its value;
    M averages the K masks; unit j takes block j // b's value. Returns y, counts, n_active."""
    G, d_ff = W_z.shape[0], W1.shape[0]
    n_keep = max(1, round(top_frac * G))
    M, counts = 0, 0
    for k in range(len(z)):
        m = z[k] @ W_z.t()
        keep = m >= m.detach().sort(dim=-1, descending=True).values[:, n_keep - 1:n_keep]
        M, counts = M + torch.where(keep, m, 0.0) / len(z), counts + keep.float().sum(0)
    units = M[:, torch.arange(d_ff) // (d_ff // G)]
    y = F.linear(F.gelu(F.linear(x, W1, b1)) * units.to(x.dtype), W2, b2)
    return y, counts, (M != 0).sum().float()


def block_path(gemm):
    return lambda *args: fastpath.block_inf_ffn(*args, gemm=gemm)


@pytest.mark.parametrize("gemm", ["grouped", "bmm"])
@pytest.mark.parametrize("K,bias,top_frac,block", [(1, True, 0.25, 8), (2, True, 0.25, 16),
                                                   (3, False, 0.5, 4), (2, True, 0.25, 128),
                                                   (4, False, 1.0, 32)])
def test_block_path_matches_the_dense_block_masked_ffn(gemm, K, bias, top_frac, block):
    # d_ff = 128 in blocks of 4 to 128 (one block: every token keeps it)
    inp = make_inputs(N=37, d=16, d_ff=128, d_z=6, K=K, bias=bias, seed=K + block, block=block)
    dy = torch.randn(37, 16, generator=torch.Generator().manual_seed(7))
    (y, counts, n_active, grads), (y0, counts0, n_active0, grads0) = (
        run(block_path(gemm), inp, top_frac, dy), run(dense_block_masked_ffn, inp, top_frac, dy))
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    assert torch.equal(counts, counts0) and n_active.item() == n_active0.item()
    assert grads.keys() == grads0.keys() == {k for k, v in inp.items() if v is not None}
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("gemm", ["grouped", "bmm"])
def test_block_path_ties_by_hand(gemm):
    # the score tables of test_fast_path_ties_by_hand, now over 8 blocks of 4 units (W_z = I):
    # row 0 of sample 0 keeps blocks 0-2, 4, 7; sample 1 keeps its three zero-valued blocks too,
    # which add nothing to M but whose scores get a gradient
    s0 = torch.tensor([[5., 3, 3, 1, 3, 0, -2, 3], [2.] * 8])
    s1 = torch.tensor([[0., 0, 0, 1, -1, -1, -1, -1], [4., -1, -1, -1, -1, -1, -1, -1]])
    inp = make_inputs(N=2, d=8, d_ff=32, d_z=8, K=2, bias=True, block=4)
    inp["z"], inp["W_z"] = torch.stack([s0, s1]).requires_grad_(), torch.eye(8).requires_grad_()
    dy = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    (y, counts, n_active, grads), (y0, counts0, _, grads0) = (
        run(block_path(gemm), inp, 0.25, dy), run(dense_block_masked_ffn, inp, 0.25, dy))
    assert counts.tolist() == [4, 4, 4, 3, 3, 2, 2, 3] == counts0.tolist()
    assert n_active.item() == 14  # row 0: blocks 0-4 and 7; row 1: all eight
    torch.testing.assert_close(y, y0)
    assert (grads["z"][1, 0, :3] != 0).all() and (grads["z"][1, 0, 4:] == 0).all()
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], msg=lambda m: f"{name}: {m}")


def test_block_path_gradcheck_float64():
    # the padded batches in float64 (grouped_mm has no float64): finite differences of all seven
    inp = make_inputs(N=9, d=4, d_ff=12, d_z=3, K=2, bias=True, seed=2, dtype=torch.float64,
                      block=3)
    inp["W_z"] = inp["W_z"].detach().double().requires_grad_()
    inp["z"] = inp["z"].detach().double().requires_grad_()
    args = [inp[k] for k in ("x", "W1", "b1", "W2", "b2", "W_z", "z")]
    assert torch.autograd.gradcheck(lambda *a: fastpath.block_inf_ffn(*a, 0.5, gemm="bmm")[0], args)


class Sizes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of every tensor an op creates."""
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves(out)
        self.numels += [t.numel() for t in leaves if torch.is_tensor(t)]
        return out


@pytest.mark.parametrize("gemm", ["grouped", "bmm"])
def test_block_path_builds_no_tokens_by_d_ff_tensor(gemm):
    # N = 64 tokens, d_ff = 128 in 8 blocks of 16, K = 2, r = 25%: forward and backward create no
    # tensor of N x d_ff elements (the unit-level path creates several), and backward keeps less
    # than a dense FFN of width d_ff / 2 (its two N x d_ff / 2 tensors): the pre-activations of
    # the kept rows (at most 4 of 8 blocks per token), and vectors over the rows
    N, d_ff = 64, 128
    inp = make_inputs(N=N, d=16, d_ff=d_ff, d_z=8, K=2, bias=True, seed=1, block=16)
    for fn, big in ((block_path(gemm), False), (fast_inf_ffn, True)):
        if fn is fast_inf_ffn:
            inp["W_z"] = torch.randn(d_ff, 8, requires_grad=True)
        with Sizes() as sizes:
            y = fn(*(inp[k] for k in ("x", "W1", "b1", "W2", "b2", "W_z", "z")), 0.25)[0]
            y.sum().backward()
        assert (max(sizes.numels) >= N * d_ff) == big, max(sizes.numels)
    kept = saved_for_backward(block_path(gemm), inp | {"W_z": torch.randn(8, 8)})
    assert 0 < sum(kept.values()) < 2 * N * d_ff // 2 * 4, kept


def test_block_custom_ops_pass_opcheck(gemm="grouped"):
    # fake versions (data-dependent row counts included), schema, autograd, AOTAutograd tracing
    inp = make_inputs(N=24, d=16, d_ff=64, d_z=8, K=2, bias=True, seed=5, block=8)
    args = [inp[k] for k in ("x", "W1", "b1", "W2", "b2", "W_z", "z")]
    torch.library.opcheck(torch.ops.infmoe.block_ffn_fwd, (*args, 0.25, gemm))
    with torch.no_grad():
        saved = torch.ops.infmoe.block_ffn_fwd(*args, 0.25, gemm)[3:]
    x, W1, _, W2, _, W_z, z = (t.detach() for t in args)
    for need in ([True] * 7, [False, True, False, True, False, False, True]):
        torch.library.opcheck(torch.ops.infmoe.block_ffn_bwd,
                              (torch.randn(24, 16), x, W1, W2, W_z, z, *saved, gemm, need))


def test_inductor_gives_the_block_path_eager_values_and_memory():
    torch._dynamo.reset()
    inp = make_inputs(N=64, d=16, d_ff=128, d_z=8, K=2, bias=True, seed=4, block=16)
    dy = torch.randn(64, 16, generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(fastpath.block_inf_ffn, dynamic=False)
    (y, counts, n_active, grads), (y0, counts0, n_active0, grads0) = (
        run(compiled, inp, 0.25, dy), run(fastpath.block_inf_ffn, inp, 0.25, dy))
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    assert torch.equal(counts, counts0) and n_active.item() == n_active0.item()
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    kept = sum(saved_for_backward(compiled, inp).values())
    torch._dynamo.reset()
    assert kept == sum(saved_for_backward(fastpath.block_inf_ffn, inp).values())


@pytest.mark.parametrize("G,b,d,rows", [(24, 256, 768, 4000), (8, 16, 16, 40)])
def test_block_path_grouped_gemms_pass_the_cuda_checks(G, b, d, rows):
    # torch's shape function for grouped_mm holds the CUDA kernel's checks (bf16, 16-byte
    # strides, column- or row-major operands): the block path's five grouped GEMMs and their weight
    # views pass them on meta tensors, at GPT-2 Small's shape (b = 256) and the tests' toy one
    meta = dict(dtype=torch.bfloat16, device="meta")
    W1, W2 = torch.empty(G * b, d, **meta), torch.empty(d, G * b, **meta)
    x, h, ends = torch.empty(rows, d, **meta), torch.empty(rows, b, **meta), torch.empty(
        G, dtype=torch.int32, device="meta")
    W1g_t, W2g_t, W2g, W1g = fastpath._block_weights(W1, W2, G)
    assert fastpath._gmm(x, W1g_t, ends, torch.empty(G * b, **meta), torch.zeros(
        rows, dtype=torch.int64, device="meta")).shape == (rows, b)
    assert fastpath._gmm(h, W2g_t, ends).shape == fastpath._gmm(h, W1g, ends).shape == (rows, d)
    assert fastpath._gmm(x, W2g, ends).shape == (rows, b)
    assert fastpath._gmm_t(x, h, ends, G).shape == (G, d, b)
    assert fastpath._gmm_t(h, x, ends, G).shape == (G, b, d)
    with pytest.raises(RuntimeError, match="16 bytes"):  # the check bites: a 12-byte stride
        fastpath._gmm(torch.empty(rows, 6, **meta), torch.empty(G, 6, b, **meta), ends)


def test_block_path_picks_grouped_mm_where_it_is_one_kernel(monkeypatch):
    # auto: grouped_mm on the CPU and on sm90/sm100 in bf16, when d and b make 16-byte rows; padded
    # bmm on other GPUs and dtypes, where grouped_mm would read its group ends on the host in
    # every GEMM, and for unaligned rows
    caps = {"cuda:0": (8, 0), "cuda:1": (9, 0), "cuda:2": (10, 0), "cuda:3": (12, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: caps[device])
    gpu = lambda dev, dt, d=768: SimpleNamespace(is_cuda=True, device=dev, dtype=dt,  # noqa: E731
                                                 shape=(64, d))
    bf16, f32 = torch.bfloat16, torch.float32
    assert [fastpath._gemm(gpu(dev, dt), "auto", 256) for dev in caps for dt in (bf16, f32)] == [
        "bmm", "bmm", "grouped", "bmm", "grouped", "bmm", "bmm", "bmm"]
    assert fastpath._gemm(gpu("cuda:1", bf16, d=20), "auto", 256) == "bmm"
    assert fastpath._gemm(gpu("cuda:1", bf16), "auto", 4) == "bmm"
    assert fastpath._gemm(torch.zeros(5, 16), "auto", 8) == "grouped"
    assert fastpath._gemm(torch.zeros(5, 16), "auto", 2) == "bmm"
    assert fastpath._gemm(gpu("cuda:1", bf16), "bmm", 256) == "bmm"


# ====================================================================== kernel.py

# ---- the Triton kernels (triton_inf_ffn) against the PyTorch path

def check_against_reference(inp, top_frac, rtol=1e-4, atol=1e-5):
    dy = torch.randn(inp["x"].shape[0], inp["W2"].shape[0],
                     generator=torch.Generator().manual_seed(1))
    dy = dy.to(inp["x"].dtype)
    y0, c0, n0, g0 = run(fast_inf_ffn, inp, top_frac, dy)
    y1, c1, n1, g1 = run(kernel.triton_inf_ffn, inp, top_frac, dy)
    assert y1.dtype == inp["x"].dtype and y1.shape == y0.shape
    torch.testing.assert_close(y1, y0, rtol=rtol, atol=atol)
    assert torch.equal(c1, c0.float()) and c1.dtype == torch.float32
    assert n1.item() == n0.item() and n1.dtype == torch.float32 and n1.dim() == 0
    assert g1.keys() == g0.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=rtol, atol=atol,
                                   msg=lambda m: f"grad {name}: {m}")
    return c1, n1


# N, d, d_ff, d_z deliberately not multiples of the 16-wide interpreter tiles
@pytest.mark.parametrize("K,bias,top_frac", [(1, True, 0.25), (2, True, 0.1), (3, False, 0.3),
                                             (2, False, 1.0), (3, True, 1.0), (1, False, 0.02)])
def test_matches_reference(K, bias, top_frac):
    inp = make_inputs(N=37, d=24, d_ff=45, d_z=20, K=K, bias=bias, seed=K)
    counts, n_active = check_against_reference(inp, top_frac)
    n_keep = max(1, round(top_frac * 45))
    # random scores: no ties, exactly n_keep per (token, sample)
    assert counts.sum().item() == K * 37 * n_keep
    if top_frac == 1.0 and K == 1:
        assert n_active.item() == 37 * 45


def test_ties_follow_the_tie_rule():
    # Integer-valued scores are exact in fp32, so ties are exact. d_ff = 8,
    # n_keep = round(0.25 * 8) = 2.
    # Row 0 scores: [5, 3, 3, 1, 3, 0, -2, 3] -> 2nd largest is 3 -> keep every score >= 3
    # (five neurons).
    # Row 1: all scores equal -> all eight kept. Row 2: [-1, -4, -1, -3, -2, -5, -6, -7] -> keep the
    # two -1.
    scores = torch.tensor([[5., 3, 3, 1, 3, 0, -2, 3], [2.] * 8, [-1., -4, -1, -3, -2, -5, -6, -7]])
    # z = scores rows padded with zeros, W_z = identity (d_z = 8): m = z W_z^T = scores exactly.
    inp = make_inputs(N=3, d=5, d_ff=8, d_z=8, K=1, bias=True)
    inp["z"] = scores[None].clone().requires_grad_()
    inp["W_z"] = torch.eye(8).requires_grad_()
    keep = torch.tensor([[1, 1, 1, 0, 1, 0, 0, 1], [1] * 8, [1, 0, 1, 0, 0, 0, 0, 0]],
                        dtype=torch.bool)
    y, counts, n_active = kernel.triton_inf_ffn(
        *(inp[k] for k in ("x", "W1", "b1", "W2", "b2", "W_z", "z")), 0.25)
    M = torch.where(keep, scores, 0.0)
    h = F.gelu(F.linear(inp["x"], inp["W1"], inp["b1"]))
    torch.testing.assert_close(y, F.linear(h * M, inp["W2"], inp["b2"]), rtol=1e-5, atol=1e-6)
    assert counts.tolist() == keep.sum(0).float().tolist()
    assert n_active.item() == (M != 0).sum().item() == 15
    check_against_reference(inp, 0.25)  # gradients through tied entries as well


def test_select_negative_zero_ties_positive_zero():
    # -0.0 == +0.0 as floats: when 0 is the n_keep-th largest score both zeros are kept, as
    # `m >= thr`.
    s = torch.tensor([[1.0, -0.0, 0.0, -1.0, 2.0]])
    keep = s >= torch.topk(s, 3, dim=1).values[:, -1:]
    bits = torch.zeros(1, 1, dtype=torch.uint8)
    kernel._select_kernel[(1,)](s, bits, 1, 5, 1, 3, ROWS=16, BLOCK_F=8)
    assert bits.item() == sum(1 << j for j in range(5) if keep[0, j]) == 0b10111


def test_duplicated_router_rows_tie(monkeypatch):
    # Two identical W_z rows give bit-identical scores: both or neither must be kept, in every row.
    # Also: the selection's score scratch holds 6 rows, so it runs in 4 chunks (6, 6, 6, 2 rows),
    # and z needs no gradient (only W_z gets one).
    monkeypatch.setattr(kernel, "SCRATCH_ELEMS", 6 * 17)
    inp = make_inputs(N=20, d=8, d_ff=17, d_z=6, K=2, bias=False, seed=3)
    with torch.no_grad():
        inp["W_z"][5] = inp["W_z"][11]
    inp["z"].requires_grad_(False)
    counts, _ = check_against_reference(inp, 0.3)
    assert counts[5] == counts[11]


def test_bf16_runs():
    # dtype plumbing only (the interpreter emulates bf16): loose bf16 tolerance
    inp = make_inputs(N=19, d=16, d_ff=33, d_z=16, K=2, bias=True, dtype=torch.bfloat16)
    check_against_reference(inp, 0.25, rtol=5e-2, atol=5e-2)


def test_fp16_matches_the_pytorch_path():
    # float16 (T4, V100; --dtype=float16 anywhere): against the PyTorch path in float16, within the
    # tolerance kernel_ok's self-check uses; the selection is exact (it is decided in fp32)
    inp = make_inputs(N=19, d=16, d_ff=33, d_z=16, K=2, bias=True, dtype=torch.float16, seed=4)
    rtol, atol = kernel.TOLERANCES[torch.float16]
    counts, _ = check_against_reference(inp, 0.25, rtol=rtol, atol=atol)
    assert counts.sum().item() == 2 * 19 * round(0.25 * 33)
    # and the self-check passes in float16, where before it had no tolerance to check against
    kernel._VERDICTS.pop(("cpu", torch.float16), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel.kernel_ok("cpu", torch.float16) is True


def test_use_kernel_auto_takes_the_pytorch_path_below_sm80(monkeypatch):
    # A T4 (sm75): Triton compiles the kernel's dots to FMAs there, with no tensor-core
    # instruction, while on sm80 it emits mma (checked by compiling the up kernel for both, no GPU
    # needed), so auto answers "PyTorch path" with one warning, without running the self-check.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys, bench, kernel\n"
            "up = [j for j in bench.launches(__import__('torch').float16, 64, 256, 32, 2)\n"
            "      if j[0].__name__ == '_up_kernel'][0]\n"
            "fn, ptrs, ints, const, [(w, s)], _ = up\n"
            "print([bench.compile_one(fn, ptrs, ints, const, w, s, cap)[3] for cap in (75, 80)])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=REPO, timeout=600)
    assert out.stdout.strip().splitlines()[-1] == "[False, True]", out.stdout + out.stderr

    cap = {"cuda:0": (7, 5), "cuda:1": (8, 0)}
    monkeypatch.setattr(kernel, "_VERDICTS", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: cap[str(d)])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Tesla T4")
    monkeypatch.setattr(kernel, "_self_check", lambda device, dtype: "")
    with pytest.warns(RuntimeWarning, match=r"Tesla T4 is sm75; .*FMAs.*\(use_kernel=on forces"):
        assert kernel.kernel_ok("cuda:0", torch.float16) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device and dtype
        assert kernel.kernel_ok("cuda:0", torch.float16) is False
        assert kernel.kernel_ok("cuda:1", torch.float16) is True  # sm80: the self-check decides


def test_cpu_without_interpreter_raises():
    code = ("import os, torch; os.environ.pop('TRITON_INTERPRET', None); import kernel\n"
            "t = torch.zeros(2, 2)\n"
            "try: kernel.triton_inf_ffn(t, t, None, t, None, t, t[None], 0.5)\n"
            "except RuntimeError as e: print('raised:', 'TRITON_INTERPRET=1' in str(e))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=REPO, timeout=600)
    assert "raised: True" in out.stdout, out.stdout + out.stderr


def test_model_training_step_with_kernel_matches_pytorch_path():
    torch.manual_seed(0)
    ref = GPT(tiny("inf", use_kernel="off"))
    fused = GPT(tiny("inf", use_kernel="on"))
    fused.load_state_dict(ref.state_dict())
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    losses = []
    for model in (ref, fused):
        # Adam's first step would amplify 1e-9 grads to ±lr
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)  # same ∞-MoE noise
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_variants_with_the_kernel(recwarn):
    """Router variants change only z (here: K * C samples of a mixture): the Triton kernel runs them
    and matches the PyTorch path. gate=pre and inf_deep fall back to the PyTorch path with a warning
    saying why."""
    x, eps = torch.randn(9, 32), torch.randn(2, 9, 8)
    for flags in (dict(router_mix=2, router_depth=2), dict(gate="pre"), dict(ffn="inf_deep")):
        flags = {"ffn": "inf", **flags}
        ref = tiny_model(**flags, use_kernel="off").transformer.h[0].mlp(x, eps=eps)
        assert not recwarn.list
        fused = tiny_model(**flags, use_kernel="on").transformer.h[0].mlp(x, eps=eps)
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
        falls_back = flags.get("gate") == "pre" or flags["ffn"] == "inf_deep"
        said = [str(w.message) for w in recwarn.list]
        assert len(said) == falls_back and all("running the PyTorch path" in s for s in said), said
        recwarn.clear()


# ---- torch.compile and use_kernel=auto

@pytest.mark.parametrize("kw", [dict(ffn="inf", use_kernel="on"), dict(ffn="inf", use_kernel="off"),
                                dict(ffn="inf_deep", use_kernel="off", gate="pre", router_mix=2,
                                     router_depth=2),
                                dict(ffn="inf", mask_block=16, router_mix=2)],
                         ids=str)
def test_torch_compile_is_one_graph_and_matches_eager(monkeypatch, kw):
    # The kernel is a custom op (forward, backward) with fake versions and its autograd; the PyTorch
    # path's selection (a flag-guarded matmul, numpy's partition) is custom ops too, so the path and
    # its hand-written backward are traced; the block path is two custom ops whose saved rows have
    # a data-dependent count. Either way: no graph break, and AOTAutograd (the aot_eager backend)
    # gives eager's loss and gradients. `on` never self-checks.
    monkeypatch.setattr(kernel, "_self_check",
                        lambda *a: pytest.fail("use_kernel=on ran the self-check"))
    torch._dynamo.reset()
    model = tiny_model(n_layer=1, n_embd=16, **kw)  # 16 tokens: one row tile of the kernel
    idx, targets = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    explained = torch._dynamo.explain(model)(idx, targets)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    results = []
    for m in (model, torch.compile(model, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same ∞-MoE noise
        _, loss = m(idx, targets)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    torch._dynamo.reset()
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_use_kernel_auto_checks_itself_once(monkeypatch):
    monkeypatch.setattr(kernel, "_VERDICTS", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a passing check says nothing
        assert kernel.kernel_ok("cpu", torch.float32) is True

    # a kernel whose W_z gradient is 1.5x too large: the check names dW_z (and nothing else), once
    real = kernel.triton_inf_ffn

    def skewed(x, W1, b1, W2, b2, W_z, z, top_frac):
        W_z = W_z.view_as(W_z)
        W_z.register_hook(lambda g: g * 1.5)
        return real(x, W1, b1, W2, b2, W_z, z, top_frac)

    monkeypatch.setattr(kernel, "_VERDICTS", {})
    monkeypatch.setattr(kernel, "triton_inf_ffn", skewed)
    expected = r"disagrees .* on cpu .*: dW_z \(max abs error [0-9.e-]+\)\. Using"
    with pytest.warns(RuntimeWarning, match=expected) as w:
        assert kernel.kernel_ok("cpu", torch.float32) is False
    assert len(w) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided: no second warning, still the PyTorch path
        assert kernel.kernel_ok("cpu", torch.float32) is False

    # a launch error is a verdict too
    def broken(*args):
        raise RuntimeError("out of resources: shared memory, Required: 114688, "
                           "Hardware limit: 101376")

    monkeypatch.setattr(kernel, "triton_inf_ffn", broken)
    with pytest.warns(RuntimeWarning, match="RuntimeError: out of resources: shared memory"):
        assert kernel.kernel_ok("cpu", torch.bfloat16) is False

    # a dtype the check has no tolerance for (float16 on a kernel without it): the PyTorch path,
    # with the one warning, not a crash of the run that asked
    monkeypatch.setattr(kernel, "TOLERANCES", {torch.float32: kernel.TOLERANCES[torch.float32]})
    with pytest.warns(RuntimeWarning, match=r"\(float16, .*no self-check tolerance"):
        assert kernel.kernel_ok("cpu", torch.float16) is False


# ====================================================================== zeroshot.py

V = 50257


class Bigram(nn.Module):
    """Fake GPT whose next-token distribution depends only on the current token: a few hand-set
    rows {current: {next: p}}, the rest of each row's mass spread evenly; unlisted tokens predict
    uniformly. Its logits are exact log-probabilities, so every log-likelihood can be worked out by
    hand."""

    def __init__(self, rows, block_size=64):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size)
        self.rows = rows

    def forward(self, idx, targets=None, seq_ids=None):
        logits = torch.full((*idx.shape, V), -math.log(V))
        for cur, nxt in self.rows.items():
            row = torch.full((V,), math.log((1 - sum(nxt.values())) / (V - len(nxt))))
            row[list(nxt)] = torch.tensor(list(nxt.values())).log()
            logits[idx == cur] = row
        return logits, None


def hand_model():
    enc = get_tokenizer()
    tok = lambda s: enc.encode_ordinary(s)[0]
    dot, dog, cat, fish, bird = (tok(s) for s in (".", " dog", " cat", " fish", " bird"))
    # after ".": " dog" 0.3, " cat" 0.5, " fish"/" bird" 0.05;  after " cat": " cat" 0.5
    return Bigram({dot: {dog: 0.3, cat: 0.5, fish: 0.05, bird: 0.05}, cat: {cat: 0.5}})


ENDINGS = ["dog", "cat cat cat", "fish", "bird"]


def test_hand_worked_acc_and_acc_norm():
    # every ctx ends in "." so, by hand:   dog          cat cat cat       fish / bird
    #   summed log-likelihood           log .3 = -1.20   3 log .5 = -2.08   log .05 = -3.00
    #   per-token average               -1.20            log .5 = -0.69     -3.00
    # acc picks "dog" (highest sum), acc_norm picks "cat cat cat" (highest average): they disagree.
    model = hand_model()
    enc = get_tokenizer()
    tokens, mask, _ = render_example({"ctx": "It rained.", "endings": ENDINGS, "label": 0}, enc)
    total, mean = score_endings(model, tokens, mask, nullcontext())
    want_total = torch.tensor([math.log(0.3), 3 * math.log(0.5), math.log(0.05), math.log(0.05)])
    # float32 log-softmax over 50257 logits is good to ~1e-4; the endings differ by > 0.5
    torch.testing.assert_close(total, want_total, rtol=0, atol=1e-3)
    torch.testing.assert_close(mean, want_total / torch.tensor([1.0, 3.0, 1.0, 1.0]), rtol=0,
                               atol=1e-3)

    # labels 1, 1, 0, 2: acc right only on the third (1/4), acc_norm on the first two (2/4)
    ctxs = ["It rained.", "Once upon a time.", "He sat down.", "The end."]
    examples = [{"ctx": c, "endings": ENDINGS, "label": y} for c, y in zip(ctxs, [1, 1, 0, 2])]
    model.train()
    r = hellaswag_eval(model, examples, "cpu", nullcontext(), batch_examples=3, progress=False)
    assert r == dict(acc=0.25, acc_norm=0.5, n=4, correct=1, correct_norm=2)
    assert model.training  # train mode restored

    # two ranks see disjoint halves whose counts add up to the whole
    parts = [hellaswag_eval(model, examples, "cpu", nullcontext(), progress=False, rank=k, world=2)
             for k in (0, 1)]
    assert [p["n"] for p in parts] == [2, 2]
    assert sum(p["correct"] for p in parts) == 1 and sum(p["correct_norm"] for p in parts) == 2


def test_render_example():
    enc = get_tokenizer()
    ex = {"ctx": "the cat sat on the",
          "endings": ["mat.", "a long ending of several tokens", "x", "y"], "label": 0}
    tokens, mask, label = render_example(ex, enc)
    ctx = enc.encode_ordinary(ex["ctx"])
    assert label == 0 and tokens.shape == mask.shape == (4, len(ctx) + 6)
    # ending after a space
    assert tokens[0, :len(ctx) + 2].tolist() == ctx + enc.encode_ordinary(" mat.")
    assert mask.sum(1).tolist() == [2, 6, 1, 1] and mask[:, :len(ctx)].sum() == 0
    assert tokens[0, len(ctx) + 2:].tolist() == [EOT] * 4  # right padding, masked out

    # longer than max_len: cut from the left, the ending kept whole
    tokens, mask, _ = render_example({**ex, "ctx": "word " * 40}, enc, max_len=16)
    assert tokens.shape == (4, 16) and mask.sum(1).tolist() == [2, 6, 1, 1]
    assert tokens[1, -6:].tolist() == enc.encode_ordinary(" a long ending of several tokens")


@pytest.mark.parametrize("ffn", ["dense", "switch", "inf"])
def test_padding_invariance(ffn):
    model = tiny_model(ffn, vocab_size=V, block_size=64).eval()
    model.set_sampling(z_deterministic=True)  # ∞-MoE: z = mu, so two forwards are comparable
    enc = get_tokenizer()
    short = render_example({"ctx": "A man walks",
                            "endings": ["in.", "out of the house.", "up", "away"], "label": 0}, enc)
    longer = [render_example({"ctx": "A much longer context " * k,
                              "endings": ["one", "two", "three", "four"], "label": 1}, enc)
              for k in (3, 6)]
    alone = score_endings(model, short[0], short[1], nullcontext())
    tokens, mask, labels = collate([longer[0], short, longer[1]])
    assert tokens.size(1) > short[0].size(1) and labels.tolist() == [1, 0, 1]
    batched = score_endings(model, tokens, mask, nullcontext())
    for a, b in zip(alone, batched):
        torch.testing.assert_close(b[4:8], a, rtol=1e-5, atol=1e-5)


def test_truncation_to_block_size():
    model = tiny_model(vocab_size=V)
    ex = {"ctx": "a very long context that does not fit " * 5, "endings": ENDINGS, "label": 1}
    # would raise if T > block_size
    r = hellaswag_eval(model, [ex, ex], "cpu", nullcontext(), progress=False)
    assert r["n"] == 2


def test_inf_sampling_knobs(tmp_path, monkeypatch):
    """set_sampling reaches every ∞-MoE layer inside hellaswag_eval (K samples of z, or z = mu);
    the counts equal a by-hand scoring of one forward (argmax of summed / mean log-likelihood,
    the noise keyed by the example's index) and do not depend on the batching or the ranks."""
    path = tmp_path / "hs.jsonl"
    write_fixture(path)
    examples = load_hellaswag(str(path))
    assert len(examples) == 6 and len(load_hellaswag(str(path), limit=2)) == 2
    net = tiny_model("inf", vocab_size=V, block_size=64)
    seen_K, real = [], fastpath.fast_inf_ffn
    monkeypatch.setattr(fastpath, "fast_inf_ffn",
                        lambda *a: seen_K.append(a[6].shape[0]) or real(*a))
    enc = get_tokenizer()
    for K, deterministic in ((4, False), (2, True)):
        net.set_sampling(z_samples=K, z_deterministic=deterministic)
        seen_K.clear()
        rng = torch.get_rng_state()
        r = hellaswag_eval(net, examples, "cpu", nullcontext(), batch_examples=8, progress=False)
        assert torch.equal(torch.get_rng_state(), rng)  # its own RNG stream
        assert seen_K == [1 if deterministic else K] * 2  # one forward, both layers
        tokens, mask, labels = collate([render_example(ex, enc, 64) for ex in examples])
        ids = torch.arange(6).repeat_interleave(4)  # an example's endings share its noise
        logp = torch.log_softmax(net(tokens, tokens, seq_ids=ids)[0][:, :-1], -1).gather(
            -1, tokens[:, 1:, None])[..., 0]
        m = mask[:, 1:]
        total, mean = (logp * m).sum(1).view(6, 4), ((logp * m).sum(1) / m.sum(1)).view(6, 4)
        assert r["correct"] == (total.argmax(1) == labels).sum().item()
        assert r["correct_norm"] == (mean.argmax(1) == labels).sum().item() and r["n"] == 6
    # sampled, the same whatever the batching and however the ranks split the examples
    net.set_sampling(z_samples=4, z_deterministic=False)
    assert hellaswag_eval(net, examples, "cpu", nullcontext(), batch_examples=8,
                          progress=False) == hellaswag_eval(net, examples, "cpu", nullcontext(),
                                                            batch_examples=2, progress=False)
    parts = [hellaswag_eval(net, examples, "cpu", nullcontext(), progress=False, rank=k, world=2)
             for k in range(2)]
    whole = hellaswag_eval(net, examples, "cpu", nullcontext(), progress=False)
    assert [sum(p[c] for p in parts) for c in ("correct", "correct_norm", "n")] == [
        whole["correct"], whole["correct_norm"], 6]


def test_train_eval_only_scores_hellaswag(shards, tmp_path, capsys):
    """`train.py --eval_only --init_from=resume --hellaswag` on a checkpoint: acc and acc_norm
    printed and logged."""
    out, fixture = tmp_path / "out", tmp_path / "hs.jsonl"
    write_fixture(fixture)
    run = lambda *a: train.main([x for x in tiny_run(shards, out, *a)
                                 if not x.startswith("--vocab_size")])
    run("--ffn=top2", "--max_iters=2", "--eval_interval=2")  # full GPT-2 vocabulary
    record = run("--init_from=resume", "--eval_only", "--hellaswag", f"--hellaswag_path={fixture}",
                 "--hellaswag_limit=4", "--moe_top_k=1")
    assert (record["hellaswag_n"] == 4 and 0 <= record["hellaswag_acc_norm"] <= 1
            and record["moe_top_k"] == 1)
    assert "hellaswag acc" in capsys.readouterr().out
    with pytest.raises(UsageError, match="prepare_fineweb.py --hellaswag"):
        run("--init_from=resume", "--eval_only", "--hellaswag",
            f"--hellaswag_path={tmp_path / 'none.jsonl'}")


# ---- lm-evaluation-harness (HarnessLM)

LOCAL_TASKS = ["tiny_mc", "tiny_lastword", "tiny_rolling", "tiny_gen"]  # data/lm_eval/*.yaml
HS_TINY = REPO / "data" / "lm_eval" / "hellaswag_tiny.jsonl"


def harness(lm, tasks, paths=("data/lm_eval",)):
    """The harness's simple_evaluate of lm on local tasks, samples kept. Call from the repository
    root: the tasks' data_files are relative to it."""
    manager = zeroshot.task_manager(tasks, [str(p) for p in paths])
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True)


def test_harness_metrics_worked_by_hand(monkeypatch):
    """The harness on the bigram of the HellaSwag tests, whose log-likelihoods are known: each
    metric of the four local tasks (one per request type) equals its hand computation. With
    block_size 4 the requests are cut on the left and a text spans several rolling windows; a
    bigram reads only the previous token, so neither may change a score."""
    monkeypatch.chdir(REPO)
    model = hand_model()
    model.config.block_size = 4
    out = harness(zeroshot.HarnessLM(model=model, batch_size=3), LOCAL_TASKS)
    r = out["results"]
    # tiny_mc: after ".", " dog" log .3 = -1.20, " cat cat cat" 3 log .5 = -2.08, " fish" and
    # " bird" log .05 = -3.00; labels 1, 1, 0, 2. acc (highest sum: dog) is right once, 1/4; the
    # harness's acc_norm divides by the choice's characters, dog -1.20/3 = -0.40, cat cat cat
    # -2.08/11 = -0.19, fish -3.00/4 = -0.75: it picks "cat cat cat", right twice, 2/4
    assert r["tiny_mc"]["acc,none"] == 0.25 and r["tiny_mc"]["acc_norm,none"] == 0.5
    lls = [[resp[0][0] for resp in s["resps"]] for s in out["samples"]["tiny_mc"]]
    want = [math.log(0.3), 3 * math.log(0.5), math.log(0.05), math.log(0.05)]
    np.testing.assert_allclose(lls, [want] * 4, atol=1e-3)
    # tiny_lastword: " cat" after "." is the greedy token (p .5), " dog" is not (p .3)
    assert r["tiny_lastword"]["acc,none"] == 0.5
    assert abs(r["tiny_lastword"]["perplexity,none"] - (0.5 * 0.3) ** -0.5) < 1e-3
    # tiny_rolling: ". cat cat" is "." after EOT (1/V) and " cat" twice (p .5); "a b ... h" is 8
    # tokens of 1/V each. Word perplexity and bits per byte pool the documents' sums.
    texts = [". cat cat", "a b c d e f g h"]
    ll = -9 * math.log(V) + 2 * math.log(0.5)
    words, nbytes = sum(len(t.split()) for t in texts), sum(len(t.encode()) for t in texts)
    assert len(get_tokenizer().encode_ordinary(texts[1])) == 8
    assert abs(math.log(r["tiny_rolling"]["word_perplexity,none"]) + ll / words) < 1e-4
    assert abs(r["tiny_rolling"]["bits_per_byte,none"] + ll / nbytes / math.log(2)) < 1e-4
    # tiny_gen: the 3 greedy tokens after "." are " cat cat cat": the answer of the first of two
    assert [s["resps"][0][0] for s in out["samples"]["tiny_gen"]] == [" cat cat cat"] * 2
    assert r["tiny_gen"]["exact_match,none"] == 0.5


def test_harness_loglikelihoods_equal_score_endings(tmp_path, monkeypatch):
    """On a sampled ∞-MoE, the log-likelihoods of the harness's requests (through _encode_pair,
    the cut to block_size + 1 tokens, sorting and batching) equal score_endings' on the same
    tokens and noise keys: the harness's own HellaSwag, run offline on the small file in the
    official format, and tiny_mc."""
    monkeypatch.chdir(REPO)
    net = tiny_model("inf", vocab_size=V, block_size=16)  # HellaSwag's rows are cut on the left
    net.set_sampling(z_samples=2, eval_seed=3)
    zeroshot.write_hellaswag_local(tmp_path, HS_TINY)
    tasks = ["hellaswag_local", "tiny_mc"]
    out = harness(zeroshot.HarnessLM(model=net, batch_size=5), tasks, ["data/lm_eval", tmp_path])
    enc = get_tokenizer()
    for task in tasks:  # every request of the task in one batch of our own
        samples = out["samples"][task]
        pairs = [(enc.encode_ordinary(c), enc.encode_ordinary(d))
                 for s in samples for c, d in s["arguments"]]
        rows = [(c + d)[-17:] for c, d in pairs]
        T = max(map(len, rows))
        tokens = torch.tensor([r + [EOT] * (T - len(r)) for r in rows])
        mask = torch.tensor([[0] * (len(r) - len(d)) + [1] * len(d) + [0] * (T - len(r))
                             for r, (_, d) in zip(rows, pairs)])
        ids = torch.tensor([zeroshot.noise_key(task, s["doc_id"], 0)
                            for s in samples for _ in s["arguments"]])
        total, _ = score_endings(net, tokens, mask, nullcontext(), ids)
        harness_ll = [r[0][0] for s in samples for r in s["resps"]]
        np.testing.assert_allclose(harness_ll, total, rtol=0, atol=1e-5)
    # the harness's prompt: the activity label, then ctx_a and ctx_b capitalised
    assert out["samples"]["hellaswag_local"][0]["arguments"][0] == (
        "Making tea: A woman fills a kettle with water. She",
        " puts the kettle on the stove and waits for it to boil.")
    assert out["n-samples"]["hellaswag_local"]["effective"] == len(load_hellaswag(str(HS_TINY)))


def test_harness_api_and_command_line_build_our_model(shards, tmp_path, monkeypatch, capsys):
    """The model registered as "infmoe": by name through the harness's Python API and its command
    line (python zeroshot.py), model_args read back with our types ("inf" is a float to the
    harness), its batch_size, max_batch_size and device (the CLI's default cuda:0 on a machine
    without CUDA: a warning, then the CPU); a shape flag that differs is a one-line error."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    train.main([x for x in tiny_run(shards, out, "--ffn=inf", "--max_iters=2", "--eval_interval=2")
                if not x.startswith("--vocab_size")])
    args = f"init_from={out},z_samples=3,z_deterministic=false,ffn=inf,seed=4"
    manager = zeroshot.task_manager(["tiny_mc"], ["data/lm_eval"])
    cuda = pytest.warns(UserWarning, match="no CUDA here") if not torch.cuda.is_available() else (
        nullcontext())
    with cuda:
        r = lm_eval.simple_evaluate(model="infmoe", model_args=args, tasks=["tiny_mc"],
                                    task_manager=manager, batch_size="auto", max_batch_size=2,
                                    device="cuda:0")
    lm = zeroshot.HarnessLM.build  # the same arguments, built alone
    model, _, _ = lm(dict(init_from=str(out), z_samples=3, ffn=float("inf"), seed=4), "cpu")
    assert (model.config.z_samples, model.config.ffn, model.eval_seed) == (3, "inf", 4)
    assert r["config"]["batch_size"] == "auto" and 0 <= r["results"]["tiny_mc"]["acc,none"] <= 1
    with pytest.raises(UsageError, match="n_layer=3 differs"):
        lm(dict(init_from=str(out), n_layer=3), "cpu")
    # the command line: the harness would index its 14,000 built-in tasks first (~10 s); these
    # local ones are all it needs
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kw: manager)
    capsys.readouterr()
    with cuda:
        zeroshot.main(["--model", "infmoe", "--model_args", args, "--tasks", "tiny_mc",
                       "--include_path", "data/lm_eval", "--batch_size", "4"])
    assert "|tiny_mc" in capsys.readouterr().out


def test_eval_only_scores_depend_on_neither_batch_size_nor_processes(shards, tmp_path,
                                                                     monkeypatch, capsys):
    """`train.py --eval_only --hellaswag --lm_eval=...` of a sampled ∞-MoE: the harness's scores
    are the same at --batch_size 1 and 16, and torchrun's 2 gloo processes give the val loss,
    HellaSwag and the harness's scores of 1 process (each rank's share keyed as in the whole);
    --gradient_accumulation_steps=1, a training setting 2 processes could not split, is no
    obstacle. One record: the scores, their averages, K; the table printed."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    base = [x for x in tiny_run(shards, out, "--device=cpu") if not x.startswith("--vocab_size")]
    train.main(base + ["--ffn=inf", "--max_iters=2", "--eval_interval=2"])
    tasks = ",".join(LOCAL_TASKS + ["hellaswag_local"])
    score = base + ["--init_from=resume", "--eval_only", "--z_samples=3", "--hellaswag",
                    f"--hellaswag_path={HS_TINY}", f"--lm_eval={tasks}",
                    "--lm_eval_include=data/lm_eval", "--gradient_accumulation_steps=1"]
    one, sixteen = train.main(score + ["--batch_size=1"]), train.main(score + ["--batch_size=16"])
    printed = capsys.readouterr().out
    assert "|tiny_rolling" in printed and "average over the 3 tasks with acc: acc " in printed
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "train.py", *score, "--batch_size=16"],
                         capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    two = read_log(out, "eval.jsonl")[-1]
    assert set(one["lm_eval"]) == set(LOCAL_TASKS) | {"hellaswag_local"}
    for other in (sixteen, two):
        for task, metrics in one["lm_eval"].items():
            for name, value in metrics.items():
                got = other["lm_eval"][task][name]
                assert (value == got if isinstance(value, str)
                        else math.isclose(value, got, rel_tol=1e-5)), (task, name, value, got)
    assert abs(sixteen["val_loss"] - two["val_loss"]) < 1e-6 * two["val_loss"]
    hs = ["hellaswag_acc", "hellaswag_acc_norm", "hellaswag_n"]
    assert [one[k] for k in hs] == [two[k] for k in hs] and one["hellaswag_n"] == 8
    acc = [one["lm_eval"][t] for t in ("tiny_mc", "tiny_lastword", "hellaswag_local")]
    assert one["lm_eval_avg"] == {"acc": sum(m["acc"] for m in acc) / 3, "tasks": 3,
                                  "acc_norm_else_acc": sum(m.get("acc_norm", m["acc"])
                                                           for m in acc) / 3}
    assert one["z_samples"] == 3 and one["lm_eval"]["hellaswag_local"]["n"] == 8


def test_lm_eval_bad_options_are_one_line_errors(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    trained(shards, out)
    # an unknown task is looked for among the harness's 14,000 built-in ones too (~10 s to index
    # them); here among the local ones only
    index = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        lambda include_path=None, **kw: index(include_path, include_defaults=False))
    cases = [(["--lm_eval=tiny_mc", "--lm_eval_include=nowhere"], "nowhere: no such directory"),
             (["--lm_eval=no_such_task", "--lm_eval_include=data/lm_eval"],
              "--lm_eval: no task no_such_task in lm-eval"),
             (["--lm_eval=hellaswag_local", f"--hellaswag_path={tmp_path / 'none.jsonl'}"],
              "--lm_eval: no HellaSwag data at")]
    for argv, words in cases:
        with pytest.raises(UsageError) as err:
            train.main(tiny_run(shards, out, "--init_from=resume", "--eval_only", *argv))
        assert words in str(err.value) and "\n" not in str(err.value), (argv, str(err.value))
    monkeypatch.setattr(zeroshot, "TemplateLM", object)  # as without lm-eval installed
    for call in (lambda: train.main(tiny_run(shards, out, "--init_from=resume", "--eval_only",
                                             "--lm_eval=tiny_mc")),
                 lambda: zeroshot.HarnessLM(model=tiny_model()), lambda: zeroshot.main([])):
        with pytest.raises(UsageError, match="pip install lm-eval"):
            call()


# ====================================================================== infra.py

def test_help_lists_every_option_with_default_and_meaning(capsys):
    assert train.main(["--help"]) is None
    text = capsys.readouterr().out
    for config in (train.TrainConfig(), GPTConfig(**train.TINY_MODEL)):
        for f in dataclasses.fields(config):
            assert f"--{f.name}=" in text, f.name
    assert "--eval_iters=10" in text and "validation batches; always the same val tokens" in text
    for cls in (train.TrainConfig, GPTConfig, sample.SampleConfig):  # every option has a meaning
        assert [name for name, note in infra.field_help(cls).items()
                if not note] == [], cls.__name__
    assert "--d_z=32" in text and "[GPTConfig and --preset: 128]" in text
    sample.main(["--help"])
    text = capsys.readouterr().out
    assert all(f"--{f.name}=" in text for f in dataclasses.fields(sample.SampleConfig))
    assert "--top_k=200" in text and "0: no top-k filtering" in text


# ---- trained weights: GPT-2, Hugging Face directories, our checkpoints (--init_from)

@pytest.mark.parametrize("fmt", ["safetensors", "openai_bin"])
def test_hf_gpt2_logits_equal_transformers(hf_gpt2, tmp_path, fmt):
    hf, path = hf_gpt2
    # OpenAI's original file: no "transformer." prefix, causal-mask buffers, no head
    if fmt == "openai_bin":
        (tmp_path / "config.json").write_text((path / "config.json").read_text())
        state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()
                 if k != "lm_head.weight"}
        state.update({f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 64, 64)) for i in range(2)})
        torch.save(state, tmp_path / "pytorch_model.bin")
        path = tmp_path
    model = from_pretrained(str(path)).eval()
    assert (model.config.n_layer, model.config.n_embd, model.config.block_size) == (2, 32, 64)
    idx = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        ours, _ = model(idx, idx)
    torch.testing.assert_close(ours, hf_logits(hf, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ffn", ["dense", "top2"])
def test_eval_only_val_loss_equals_transformers(hf_gpt2, tmp_path, ffn):
    """--eval_only --init_from=DIR scores the bundled val shard's first batches as transformers
    does; upcycled into top2 (renormalised weights, every expert a copy) it is still the same
    function."""
    hf, path = hf_gpt2
    B, T, iters = 2, 64, 2
    record = train.main([f"--init_from={path}", "--eval_only", f"--ffn={ffn}", f"--batch_size={B}",
                         f"--eval_iters={iters}", f"--out_dir={tmp_path}",
                         f"--data_dir={SAMPLE_VAL.parent}"])
    tokens = torch.from_numpy(
        np.fromfile(SAMPLE_VAL, dtype=np.uint16, offset=256 * 4).astype(np.int64))
    losses = []
    for k in range(iters):  # batch k: B rows of T tokens, targets shifted by one
        buf = tokens[k * B * T: (k + 1) * B * T + 1]
        logits = hf_logits(hf, buf[:-1].view(B, T))
        losses.append(F.cross_entropy(logits.flatten(0, 1), buf[1:]).item())
    assert record["val_loss"] == pytest.approx(sum(losses) / iters, abs=1e-5)


def test_init_from_takes_the_shape_from_the_source(hf_gpt2, tmp_path):
    hf, path = hf_gpt2
    with pytest.raises(ValueError, match="--n_layer=4 differs from its n_layer=2"):
        from_pretrained(str(path), {"n_layer": 4})
    with pytest.raises(ValueError, match="only 64 positions"):
        from_pretrained(str(path), {"block_size": 128})
    # ffn=inf of a GPT-2 would need the tanh GELU
    with pytest.raises(ValueError, match="gelu_approx"):
        from_pretrained(str(path), {"ffn": "inf", "gelu_approx": "tanh"})
    with pytest.raises(FileNotFoundError, match="--init_from=nowhere: no such checkpoint"):
        from_pretrained("nowhere")
    # crop, free, same
    model = from_pretrained(str(path), {"block_size": 16, "dropout": 0.2, "n_head": 4})
    assert model.config.block_size == 16 and model.config.dropout == 0.2
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        ours, _ = model.eval()(idx, idx)
    torch.testing.assert_close(ours, hf_logits(hf, idx), rtol=1e-5, atol=1e-5)
    res = subprocess.run([sys.executable, "train.py", f"--init_from={path}", "--n_embd=64",
                          "--eval_only"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert (res.returncode == 2 and res.stderr.strip().count("\n") == 0
            and "--n_embd=64 differs" in res.stderr)


def test_init_from_our_checkpoint_and_out_dir(shards, tmp_path):
    out = tmp_path / "out"
    train.main(tiny_run(shards, out, "--ffn=dense", "--max_iters=2", "--eval_interval=2"))
    ckpt = load_checkpoint(out / "ckpt.pt")
    # train.py and sample.py read our files; from_pretrained builds
    for source in (out, out / "ckpt.pt"):
        # not a resume: a new run
        assert infra.starting_point(str(source), str(tmp_path))[0] is None
        model = from_pretrained(str(source),
                                weights=infra.starting_point(str(source), str(tmp_path))[1])
        assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    # training from it starts at step 0 from its weights: same val loss as the source at its last
    # step
    log = train.main(tiny_run(shards, tmp_path / "b", f"--init_from={out}", "--eval_only"))
    assert log["val_loss"] == pytest.approx(read_log(out)[-1]["val_loss"], abs=1e-6)
    # upcycled into top2 (the source's d_ff_mult is 0, dense's default 4d: experts of 4d,
    # d_ff_mult 16)
    log = train.main(tiny_run(shards, tmp_path / "c", f"--init_from={out}", "--eval_only",
                              "--ffn=top2"))
    assert log["val_loss"] == pytest.approx(read_log(out)[-1]["val_loss"], abs=1e-5)


def test_sample_from_hf_gpt2_is_transformers_greedy(hf_gpt2):
    hf, path = hf_gpt2
    enc = get_tokenizer()
    ids = enc.encode("Hello, I'm a language model,")
    x = torch.tensor([ids])
    for _ in range(5):  # greedy decoding with transformers, by hand
        x = torch.cat([x, hf_logits(hf, x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    texts = sample.main([f"--init_from={path}", "--start=Hello, I'm a language model,",
                         "--num_samples=1", "--max_new_tokens=5", "--top_k=1"])
    assert texts == [enc.decode(x[0].tolist())]


def test_hub_name_offline_or_without_huggingface_hub_is_a_one_line_error(tmp_path, monkeypatch):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}  # empty cache, no network
    res = subprocess.run([sys.executable, "sample.py", "--init_from=gpt2"], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert "openai-community/gpt2's config.json and model.safetensors" in res.stderr
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        from_pretrained("gpt2-medium")


@pytest.mark.parametrize("lie, file, words", [
    ("n_layer", "model.safetensors", "holds 2 layers; "),
    ("n_embd", "model.safetensors", "transformer.wte.weight is (50257, 32), but"),
    ("no_key", "config.json", "no n_head, which a GPT-2 config.json has"),
    ("not_json", "config.json", "cannot read it as JSON"),
    ("truncated", "model.safetensors", "cannot read it (SafetensorError"),
])
def test_a_hugging_face_directory_that_lies_is_one_line(hf_gpt2, tmp_path, no_model, lie, file,
                                                         words):
    """config.json against the tensors, a key missing, invalid JSON, truncated weights: one line
    naming the file, before out_dir or its lock exists."""
    src = tmp_path / "hf"
    shutil.copytree(hf_gpt2[1], src)
    config = json.loads((src / "config.json").read_text())
    weights = src / "model.safetensors"
    if lie == "n_layer":
        config["n_layer"] = 3
    elif lie == "n_embd":
        config["n_embd"] = 64
    elif lie == "no_key":
        del config["n_head"]
    elif lie == "truncated":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    (src / "config.json").write_text("{not json" if lie == "not_json" else json.dumps(config))
    out = tmp_path / "out"
    for call in (lambda: train.main([f"--init_from={src}", f"--out_dir={out}", "--max_iters=1"]),
                 lambda: train.main([f"--init_from={src}", f"--out_dir={out}", "--eval_only"]),
                 lambda: sample.main([f"--init_from={src}"])):
        with pytest.raises(ValueError) as err:
            call()
        assert (str(src / file) in str(err.value) and words in str(err.value)
                and "\n" not in str(err.value)), str(err.value)
    assert not out.exists()


# ---- evaluation's keyed noise

def lowbias32(x):
    """C. Wellons' lowbias32 in plain 32-bit integer arithmetic, as its C source states it."""
    x ^= x >> 16
    x = x * 0x7FEB352D % 2 ** 32
    x ^= x >> 15
    x = x * 0x846CA68B % 2 ** 32
    return x ^ (x >> 16)


def keyed_normal_by_hand(seed, seq_id, t, layer, k, i):
    """infra.keyed_normal's one entry, from its docstring's recipe, in Python integers and
    float64: two lanes fold the key's words in turn; coordinate i is the cosine (even i) or sine
    (odd i) of the Box-Muller pair of 24-bit uniforms hashed from the lanes with j = i // 2."""
    words = [seed % 2 ** 32, seed >> 32, layer, seq_id % 2 ** 32, (seq_id % 2 ** 64) >> 32, t, k]
    lanes = []
    for h in (0x2545F491, 0x9E3779B9):
        for w in words:
            h = lowbias32(h ^ w)
        lanes.append(lowbias32(h ^ (i // 2)) >> 8)
    u1, u2 = (lanes[0] + 1) / 2 ** 24, lanes[1] / 2 ** 24
    trig = math.cos if i % 2 == 0 else math.sin
    return math.sqrt(-2 * math.log(u1)) * trig(2 * math.pi * u2)


def test_keyed_normal_is_its_hash_and_a_standard_normal():
    ids = torch.tensor([0, 3, -5, 2 ** 45 + 1])
    eps = infra.keyed_normal(2 ** 33 + 7, ids, 5, 3, 2, 7)
    assert eps.shape == (2, 4, 5, 7) and eps.dtype == torch.float32
    for k, b, t, i in [(0, 0, 0, 0), (1, 2, 4, 6), (0, 3, 2, 3), (1, 1, 1, 5)]:
        want = keyed_normal_by_hand(2 ** 33 + 7, ids[b].item(), t, 3, k, i)
        assert abs(eps[k, b, t, i].item() - want) < 1e-5
    # an entry is its key's alone: fewer rows, positions, samples or coordinates change nothing
    assert torch.equal(infra.keyed_normal(2 ** 33 + 7, ids[2:3], 3, 3, 1, 4), eps[:1, 2:3, :3, :4])
    # 2 x 1000 x 64 x 32 = 4M numbers: the moments and the distribution of N(0, 1); neighbours in
    # each part of the key (position, row, sample, coordinate, layer, seed) uncorrelated
    x = infra.keyed_normal(1, torch.arange(1000), 64, 0, 2, 32).double()
    assert abs(x.mean()) < 3e-3 and abs(x.var() - 1) < 3e-3 and abs((x ** 4).mean() - 3) < 3e-2
    grid = torch.linspace(-3, 3, 13, dtype=torch.float64)
    cdf = 0.5 * (1 + torch.erf(grid / math.sqrt(2)))
    assert ((x.flatten()[:, None] <= grid).double().mean(0) - cdf).abs().max() < 2e-3
    corr = lambda a, b: ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
    pairs = [(x[:, :, 1:], x[:, :, :-1]), (x[:, 1:], x[:, :-1]), (x[1], x[0]),
             (x[..., 1::2], x[..., ::2]),
             (x, infra.keyed_normal(1, torch.arange(1000), 64, 1, 2, 32).double()),
             (x, infra.keyed_normal(2, torch.arange(1000), 64, 0, 2, 32).double())]
    for a, b in pairs:
        assert abs(corr(a, b)) < 5e-3


# ---- other machines: Apple's MPS, no Triton (macOS, Windows), no fcntl (Windows)

def test_mps_device_and_dtype_with_availability_mocked(shards, tmp_path, monkeypatch, no_model):
    """No Mac here: torch's answers are mocked. --device=mps is taken where MPS is and refused in
    one line where not; "" stays cuda-or-cpu; float32 by default; no Triton kernel; one process."""
    mps = torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UsageError, match=r"^--device=mps: no MPS device here \(torch .*; use "
                                         r"--device=cpu$"):
        infra.pick_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert infra.pick_device("mps") == mps and infra.pick_device("mps:0").type == "mps"
    assert infra.pick_device("") == torch.device("cpu")  # mps only when asked for
    with pytest.raises(UsageError, match="^--device=mps:1: a Mac has one MPS device"):
        infra.pick_device("mps:1")
    with pytest.raises(UsageError, match="^--device=xpu: expected cpu, cuda, cuda:N or mps$"):
        infra.pick_device("xpu")
    assert infra.default_dtype(mps) == "float32"
    dtype, ctx = infra.autocast(mps, "")
    assert dtype == "float32" and isinstance(ctx, nullcontext)
    for name in ("float16", "bfloat16"):
        assert (lambda c: (c.device, c.fast_dtype))(infra.autocast(mps, name)[1]) == (
            "mps", getattr(torch, name))
    # the kernel: auto never asks it off CUDA, on is one line (Triton has no Metal backend)
    monkeypatch.setattr(kernel, "kernel_ok", lambda *a: pytest.fail("auto asked the kernel"))
    layer = InfMoE(tiny("inf"))
    assert layer.use_kernel(SimpleNamespace(is_cuda=False, device=mps)) is False
    assert not infra.kernel_runs_here(mps)  # even under TRITON_INTERPRET=1, as here
    out = tmp_path / "out"
    for call in (lambda: train.configure(tiny_run(shards, out, "--device=mps", "--use_kernel=on")),
                 lambda: sample.main(["--device=mps", "--use_kernel=on"])):
        with pytest.raises(UsageError, match=r"^--use_kernel=on needs a CUDA device for its "
                                             r"Triton kernels, not mps; use --use_kernel=off"):
            call()
    cfg, model_args, *_ = train.configure(tiny_run(shards, out, "--device=mps", "--dtype=float16"))
    assert (cfg.device, cfg.dtype, model_args["use_kernel"]) == ("mps", "float16", "auto")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="^--device=mps runs one process: torchrun's 2"):
        train.configure(tiny_run(shards, out, "--device=mps"))
    # batches go to the device (meta stands in for mps: a device that is neither cpu nor cuda)
    x, y = train.ShardLoader(shards, "train", 4, 32).next_batch("meta")
    assert x.device.type == y.device.type == "meta" and x.shape == (4, 32)


def test_default_dtype_is_bf16_where_the_gpu_has_it_else_fp16(monkeypatch):
    """--dtype="" on CUDA: bf16 tensor cores came with compute capability 8.0 (A100); a T4 (7.5)
    or V100 (7.0) trains in float16. The CPU: float32."""
    for capability, want in [((7, 0), "float16"), ((7, 5), "float16"), ((8, 0), "bfloat16"),
                             ((8, 9), "bfloat16"), ((9, 0), "bfloat16")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert infra.default_dtype(torch.device("cuda")) == want, capability
    assert infra.default_dtype(torch.device("cpu")) == "float32"
    assert infra.autocast(torch.device("cpu"), "float16")[1].fast_dtype == torch.float16


NO_TRITON = "import sys\nsys.modules['triton'] = None  # import triton fails: no wheel off Linux\n"
# Windows has no fcntl; filelock then warns that it falls back to a lock file (on Windows it has
# LockFileEx instead): its warning is not the scripts' output
NO_FCNTL = ("import sys, warnings\nsys.modules['fcntl'] = None\n"
            "warnings.filterwarnings('ignore', 'only soft file lock')\n")
RUN_TRAIN = ("import json\nfrom prepare_fineweb import run_main\n"
             "sys.argv = ['train.py', *json.loads(sys.argv[1])]\nrun_main(train.main)\n")


def test_without_triton_the_scripts_train_evaluate_and_sample(shards, tmp_path):
    """Triton unimportable (no wheel off Linux): every script imports, and training, --eval_only
    and sample.py run on the PyTorch path."""
    out = tmp_path / "out"
    code = NO_TRITON + textwrap.dedent("""
        import json, bench, compare, kernel, prepare_fineweb, sample, train, zeroshot
        argv = json.loads(sys.argv[1])
        train.main(argv + ["--max_iters=2", "--eval_interval=2"])
        train.main(argv + ["--init_from=resume", "--eval_only"])
        text = sample.main([f"--out_dir={sys.argv[2]}", "--start=!", "--num_samples=1",
                            "--max_new_tokens=3"])[0]
        print(json.dumps({"triton": kernel.triton.__version__, "text": text}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    argv = json.dumps(tiny_run(shards, out, "--ffn=inf"))
    res = subprocess.run([sys.executable, "-c", code, argv, str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.splitlines()[-1])
    assert got["triton"] is None and got["text"].startswith("!") and len(got["text"]) > 1
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2]
    assert math.isfinite(read_log(out, "eval.jsonl")[-1]["val_loss"])


def test_without_fcntl_the_scripts_import_and_a_run_holds_its_lock(shards, tmp_path):
    """fcntl unimportable (Windows): train.py, sample.py, compare.py and infra.py import, and a
    training run holds out_dir's lock: a second run into it is refused with one error line (with
    --overwrite too: the live run's files stay)."""
    out = tmp_path / "out"
    argv = json.dumps(tiny_run(shards, out, "--max_iters=100000", "--eval_interval=100000",
                               "--overwrite"))
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen([sys.executable, "-c", NO_FCNTL + "import train\n" + RUN_TRAIN,
                                  argv], cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    second = subprocess.Popen(  # imports while the first starts; runs when told
        [sys.executable, "-c", NO_FCNTL + "import compare, infra, sample, train\n"
         "sys.stdin.readline()\n" + RUN_TRAIN, argv], cwd=REPO, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:  # the first run trains, holding the lock
            if line.startswith("step 1/"):
                break
        assert first.poll() is None, (tmp_path / "first.err").read_text()
        _, err = second.communicate("go\n", timeout=600)
    finally:
        first.kill()
        first.wait()
        second.kill()
    assert second.returncode == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --out_dir={out} is in use by another run (it holds "), err
    assert "if no run is alive, a killed one left it: delete it" in err  # filelock's lock file
    assert [r["step"] for r in read_log(out)][:2] == [0, 1]


def test_only_zero_shot_runs_import_the_harness(shards, tmp_path):
    """lm-evaluation-harness (with transformers and datasets: seconds) is imported by the runs that
    score zero-shot, not by a training run, sample.py, compare.py or the GPU report."""
    code = textwrap.dedent("""
        import json, sys
        import bench, compare, gpu_report, sample, train
        before = "lm_eval" in sys.modules
        train.main(json.loads(sys.argv[1]))
        print(json.dumps([before, "lm_eval" in sys.modules]))
    """)
    write_fixture(tmp_path / "hs.jsonl")
    plain = tiny_run(shards, tmp_path / "a", "--max_iters=1", "--eval_interval=1")
    scored = [x for x in tiny_run(shards, tmp_path / "b", "--max_iters=1", "--eval_interval=1",
                                  "--hellaswag", f"--hellaswag_path={tmp_path / 'hs.jsonl'}",
                                  "--hellaswag_limit=2")
              if not x.startswith("--vocab_size")]  # HellaSwag needs GPT-2's vocabulary
    for argv, want in ((plain, [False, False]), (scored, [False, True])):
        res = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout.splitlines()[-1]) == want


# ====================================================================== bench.py

def test_compile_check_every_kernel_on_every_arch(tmp_path):
    # Triton's own compiler and ptxas for sm75/80/86/89/90, no GPU: one config per kernel
    # (`--quick`), the kernels spread over the archs and dtypes
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "bench.py", "--compile-check", "--quick"], env=env,
                         capture_output=True, text=True,
                         cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line[18:20] == "sm"]
    assert {r[0] for r in rows} == {"select", "up", "down_bwd", "dz", "dwz"}
    assert {r[1] for r in rows} == {"sm75", "sm80", "sm86", "sm89", "sm90"}
    assert {r[2] for r in rows} == {"bf16", "fp16", "fp32"}
    assert all(r[-1] == "ok" and int(r[-5]) == 0 for r in rows), out.stdout  # no spill bytes
    # tensor-core instructions in the PTX: in the half-precision dots on sm80+, never in IEEE fp32
    tc = {r[0]: r[-2] for r in rows}
    assert tc == {"select": "-", "up": "yes", "down_bwd": "no", "dz": "yes", "dwz": "yes"}, tc
    summary = "compile-check: 5 compiled, 0 failed, 0 spilling, 0 over shared memory"
    assert out.stdout.splitlines()[-1] == summary


def test_kernel_benchmark_runs_on_the_cpu(tmp_path):
    # `python bench.py` at a toy shape: every row, and the activation memory against a dense FFN of
    # width d_ff (pre-activation + activation, 8 bytes per token and unit) worked out by hand: the
    # path keeps pre and M (8 bytes) and one keep byte per sample: 1 + K/8 of it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "bench.py", "--tokens=64", "--d=16", "--d_ff=128",
                          "--d_z=8", "--ks=1,2", "--rates=25,50", "--reps=1",
                          f"--plot={tmp_path / 'b.png'}"],
                         env=env, capture_output=True, text=True,
                         cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| FFN")]
    assert [r[:3] for r in rows] == [["dense, width 128", "", ""], ["dense, width 64", "", ""],
                                     ["∞-MoE, PyTorch", "1", "25%"], ["∞-MoE, PyTorch", "1", "50%"],
                                     ["floor: dense d_ff + W_z products + thresholds", "1", "25%"],
                                     ["∞-MoE, PyTorch", "2", "25%"], ["∞-MoE, PyTorch", "2", "50%"],
                                     ["floor: dense d_ff + W_z products + thresholds", "2", "25%"]]
    assert [r[-1] for r in rows] == ["1.00", "0.50", "1.12", "1.12", "", "1.25", "1.25", ""]
    assert "the floor (dense + W_z products + thresholds" in out.stdout.splitlines()[-2]
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_block_benchmark_runs_on_the_cpu(monkeypatch, capsys):
    # `python bench.py --blocks` at a toy shape, in this process: every row, the share of blocks
    # kept and the activation memory against dense FFNs of width d_ff = 128 (pre-activation and
    # activation: 65,536 B) and 4d = 64 (32,768 B) worked out by hand. At K = 1, r = 25% each of
    # the 64 tokens keeps one block of 32 units: the grouped rows keep pre (64 x 32 x 4 B), each
    # row's mask value (4 B), token (8 B) and pair indices (16 B), and the keep bits (64 x 4 B):
    # 10,240 B, 0.16 and 0.31
    monkeypatch.setattr(kernel, "INTERPRET", False)  # the block path runs no Triton
    monkeypatch.setattr(sys, "argv", ["bench.py", "--blocks", "--tokens=64", "--d=16",
                                      "--d_ff=128", "--d_z=8", "--ks=1,2", "--rates=25",
                                      "--block_sizes=32,64", "--reps=1", "--gemm=grouped,bmm",
                                      "--system_malloc"])
    bench.main()
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| FFN")]
    blocks = lambda K: [[f"∞-MoE, blocks ({g})", str(b), K, "25%"]  # noqa: E731
                        for b in (32, 64) for g in ("grouped", "bmm")]
    dense = [["dense, width 128", "", "", ""], ["dense, width 64", "", "", ""]]
    assert [r[:4] for r in rows] == [*dense, ["∞-MoE, units", "1", "1", "25%"], *blocks("1"),
                                     ["∞-MoE, units", "1", "2", "25%"], *blocks("2")]
    assert [r[-2:] for r in rows[:3]] == [["1.00", "2.00"], ["0.50", "1.00"], ["1.12", "2.25"]]
    assert rows[3][4] == "0.250" and rows[3][-2:] == ["0.16", "0.31"]  # K = 1, b = 32, grouped
    assert all(float(r[4]) > 0.25 for r in rows[-4:])  # K = 2: the union of two masks


# ====================================================================== gpu_report.py
# `python bench.py --gpu`: its parts on the CPU at a toy shape, the kernel in the interpreter

GPU_TOY = (24, 16, 64, 8)  # N, d, d_ff, d_z
GPU_TOY_MODEL = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=97, d_z=8)


def test_gpu_report_grid_makes_every_score_exact():
    # on_grid's claim, checked in float64 (exact here: integers far below 2^53): the fp32 scores
    # equal the exact ones in any summation order, the Gaussian inputs' do not
    (*_, W_z, z), _ = gpu_report.ffn_inputs(torch.device("cpu"), (8, 4, 256, 128), K=2, grid=True)
    exact = z.double() @ W_z.double().t()
    perm = torch.randperm(128)
    assert torch.equal((z @ W_z.t()).double(), exact)
    assert torch.equal((z[..., perm] @ W_z[:, perm].t()).double(), exact)
    assert exact.unique().numel() > 0.9 * exact.numel()  # values still spread: few exact ties
    (*_, W_g, z_g), _ = gpu_report.ffn_inputs(torch.device("cpu"), (8, 4, 256, 128), K=2)
    assert not torch.equal((z_g @ W_g.t()).double(), z_g.double() @ W_g.double().t())


def test_gpu_report_accuracy_check_reports_each_failure():
    # the PyTorch path against itself with one thing wrong at a time: y scaled by 1 + 1e-3 (so
    # are all seven gradients: over fp32's 1e-4, under bf16's 5e-2), counts off by one, a keep
    # mask with a unit flipped far from the threshold or at it (a near-tie)
    cpu, fast = torch.device("cpu"), fast_inf_ffn

    def scaled(*a):
        y, counts, n_active = fast(*a)
        return y * (1 + 1e-3), counts + (torch.arange(len(counts)) == 3), n_active

    def flipped(which):
        def keep(z, W_z, top_frac):
            k = gpu_report.torch_keep(z, W_z, top_frac).clone()
            order = (z[0, 0] @ W_z.t()).argsort(descending=True)
            last = model_py.keep_count(top_frac, len(W_z)) - 1
            unit = order[0] if which == "top" else order[last]
            k[0, 0, unit] = ~k[0, 0, unit]
            return k
        return keep

    same = gpu_report.accuracy(cpu, GPU_TOY, [torch.float32], fn=fast, ref=fast,
                               keeps=(gpu_report.torch_keep, gpu_report.torch_keep))
    assert len(same) == 2 + 10 and all(r[-1] for r in same)
    rows = gpu_report.accuracy(cpu, GPU_TOY, [torch.float32, torch.bfloat16], fn=scaled,
                               ref=fast, keeps=(flipped("top"), gpu_report.torch_keep))
    failed = {(dt, q) for dt, q, _, _, ok in rows if not ok}
    masks = {("fp32 scores", "keep masks, grid-valued router inputs"),
             ("fp32 scores", "keep masks, Gaussian router inputs")}
    assert failed == masks | {(dt, "counts") for dt in ("fp32", "bf16")} | {
        ("fp32", q) for q in ["y"] + gpu_report.GRADS}
    assert rows[0][2] == "1 of 3,072 differ (3.3e-04)"  # K x N x d_ff = 2 x 24 x 64
    assert rows[1][2].endswith(", 1 not at a near-tie")
    near = gpu_report.accuracy(cpu, GPU_TOY, [], keeps=(flipped("threshold"),
                                                         gpu_report.torch_keep))
    assert [r[-1] for r in near] == [False, True]  # grid inputs: no tie allowed; Gaussian: a tie
    broken = gpu_report.accuracy(cpu, GPU_TOY, [torch.float32], fn=lambda *a: 1 / 0, ref=fast)
    assert broken[-1] == ("fp32", "kernel and PyTorch path",
                          "ZeroDivisionError: division by zero", "", False)


def test_gpu_report_at_a_toy_shape(tmp_path, monkeypatch):
    # the whole report on the CPU: the accuracy check runs the real kernel in the interpreter;
    # the timing runs the PyTorch path and a path that fails; the training runs are in this
    # process, use_kernel=on through a stand-in for the kernel (installed once the accuracy check
    # is done) that counts its calls
    calls, speed = [], gpu_report.speed

    def speed_then_stand_in(*args):
        monkeypatch.setattr(kernel, "triton_inf_ffn",
                            lambda *a: calls.append(1) or fast_inf_ffn(*a))
        return speed(*args)

    monkeypatch.setattr(gpu_report, "speed", speed_then_stand_in)
    paths = {"PyTorch": fast_inf_ffn, "kernel": lambda *a: 1 / 0}
    cpu = torch.device("cpu")
    text = gpu_report.build_report(cpu, GPU_TOY, [torch.float32, torch.bfloat16], torch.float32,
                                   GPU_TOY_MODEL, 2, 2, time.monotonic() + 600, "cmd", rounds=2,
                                   paths=paths, isolate=False)
    assert len(calls) == 2  # use_kernel=on alone: 2 steps of 1 layer
    sections = re.findall(r"^## (.*)$", text, re.M)
    assert sections == ["Machine", "The kernel against the PyTorch path", "Speed of one FFN layer",
                        "Training"]
    rows = lambda title: [[c.strip() for c in line.split("|")[1:-1]]  # noqa: E731
                          for line in text.split(f"## {title}")[1].split("\n## ")[0].splitlines()
                          if line.startswith("| ") and not line.startswith("|  |")][1:]
    acc = rows("The kernel against the PyTorch path")
    assert len(acc) == 2 + 2 * 10 and all(r[-1] == "ok" for r in acc), acc
    assert [r[1] for r in acc[2:12]] == ["y", "counts", "n_active", *gpu_report.GRADS]
    speed = rows("Speed of one FFN layer")
    assert [r[:3] for r in speed] == [["dense, width 64", "", ""]] + [
        ["∞-MoE, PyTorch", str(K), f"{r}%"] for K in (1, 2) for r in (10, 25)]
    assert speed[0][4:6] == ["1.00 (1.00–1.00)"] * 2  # d_ff = 4d here: one dense row
    assert "kernel: not timed, it failed: ZeroDivisionError" in text
    train_rows = rows("Training")
    assert [r[:2] for r in train_rows] == [["dense", ""], ["switch", ""], ["top2", ""],
                                           ["inf", "off"], ["inf", "on"]]
    # random tokens: every loss near ln 97; CPU: no MFU, no CUDA memory
    assert all(abs(float(r[-1]) - math.log(97)) < 0.3 and r[6:8] == ["—", "n/a"]
               for r in train_rows), train_rows
    assert train_rows[3][-1] == train_rows[4][-1]  # the same seed and tokens in every run
    assert train_rows[0][5] == "1.00" and float(train_rows[4][4].replace(",", "")) > 0
    assert text.splitlines()[4] == "- accuracy: all 22 checks pass"
    gpu_report.write_report(tmp_path / "r.md", text)
    assert (tmp_path / "r.md").read_text(encoding="utf-8") == text
    assert os.listdir(tmp_path) == ["r.md"]


def test_gpu_report_training_in_a_process_of_its_own_and_the_budget():
    cpu = torch.device("cpu")
    later = time.monotonic() + 600
    rows = gpu_report.training(GPU_TOY_MODEL, cpu, 2, 2, later, runs=[("dense", "off")])
    (ffn, _, res), = rows
    assert ffn == "dense" and "error" not in res, res
    assert res["timed_steps"] == 1 and abs(res["loss"] - math.log(97)) < 0.3
    assert res["params"] == GPT(GPTConfig(ffn="dense", **GPU_TOY_MODEL)).num_params()[0]
    bad = gpu_report.training({**GPU_TOY_MODEL, "n_head": 3}, cpu, 2, 2, later,
                              runs=[("dense", "off")], isolate=False)
    assert bad[0][2]["error"].startswith("ValueError: GPTConfig: n_embd=32 is not divisible")
    spent = gpu_report.training(GPU_TOY_MODEL, cpu, 2, 2, time.monotonic() + 10)
    assert [r[2] for r in spent] == [{"error": "not run: the time budget was spent"}] * 5


def test_gpu_report_needs_cuda(tmp_path, monkeypatch, capsys):
    # `python bench.py --gpu` without CUDA: one line, exit status 2 (run_main's usage error),
    # nothing written
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--gpu"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        prepare_fineweb.run_main(bench.main)
    out = capsys.readouterr()
    assert e.value.code == 2 and out.out == "" and out.err.count("\n") == 1
    assert out.err.startswith("error: bench.py --gpu needs a CUDA GPU, and torch ")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("capability,half", [((7, 5), torch.float16), ((9, 0), torch.bfloat16)])
def test_gpu_report_checks_and_trains_in_the_gpus_half_precision(capability, half, tmp_path,
                                                                   monkeypatch):
    # what main() asks of the report on a T4 (fp16: no bf16 tensor cores) and on an H100 (bf16),
    # with the GPU mocked: the accuracy in fp32 and that half, the timing in it, and training in
    # train.py's default dtype, which infra.default_dtype picks by the same capability
    asked = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(total_memory=16 * 2 ** 30))
    monkeypatch.setattr(kernel, "INTERPRET", False)
    monkeypatch.setattr(gpu_report, "build_report",
                        lambda device, shape, dtypes, dtype, *a, train_dtype, **k:
                        asked.update(dtypes=dtypes, dtype=dtype, train=train_dtype) or "report")
    gpu_report.main(["--gpu", f"--report={tmp_path / 'r.md'}"])
    assert asked == {"dtypes": [torch.float32, half], "dtype": half, "train": ""}
    assert (tmp_path / "r.md").read_text().startswith("report")


# ====================================================================== compare.py

def fake_compare_run(root, name, ffn, seed, curve, tok_s=None):
    """A run of compare's grid as train.py leaves it: log.jsonl with an evaluation and a training
    record per step of `curve`, and ckpt.pt at its last step."""
    out = root / name
    out.mkdir()
    tok_s = list(tok_s or [1.0] * len(curve))
    with open(out / "log.jsonl", "w") as f:
        for step, v in curve:
            f.write(json.dumps({"step": step, "val_loss": v}) + "\n")
            f.write(json.dumps({"step": step + 10, "loss": v, "tokens_per_s": tok_s.pop(0)}) + "\n")
    ckpt = {"model_args": dataclasses.asdict(tiny(ffn)), "iter_num": curve[-1][0],
            "config": {"max_iters": 200, "seed": seed}}
    infra.save_checkpoint(str(out / "ckpt.pt"), ckpt)


def test_compare_tables_and_plots_finished_runs(tmp_path):
    # three dense seeds with hand-made curves, one variant, one unfinished run (left out)
    def fake_run(name, ffn, curve, tok_s):
        fake_compare_run(tmp_path, name, ffn, int(name[-4:]), curve, tok_s)

    fake_run("dense-s1337", "dense", [(0, 11.0), (200, 6.25)], [100.0, 900.0])
    fake_run("dense-s1338", "dense", [(0, 11.0), (200, 6.20)], [200.0, 300.0])
    fake_run("dense-s1339", "dense", [(0, 11.0), (200, 6.30)], [400.0, 500.0])
    fake_run("inf_deep-s1337", "inf_deep", [(0, 11.0), (200, 6.40)], [50.0, 70.0])
    fake_run("inf-s1337", "inf", [(0, 11.0), (100, 7.0)], [1.0, 1.0])  # stopped before step 200
    rows = compare.summarise(str(tmp_path))
    assert list(rows) == ["dense", "inf_deep"]
    assert (rows["dense"]["final"] == [6.25, 6.20, 6.30]
            and rows["dense"]["seeds"] == [1337, 1338, 1339])
    assert rows["dense"]["active"] == GPT(tiny("dense")).num_params()[1]
    lines = compare.table(rows).splitlines()
    # mean 6.25, spread 0.10, tokens/s the mean of the runs' medians (500, 250, 450)
    assert lines[2] == ("| dense | `--ffn=dense` | 3 | 6.2500 (6.2500, 6.2000, 6.3000) "
                        "| 0.1000 | 400 | "
                        f"{GPT(tiny('dense')).num_params()[1] / 1e6:.2f}M |")
    assert lines[3].startswith("| inf_deep | `--ffn=inf_deep` | 1 | 6.4000 |  | 60 |")
    png = tmp_path / "val_loss.png"
    assert compare.plot(rows, str(png)) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UsageError, match="no finished run"):
        compare.main(["--runs_dir", str(tmp_path / "empty")])


def test_compare_plots_seed_means_by_step_and_checks_whose_checkpoint(tmp_path, monkeypatch):
    """B6: two seeds that logged different eval steps: the mean curve pairs their values by step.
    B7: a run directory whose ckpt.pt is another FFN's is refused, naming it."""
    import matplotlib.axes
    drawn, plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, *a, **k: drawn.append((list(x), list(y)))
                        or plot(self, x, y, *a, **k))
    fake_compare_run(tmp_path, "dense-s1337", "dense", 1337, [(0, 11.0), (100, 7.0), (200, 6.4)])
    fake_compare_run(tmp_path, "dense-s1338", "dense", 1338, [(0, 11.0), (200, 6.5)])
    rows = compare.summarise(str(tmp_path))
    assert compare.plot(rows, str(tmp_path / "p.png"))
    x, y = drawn[0]
    assert dict(zip(x, y))[200] == pytest.approx(6.45)
    fake_compare_run(tmp_path, "inf-s1337", "dense", 1337, [(0, 11.0), (200, 6.3)])
    with pytest.raises(UsageError) as err:
        compare.summarise(str(tmp_path))
    assert str(tmp_path / "inf-s1337" / "ckpt.pt") in str(err.value) and "dense" in str(err.value)


def test_compare_reads_what_it_can_and_names_what_it_cannot(tmp_path, capsys):
    """A finished log without ckpt.pt is not a finished run; one without training records has no
    tokens/s; a damaged ckpt.pt is one line naming it."""
    fake_compare_run(tmp_path, "dense-s1337", "dense", 1337, [(0, 11.0), (200, 6.4)])
    fake_compare_run(tmp_path, "dense-s1338", "dense", 1338, [(0, 11.0), (200, 6.5)])
    log = tmp_path / "dense-s1338" / "log.jsonl"
    log.write_text("".join(line for line in log.read_text().splitlines(keepends=True)
                           if "val_loss" in line))
    fake_compare_run(tmp_path, "switch-s1337", "switch", 1337, [(0, 11.0), (200, 6.6)])
    (tmp_path / "switch-s1337" / "ckpt.pt").unlink()
    rows = compare.summarise(str(tmp_path))
    assert list(rows) == ["dense"] and rows["dense"]["tok_s"] == [1.0, None]
    assert compare.table(rows).splitlines()[2].split(" | ")[5] == "1"
    fake_compare_run(tmp_path, "top2-s1337", "top2", 1337, [(0, 11.0), (200, 6.6)])
    (tmp_path / "top2-s1337" / "ckpt.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        prepare_fineweb.run_main(lambda: compare.main(["--runs_dir", str(tmp_path)]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and str(tmp_path / "top2-s1337") in err


def test_compare_grid_has_the_block_masks_with_three_seeds(tmp_path, capsys):
    runs = [r for r in compare.grid() if "--mask_block" in r[1]]
    assert [(r[1], r[2], r[3]) for r in runs] == [
        (f"--ffn=inf --mask_block={b}", seed, f"inf-mask_block_{b}-s{seed}")
        for b in (64, 256) for seed in (1337, 1338, 1339)]
    for seed, loads in ((1337, [1.5, 2.0]), (1338, [2.5, 3.0])):  # two of them finished
        out = tmp_path / f"inf-mask_block_64-s{seed}"
        out.mkdir()
        records = [{"step": 0, "val_loss": 11.0}, {"step": 190, "loss": 7.0, "tokens_per_s": 9.0,
                                                   "block_load": loads},
                   {"step": 200, "val_loss": 6.5}]
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        infra.save_checkpoint(str(out / "ckpt.pt"), {
            "model_args": dataclasses.asdict(tiny("inf", mask_block=64)), "iter_num": 200,
            "config": {"max_iters": 200}})
    compare.main(["--runs_dir", str(tmp_path), "--plot", str(tmp_path / "p.png")])
    printed = capsys.readouterr().out
    assert "| inf, blocks of 64 (16 blocks) | `--ffn=inf --mask_block=64` | 2 | 6.5000" in printed
    assert "(busiest block / mean, per layer, mean of the seeds): 2.00 / 2.50" in printed


# ====================================================================== README.md

def test_reading_order_names_the_lines_where_the_code_is():
    """Each `name` (l. N) of the README's reading order is defined on line N of the file its item
    names first."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Reading order"):text.index("## Training")]
    items = re.split(r"\n\d\. ", section)[1:]
    checked = 0
    for item in items:
        path = REPO / re.search(r"`(\w+\.py)`", item)[1]
        lines = path.read_text(encoding="utf-8").splitlines()
        for name, n in re.findall(r"`(\w+)` \(l\. (\d+)\)", item.replace("\n   ", " ")):
            assert re.match(rf"\s*(def|class) {name}\b", lines[int(n) - 1]), (path.name, name, n)
            checked += 1
    assert checked >= 15

