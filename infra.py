"""
What every script needs around the model, so that train.py, sample.py and compare.py read as what
they do: command-line options and --help, the device and its autocast, processes under torchrun,
the checkpoint format (checksummed) and the other trained weights a run can start from (OpenAI's
GPT-2, a Hugging Face directory; a dense model upcycled into an MoE), the out_dir lock, RNG state
and the log.

A bad option, value or file is a UsageError: the scripts print it as one line, `error: ...`, and
exit with status 2 (prepare_fineweb.run_main: every script's exit statuses).
"""
import ast
import dataclasses
import glob
import hashlib
import inspect
import io
import json
import math
import os
import re
import textwrap
import tokenize
from collections import namedtuple
from contextlib import nullcontext
from statistics import NormalDist

import torch
import torch.distributed as dist

from model import GPT, INFERENCE_KNOBS, GPTConfig, in_range, keep_count, range_words
from prepare_fineweb import DataError, replacing
from prepare_fineweb import lock_out_dir as lock_dir


class UsageError(ValueError):
    """A bad option, value or file: the scripts print it as one line and exit 2."""


# ----------------------------------------------------------------------------- options

def parse_value(key, text, default):
    kind = type(default)
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UsageError(f"--{key}={text}: expected true or false")
    try:
        return kind(text)
    except ValueError:
        raise UsageError(f"--{key}={text}: expected {kind.__name__}") from None


def read_flags(argv, *classes):
    """--key=value strings -> {key: value, typed like the field of the first dataclass that has it}.

    A bare --flag means --flag=true for a boolean and is an error for anything else.
    """
    fields = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, f.default)
    flags = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}: options look like --key=value "
                             f"(see --help)")
        key, eq, text = arg[2:].partition("=")
        if key not in fields:
            raise UsageError(f"unknown option --{key} (known: {', '.join(sorted(fields))})")
        if not eq and type(fields[key]) is not bool:
            raise UsageError(f"--{key} needs a value: --{key}=...")
        flags[key] = parse_value(key, text if eq else "true", fields[key])
    return flags


def parse_args(argv, *configs):
    """Apply --key=value overrides to the first dataclass instance in configs that has the field.
    Returns {key: value} of what was given."""
    flags = read_flags(argv, *(type(c) for c in configs))
    for key, value in flags.items():
        setattr(next(c for c in configs if hasattr(c, key)), key, value)
    return flags


def check_ranges(values, ranges):
    """Each value whose key has a range (a dict like model.RANGES) inside it, or a UsageError."""
    for key, value in values.items():
        if key in ranges and not in_range(value, ranges[key]):
            raise UsageError(f"--{key}={value}: must be {range_words(ranges[key])}")


def field_help(cls):
    """{field: the comment on its line} of a dataclass, read from its source: --help's only text."""
    source = textwrap.dedent(inspect.getsource(cls))
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokens
                if t.type == tokenize.COMMENT}
    return {node.target.id: comments.get(node.lineno, "")
            for node in ast.parse(source).body[0].body if isinstance(node, ast.AnnAssign)}


