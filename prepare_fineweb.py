"""
Tokenise text into llm.c-format shards: the one way text becomes training data.
Sources: FineWeb / FineWeb-Edu streamed from Hugging Face, or local .jsonl /
.json / .parquet / .txt files (the `text` field; a .txt is one document).
Each document is <|endoftext|> + its GPT-2 BPE tokens. Shard 0 is validation
({prefix}_val_000000.bin, the first --val_tokens tokens, or 10% of an input too small for that
plus one train shard), then {prefix}_train_000001.bin, ..., each exactly --shard_size tokens
except the last (a document may span two shards). manifest.json says whether every shard is
written; a rerun finishes an interrupted run and does nothing after a complete one.

    python prepare_fineweb.py                            # FineWeb sample-10BT -> data/fineweb10B
    python prepare_fineweb.py --dataset=fineweb-edu --subset=sample-100BT
    python prepare_fineweb.py --input a.jsonl b.txt      # local files -> data/a/a_*.bin

The bundled data/sample/ was built with exactly this command:

    python prepare_fineweb.py --input ../shared/data/public_domain_texts.jsonl \
        --out_dir data/sample --prefix sample --shard_size 250000

(that file, 46 public-domain texts in 6.2 MB, is not shipped; data/fixture_texts.jsonl has 4 of
them).

Shard format (llm.c's): 256 int32 header ([0]=20240520 magic, [1]=1 version,
[2]=number of tokens), then uint16 tokens. train.py uses check_dataset(), shard_paths() and
load_shard(); sample.py uses get_tokenizer().
"""
import os
import json
import glob
import argparse
import functools
import itertools
import collections
import multiprocessing as mp
import urllib.request

import numpy as np
import tiktoken

EOT = 50256  # <|endoftext|>, precedes every document
MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4
REPO_DIR = os.path.dirname(os.path.abspath(__file__))
TIKTOKEN_DIR = os.path.join(REPO_DIR, "data", "tiktoken")  # GPT-2 BPE files: no network needed
DATASETS = {"fineweb": "HuggingFaceFW/fineweb", "fineweb-edu": "HuggingFaceFW/fineweb-edu"}
MANIFEST = "manifest.json"  # by prepare(): the shards that make the dataset; is it complete
# ~256K characters of text per worker task: big enough to amortise IPC, small enough to balance
CHUNK_CHARS = 1 << 18

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
    assert tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 2**16), "ids must fit uint16"
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, len(tokens)
    # write under a temporary name, then rename: a crash never leaves half a shard under its name
    with open(path + ".tmp", "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(path + ".tmp", path)

def load_shard(path):
    """The tokens of one shard as a read-only uint16 memmap; ValueError on any damage."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes, too short for the {HEADER_BYTES}-byte shard "
                         f"header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(f"{path}: wrong magic number {header[0]} (expected {MAGIC}), not an "
                         f"llm.c shard")
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
        raise FileNotFoundError(f"no {split} shards (*_{split}_*.bin) in {data_dir}; create them "
                                f"with `python prepare_fineweb.py --input your.jsonl --out_dir "
                                f"{data_dir}` "
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
        if not (isinstance(manifest.get("complete"), bool)
                and isinstance(manifest.get("shards"), list)
                and all(isinstance(s.get("name"), str) and isinstance(s.get("tokens"), int)
                        for s in manifest["shards"])):
            raise ValueError("expected complete (true/false) and shards [{name, tokens}, ...]")
    except (OSError, ValueError, AttributeError) as e:  # bad JSON: ValueError; not a dict: Attr...
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
            raise DataError(f"{where}: the dataset is incomplete (prepare_fineweb.py was "
                            f"interrupted or stopped at an error); fix the error, if any, and "
                            f"rerun the same command to finish it")
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
                raise DataError(f"{path}: token id {top} is out of range for vocab_size "
                                f"{vocab_size}")
            out[split].append((path, n))
    return out

# -----------------------------------------------------------------------------
# document sources: each yields strings

def utf8(path, data, line=None):
    """bytes -> str, or a DataError naming the file and the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line or data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte {data[e.start]:#04x})"
                        ) from None

def json_records(path):
    """(where, object) for each object of a .jsonl file, or of a .json list (or jsonl as .json)."""
    with open(path, "rb") as f:
        lines = f  # .jsonl: streamed line by line, so any size fits in memory
        if path.lower().endswith(".json"):
            text = utf8(path, f.read())
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                first = next((line for line in text.splitlines() if line.strip()), "")
                try:  # JSON lines in a .json file: its first line is a whole JSON value
                    json.loads(first)
                except json.JSONDecodeError:
                    raise DataError(f"{path}, line {e.lineno}: invalid JSON ({e.msg}, "
                                    f"column {e.colno})") from None
                lines = text.encode().splitlines()
            else:
                records = data if isinstance(data, list) else [data]
                yield from ((f"record {i}", r) for i, r in enumerate(records))
                return
        for lineno, line in enumerate(lines, 1):
            line = utf8(path, line, lineno)
            if line.strip():
                try:
                    yield f"line {lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {lineno}: invalid JSON ({e.msg}, "
                                    f"column {e.colno})") from None

