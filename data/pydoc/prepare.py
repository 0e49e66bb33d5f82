"""
The built-in offline corpus: `pydoc_data.topics`, the help() topics that ship
with every Python (79 documents, ~465 KB of English + code). No network needed.

Documents are taken in sorted-key order and split 90/10 by document (~10% of
the bytes in val). A byte-level BPE tokenizer is trained on the train docs only,
then train.bin / val.bin / meta.json are written next to this file.

    python data/pydoc/prepare.py [--vocab_size=2048] [--out_dir=DIR] [--tokenizer=hf:NAME]
or
    from data.pydoc.prepare import prepare; prepare()
"""

import hashlib
import os
import random
import sys
import time

# make the repo root importable when run as a script (python data/pydoc/prepare.py)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from data.common import ArgumentParser, check_vocab_size, hf_tokenizer, write_dataset  # noqa: E402
from data.tokenizer import tokenizer_to_dict, train_bpe  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def load_corpus():
    """(names, docs) of the pydoc topics, in a fixed (sorted-key) order."""
    from pydoc_data.topics import topics
    names = sorted(topics)
    return names, [topics[n] for n in names]


def split_docs(docs, val_frac=0.1, seed=1337):
    """
    Split documents into (train_idx, val_idx), both sorted, aiming at val_frac of
    the utf-8 bytes in val. Walk a fixed-seed permutation and take a doc into val
    unless it would push val past 1.1x the target (docs vary from 0.2 to 62 KB,
    so one big doc could otherwise double val); stop once the target is reached.
    """
    assert len(docs) >= 2, "need at least 2 documents to split"
    sizes = [len(d.encode("utf-8")) for d in docs]
    target = val_frac * sum(sizes)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    val, val_bytes = [], 0
    for i in order:
        if val_bytes >= target:
            break
        if val_bytes + sizes[i] <= 1.1 * target:
            val.append(i)
            val_bytes += sizes[i]
    if not val:  # every doc is too big for the target: take one anyway
        val = [order[0]]
    if len(val) == len(docs):  # keep at least one doc for training
        val.pop()
    val_set = set(val)
    return [i for i in range(len(docs)) if i not in val_set], sorted(val)


def prepare(out_dir=None, vocab_size=2048, tokenizer="bpe"):
    """Build the pydoc dataset into out_dir (default: this folder); returns out_dir.
    tokenizer: "bpe" (trained here on the train docs) or "hf:NAME" (a Hugging Face model's)."""
    out_dir = out_dir or HERE
    t0 = time.time()
    names, docs = load_corpus()
    corpus_sha = hashlib.sha256("".join(docs).encode("utf-8")).hexdigest()
    train_idx, val_idx = split_docs(docs)
    train_docs = [docs[i] for i in train_idx]
    val_docs = [docs[i] for i in val_idx]
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    val_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
    print(f"pydoc corpus: {len(docs)} docs, {n_bytes:,} bytes, sha256 {corpus_sha[:12]}; "
          f"val: {len(val_docs)} docs, {val_bytes / n_bytes:.1%} of bytes")

    if tokenizer.startswith("hf:"):
        tok = hf_tokenizer(tokenizer)
    else:
        t1 = time.time()
        ranks = train_bpe(train_docs, vocab_size)
        print(f"trained BPE (vocab {vocab_size}) on train docs in {time.time() - t1:.1f}s")
        tok = tokenizer_to_dict(ranks, name=f"pydoc-bpe-{vocab_size}")
    meta = write_dataset(out_dir, train_docs, val_docs, tok, {
        "source": "pydoc_data.topics",
        "corpus_sha256": corpus_sha,
        "python_version": sys.version.split()[0],
        "val_topics": [names[i] for i in val_idx],
    })
    print(f"wrote {out_dir}: train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens "
          f"({meta['train_bytes'] / max(meta['train_tokens'], 1):.2f} bytes/token), "
          f"total {time.time() - t0:.1f}s")
    return out_dir


def main(argv=None):
    parser = ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--out_dir", default=None, help="default: data/pydoc/")
    parser.add_argument("--tokenizer", default="bpe", help="bpe (trained here) or hf:NAME (a Hugging Face model's)")
    args = parser.parse_args(argv)
    if args.tokenizer != "bpe" and not args.tokenizer.startswith("hf:"):
        raise SystemExit(f"error: unknown --tokenizer={args.tokenizer} (use bpe or hf:NAME)")
    check_vocab_size(args.vocab_size)
    prepare(out_dir=args.out_dir, vocab_size=args.vocab_size, tokenizer=args.tokenizer)


if __name__ == "__main__":
    main()
