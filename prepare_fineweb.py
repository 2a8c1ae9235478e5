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
load_shard(); sample.py uses get_tokenizer(). Every script reports its errors through run_main()
(this module is the one they all import without torch).
"""
import os
import sys
import json
import time
import signal
import fnmatch
import argparse
import contextlib
import functools
import itertools
import collections
import multiprocessing as mp
import urllib.request

import filelock
import numpy as np
import tiktoken

EOT = 50256  # <|endoftext|>, precedes every document
MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4
REPO_DIR = os.path.dirname(os.path.abspath(__file__))
# the bundled data and the default places of downloaded data: in the repository, wherever a
# script is started from (a path given on the command line is relative to the working directory)
DATA_DIR = os.path.join(REPO_DIR, "data")
TIKTOKEN_DIR = os.path.join(DATA_DIR, "tiktoken")  # GPT-2 BPE files: no network needed
DATASETS = {"fineweb": "HuggingFaceFW/fineweb", "fineweb-edu": "HuggingFaceFW/fineweb-edu"}
MANIFEST = "manifest.json"  # by prepare(): the shards that make the dataset; is it complete
LOCK = ".lock"  # in out_dir: held by the run writing there (the file stays; it holds no data)
# ~256K characters of text per worker task: big enough to amortise IPC, small enough to balance
CHUNK_CHARS = 1 << 18
# seconds between manifest updates while shards are written (a dataset of tiny shards rewrote it
# per shard, O(shards^2)); a kill leaves the shards since unlisted, and a rerun writes them again
MANIFEST_EVERY = 1.0

class DataError(Exception):
    """A user error (bad input, nothing to do): reported as one line, no traceback."""

# -----------------------------------------------------------------------------
# every script's errors: one line, one convention of exit statuses (README, "Errors and exit
# status")

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `error: ...`, exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")

def run_main(main):
    """Run a script's main() and exit as every script does: 0 when it is done; else one line on
    stderr and 2 for a usage or data error (DataError, ValueError such as infra.UsageError,
    FileNotFoundError, ImportError: a bad option, value, file, dataset or missing package), 1 for
    a run that failed once started (another OSError, e.g. a full disk: it names the file;
    MemoryError), 130 for Ctrl-C (KeyboardInterrupt, whose text says what is kept)."""
    try:
        main()
        return
    except KeyboardInterrupt as e:
        line, status = f"interrupted{f': {e}' if str(e) else ''}", 130
    except (DataError, ValueError, FileNotFoundError, ImportError) as e:
        line, status = f"error: {e}", 2
    except OSError as e:
        line, status = f"error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}", 1
    except MemoryError:
        line, status = "error: out of memory", 1
    print(line, file=sys.stderr)
    sys.exit(status)

def canonical_path(path):
    """The file or directory a path names, however it is spelled (data/x, ./data/x, /abs/data/x,
    through symlinks): the one way an input, a dataset or a data_dir is recognised as the same."""
    return os.path.realpath(path)

@contextlib.contextmanager
def replacing(path, mode="wb"):
    """A file opened under this process's own temporary name beside path, renamed to path once
    the block has written it whole: a crash never leaves half a file under its name, and an error
    or Ctrl-C in the block leaves no temporary file. An OSError names path."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename in (None, tmp):  # a full disk: no file named
            raise OSError(e.errno, e.strerror, path) from None
        raise

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
    with replacing(path) as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())

def load_shard(path):
    """The tokens of one shard as a read-only uint16 memmap; ValueError on any damage."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: a directory, not a shard; move it out of "
                         f"{os.path.dirname(path) or '.'}")
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
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

def shard_name(prefix, i):
    """Shard i's name: 0 is validation, the rest train."""
    return f"{prefix}_{'train' if i else 'val'}_{i:06d}.bin"