def read_file_docs(path):
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        with open(path, "rb") as f:
            text = utf8(path, f.read())
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
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)"
                            ) from None
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise DataError(f"{path}: no 'text' column (columns: "
                            f"{', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=["text"]):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
    else:
        raise DataError(f"{path}: unsupported file type {ext!r} (use .jsonl, .json, .parquet or "
                        f".txt)")

def local_source(paths):
    """What a manifest records of local inputs: a rerun with any file changed is another dataset."""
    for path in paths:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise DataError(f"{path}: no such readable file")
    stats = [os.stat(path) for path in paths]
    return {"inputs": [{"path": path, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
                       for path, st in zip(paths, stats)]}

def local_docs(paths):
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
        raise DataError("FineWeb needs the Hugging Face datasets package: pip install "
                        "datasets") from None
    return hf_rows(load_dataset, DATASETS[dataset], subset)

def hf_rows(load_dataset, repo, subset):
    try:
        for row in load_dataset(repo, name=subset, split="train", streaming=True):
            yield row["text"]
    except OSError as e:  # ConnectionError, timeouts, HTTP errors (requests', huggingface_hub's)
        raise DataError(f"cannot stream {repo} ({subset}) from Hugging Face: {type(e).__name__}: "
                        f"{' '.join(str(e).split())}. Without a network, download its .parquet "
                        f"files (https://huggingface.co/datasets/{repo}) elsewhere and pass "
                        f"them with --input") from None

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

def write_manifest(out_dir, settings, shards, complete):
    """manifest.json: what the dataset is made from, its finished shards, and whether that's all."""
    path = os.path.join(out_dir, MANIFEST)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"complete": complete, "settings": settings, "shards": shards}, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)

def intact(out_dir, shards):
    """The leading manifest entries whose shard files are still whole (header, size, tokens)."""
    good = []
    for s in shards:
        try:
            if len(load_shard(os.path.join(out_dir, s["name"]))) != s["tokens"]:
                break
        except (OSError, ValueError):
            break
        good.append(s)
    return good

