"""
Tokenise text into llm.c-format shards: the one way text becomes training data.
Sources: FineWeb / FineWeb-Edu streamed from Hugging Face, or local .jsonl /
.json / .parquet / .txt files (the `text` field; a .txt is one document).
Each document is <|endoftext|> + its GPT-2 BPE tokens. Shard 0 is validation
({prefix}_val_000000.bin), then {prefix}_train_000001.bin, ..., each exactly
--shard_size tokens except the last (a document may span two shards).

    python prepare_fineweb.py                            # FineWeb sample-10BT -> data/fineweb10B
    python prepare_fineweb.py --dataset=fineweb-edu --subset=sample-100BT
    python prepare_fineweb.py --input a.jsonl b.txt      # local files -> data/a/a_*.bin

The bundled data/sample/ was built with exactly this command:

    python prepare_fineweb.py --input ../shared/data/public_domain_texts.jsonl --out_dir data/sample --prefix sample --shard_size 250000

Shard format (llm.c's): 256 int32 header ([0]=20240520 magic, [1]=1 version,
[2]=number of tokens), then uint16 tokens. train.py uses shard_paths() and
load_shard(); sample.py uses get_tokenizer().
"""
import os
import json
import glob
import argparse
import functools
import collections
import multiprocessing as mp
import urllib.request

import numpy as np
import tiktoken

EOT = 50256  # <|endoftext|>, precedes every document
MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4
REPO_DIR = os.path.dirname(os.path.abspath(__file__))
TIKTOKEN_DIR = os.path.join(REPO_DIR, "data", "tiktoken")  # GPT-2 BPE files, so no network is needed
DATASETS = {"fineweb": "HuggingFaceFW/fineweb", "fineweb-edu": "HuggingFaceFW/fineweb-edu"}
MANIFEST = "manifest.json"  # written by prepare(): which shards make the dataset, and whether it is complete
CHUNK_CHARS = 1 << 18  # ~256K characters of text per worker task: big enough to amortise IPC, small enough to balance

class DataError(Exception):
    """A user error (bad input, nothing to do): reported as one line, no traceback."""

# -----------------------------------------------------------------------------
# tokenizer

@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """tiktoken's gpt2 Encoding, loaded from data/tiktoken/ unless TIKTOKEN_CACHE_DIR is set."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return tiktoken.get_encoding("gpt2")
    # point tiktoken at our copy only for this call, so other encodings keep their usual cache
    os.environ["TIKTOKEN_CACHE_DIR"] = TIKTOKEN_DIR
    try:
        return tiktoken.get_encoding("gpt2")
    finally:
        del os.environ["TIKTOKEN_CACHE_DIR"]

def tokenize_docs(docs):
    """A list of documents -> one uint16 array: EOT, doc 0, EOT, doc 1, ..."""
    enc = get_tokenizer()
    out = []
    for doc in docs:
        out.append(EOT)
        out.extend(enc.encode_ordinary(doc))
    return np.array(out, dtype=np.uint16)  # gpt2 ids < 50257 always fit

# -----------------------------------------------------------------------------
# shard format

def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    assert tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 2**16), "token ids must fit in uint16"
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, len(tokens)
    # write under a temporary name, then rename: a crash never leaves a half shard under the real name
    with open(path + ".tmp", "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(path + ".tmp", path)

def load_shard(path):
    """The tokens of one shard as a read-only uint16 memmap; ValueError on any damage."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes, too short for the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(f"{path}: wrong magic number {header[0]} (expected {MAGIC}), not an llm.c shard")
    if header[1] != VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    ntok = int(header[2])
    if size != HEADER_BYTES + 2 * ntok:
        raise ValueError(f"{path}: header says {ntok} tokens ({HEADER_BYTES + 2 * ntok} bytes) "
                         f"but the file has {size} bytes: truncated or corrupt")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(ntok,))