def usage(doc, *configs):
    """--help: the script's docstring, then every option with its default and meaning. A config
    built with other values than its class's defaults (the default run's TINY_MODEL) shows both."""
    def shown(value):
        if isinstance(value, bool):
            return str(value).lower()
        printable = not isinstance(value, str) or (value and value.isprintable())
        return value if printable else repr(value)

    lines = [doc.strip(), "",
             "Options, --key=value (a bare --flag means --flag=true), default shown:"]
    for config in configs:
        cls, notes = type(config), field_help(type(config))
        lines.append(f"  {cls.__name__}:")
        for f in dataclasses.fields(config):
            value, note = getattr(config, f.name), notes[f.name]
            if value != f.default:
                note += f" [{cls.__name__} and --preset: {shown(f.default)}]"
            lines.append(f"    {'--' + f.name + '=' + str(shown(value)):<32} {note}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- device and processes

def pick_device(name):
    """torch.device for --device ("" picks cuda when available, else cpu; mps only when asked:
    no one ran this code on a Mac); refused if absent."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device={name}: expected cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device={name}: no CUDA device here (torch {torch.__version__}); "
                         f"use --device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device={name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device={name}: no MPS device here (torch {torch.__version__}; MPS "
                         f"needs Apple silicon, macOS 12.3+ and torch's macOS build); use "
                         f"--device=cpu")
    if device.type == "mps" and device.index:
        raise UsageError(f"--device={name}: a Mac has one MPS device, --device=mps")
    return device


def kernel_runs_here(device):
    """Can use_kernel=on run on device: Triton's kernels need CUDA, or Triton's CPU interpreter
    (TRITON_INTERPRET=1, as the tests run them; CPU tensors only). Not MPS: Triton has no Metal
    backend."""
    return device.type == "cuda" or (device.type == "cpu"
                                     and os.environ.get("TRITON_INTERPRET") == "1")


def check_kernel(use_kernel, device):
    if use_kernel == "on" and not kernel_runs_here(device):
        raise UsageError(f"--use_kernel=on needs a CUDA device for its Triton kernels, not "
                         f"{device}; use --use_kernel=off (or auto) here")


def device_memory(device):
    """Bytes of memory device has in all, or None where that is not known. MPS shares the
    machine's memory with the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type not in ("cpu", "mps"):
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        return None


def check_memory(model_args, batch_size, device, training):
    """Refuse a model or batch that cannot fit on device before anything is built or written: a
    lower bound of what the run allocates, fp32 weights (for training also their gradients and
    AdamW's two moments) and one batch's fp32 logits (training: and their gradient), against all
    of the device's memory. Parameters are counted on a one-layer model on the meta device."""
    total = device_memory(device)
    if total is None:
        return
    c = GPTConfig(**model_args)
    with torch.device("meta"):
        one = GPT(dataclasses.replace(c, n_layer=1))
    block = sum(p.numel() for p in one.transformer.h[0].parameters())
    params = sum(p.numel() for p in one.parameters()) + (c.n_layer - 1) * block
    logits = batch_size * c.block_size * c.vocab_size
    need = 4 * (params * (4 if training else 1) + logits * (2 if training else 1))
    if need > total:
        raise UsageError(f"--n_layer={c.n_layer} --n_embd={c.n_embd} --block_size={c.block_size} "
                         f"--batch_size={batch_size}: {params / 1e6:,.0f}M parameters and a "
                         f"batch's {logits:,} logits need at least {need / 2**30:,.0f} GiB to "
                         f"{'train' if training else 'evaluate'}, more than the "
                         f"{total / 2**30:,.0f} GiB of {device}; make the model or the batch "
                         f"smaller")


DTYPES = ("bfloat16", "float16", "float32")


def check_dtype(dtype):
    if dtype not in ("", *DTYPES):
        raise UsageError(f"--dtype={dtype}: expected {', '.join(DTYPES[:-1])} or {DTYPES[-1]}")


def default_dtype(device):
    """--dtype="": bfloat16 on a CUDA GPU with bf16 tensor cores (compute capability 8.0+: A100,
    RTX 30xx and later), float16 on older ones (T4, V100: torch only emulates bf16 there, slowly),
    float32 on the CPU and on MPS (whose bf16 needs macOS 14)."""
    if device.type != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.get_device_capability(device)[0] >= 8 else "float16"


def autocast(device, dtype):
    """(dtype name, context to run the model in) for --dtype on device ("": default_dtype):
    bfloat16 and float16 are autocast, float32 plain. float16 training also needs a loss scaler
    (train.py's GradScaler); evaluation and sampling do not."""
    dtype = dtype or default_dtype(device)
    if dtype == "float32":
        return dtype, nullcontext()
    return dtype, torch.autocast(device.type, dtype=getattr(torch, dtype))


Process = namedtuple("Process", "ddp rank local_rank world master device dtype ctx")


def start_process(device, dtype):
    """This process's place in the run: under torchrun (RANK set) it joins the process group and
    takes its local GPU. CUDA matmuls outside the ∞-MoE selection may use TF32."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        nccl = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group(backend="nccl" if nccl else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ["LOCAL_RANK"])
    else:
        rank, local_rank, world = 0, 0, 1
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if ddp else (dev.index or 0))
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Process(ddp, rank, local_rank, world, rank == 0, dev, *autocast(dev, dtype))


def reduce_mean(t, ddp):
    if ddp:
        t = t.clone()
        dist.all_reduce(t)  # SUM: gloo has no AVG
        t /= dist.get_world_size()
    return t


def leave_process_group():
    """All ranks tear the group down together: a rank that left while another was still in gloo
    was seen to SIGABRT it."""
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- checkpoints
# A checkpoint is a one-line header, then torch.save's bytes; the header holds their SHA-256 and
# length, so a damaged, truncated or empty file is an error naming it, never a silent load.
CKPT_HEADER = re.compile(rb"inf-moe checkpoint sha256=([0-9a-f]{64}) bytes=([0-9]{20})\n")
CKPT_HEADER_BYTES = len(b"inf-moe checkpoint sha256= bytes=\n") + 64 + 20


class HashingWriter:
    """A file-like write() target for torch.save that hashes and counts the bytes on their way."""

    def __init__(self, f):
        self.f, self.sha, self.size, self.error = f, hashlib.sha256(), 0, None

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        try:
            return self.f.write(data)
        except OSError as e:  # torch.save reports only its own "unexpected pos": keep the cause
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def save_checkpoint(path, ckpt):
    """Write ckpt under this process's own temp name, then rename (prepare_fineweb.replacing): a
    crash (or another run) never leaves a half-written file at path, the previous checkpoint stays
    intact until the new one is whole, and a failed write (a full disk: an OSError naming path) or
    Ctrl-C leaves no temp file."""
    with replacing(path) as f:
        f.write(bytes(CKPT_HEADER_BYTES))  # a placeholder until torch.save is done
        writer = HashingWriter(f)
        try:
            torch.save(ckpt, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None
        f.seek(0)
        f.write(b"inf-moe checkpoint sha256=%s bytes=%020d\n"
                % (writer.sha.hexdigest().encode(), writer.size))
        f.flush()
        os.fsync(f.fileno())


class Body(io.RawIOBase):
    """The file f from byte `start` on, as a file of its own: what torch.load reads, uncopied."""

    def __init__(self, f, start):
        self.f, self.start = f, start
        f.seek(start)

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer):
        return self.f.readinto(buffer)

    def seek(self, pos, whence=io.SEEK_SET):
        return self.f.seek(pos + self.start if whence == io.SEEK_SET else pos, whence) - self.start

    def tell(self):
        return self.f.tell() - self.start


def load_checkpoint(path):
    """The dict save_checkpoint wrote, on the CPU, once its SHA-256 matches; a UsageError naming
    path if not. The file is hashed in chunks and then read once by torch.load: memory holds the
    tensors, not the file."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"no checkpoint at {path}") from None
    except OSError as e:
        raise UsageError(f"cannot read checkpoint {path}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = CKPT_HEADER.fullmatch(f.read(CKPT_HEADER_BYTES))
        if head is None:
            raise UsageError(f"{path} ({size} bytes) is not a checkpoint of this train.py: empty, "
                             f"damaged, or written by an older version")
        if size - CKPT_HEADER_BYTES != int(head[2]):
            raise UsageError(f"{path} is truncated or damaged: {size - CKPT_HEADER_BYTES} bytes "
                             f"after its header, which says {int(head[2])}")
        sha = hashlib.sha256()
        while chunk := f.read(1 << 24):
            sha.update(chunk)
        if sha.hexdigest() != head[1].decode():
            raise UsageError(f"{path} is damaged: its contents do not match the checksum written "
                             f"with them")
        return torch.load(Body(f, CKPT_HEADER_BYTES), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- trained weights
# init_from's sources: our checkpoints, OpenAI's GPT-2 on the Hugging Face Hub, a Hugging Face
# GPT-2 directory (read without transformers); from_pretrained builds our GPT from one.

HF_GPT2 = {name: f"openai-community/{name}"
           for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


def starting_point(init_from, out_dir):
    """(checkpoint to resume, source weights): the one place init_from is read. A resumed run has
    the checkpoint; a run from trained weights (GPT-2, a Hugging Face directory, one of our ckpt.pt
    files or out_dirs) has the source's (GPTConfig kwargs, state dict) and starts at step 0; a
    scratch run neither."""
    if init_from == "scratch":
        return None, None
    if init_from == "resume":
        return load_checkpoint(os.path.join(out_dir, "ckpt.pt")), None
    path = init_from
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        path = os.path.join(path, "ckpt.pt")  # an out_dir
    if os.path.isfile(path):
        ckpt = load_checkpoint(path)
        return None, (ckpt["model_args"], ckpt["model"])
    try:
        return None, load_source(init_from)  # a GPT-2 name or a Hugging Face directory
    except FileNotFoundError as e:  # no such source, or the Hub out of reach: the message says why
        raise UsageError(str(e)) from None


def load_source(source):
    """A GPT-2 name or a Hugging Face GPT-2 directory -> (GPTConfig kwargs, state dict)."""
    path = download_gpt2(source) if source in HF_GPT2 else source
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        return read_hf_gpt2(path)
    raise FileNotFoundError(f"--init_from={source}: no such checkpoint or directory (expected "
                            f"scratch, resume, {', '.join(HF_GPT2)}, a Hugging Face GPT-2 "
                            f"directory, a ckpt.pt or an out_dir)")


def download_gpt2(name):
    """OpenAI's GPT-2 (config.json + model.safetensors) from the Hugging Face Hub, cached; returns
    the directory."""
    repo = HF_GPT2[name]
    instead = (f"or put {repo}'s config.json and model.safetensors in a directory DIR and pass "
               f"--init_from=DIR")
    try:
        from huggingface_hub import snapshot_download  # optional: only the hub names need it
    except ImportError:
        raise ImportError(f"--init_from={name} downloads from the Hugging Face Hub: pip install "
                          f"huggingface_hub, {instead}") from None
    try:
        return snapshot_download(repo, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # offline (HF_HUB_OFFLINE=1 or no network) and not in the cache
        raise FileNotFoundError(f"--init_from={name}: could not fetch {repo} "
                                f"({type(e).__name__}; offline?), {instead}") from None


def read_hf_gpt2(path):
    """A Hugging Face GPT2LMHeadModel directory -> (GPTConfig kwargs, our state dict).

    Reads config.json and model.safetensors (or pytorch_model.bin) without transformers. GPT-2
    stores its linear layers as Conv1D, weight (in, out): they are transposed into nn.Linear's.
    A config.json that is unreadable, or that the weights do not match, is a ValueError naming
    the file: found when the source is read, before a run creates anything.
    """
    where = os.path.join(path, "config.json")
    try:
        with open(where, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or UTF-8
        raise ValueError(f"{where}: cannot read it as JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{where}: not a JSON object")
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{where}: model_type={hf.get('model_type')!r}, expected gpt2")
    unsupported = {"activation_function": ("gelu_new", "gelu_pytorch_tanh", "gelu"),
                   "layer_norm_epsilon": (1e-5,), "scale_attn_weights": (True,),
                   "scale_attn_by_inverse_layer_idx": (False,), "tie_word_embeddings": (True,)}
    for key, ok in unsupported.items():
        if hf.get(key, ok[0]) not in ok:
            raise ValueError(f"{where}: {key}={hf[key]!r} is not supported (expected "
                             f"{' or '.join(map(str, ok))})")
    try:
        d = hf["n_embd"]
        d_ff = hf.get("n_inner") or 4 * d
        exact = hf.get("activation_function", "gelu_new") == "gelu"
        args = dict(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                    n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=d, bias=True, ffn="dense",
                    d_ff_mult=d_ff // d, gelu_approx="none" if exact else "tanh")
        if d_ff % d:
            raise ValueError(f"n_inner={d_ff} is not a multiple of n_embd={d}")
        GPTConfig(**args)  # the ranges: n_layer >= 1, n_embd divisible by n_head, ...
    except KeyError as e:
        raise ValueError(f"{where}: no {e.args[0]}, which a GPT-2 config.json has") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"{where}: {e}") from None

    weights = os.path.join(path, "model.safetensors")
    if not os.path.exists(weights):
        weights = os.path.join(path, "pytorch_model.bin")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{path}: has config.json but neither model.safetensors nor "
                                f"pytorch_model.bin")
    if weights.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{weights} needs the safetensors package: pip install "
                              f"safetensors") from None
    try:
        hf_state = (load_file(weights) if weights.endswith(".safetensors") else
                    torch.load(weights, map_location="cpu", weights_only=True, mmap=True))
    except Exception as e:  # safetensors' SafetensorError, torch's RuntimeError, unpickling errors
        raise ValueError(f"{weights}: cannot read it ({type(e).__name__}: {e}); truncated or "
                         f"damaged?") from None

    state = {}
    for key, value in hf_state.items():
        key = key.removeprefix("transformer.")   # OpenAI's original files have no prefix
        if key.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight")):
            continue                              # causal-mask buffers of old files; the tied head
        if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            value = value.t()                     # Conv1D (in, out) -> nn.Linear (out, in)
        key = key.replace("mlp.c_fc.", "mlp.W1.").replace("mlp.c_proj.", "mlp.W2.")
        state["transformer." + key] = value.float().contiguous()
    head = hf_state.get("lm_head.weight")
    wte = hf_state.get("transformer.wte.weight", hf_state.get("wte.weight"))
    if head is not None and not torch.equal(head, wte):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight; this GPT ties them")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    check_weights(state, args, weights, where)
    return args, state


def check_weights(state, args, weights, where):
    """A ValueError naming both files unless state has exactly the tensors, of the shapes, that
    the model of `args` (read from config.json at `where`) holds."""
    with torch.device("meta"):
        expected = GPT(GPTConfig(**args)).state_dict()
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.h.")})
    if layers != args["n_layer"]:
        raise ValueError(f"{weights} holds {layers} layers; {where} says n_layer={args['n_layer']}")
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match {where}: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    for key, t in expected.items():
        if state[key].shape != t.shape:
            raise ValueError(f"{weights}: {key} is {tuple(state[key].shape)}, but {where} "
                             f"(n_embd, n_positions, vocab_size, n_inner) makes it "
                             f"{tuple(t.shape)}")


# ----------------------------------------------------------------------------- upcycling
# from_pretrained (below) builds our GPT from trained weights; from a dense source into an MoE it
# calls upcycle.

def expected_mask_value(top_frac, n=None):
    """E[M_j], the mean mask value of one hidden unit at initialisation (any K: M averages K masks).

    A fresh router gives mu ≈ 0, sigma ≈ 1, so z ~ N(0, I); W_z's rows have norm ≈ 1, so each score
    m_j = W_z[j] . z is ~ N(0, 1). A sample keeps the top r of the scores, those above the (1 - r)
    quantile t, at their own values: E[m 1{m > t}] = phi(t), the standard normal density at t
    (0.318 for r = 25%). That is the limit of many scores (units). With n scores (blocks), the
    k = keep_count(r, n) largest of n normals: E[M_j] = ∫ m phi(m) P(Bin(n-1, 1 - Phi(m)) < k) dm,
    less than phi(t) (0.257 for the largest of 4).
    """
    if not 0.0 < top_frac < 1.0:
        raise ValueError(f"top_frac={top_frac}: upcycling into ffn=inf needs 0 < top_frac < 1")
    normal = NormalDist()
    if n is None:
        return normal.pdf(normal.inv_cdf(1.0 - top_frac))
    m = torch.linspace(-10, 10, 20001, dtype=torch.float64)[:, None]
    above, i = torch.special.ndtr(-m), torch.arange(keep_count(top_frac, n), dtype=m.dtype)
    log_pmf = (math.lgamma(n) - torch.lgamma(i + 1) - torch.lgamma(n - i)   # m in the top k
               + torch.special.xlogy(i, above) + torch.special.xlog1py(n - 1 - i, -above))
    density = m * torch.exp(-m * m / 2) / math.sqrt(2 * math.pi) * log_pmf.logsumexp(1, True).exp()
    return torch.trapezoid(density[:, 0], m[:, 0]).item()


def check_upcycle(c, d_dense):
    """A ValueError unless a model of config c can be upcycled from a dense one of width d_dense."""
    if c.ffn in ("switch", "top2") and c.d_ff != c.n_expert * d_dense:
        raise ValueError(f"upcycling into {c.ffn}: each of the {c.n_expert} experts copies the "
                         f"dense MLP, so d_ff_mult must be {c.n_expert * d_dense // c.n_embd} "
                         f"(got {c.d_ff_mult})")
    if c.ffn == "inf" and c.d_ff % d_dense:
        raise ValueError(f"upcycling into inf: d_ff_mult={c.d_ff_mult} must be a multiple of the "
                         f"dense source's {d_dense // c.n_embd}")
    if c.ffn == "inf":
        expected_mask_value(c.top_frac)  # 0 < top_frac < 1


@torch.no_grad()
def upcycle(model, dense_state, d_dense):
    """Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): fill `model`, a freshly
    initialised switch/top2/inf GPT, from a dense GPT's state dict of hidden width d_dense.
    Embeddings, attention, norms and b2 are copied; routers and W_z keep their fresh initialisation.

      switch/top2  every expert is a full copy of the dense MLP (needs d_ff = n_expert * d_dense).
                   top2's renormalised weights sum to 1, so at step 0 it computes exactly the dense
                   model; switch computes each FFN output times the chosen expert's probability.
      inf          hidden unit j is dense unit j mod d_dense (needs d_ff a multiple of it: R copies
                   each; a block mask puts it in block j // b, and E[M_j] is that of d_ff / b
                   blocks), and W2 is divided by R * E[M_j]: averaged over the routing noise and the
                   fresh W_z, the FFN output equals the dense one (expected_mask_value). Per
                   token it is the dense FFN with its units re-weighted at random (mean 1), so
                   step-0 loss is above the source's.
    """
    c = model.config
    check_upcycle(c, d_dense)
    rest = {k: v for k, v in dense_state.items() if ".mlp." not in k}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    if unexpected or any(".mlp." not in k for k in missing):
        raise ValueError(f"upcycling: the dense source does not match the model "
                         f"({(missing + unexpected)[:3]} ...)")
    for i, block in enumerate(model.transformer.h):
        prefix = f"transformer.h.{i}.mlp."
        src = {k[len(prefix):]: v for k, v in dense_state.items() if k.startswith(prefix)}
        W1, b1, W2, b2 = src["W1.weight"], src.get("W1.bias"), src["W2.weight"], src.get("W2.bias")
        mlp = block.mlp
        if c.ffn in ("switch", "top2"):   # experts stored (E, in, out): nn.Linear's transposes
            mlp.W1.copy_(W1.t().expand_as(mlp.W1))
            mlp.W2.copy_(W2.t().expand_as(mlp.W2))
            if mlp.b1 is not None:
                mlp.b1.copy_(b1.expand_as(mlp.b1))
                mlp.b2.copy_(b2.expand_as(mlp.b2))
        else:
            unit = torch.arange(c.d_ff) % d_dense            # hidden unit j copies dense unit j mod
            blocks = c.d_ff // c.mask_block if c.mask_block > 1 else None  # units: their limit
            scale = 1.0 / ((c.d_ff // d_dense) * expected_mask_value(c.top_frac, blocks))
            mlp.W1.weight.copy_(W1[unit])
            mlp.W2.weight.copy_(W2[:, unit] * scale)
            if mlp.W1.bias is not None:
                mlp.W1.bias.copy_(b1[unit])
                mlp.W2.bias.copy_(b2)
    return model


UPCYCLE_TARGETS = ("switch", "top2", "inf")
# an upcycled MoE's own fields, free to differ from the dense source's
MOE_FIELDS = ("ffn", "d_ff_mult", "n_expert", "moe_top_k", "aux_loss_coef", "z_loss_coef", "d_z",
              "top_frac", "z_samples", "z_deterministic", "use_kernel", "balance", "balance_rate",
              "router_depth", "router_width", "router_mix", "gate", "mask_block")


def pretrained_config(args, overrides, source):
    """GPTConfig kwargs of the model init_from=SOURCE builds from a source of config args.

    overrides: GPTConfig fields from the command line. INFERENCE_KNOBS may differ from the source's;
    block_size may be lowered (the position table is cropped, as in nanoGPT); from a dense source
    another ffn upcycles it (see upcycle) and MOE_FIELDS are then free too. Any other field that
    differs is an error naming it.
    """
    args = dataclasses.asdict(GPTConfig(**args))   # fields an older checkpoint lacks: defaults
    overrides = dict(overrides or {})
    upcycling = args["ffn"] == "dense" and overrides.get("ffn", "dense") != "dense"
    free = set(INFERENCE_KNOBS) | (set(MOE_FIELDS) if upcycling else set()) | {"block_size"}
    clash = {k: args[k] for k, v in overrides.items() if k not in free and args[k] != v}
    if clash:
        given = ", ".join(f"--{k}={overrides[k]}" for k in clash)
        theirs = ", ".join(f"{k}={v}" for k, v in clash.items())
        raise ValueError(f"--init_from={source} fixes the model's shape: {given} differs from its "
                         f"{theirs} (free: {', '.join(INFERENCE_KNOBS)}, a smaller block_size, and "
                         f"upcycling a dense source)")
    if overrides.get("block_size", args["block_size"]) > args["block_size"]:
        raise ValueError(f"--block_size={overrides['block_size']}: --init_from={source} has only "
                         f"{args['block_size']} positions")
    args["dropout"] = 0.0  # the source's dropout was for its own training; --dropout sets ours
    if not upcycling:
        return {**args, **overrides}
    ffn, dense_mult = overrides["ffn"], GPTConfig(**args).d_ff // args["n_embd"]
    if ffn not in UPCYCLE_TARGETS:
        raise ValueError(f"--init_from={source} --ffn={ffn}: a dense model upcycles into "
                         f"{', '.join(UPCYCLE_TARGETS)} only")
    n_expert = overrides.get("n_expert", GPTConfig.n_expert)
    # switch/top2: every expert a copy of the dense MLP; inf: twice its width (the paper's 8d)
    default_mult = dense_mult * n_expert if ffn in ("switch", "top2") else 2 * dense_mult
    exact = {"gelu_approx": "none"} if ffn == "inf" else {}  # inf's paths: the exact GELU only
    upcycled = {**args, "d_ff_mult": default_mult, **exact, **overrides}
    check_upcycle(GPTConfig(**upcycled), dense_mult * args["n_embd"])  # now, not at load time
    return upcycled


@torch.no_grad()
def load_pretrained(model, args, state):
    """Fill model, built from pretrained_config(args, ...), with a source's weights: copied, or
    upcycled when the source is dense and the model is not. Returns the model."""
    wpe = state["transformer.wpe.weight"][:model.config.block_size]
    state = {**state, "transformer.wpe.weight": wpe}
    if args["ffn"] == model.config.ffn:
        model.load_state_dict(state)
        return model
    return upcycle(model, state, GPTConfig(**args).d_ff)


def from_pretrained(source, overrides=None, weights=None):
    """GPT from init_from's SOURCE, its shape read from the source: weights = (GPTConfig kwargs,
    state dict) already read (starting_point), else load_source(source)."""
    args, state = weights or load_source(source)
    model = GPT(GPTConfig(**pretrained_config(args, overrides, source)))
    return load_pretrained(model, args, state)


# ----------------------------------------------------------------------------- out_dir

def lock_out_dir(out_dir):
    """prepare_fineweb.lock_out_dir's lock on out_dir/.lock (filelock: any OS), held until its
    release(): a second run into the same out_dir is refused, with a UsageError."""
    try:
        return lock_dir(out_dir, option="--out_dir=")
    except DataError as e:
        raise UsageError(str(e)) from None


def prepare_out_dir(cfg, ckpt):
    """Create and lock out_dir for a training run, and make its files this run's (rank 0 only).

    A scratch run never replaces or deletes a run's files (ckpt.pt, log.jsonl, eval.jsonl) unless
    --overwrite: without it, finding any is an error naming them, before anything is created. A
    resumed run drops log.jsonl's records after the checkpoint's step: they belong to steps it is
    about to redo. train.py calls this once every option is checked: nothing is deleted for a
    run that an error would stop.
    """
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    runs_files = [ckpt_path, log_path, os.path.join(cfg.out_dir, "eval.jsonl")]
    there = [path for path in runs_files if os.path.exists(path)]
    if ckpt is None and there and not cfg.overwrite:
        resume = "continue that run with --init_from=resume, " if ckpt_path in there else ""
        one = len(there) == 1
        raise UsageError(f"{', '.join(there)} already exist{'s' * one}: {resume}start over with "
                         f"--overwrite (deletes {'it' if one else 'them'}), or choose another "
                         f"--out_dir")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        lock = lock_out_dir(cfg.out_dir)
    except OSError as e:
        raise UsageError(f"--out_dir={cfg.out_dir}: {e.strerror}") from None
    try:
        stale = glob.glob(ckpt_path + ".*tmp") + glob.glob(log_path + ".*.tmp")
        for tmp in stale:
            os.remove(tmp)  # left by a killed run: no live run writes here, we hold the lock
        if ckpt is None:  # a new run: none of the old one's files stay to be mistaken for its own
            for path in runs_files:
                if os.path.exists(path):
                    os.remove(path)
        elif os.path.exists(log_path):
            keep = []
            with open(log_path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= ckpt["iter_num"]:
                            keep.append(line)
                    except (ValueError, KeyError, TypeError):
                        pass  # a line cut short by a kill
            with replacing(log_path, "w") as f:
                f.writelines(keep)
        return lock
    except BaseException:
        lock.release()
        raise


# ----------------------------------------------------------------------------- RNG state, log
# --seed of train.py and sample.py: what torch.manual_seed accepts, 2**64 - 1 at most (an int
# bound, which in_range compares exactly)
SEED_RANGE = "[0, 18446744073709551615]"


def rng_states(device, ddp):
    """Every rank's RNG state (ranks draw different ∞-MoE noise), gathered for the checkpoint."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    state = {"cpu": torch.get_rng_state(), "cuda": cuda}
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    if not ddp:
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    if device.type == "mps" and state.get("mps") is not None:
        torch.mps.set_rng_state(state["mps"])


def fork_rng(device):
    """torch.random.fork_rng of the CPU's generator and device's own (CUDA's, MPS's): what runs
    inside leaves the random numbers of what runs after unchanged."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


# Evaluation's ∞-MoE noise comes from a counter-based generator: every number is a hash of its
# own key, so it owes nothing to what ran before, to the batch a row sits in or to the process.
MASK32 = 0xFFFFFFFF


def mul32(x, c):
    """x * c mod 2^32 for 0 <= x < 2^32, with c split at 16 bits so that int64 never overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x):
    """lowbias32 (C. Wellons, github.com/skeeto/hash-prospector): a bijection of 32-bit words in
    which each input bit flips each output bit with probability close to 1/2."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keyed_normal(seed, ids, T, layer, K, d):
    """N(0, 1) noise (K, B, T, d) whose entry [k, b, t, i] is a function of (seed, ids[b], t,
    layer, k, i) alone; ids: (B,) int64, on the device the noise is made on.

    Two 32-bit lanes (a 64-bit state, so two tokens of a run never share a draw) fold in the key
    one word at a time, h = mix32(h ^ word). Coordinates 2j and 2j + 1 come from the pair (lane 1,
    lane 2) hashed with j, two 24-bit uniforms that Box-Muller turns into two normals (|eps| <=
    5.8). Elementwise int64 ops, no host sync; the largest tensor holds as many bytes as eps.
    """
    dev = ids.device
    h = 0x2545F491 + (0x9E3779B9 - 0x2545F491) * torch.arange(2, device=dev)  # lanes' first words
    for word in (seed & MASK32, (seed >> 32) & MASK32, layer):
        h = mix32(h ^ word)
    h = mix32(mix32(h[:, None] ^ (ids & MASK32)) ^ ((ids >> 32) & MASK32))      # (2, B)
    h = mix32(h[..., None] ^ torch.arange(T, device=dev))                       # (2, B, T)
    h = mix32(h[:, None] ^ torch.arange(K, device=dev)[:, None, None])          # (2, K, B, T)
    j = torch.arange((d + 1) // 2, device=dev)
    u1 = ((mix32(h[0, ..., None] ^ j) >> 8) + 1).float() * 2.0 ** -24           # (0, 1]
    u2 = (mix32(h[1, ..., None] ^ j) >> 8).float() * 2.0 ** -24                 # [0, 1)
    r, angle = torch.sqrt(-2 * torch.log(u1)), 2 * math.pi * u2
    return torch.stack((r * torch.cos(angle), r * torch.sin(angle)), -1).flatten(-2)[..., :d]


class Logger:
    """Prints a line and appends a JSON record to a file in out_dir (rank 0 only); optional W&B."""

    def __init__(self, cfg, master, run_config, name="log.jsonl"):
        self.master, self.path, self.wandb = master, os.path.join(cfg.out_dir, name), None
        if master:  # --eval_only of GPT-2 or another run's weights may name a new out_dir
            os.makedirs(cfg.out_dir, exist_ok=True)
        if master and cfg.wandb_log:
            import wandb  # optional dependency; train.py's configure checked it is installed
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None,
                                    config=run_config)

    def log(self, record, line):
        if not self.master:
            return
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(record, step=record["step"])