def prepare(docs, source, out_dir, prefix, shard_size, workers, val_tokens=None):
    """Tokenise an iterable of documents into shards in out_dir; returns the shard paths.

    The first val_tokens tokens (default: one shard) are the val shard, the rest train shards of
    shard_size tokens. An input that ends before its first train shard fills is split 10% / 90%
    instead (val at most val_tokens), so a small text still gets a train shard.
    manifest.json records `source` (what `docs` is read from: the same source must give the same
    documents), the settings and each shard as it is finished; complete=true only after the last
    one. A rerun with the same source and settings does nothing if the dataset is complete;
    otherwise it keeps the finished shards that are still whole, skips their documents (read, not
    tokenised) and writes the rest.
    """
    from tqdm import tqdm
    val_tokens = val_tokens or shard_size
    settings = {"source": source, "prefix": prefix, "shard_size": shard_size,
                "val_tokens": val_tokens, "tokenizer": "gpt2"}
    os.makedirs(out_dir, exist_ok=True)
    where = os.path.join(out_dir, MANIFEST)
    old = read_manifest(out_dir)
    shards = []  # manifest entries, one per finished shard (see flush)
    if old is not None and old.get("settings") == settings:
        shards = intact(out_dir, old["shards"])
        if old["complete"] and len(shards) == len(old["shards"]):
            print(f"{out_dir}: already complete ({where}: {len(shards)} shards from the same "
                  f"inputs and settings); nothing to do")
            return [os.path.join(out_dir, s["name"]) for s in shards]
    elif old is not None and old["complete"]:
        differ = [k for k in settings if (old.get("settings") or {}).get(k) != settings[k]]
        raise DataError(f"{where}: {out_dir} holds a complete dataset made with another "
                        f"{', '.join(differ)}; delete {out_dir} or choose another --out_dir")
    elif old is not None:
        print(f"{where}: an unfinished run with other inputs or settings; starting over")
    for s in (old or {"shards": []})["shards"][len(shards):]:  # unfinished work, redone below
        if os.path.exists(os.path.join(out_dir, s["name"])):
            os.remove(os.path.join(out_dir, s["name"]))
    write_manifest(out_dir, settings, shards, complete=False)
    kept = len(shards)

    def flush(tokens):
        """Write the next shard, then list it in the manifest with where its last document stands:
        `docs` documents begun so far, `tail` tokens of the last of them written (it may go on)."""
        docs_begun, tail = (shards[-1]["docs"], shards[-1]["tail"]) if shards else (0, 0)
        starts = np.flatnonzero(tokens == EOT)  # every document, and only one, begins with EOT
        tail = len(tokens) - starts[-1] if len(starts) else tail + len(tokens)
        name = f"{prefix}_{'train' if shards else 'val'}_{len(shards):06d}.bin"
        write_shard(os.path.join(out_dir, name), tokens)
        shards.append({"name": name, "tokens": len(tokens), "docs": docs_begun + len(starts),
                       "tail": int(tail)})
        write_manifest(out_dir, settings, shards, complete=False)

    drop = 0  # tokens at the start of the stream that a kept shard already holds
    if shards:
        skip, drop = shards[-1]["docs"] - 1, shards[-1]["tail"]
        print(f"resuming: {kept} finished shards kept; their {skip:,} whole documents are skipped "
              f"(read, not tokenised)")
        docs = itertools.islice(docs, skip, None)
    buf = np.empty(max(val_tokens, shard_size), dtype=np.uint16)  # one shard, whatever the corpus
    n = 0
    get_tokenizer()  # loaded before the Pool forks: workers inherit it, none parses the BPE files
    with mp.Pool(workers) as pool, tqdm(unit="tok", unit_scale=True, desc=prefix) as bar:
        for tokens in tokenized(pool, docs, window=4 * workers):
            cut = min(drop, len(tokens))
            tokens, drop = tokens[cut:], drop - cut
            bar.update(len(tokens))
            while len(tokens):
                want = shard_size if shards else val_tokens
                take = min(want - n, len(tokens))
                buf[n:n + take] = tokens[:take]
                n, tokens = n + take, tokens[take:]
                if n == want:
                    flush(buf[:n])
                    n = 0
    if len(shards) <= 1:  # no train shard yet: the input was small; split all of it 10% / 90%
        val = [load_shard(os.path.join(out_dir, s["name"])) for s in shards]
        tokens = np.concatenate(val + [buf[:n]])
        nval = min(val_tokens, max(1, len(tokens) // 10))
        if len(tokens) <= nval:
            raise DataError(f"the input has {len(tokens)} tokens: too few to split into validation "
                            f"and training")
        if nval < val_tokens:
            print(f"note: a small input ({len(tokens):,} tokens): {nval:,} go to validation, "
                  f"the rest to training")
        shards.clear()
        flush(tokens[:nval])
        for i in range(nval, len(tokens), shard_size):
            flush(tokens[i:i + shard_size])
        kept = 0
    elif n:
        flush(buf[:n])
    write_manifest(out_dir, settings, shards, complete=True)
    paths = [os.path.join(out_dir, s["name"]) for s in shards]
    print(f"{sum(s['tokens'] for s in shards):,} tokens in {len(shards)} shards in {out_dir} "
          f"({kept} kept from an earlier run, {len(shards) - kept} written); {where} marks the "
          f"dataset complete")
    found = [p for split in ("train", "val")
             for p in glob.glob(os.path.join(out_dir, f"*_{split}_*.bin"))]
    stale = sorted(set(found) - set(paths))
    if stale:
        print(f"warning: {len(stale)} shards in {out_dir} are not part of this dataset and "
              f"train.py refuses the directory while they are there; move them out: "
              f"{' '.join(stale)}")
    return paths

# -----------------------------------------------------------------------------
# HellaSwag (zero-shot evaluation data; scored by train.py --hellaswag)

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# the validation split: 10,042 examples
HELLASWAG_PATH = os.path.join(REPO_DIR, "data", "hellaswag", "hellaswag_val.jsonl")
HELLASWAG_FETCH = "python prepare_fineweb.py --hellaswag"

def download_hellaswag(path=HELLASWAG_PATH, url=HELLASWAG_URL, timeout=60):
    """The official HellaSwag validation split at path, downloaded first if it is missing; returns
    path."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(path + ".tmp", "wb") as f:
            f.write(r.read())  # ~11 MB
    except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
        raise DataError(f"cannot download HellaSwag from {url} to {path}: {e}. Run "
                        f"`{HELLASWAG_FETCH}` "
                        f"where the network is reachable, or copy the file to {path}") from None
    os.replace(path + ".tmp", path)  # an interrupted download leaves no partial file at path
    return path

def load_hellaswag(path=HELLASWAG_PATH, limit=None):
    """HellaSwag examples as dicts {ctx, endings (4 strings), label (0-3)}: all, or the first
    `limit`.
    Never downloads: evaluation runs may have no network, so the file is fetched beforehand."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no HellaSwag data at {path}; fetch it with `{HELLASWAG_FETCH}`")
    examples = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            line = utf8(path, line, lineno)
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                ctx, endings, label = ex["ctx"], ex["endings"], ex["label"]
                if not (isinstance(ctx, str) and isinstance(endings, list) and len(endings) == 4
                        and all(isinstance(e, str) for e in endings) and label in (0, 1, 2, 3)):
                    raise ValueError("expected a string ctx, a list of 4 string endings and a "
                                     "label 0-3")
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: invalid JSON ({e.msg}, column "
                                f"{e.colno})") from None
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}, line {lineno}: not a HellaSwag example "
                                f"({type(e).__name__}: {e})") from None
            examples.append({"ctx": ctx, "endings": endings, "label": int(label)})
    if not examples and limit != 0:
        raise DataError(f"{path}: no HellaSwag examples in it (empty file?); fetch it again with "
                        f"`{HELLASWAG_FETCH}` after deleting it")
    return examples