def shard_paths(data_dir, split):
    assert split in ("train", "val"), f"split must be 'train' or 'val', not {split!r}"
    paths = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.bin")))
    if not paths:
        raise FileNotFoundError(f"no {split} shards (*_{split}_*.bin) in {data_dir}; create them with "
                                f"`python prepare_fineweb.py --input your.jsonl --out_dir {data_dir}` "
                                f"(or plain `python prepare_fineweb.py` for FineWeb)")
    return paths

def read_manifest(data_dir):
    """The parsed manifest.json of data_dir, or None if there is none."""
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if not (isinstance(manifest.get("complete"), bool) and isinstance(manifest.get("shards"), list)
                and all(isinstance(s.get("name"), str) and isinstance(s.get("tokens"), int)
                        for s in manifest["shards"])):
            raise ValueError("expected complete (true/false) and shards [{name, tokens}, ...]")
    except (OSError, ValueError, AttributeError) as e:  # bad JSON is a ValueError; a non-dict, AttributeError
        raise DataError(f"{path}: unreadable manifest ({type(e).__name__}: {e}); "
                        f"rerun prepare_fineweb.py or delete it") from None
    return manifest

def check_dataset(data_dir, vocab_size):
    """Check a shard directory whole before training on it; raises DataError naming the file.

    Every shard: header and size (load_shard), at least one token, every token < vocab_size (one
    vectorised max per shard, so a bad id is found now, not as an IndexError at step 78). With a
    manifest (written by prepare()): the dataset is marked complete, and its shards are exactly the
    *_train_*/*_val_* files present, each of the listed token count. Without one (shards made
    elsewhere, e.g. by llm.c) the shards are checked alone.
    Returns {"train": [(path, n_tokens), ...], "val": [...], "manifest": bool}.
    """
    try:
        found = {split: shard_paths(data_dir, split) for split in ("train", "val")}
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    manifest = read_manifest(data_dir)
    listed = {}
    if manifest is not None:
        where = os.path.join(data_dir, MANIFEST)
        if not manifest["complete"]:
            raise DataError(f"{where}: the dataset is incomplete (prepare_fineweb.py was interrupted or stopped "
                            f"at an error); fix the error, if any, and rerun the same command to finish it")
        listed = {s["name"]: s["tokens"] for s in manifest["shards"]}
        present = {os.path.basename(p) for paths in found.values() for p in paths}
        for name in listed:
            if name not in present:
                raise DataError(f"{os.path.join(data_dir, name)}: listed in {where} but missing")
        for name in sorted(present - set(listed)):
            raise DataError(f"{os.path.join(data_dir, name)}: not part of the dataset in {where} "
                            f"(left from another run?); move it out of {data_dir}")
    out = {"train": [], "val": [], "manifest": manifest is not None}
    for split, paths in found.items():
        for path in paths:
            try:
                tokens = load_shard(path)
            except ValueError as e:
                raise DataError(str(e)) from None
            n = len(tokens)
            expected = listed.get(os.path.basename(path), n)
            if n != expected:
                raise DataError(f"{path}: {n} tokens, but {MANIFEST} lists {expected}")
            if n == 0:
                raise DataError(f"{path}: empty shard (0 tokens)")
            top = int(tokens.max())
            if top >= vocab_size:
                raise DataError(f"{path}: token id {top} is out of range for vocab_size {vocab_size}")
            out[split].append((path, n))
    return out

# -----------------------------------------------------------------------------
# document sources: each yields strings

def json_records(path):
    """(where, object) for each object of a .jsonl file, or of a .json list (or jsonl named .json)."""
    with open(path, encoding="utf-8") as f:
        lines = f  # .jsonl: streamed line by line, so any size fits in memory
        if path.lower().endswith(".json"):
            text = f.read()
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                lines = text.splitlines()  # not one JSON value: read it as JSON lines
            else:
                yield from ((f"record {i}", r) for i, r in enumerate(data if isinstance(data, list) else [data]))
                return
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield f"line {lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {lineno}: invalid JSON ({e})") from None