def shard_names(data_dir, split):
    """The names of a split's shards in data_dir, sorted: the one place a file is recognised as a
    shard (by its name, *_{split}_*.bin; data_dir is a path, never a pattern). A DataError names
    a data_dir that is missing or not a directory."""
    assert split in ("train", "val"), f"split must be 'train' or 'val', not {split!r}"
    try:
        names = os.listdir(data_dir)
    except FileNotFoundError:
        cwd = "" if os.path.isabs(data_dir) else f" (in the working directory {os.getcwd()})"
        raise DataError(f"{data_dir}: no such directory{cwd}") from None
    except NotADirectoryError:
        raise DataError(f"{data_dir}: not a directory") from None
    except OSError as e:  # a symlink loop, no permission
        raise DataError(f"{data_dir}: cannot list this directory: {e.strerror}") from None
    return sorted(n for n in names if fnmatch.fnmatchcase(n, f"*_{split}_*.bin"))

def shard_paths(data_dir, split):
    paths = [os.path.join(data_dir, n) for n in shard_names(data_dir, split)]
    if not paths:
        raise DataError(f"no {split} shards (*_{split}_*.bin) in {data_dir}; create them with "
                        f"`python prepare_fineweb.py --input your.jsonl --out_dir {data_dir}` (or "
                        f"plain `python prepare_fineweb.py` for FineWeb)")
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
    found = {split: shard_paths(data_dir, split) for split in ("train", "val")}
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
        if text.strip():  # as a .jsonl of blank lines: no document
            yield text
    elif ext in (".jsonl", ".json"):
        for where, record in json_records(path):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}, {where}: no string 'text' field")
            yield record["text"]
    elif ext == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)"
                            ) from None
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise DataError(f"{path}: no 'text' column (columns: "
                            f"{', '.join(pf.schema_arrow.names)})")
        kind = pf.schema_arrow.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: its 'text' column holds {kind}, not strings")
        for batch in pf.iter_batches(columns=["text"]):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
    else:
        raise DataError(f"{path}: unsupported file type {ext!r} (use .jsonl, .json, .parquet or "
                        f".txt)")

def local_source(paths):
    """What a manifest records of local inputs: each file as canonical_path names it, its size and
    mtime. A rerun with any file changed is another dataset; the same file spelled another way is
    the same."""
    for path in paths:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise DataError(f"{path}: no such readable file")
    stats = [os.stat(path) for path in paths]
    return {"inputs": [{"path": canonical_path(path), "bytes": st.st_size,
                        "mtime_ns": st.st_mtime_ns} for path, st in zip(paths, stats)]}

def same_settings(recorded, settings):
    """Do a manifest's recorded settings name this run's? Its inputs compared as canonical_path
    names them (a manifest of an older version recorded them as they were spelled)."""
    try:
        inputs = recorded["source"].get("inputs")
        if inputs is not None:
            inputs = [{**i, "path": canonical_path(i["path"])} for i in inputs]
            recorded = {**recorded, "source": {**recorded["source"], "inputs": inputs}}
    except (TypeError, KeyError, AttributeError):  # not settings this version writes
        return False
    return recorded == settings

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
            raise DataError(f"{path}: no documents (an empty file, or only whitespace)")

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

def started(docs):
    """docs with its first document already read: an input that cannot be read (the network is
    down, the first line is bad) fails here, before anything is written."""
    docs = iter(docs)
    first = next(docs, None)
    return docs if first is None else itertools.chain([first], docs)

def worker_pool(workers):
    """The tokeniser processes, or None for one worker (it tokenises in this process). They
    ignore Ctrl-C: this process stops them, and says once what is kept."""
    if workers == 1:
        return None
    try:
        return mp.Pool(workers, initializer=signal.signal,
                       initargs=(signal.SIGINT, signal.SIG_IGN))
    except OSError as e:  # multiprocessing's semaphores live in /dev/shm
        raise DataError(f"--workers {workers}: cannot start tokeniser processes ({e.strerror}; "
                        f"multiprocessing needs a writable /dev/shm); --workers 1 tokenises "
                        f"without them") from None