def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenise FineWeb or local files into llm.c-format "
                                "GPT-2 shards.")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="fineweb",
                   help="Hugging Face source")
    p.add_argument("--subset", default="sample-10BT",
                   help="sample-10BT, sample-100BT, sample-350BT, default, ...")
    p.add_argument("--input", nargs="+",
                   help="local .jsonl/.json/.parquet/.txt files instead of Hugging Face")
    p.add_argument("--out_dir", help="default: data/fineweb10B (FineWeb sample-10BT) or "
                   "data/<prefix> (local files)")
    p.add_argument("--prefix", help="shard name prefix; default: fineweb, or the first input "
                   "file's name stem")
    p.add_argument("--shard_size", type=int, default=10**8, help="tokens per shard")
    p.add_argument("--val_tokens", type=int, help="tokens in the val shard (default: --shard_size; "
                   "an input too small for it plus one train shard gets 10%%)")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="tokeniser processes")
    p.add_argument("--hellaswag", action="store_true",
                   help="download HellaSwag val to data/hellaswag/ and exit")
    args = p.parse_args(argv)
    if args.hellaswag:
        try:
            return print(download_hellaswag())
        except DataError as e:
            raise SystemExit(f"prepare_fineweb.py: error: {e}") from None
    for name in ("shard_size", "val_tokens"):  # the header stores a shard's length as an int32
        if getattr(args, name) is not None and not 1 <= getattr(args, name) < 2**31:
            p.error(f"--{name} must be between 1 and {2**31 - 1}, not {getattr(args, name)}")
    workers = max(1, min(args.workers, os.cpu_count() or 1))
    try:
        if args.input:
            prefix = args.prefix or os.path.splitext(os.path.basename(args.input[0]))[0]
            out_dir = args.out_dir or os.path.join("data", prefix)
            docs, source = local_docs(args.input), local_source(args.input)
        else:
            prefix = args.prefix or "fineweb"
            sample = args.subset.startswith("sample-")
            tag = args.subset[len("sample-"):].rstrip("T") if sample else "_" + args.subset
            out_dir = args.out_dir or os.path.join("data", args.dataset + tag)  # data/fineweb10B
            docs = hf_docs(args.dataset, args.subset)
            source = {"dataset": DATASETS[args.dataset], "subset": args.subset}
        # train.py finds shards by *_train_* / *_val_*: a prefix holding those would be read twice
        if not prefix or os.sep in prefix or "_train_" in prefix + "_" or "_val_" in prefix + "_":
            raise DataError(f"shard prefix {prefix!r} (--prefix, or the first input's name): "
                            f"pass a --prefix without '/', '_train' or '_val'")
        return prepare(docs, source, out_dir, prefix, args.shard_size, workers, args.val_tokens)
    except (DataError, OSError) as e:  # OSError: out_dir not writable, disk full, ... (names it)
        raise SystemExit(f"prepare_fineweb.py: error: {e}") from None

if __name__ == "__main__":
    main()
