"""Tests for data/: write_dataset format, the pydoc split, shakespeare/fineweb paths, download errors."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.common import download, write_dataset  # noqa: E402
from data.pydoc.prepare import load_corpus, split_docs  # noqa: E402
from data.tokenizer import load_tokenizer, tokenizer_to_dict, train_bpe  # noqa: E402

DOCS = ["hello world, hello there", "second doc\nwith lines\n", "ünïcode 🙂 日本", "<|endoftext|> as text"]


@pytest.fixture(scope="module")
def tok():
    return tokenizer_to_dict(train_bpe(DOCS * 3, 300), name="test")


def read_bin(path):
    return np.memmap(path, dtype=np.uint16, mode="r")


def test_write_dataset(tmp_path, tok):
    out = tmp_path / "ds"
    meta = write_dataset(str(out), DOCS[:3], DOCS[3:], tok, {"source": "test", "corpus_sha256": "x"})
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]  # no temp leftovers
    assert json.loads((out / "meta.json").read_text()) == meta
    for k in ("tokenizer", "vocab_size", "train_tokens", "val_tokens", "train_docs", "val_docs",
              "train_bytes", "val_bytes", "eot_token", "source", "corpus_sha256"):
        assert k in meta
    enc = load_tokenizer(meta["tokenizer"])
    assert meta["vocab_size"] == enc.n_vocab == 300 and meta["eot_token"] == enc.eot_token
    for split, docs in (("train", DOCS[:3]), ("val", DOCS[3:])):
        ids = read_bin(out / f"{split}.bin")
        assert len(ids) == meta[f"{split}_tokens"]
        assert meta[f"{split}_docs"] == len(docs)
        assert meta[f"{split}_bytes"] == sum(len(d.encode()) for d in docs)
        # every doc starts with EOT, and EOT appears nowhere else
        starts = np.flatnonzero(ids == enc.eot_token)
        assert len(starts) == len(docs) and starts[0] == 0
        pieces = np.split(np.asarray(ids), starts[1:])
        assert [enc.decode(p[1:].tolist()) for p in pieces] == docs


def test_write_dataset_overwrites_and_takes_iterators(tmp_path, tok):
    out = str(tmp_path)
    write_dataset(out, DOCS, DOCS[:1], tok, {})
    meta = write_dataset(out, iter(DOCS[:2]), (d for d in DOCS[2:]), tok, {})
    assert meta["train_docs"] == 2 and meta["val_docs"] == 2
    assert len(read_bin(os.path.join(out, "train.bin"))) == meta["train_tokens"]


def test_pydoc_split():
    names, docs = load_corpus()
    assert names == sorted(names) and len(docs) == len(names) > 10
    train, val = split_docs(docs)
    assert (train, val) == split_docs(docs)  # deterministic
    assert not set(train) & set(val) and sorted(train + val) == list(range(len(docs)))
    sizes = [len(d.encode("utf-8")) for d in docs]
    frac = sum(sizes[i] for i in val) / sum(sizes)
    assert 0.08 <= frac <= 0.12, frac


def test_split_edge_cases():
    train, val = split_docs(["a" * 100, "b" * 100])  # both docs far above the 10% target
    assert len(train) == 1 and len(val) == 1
    train, val = split_docs(["x"] * 100)
    assert len(val) == 10 and len(train) == 90


def test_shakespeare_bpe_local(tmp_path):
    from data.shakespeare.prepare import main, split_text
    text = "".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(300))
    train, val = split_text(text)
    assert train + val == text and train.endswith("\n")
    assert 0.08 < len(val) / len(text) < 0.12
    src = tmp_path / "input.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    main([f"--input={src}", "--tokenizer=bpe", "--vocab_size=300", f"--out_dir={out}"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["train_docs"] == meta["val_docs"] == 1
    enc = load_tokenizer(meta["tokenizer"])
    assert enc.decode(read_bin(out / "val.bin")[1:].tolist()) == val


def test_fineweb_write_docs(tmp_path, tok):
    from data.fineweb_edu.prepare import shard_url, write_docs
    assert shard_url(7).endswith("/shard_00007.parquet")
    meta = write_docs(iter(DOCS), iter(DOCS[:1]), str(tmp_path), tok)
    assert meta["train_docs"] == 4 and meta["val_docs"] == 1
    assert {"meta.json", "train.bin", "val.bin"} <= set(os.listdir(tmp_path))


def test_download_offline(tmp_path):
    path = tmp_path / "x.txt"
    with pytest.raises(SystemExit) as e:
        download("http://127.0.0.1:9/x", str(path), timeout=5)
    msg = str(e.value.code)
    assert msg.startswith("error: could not download http://127.0.0.1:9/x") and "\n" not in msg
    assert os.listdir(tmp_path) == []  # no partial file left behind