def tokenized(pool, docs, window):
    """The documents' tokens, chunk by chunk, in order: by the pool's processes with at most
    `window` tasks in flight (Pool.imap would read the whole input ahead into memory), or here."""
    if pool is None:
        yield from map(tokenize_docs, chunks(docs))
        return
    pending = collections.deque()
    for chunk in chunks(docs):
        pending.append(pool.apply_async(tokenize_docs, (chunk,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()

def write_manifest(out_dir, settings, shards, complete):
    """manifest.json: what the dataset is made from, its finished shards, and whether that's all."""
    with replacing(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump({"complete": complete, "settings": settings, "shards": shards}, f, indent=1)
        f.write("\n")

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

def lock_out_dir(out_dir, option="--out_dir "):
    """Hold out_dir/.lock while this run writes there (filelock: flock on POSIX, LockFileEx on
    Windows): a second run into out_dir is refused, and the lock ends with the process, however it
    ends. Returns the held lock. option: how the error names the directory (train.py's
    "--out_dir="). The one lock of every script that writes an out_dir (infra.lock_out_dir).

    Where the OS has neither lock, filelock falls back to a lock file's existence (SoftFileLock),
    which a killed run can leave behind: the error then says to delete it."""
    lock = filelock.FileLock(os.path.join(out_dir, LOCK), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        stale = (f"; if no run is alive, a killed one left it: delete it"
                 if isinstance(lock, filelock.SoftFileLock) else "")
        raise DataError(f"{option}{out_dir} is in use by another run (it holds "
                        f"{lock.lock_file}{stale}): wait for it to end, or choose another "
                        f"--out_dir") from None
    except (OSError, NotImplementedError) as e:  # a file system without locks
        raise DataError(f"{option}{out_dir}: cannot lock {lock.lock_file}: {e}") from None
    return lock

def plan(out_dir, settings):
    """What a run of these settings does in out_dir, read before anything is written: (manifest
    entries of the finished shards it keeps, names of its own earlier files it replaces, is the
    dataset complete already, is an unfinished one of other settings started over).

    Shards are prepare_fineweb.py's when its manifest lists them, or name the next ones it would
    have listed (written, then killed before the manifest said so). Any other shard, and a
    complete dataset of other settings, are a DataError naming them: never overwritten, and never
    disowned by a manifest that would make train.py refuse them.
    """
    if not os.path.isdir(out_dir):
        return [], [], False, False
    old = read_manifest(out_dir)
    present = set(shard_names(out_dir, "val") + shard_names(out_dir, "train"))
    recorded = old.get("settings") if old and isinstance(old.get("settings"), dict) else {}
    ours = [s["name"] for s in old["shards"]] if old else []
    prefix = recorded.get("prefix")
    while isinstance(prefix, str) and shard_name(prefix, len(ours)) in present:
        ours.append(shard_name(prefix, len(ours)))
    foreign = sorted(present - set(ours))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        why = f"its {MANIFEST} does not list them" if old else f"there is no {MANIFEST}"
        raise DataError(f"{out_dir} holds shards prepare_fineweb.py did not write ({why}): "
                        f"{', '.join(os.path.join(out_dir, n) for n in foreign[:3])}{more}; it "
                        f"leaves them alone: choose another --out_dir, or move them out")
    if old is None:
        return [], [], False, False
    if same_settings(recorded, settings):
        kept = intact(out_dir, old["shards"])
        done = old["complete"] and len(kept) == len(old["shards"])
        return kept, ours[len(kept):], done, False
    if old["complete"]:
        differ = [k for k in settings
                  if not same_settings({**settings, k: recorded.get(k)}, settings)]
        raise DataError(f"{os.path.join(out_dir, MANIFEST)}: {out_dir} holds a complete dataset "
                        f"made with another {', '.join(differ)}; delete {out_dir} or choose "
                        f"another --out_dir")
    return [], ours, False, True

def already_complete(out_dir, shards):
    print(f"{out_dir}: already complete ({os.path.join(out_dir, MANIFEST)}: {len(shards)} shards "
          f"from the same inputs and settings); nothing to do")
    return [os.path.join(out_dir, s["name"]) for s in shards]

def prepare(docs, source, out_dir, prefix, shard_size, workers, val_tokens=None):
    """Tokenise an iterable of documents into shards in out_dir; returns the shard paths.

    The first val_tokens tokens (default: one shard) are the val shard, the rest train shards of
    shard_size tokens. An input that ends before its first train shard fills is split 10% / 90%
    instead (val at most val_tokens), so a small text still gets a train shard.
    manifest.json records `source` (what `docs` is read from: the same source must give the same
    documents), the settings and the finished shards; complete=true only after the last one. A
    rerun with the same source and settings does nothing if the dataset is complete; otherwise it
    keeps the finished shards that are still whole, skips their documents (read, not tokenised)
    and writes the rest. Nothing is written before the input's first document is read and out_dir
    is locked (lock_out_dir); shards it did not write are refused (plan).
    """
    val_tokens = val_tokens or shard_size
    settings = {"source": source, "prefix": prefix, "shard_size": shard_size,
                "val_tokens": val_tokens, "tokenizer": "gpt2"}
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out_dir {out_dir}: not a directory")
    kept, _, done, _ = plan(out_dir, settings)
    if done:  # nothing to read, lock or write
        return already_complete(out_dir, kept)
    docs = started(docs)
    get_tokenizer()  # loaded before the Pool forks: workers inherit it, none parses the BPE files
    with worker_pool(workers) or contextlib.nullcontext() as pool:
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise DataError(f"--out_dir {out_dir}: {e.strerror}") from None
        lock = lock_out_dir(out_dir)
        try:
            return write_dataset(pool, docs, out_dir, settings, workers)
        finally:
            lock.release()

def write_dataset(pool, docs, out_dir, settings, workers):
    """prepare()'s writing, under out_dir's lock."""
    from tqdm import tqdm
    prefix, shard_size, val_tokens = (settings[k] for k in ("prefix", "shard_size", "val_tokens"))
    where = os.path.join(out_dir, MANIFEST)
    shards, replaced, done, restart = plan(out_dir, settings)  # again, now that no one else writes
    if done:
        return already_complete(out_dir, shards)
    if restart:
        print(f"{where}: an unfinished run with other inputs or settings; starting over")
    for name in os.listdir(out_dir):  # a killed run's temporary files, unfinished work redone
        if name in replaced or (name.endswith(".tmp") and (fnmatch.fnmatchcase(name, "*.bin.*")
                                                           or name.startswith(MANIFEST + "."))):
            os.remove(os.path.join(out_dir, name))
    write_manifest(out_dir, settings, shards, complete=False)
    kept, listed = len(shards), [time.monotonic()]

    def flush(tokens):
        """Write the next shard, and note it for the manifest with where its last document stands:
        `docs` documents begun so far, `tail` tokens of the last of them written (it may go on)."""
        docs_begun, tail = (shards[-1]["docs"], shards[-1]["tail"]) if shards else (0, 0)
        starts = np.flatnonzero(tokens == EOT)  # every document, and only one, begins with EOT
        tail = len(tokens) - starts[-1] if len(starts) else tail + len(tokens)
        name = shard_name(prefix, len(shards))
        write_shard(os.path.join(out_dir, name), tokens)
        shards.append({"name": name, "tokens": len(tokens), "docs": docs_begun + len(starts),
                       "tail": int(tail)})
        if time.monotonic() - listed[0] >= MANIFEST_EVERY:
            write_manifest(out_dir, settings, shards, complete=False)
            listed[0] = time.monotonic()

    drop = 0  # tokens at the start of the stream that a kept shard already holds
    if shards:
        skip, drop = shards[-1]["docs"] - 1, shards[-1]["tail"]
        print(f"resuming: {kept} finished shards kept; their {skip:,} whole documents are skipped "
              f"(read, not tokenised)")
        docs = itertools.islice(docs, skip, None)
    buf = np.empty(max(val_tokens, shard_size), dtype=np.uint16)  # one shard, whatever the corpus
    n = 0
    try:
        with tqdm(unit="tok", unit_scale=True, desc=prefix) as bar:
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
                raise DataError(f"the input has {len(tokens)} tokens: too few to split into "
                                f"validation and training")
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
    except BaseException as e:  # what is finished stays listed, for the rerun to keep
        with contextlib.suppress(OSError):
            write_manifest(out_dir, settings, shards, complete=False)
        if isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt(f"{where} lists the {len(shards)} shards finished; the same "
                                    f"command again writes the rest") from None
        raise
    write_manifest(out_dir, settings, shards, complete=True)
    print(f"{sum(s['tokens'] for s in shards):,} tokens in {len(shards)} shards in {out_dir} "
          f"({kept} kept from an earlier run, {len(shards) - kept} written); {where} marks the "
          f"dataset complete")
    return [os.path.join(out_dir, s["name"]) for s in shards]

# -----------------------------------------------------------------------------
# HellaSwag (zero-shot evaluation data; scored by train.py --hellaswag)

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# the validation split, 10,042 examples, in the repository
HELLASWAG_FILE = os.path.join("data", "hellaswag", "hellaswag_val.jsonl")
HELLASWAG_PATH = os.path.join(REPO_DIR, HELLASWAG_FILE)
HELLASWAG_FETCH = "python prepare_fineweb.py --hellaswag"
HELLASWAG_LOCAL = "hellaswag_local"  # lm-eval's HellaSwag task on that file, offline (zeroshot.py)

def download_hellaswag(path=HELLASWAG_PATH, url=HELLASWAG_URL, timeout=60):
    """The official HellaSwag validation split at path, downloaded first if it is missing; returns
    path."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:  # an interrupted download leaves no partial file (replacing)
        with urllib.request.urlopen(url, timeout=timeout) as r, replacing(path) as f:
            f.write(r.read())  # ~11 MB
    except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
        raise DataError(f"cannot download HellaSwag from {url} to {path}: {e}. Run "
                        f"`{HELLASWAG_FETCH}` "
                        f"where the network is reachable, or copy the file to {path}") from None
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
    p = ArgumentParser(description="Tokenise FineWeb or local files into llm.c-format GPT-2 "
                       "shards.")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="fineweb",
                   help="Hugging Face source")
    p.add_argument("--subset", default="sample-10BT",
                   help="sample-10BT, sample-100BT, sample-350BT, default, ...")
    p.add_argument("--input", nargs="+",
                   help="local .jsonl/.json/.parquet/.txt files instead of Hugging Face")
    p.add_argument("--out_dir", help="default: the repository's data/fineweb10B (FineWeb "
                   "sample-10BT) or data/<prefix> (local files)")
    p.add_argument("--prefix", help="shard name prefix; default: fineweb, or the first input "
                   "file's name stem (without a leading '.')")
    p.add_argument("--shard_size", type=int, default=10**8, help="tokens per shard")
    p.add_argument("--val_tokens", type=int, help="tokens in the val shard (default: --shard_size; "
                   "an input too small for it plus one train shard gets 10%%)")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="tokeniser processes")
    p.add_argument("--hellaswag", action="store_true",
                   help="download HellaSwag val to data/hellaswag/ and exit")
    args = p.parse_args(argv)
    if args.hellaswag:
        return print(download_hellaswag())
    for name in ("shard_size", "val_tokens"):  # the header stores a shard's length as an int32
        if getattr(args, name) is not None and not 1 <= getattr(args, name) < 2**31:
            p.error(f"--{name} must be between 1 and {2**31 - 1}, not {getattr(args, name)}")
    if args.workers < 1:
        p.error(f"--workers must be at least 1, not {args.workers}")
    workers = min(args.workers, os.cpu_count() or 1)
    if args.input:
        prefix = args.prefix or os.path.splitext(os.path.basename(args.input[0]))[0].lstrip(".")
        out_dir = args.out_dir or os.path.join(DATA_DIR, prefix)
        docs, source = local_docs(args.input), local_source(args.input)
    else:
        prefix = args.prefix or "fineweb"
        sample = args.subset.startswith("sample-")
        tag = args.subset[len("sample-"):].rstrip("T") if sample else "_" + args.subset
        out_dir = args.out_dir or os.path.join(DATA_DIR, args.dataset + tag)  # data/fineweb10B
        docs = hf_docs(args.dataset, args.subset)
        source = {"dataset": DATASETS[args.dataset], "subset": args.subset}
    # train.py finds shards by *_train_* / *_val_*: a prefix holding those would be read twice;
    # one starting with '.' would make hidden files
    if (not prefix or os.sep in prefix or prefix.startswith(".") or "_train_" in prefix + "_"
            or "_val_" in prefix + "_"):
        raise DataError(f"shard prefix {prefix!r} (--prefix, or the first input's name): pass a "
                        f"--prefix without '/', a leading '.', '_train' or '_val'")
    return prepare(docs, source, out_dir, prefix, args.shard_size, workers, args.val_tokens)

if __name__ == "__main__":
    run_main(main)
