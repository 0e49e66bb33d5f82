"""
Shared helpers for the data/<name>/prepare.py scripts.

A prepared dataset is a folder with (nanoGPT format):
    train.bin, val.bin  flat token arrays; every document starts with EOT. np.uint16 while
                        every id fits (at most 65,536 tokens), np.uint32 above (Qwen3's
                        ~151.7k): meta.json's "dtype" says which (token_dtype reads it)
    meta.json           tokenizer dict, vocab size, dtype, token/doc/byte counts, source info
meta.json is written last, so its presence (with both bins) means "prepared".
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import urllib.request

import numpy as np
from tqdm import tqdm

from data.tokenizer import load_tokenizer

BATCH_DOCS = 256  # docs per encode_ordinary_batch call: big enough for tiktoken's threads
TOKEN_DTYPES = ("uint16", "uint32")  # what a dataset's token files may hold


def storage_dtype(n_vocab):
    """The dtype a tokenizer of n_vocab ids is stored in: uint16 while every id fits (at most
    65,536 tokens: half the bytes, and what every dataset prepared before uint32 holds), uint32
    above (Llama 3's 128k, Qwen3's ~151.7k)."""
    if n_vocab <= 1 << 16:
        return "uint16"
    if n_vocab <= 1 << 32:
        return "uint32"
    raise ValueError(f"a vocabulary of {n_vocab} tokens does not fit in uint32 token files")


def token_dtype(meta):
    """The numpy dtype of a dataset's token files (train.bin, val.bin) from its meta: its
    "dtype", uint16 when it has none (a meta from before uint32 files, a checkpoint without
    its dataset's meta). ValueError for anything else."""
    name = (meta or {}).get("dtype") or "uint16"
    if name not in TOKEN_DTYPES:
        raise ValueError(f"token dtype {name!r} (valid: {', '.join(TOKEN_DTYPES)})")
    return np.dtype(name)


def _encode_to_file(enc, docs, path, desc, dtype="uint16"):
    """Encode docs ([eot] + tokens each) and append them to path as dtype.
    Streams batch by batch, so an iterator of docs never sits in memory at once.
    Returns (n_tokens, n_docs, n_bytes)."""
    n_tokens = n_docs = n_bytes = 0
    total = len(docs) if hasattr(docs, "__len__") else None
    with open(path, "wb") as f, tqdm(total=total, desc=desc, unit="doc",
                                     disable=total is not None and total < 1000) as bar:
        batch = []

        def flush():
            nonlocal n_tokens
            for ids in enc.encode_ordinary_batch(batch):
                arr = np.empty(len(ids) + 1, dtype=dtype)
                arr[0] = enc.eot_token
                arr[1:] = ids
                arr.tofile(f)
                n_tokens += len(arr)
            bar.update(len(batch))
            batch.clear()

        for doc in docs:
            batch.append(doc)
            n_docs += 1
            n_bytes += len(doc.encode("utf-8"))
            if len(batch) == BATCH_DOCS:
                flush()
        flush()
    return n_tokens, n_docs, n_bytes


def write_dataset(out_dir, train_docs, val_docs, tok, source_meta):
    """
    Tokenize docs (lists or iterables of str) with the tokenizer dict tok and write
    train.bin / val.bin / meta.json into out_dir, atomically: files are built in a
    temp dir and moved into place with os.replace, meta.json last. The tokens are uint16,
    or uint32 above 65,536 tokens (storage_dtype), as meta["dtype"] says. Returns the meta dict.
    """
    enc = load_tokenizer(tok)
    dtype = storage_dtype(enc.n_vocab)  # uint16 up to 65,536 tokens, uint32 above
    out_folder(out_dir)
    # drop a stale meta.json first: otherwise, between the os.replace calls
    # below, new bins next to the old meta would look like a prepared dataset
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=out_dir)  # same filesystem -> atomic rename
    try:
        counts = {}
        for split, docs in (("train", train_docs), ("val", val_docs)):
            counts[split] = _encode_to_file(enc, docs, os.path.join(tmp, f"{split}.bin"), split, dtype)
        meta = {
            "tokenizer": tok,
            "vocab_size": enc.n_vocab,
            "eot_token": enc.eot_token,
            "dtype": dtype,  # what train.bin / val.bin hold: readers take it from here (token_dtype)
        }
        for split, (n_tokens, n_docs, n_bytes) in counts.items():
            meta[f"{split}_tokens"] = n_tokens
            meta[f"{split}_docs"] = n_docs
            meta[f"{split}_bytes"] = n_bytes  # utf-8 bytes of the text, for bits-per-byte
        meta.update(source_meta)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        for name in ("train.bin", "val.bin", "meta.json"):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line (argparse prints its usage first)."""

    def error(self, message):
        raise SystemExit(f"error: {message} (see --help)")


def out_folder(path):
    """Create the dataset's folder, or stop with one line (a file in the way, no permission)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: {path}: cannot create the folder ({e.strerror or e})") from None
    return path


def check_vocab_size(n):
    """A byte-level BPE has the 256 bytes and the document token; its ids are stored as uint16
    up to 65,536 tokens and as uint32 above (storage_dtype), so uint32 bounds it."""
    if not 257 <= n <= 1 << 32:
        raise SystemExit(f"error: --vocab_size={n}: a byte-level BPE needs 257 to {1 << 32} tokens (256 bytes, the "
                         "document token, and merges; the token files hold uint32 ids at most)")


def hf_tokenizer(arg):
    """--tokenizer=hf:NAME: the Hugging Face model NAME's byte-level BPE (data/huggingface.py),
    so a model converted with train.py --init_from=hf:NAME reads tokens it knows."""
    from data.huggingface import load_tokenizer_dict  # (imports this module)
    try:
        return load_tokenizer_dict(arg[3:])
    except ValueError as e:
        raise SystemExit(f"error: --tokenizer={arg}: {e}") from None


def read_text(path):
    """A local text file (UTF-8), or stop with one line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: cannot read {path} as UTF-8 text: {e}") from None
    if not text.strip():
        raise SystemExit(f"error: {path} holds no text")
    return text


def download(url, path, timeout=30, headers=None, missing_ok=False):
    """Stream url to path (temp file + rename). Offline: SystemExit with one line.
    missing_ok: a file the server does not have (HTTP 404, or no such local file for
    file:// URLs) returns None instead."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".part"
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path),
                      file=sys.stderr) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, path)
    except (OSError, ValueError) as e:  # URLError/HTTPError/timeouts are OSErrors
        if missing_ok and (getattr(e, "code", None) == 404 or isinstance(getattr(e, "reason", None), FileNotFoundError)):
            return None
        reason = (str(getattr(e, "reason", None) or e).splitlines() or ["?"])[0]
        code = getattr(e, "code", None)
        if code in (401, 403):  # the server answered: not a network problem
            raise SystemExit(f"error: could not download {url}: HTTP {code} {reason} (a gated or private "
                             f"repository: accept its terms on the hub and set HF_TOKEN)") from None
        if code:
            raise SystemExit(f"error: could not download {url}: HTTP {code} {reason}") from None
        raise SystemExit(f"error: could not download {url} (no network?): {reason}") from None
    finally:  # an error or Ctrl-C leaves no partial file behind
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
