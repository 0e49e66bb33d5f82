"""
FineWeb-Edu, from karpathy's pre-shuffled parquet shards on the Hugging Face hub
(~100 MB / ~250M characters each). Needs a network and pyarrow.

--num_shards=N downloads shards 0..N-1 for train plus one fixed shard for val
(the last one of the dataset, so val stays the same whatever N is), reads
their `text` column, tokenizes with GPT-2's BPE (or --tokenizer=hf:NAME, a Hugging Face
model's, for uptraining it) and writes the bins.

    python data/fineweb_edu/prepare.py [--num_shards=1] [--out_dir=DIR] [--tokenizer=hf:NAME]
"""

import os
import sys

# make the repo root importable when run as a script
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from data.common import ArgumentParser, download, hf_tokenizer, write_dataset  # noqa: E402
from data.tokenizer import load_tokenizer, tokenizer_to_dict  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
VAL_SHARD = 1822  # the last shard (shard_01822.parquet) is held out for validation


def shard_url(i):
    return f"{BASE_URL}/shard_{i:05d}.parquet"


def require_pyarrow():
    """Import pyarrow.parquet lazily: only this script needs it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("error: fineweb_edu needs pyarrow: pip install pyarrow") from None
    return pq


def docs_from_parquet(paths):
    """Yield the `text` of every row of the parquet files, one row group at a
    time, so a shard is never fully in memory as Python strings."""
    pq = require_pyarrow()
    for path in paths:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            yield from pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


def write_docs(train_docs, val_docs, out_dir, tok=None, source_meta=None):
    """Tokenize already-read docs (GPT-2 BPE unless tok is given) and write the dataset."""
    tok = tok or tokenizer_to_dict(None)
    meta = write_dataset(out_dir, train_docs, val_docs, tok,
                         {"source": "karpathy/fineweb-edu-100b-shuffle", **(source_meta or {})})
    print(f"wrote {out_dir}: train {meta['train_tokens']:,} tokens ({meta['train_docs']:,} docs), "
          f"val {meta['val_tokens']:,} tokens ({meta['val_docs']:,} docs)")
    return meta


def prepare(num_shards=1, out_dir=None, tokenizer="gpt2"):
    """Download shards 0..num_shards-1 (+ the val shard) and build the dataset; returns out_dir.
    tokenizer: "gpt2" or "hf:NAME" (a Hugging Face model's byte-level BPE)."""
    out_dir = out_dir or HERE
    if not 0 < num_shards <= VAL_SHARD:
        raise SystemExit(f"error: --num_shards must be in 1..{VAL_SHARD}, got {num_shards}")
    require_pyarrow()  # fail before any download
    if tokenizer.startswith("hf:"):
        tok = hf_tokenizer(tokenizer)
    elif tokenizer == "gpt2":
        tok = tokenizer_to_dict(None)
        try:
            load_tokenizer(tok)
        except RuntimeError as e:
            raise SystemExit(f"error: {e}") from None
    else:
        raise SystemExit(f"error: unknown --tokenizer={tokenizer} (use gpt2 or hf:NAME)")
    ids = list(range(num_shards)) + [VAL_SHARD]
    paths = {}
    for i in ids:
        paths[i] = os.path.join(HERE, f"shard_{i:05d}.parquet")
        if not os.path.exists(paths[i]):
            download(shard_url(i), paths[i])
    write_docs(docs_from_parquet([paths[i] for i in range(num_shards)]),
               docs_from_parquet([paths[VAL_SHARD]]), out_dir, tok,
               {"train_shards": list(range(num_shards)), "val_shard": VAL_SHARD})
    return out_dir


def main(argv=None):
    parser = ArgumentParser(description="prepare FineWeb-Edu shards")
    parser.add_argument("--num_shards", type=int, default=1, help="train shards (+1 val shard)")
    parser.add_argument("--out_dir", default=None, help="default: data/fineweb_edu/")
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2 or hf:NAME (a Hugging Face model's byte-level BPE)")
    args = parser.parse_args(argv)
    return prepare(args.num_shards, args.out_dir, args.tokenizer)


if __name__ == "__main__":
    main()