def read_file_docs(path):
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text:
            yield text
    elif ext in (".jsonl", ".json"):
        for where, record in json_records(path):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}, {where}: no string 'text' field")
            yield record["text"]
    elif ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise DataError(f"{path}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=["text"]):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
    else:
        raise DataError(f"{path}: unsupported file type {ext!r} (use .jsonl, .json, .parquet or .txt)")

def local_docs(paths):
    for path in paths:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise DataError(f"{path}: no such readable file")
    for path in paths:
        n = 0
        try:
            for doc in read_file_docs(path):
                n += 1
                yield doc
        except (OSError, ValueError) as e:  # I/O errors, bad UTF-8, unreadable parquet
            raise DataError(f"{path}: cannot read: {e}") from None
        if n == 0:
            raise DataError(f"{path}: no documents (empty file?)")

def hf_docs(dataset, subset):
    try:
        from datasets import load_dataset  # heavy and optional: only the FineWeb path needs it
    except ImportError:
        raise DataError("FineWeb needs the Hugging Face datasets package: pip install datasets") from None
    for row in load_dataset(DATASETS[dataset], name=subset, split="train", streaming=True):
        yield row["text"]

def chunks(docs):
    """Group documents into worker tasks of about CHUNK_CHARS characters, in order."""
    chunk, nchars = [], 0
    for doc in docs:
        chunk.append(doc)
        nchars += len(doc)
        if nchars >= CHUNK_CHARS:
            yield chunk
            chunk, nchars = [], 0
    if chunk:
        yield chunk

# -----------------------------------------------------------------------------
# the pipeline: documents -> tokens (in parallel, in order) -> shards

def tokenized(pool, docs, window):
    # at most `window` tasks in flight; Pool.imap would read the whole input ahead into memory
    pending = collections.deque()
    for chunk in chunks(docs):
        pending.append(pool.apply_async(tokenize_docs, (chunk,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()

def save(path, tokens):
    """Write a shard unless an identical one is already there. Returns True if written."""
    # Resume rule: a rerun re-tokenises from the start (deterministic) and skips WRITING a shard
    # whose file already holds exactly these tokens. This is correct for every shard, including
    # a short final one, and whatever the earlier run's settings were; a damaged or different
    # file (or a leftover .tmp, which is never read) is simply rewritten.
    if os.path.exists(path):
        try:
            if np.array_equal(load_shard(path), tokens):
                return False
        except ValueError:
            pass
    write_shard(path, tokens)
    return True

def prepare(docs, out_dir, prefix, shard_size, workers):
    """Tokenise an iterable of documents into shards in out_dir; returns the shard paths."""
    from tqdm import tqdm
    os.makedirs(out_dir, exist_ok=True)
    buf = np.empty(shard_size, dtype=np.uint16)  # memory is one shard, whatever the corpus size
    paths, n, total, written = [], 0, 0, 0

    def flush(tokens):
        nonlocal written
        split = "val" if not paths else "train"
        paths.append(os.path.join(out_dir, f"{prefix}_{split}_{len(paths):06d}.bin"))
        written += save(paths[-1], tokens)

    get_tokenizer()  # load before the Pool forks, so workers inherit it instead of each parsing the BPE files
    with mp.Pool(workers) as pool, tqdm(unit="tok", unit_scale=True, desc=prefix) as bar:
        for tokens in tokenized(pool, docs, window=4 * workers):
            bar.update(len(tokens))
            total += len(tokens)
            while len(tokens):
                take = min(shard_size - n, len(tokens))
                buf[n:n + take] = tokens[:take]
                n, tokens = n + take, tokens[take:]
                if n == shard_size:
                    flush(buf)
                    n = 0
    if n:
        flush(buf[:n])
    if not paths:
        raise DataError("no documents in the input")
    print(f"{total:,} tokens in {len(paths)} shards in {out_dir} "
          f"({written} written, {len(paths) - written} already there and identical)")
    if len(paths) == 1:
        print(f"warning: all {total:,} tokens went to the validation shard; pass a smaller --shard_size")
    stale = sorted(set(glob.glob(os.path.join(out_dir, f"{prefix}_train_*.bin"))) - set(paths))
    if stale:
        print(f"warning: {len(stale)} shards in {out_dir} are left from an earlier, different run; "
              f"delete them before training: {' '.join(stale)}")
    return paths

# -----------------------------------------------------------------------------
# HellaSwag (zero-shot evaluation data; scored by train.py --hellaswag)

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_PATH = os.path.join(REPO_DIR, "data", "hellaswag", "hellaswag_val.jsonl")  # 10,042 examples
HELLASWAG_FETCH = "python prepare_fineweb.py --hellaswag"

def download_hellaswag(path=HELLASWAG_PATH, url=HELLASWAG_URL, timeout=60):
    """The official HellaSwag validation split at path, downloaded first if it is missing; returns path."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(path + ".tmp", "wb") as f:
            f.write(r.read())  # ~11 MB
    except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
        raise DataError(f"cannot download HellaSwag from {url} to {path}: {e}. Run `{HELLASWAG_FETCH}` "
                        f"where the network is reachable, or copy the file to {path}") from None
    os.replace(path + ".tmp", path)  # an interrupted download never leaves a partial file under the real name
    return path

def load_hellaswag(path=HELLASWAG_PATH, limit=None):
    """HellaSwag examples as dicts {ctx, endings (4 strings), label (0-3)}: all, or the first `limit`.
    Never downloads: evaluation runs may have no network, so the file is fetched beforehand."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no HellaSwag data at {path}; fetch it with `{HELLASWAG_FETCH}`")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                ctx, endings, label = ex["ctx"], ex["endings"], ex["label"]
                if not (isinstance(ctx, str) and isinstance(endings, list) and len(endings) == 4
                        and all(isinstance(e, str) for e in endings) and label in (0, 1, 2, 3)):
                    raise ValueError("expected a string ctx, a list of 4 string endings and a label 0-3")
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}, line {lineno}: not a HellaSwag example ({type(e).__name__}: {e})") from None
            examples.append({"ctx": ctx, "endings": endings, "label": int(label)})
    return examples

def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenise FineWeb or local files into llm.c-format GPT-2 shards.")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="fineweb", help="Hugging Face source")
    p.add_argument("--subset", default="sample-10BT", help="sample-10BT, sample-100BT, sample-350BT, default, ...")
    p.add_argument("--input", nargs="+", help="local .jsonl/.json/.parquet/.txt files instead of Hugging Face")
    p.add_argument("--out_dir", help="default: data/fineweb10B (FineWeb sample-10BT) or data/<prefix> (local files)")
    p.add_argument("--prefix", help="shard name prefix; default: fineweb, or the first input file's name stem")
    p.add_argument("--shard_size", type=int, default=10**8, help="tokens per shard")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="tokeniser processes")
    p.add_argument("--hellaswag", action="store_true", help="download HellaSwag val to data/hellaswag/ and exit")
    args = p.parse_args(argv)
    if args.hellaswag:
        try:
            return print(download_hellaswag())
        except DataError as e:
            raise SystemExit(f"prepare_fineweb.py: error: {e}") from None
    if args.shard_size < 1:
        p.error("--shard_size must be positive")
    workers = max(1, min(args.workers, os.cpu_count() or 1))
    if args.input:
        prefix = args.prefix or os.path.splitext(os.path.basename(args.input[0]))[0]
        out_dir = args.out_dir or os.path.join("data", prefix)
        docs = local_docs(args.input)
    else:
        prefix = args.prefix or "fineweb"
        tag = args.subset[len("sample-"):].rstrip("T") if args.subset.startswith("sample-") else "_" + args.subset
        out_dir = args.out_dir or os.path.join("data", args.dataset + tag)  # e.g. data/fineweb-edu100B
        docs = hf_docs(args.dataset, args.subset)
    try:
        return prepare(docs, out_dir, prefix, args.shard_size, workers)
    except DataError as e:
        raise SystemExit(f"prepare_fineweb.py: error: {e}") from None

if __name__ == "__main__":
    main()
