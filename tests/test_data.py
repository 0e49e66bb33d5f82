"""Tests for data/: write_dataset format (uint16 token files, uint32 above 65,536 tokens, read back by
train.py and eval.py), the pydoc split, shakespeare/fineweb paths, download errors."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.common import download, storage_dtype, token_dtype, write_dataset  # noqa: E402
from data.pydoc.prepare import load_corpus, split_docs  # noqa: E402
from data.tokenizer import EOT, SPLIT_PATTERN, load_tokenizer, tokenizer_to_dict, train_bpe  # noqa: E402

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
    assert meta["dtype"] == "uint16"  # a vocabulary that fits keeps nanoGPT's 2 bytes a token
    assert os.path.getsize(out / "train.bin") == 2 * meta["train_tokens"]
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


# ---- token files above 65,536 ids: uint32 ----------------------------------------------------------

BIG_DOCS = ["zzzz yyyy", "hello xxzz", "ünïcode 🙂 zz"]


def big_tokenizer():
    """A tokenizer dict of 65,793 ids, built without training: the 256 bytes, then every pair of
    bytes with the pairs of two lowercase letters last (ids 65,116..65,791: "zz" is 65,791), and
    the document token at 65,792. Too many for uint16."""
    letters = set(b"abcdefghijklmnopqrstuvwxyz")
    pairs = sorted(((a, b) for a in range(256) for b in range(256)),
                   key=lambda p: (p[0] in letters and p[1] in letters, p))
    return {"kind": "bpe", "name": "pairs", "pattern": SPLIT_PATTERN,
            "ranks": [bytes([i]).hex() for i in range(256)] + [bytes(p).hex() for p in pairs], "eot": EOT}


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("big") / "ds"
    meta = write_dataset(str(out), BIG_DOCS * 20, BIG_DOCS, big_tokenizer(), {"source": "test"})
    return out, meta


def expected_ids(enc, docs):
    return [t for ids in enc.encode_ordinary_batch(docs) for t in [enc.eot_token] + ids]


def test_storage_dtype_and_token_dtype():
    assert storage_dtype(257) == storage_dtype(65536) == "uint16"  # ids 0..65,535 fit
    assert storage_dtype(65537) == storage_dtype(151_669) == "uint32"  # Qwen3's vocabulary
    with pytest.raises(ValueError):
        storage_dtype((1 << 32) + 1)
    assert token_dtype({"dtype": "uint32"}) == np.uint32 and token_dtype({"dtype": "uint16"}) == np.uint16
    assert token_dtype({}) == token_dtype(None) == token_dtype({"dtype": None}) == np.uint16  # metas before uint32
    for bad in ("float32", "int64", 4):
        with pytest.raises(ValueError, match="token dtype"):
            token_dtype({"dtype": bad})


def test_big_vocab_writes_uint32_and_ids_round_trip(big_dataset):
    out, meta = big_dataset
    enc = load_tokenizer(meta["tokenizer"])
    assert enc.n_vocab == meta["vocab_size"] == 65793 and enc.eot_token == meta["eot_token"] == 65792
    assert meta["dtype"] == "uint32" and json.loads((out / "meta.json").read_text())["dtype"] == "uint32"
    for split, docs in (("train", BIG_DOCS * 20), ("val", BIG_DOCS)):
        assert os.path.getsize(out / f"{split}.bin") == 4 * meta[f"{split}_tokens"]
        ids = np.fromfile(out / f"{split}.bin", dtype=token_dtype(meta))
        assert ids.tolist() == expected_ids(enc, docs)
        assert ids[0] == 65792 and enc.encode_ordinary("zz") == [65791] and 65791 in ids  # above 65,535, intact
        pieces = np.split(ids, np.flatnonzero(ids == enc.eot_token)[1:])
        assert [enc.decode(p[1:].tolist()) for p in pieces] == docs


def test_train_and_eval_read_uint32_tokens(big_dataset, tmp_path):
    """train.py's batch loader and eval.py's readers (the val split's tokens, a task's rows) give
    back ids above 65,535 as written."""
    import torch
    import eval as ev
    import train
    out, meta = big_dataset
    enc = load_tokenizer(meta["tokenizer"])
    want = np.array(expected_ids(enc, BIG_DOCS * 20))
    data = train.load_split(str(out), meta, "train")
    assert data.dtype == np.uint32 and np.array_equal(data, want)
    x, y = train.text_batch(data, np.random.default_rng(0), 8, 6)
    assert x.dtype == torch.int64 and x.max() > 65535
    for xr, yr in zip(x.tolist(), y.tolist()):  # each row a window of the stream, y the next tokens
        starts = [i for i in range(len(want) - 6) if want[i:i + 6].tolist() == xr]
        assert starts and any(want[i + 1:i + 7].tolist() == yr for i in starts)
    tokens = ev.text_tokens({"label": "bpb"}, enc, {**meta, "data_dir": str(out)}, str(tmp_path), 0)
    assert tokens.tolist() == expected_ids(enc, BIG_DOCS)
    # a task dataset's rows: EOT, prompt, answer; the mask marks the answer
    rows = np.array([[65792, 65791, 7, 70000], [65792, 3, 65600, 65792]], dtype=np.uint32)
    rows.tofile(tmp_path / "val.bin")
    np.array([[0, 0, 1, 1], [0, 0, 0, 1]], dtype=np.uint8).tofile(tmp_path / "val_mask.bin")
    np.array([1, 2], dtype=np.uint8).tofile(tmp_path / "val_group.bin")
    x, y, group = ev.task_rows(str(tmp_path), 4, meta={"dtype": "uint32"})
    assert x.tolist() == rows[:, :-1].tolist() and y.tolist() == [[-1, 7, 70000], [-1, -1, 65792]]
    assert group.tolist() == [1, 2]
    assert np.array_equal(train.load_split(str(tmp_path), {"dtype": "uint32"}, "val"), rows.reshape(-1))


def test_uint16_files_without_a_dtype_still_load(tok, tmp_path):
    """Data prepared before uint32 files: uint16 tokens, a meta.json with no "dtype" (and a
    checkpoint's meta with none) reads as before."""
    out = tmp_path / "old"
    out.mkdir()
    enc = load_tokenizer(tok)
    ids = expected_ids(enc, DOCS)
    np.array(ids, dtype=np.uint16).tofile(out / "val.bin")  # the old writer
    np.array(ids * 3, dtype=np.uint16).tofile(out / "train.bin")
    meta = {"tokenizer": tok, "vocab_size": enc.n_vocab, "eot_token": enc.eot_token}
    import eval as ev
    import train
    data = train.load_split(str(out), meta, "train")
    assert data.dtype == np.uint16 and data.tolist() == ids * 3
    x, y = train.text_batch(data, np.random.default_rng(0), 4, 5)
    assert x.shape == y.shape == (4, 5) and int(x.max()) < enc.n_vocab
    assert ev.text_tokens({"label": "bpb"}, enc, {**meta, "data_dir": str(out)}, str(tmp_path), 0).tolist() == ids


def test_train_py_runs_on_uint32_data(big_dataset, tmp_path):
    """train.py as a user runs it on uint32 token files (a vocabulary padded to 65,856); it checks
    their length in whole uint32 tokens."""
    from tests.test_train import SMALL, records, run
    out, meta = big_dataset
    small = [a for a in SMALL if not a.startswith(("--block_size", "--n_embd"))] + ["--block_size=8", "--n_embd=16"]
    run("train.py", f"--data_dir={out}", f"--out_dir={tmp_path / 'run'}", "--max_iters=1", "--eval_interval=1", *small)
    assert records(tmp_path / "run", "config")[0]["model"]["vocab_size"] == 65856
    evals = records(tmp_path / "run", "eval")
    assert evals and all(np.isfinite(r["loss"]) for e in evals for r in e["val"].values())
    bad = tmp_path / "odd"
    bad.mkdir()
    for name in ("meta.json", "val.bin"):
        (bad / name).write_bytes((out / name).read_bytes())
    (bad / "train.bin").write_bytes((out / "train.bin").read_bytes()[:-2])  # whole uint16s, not whole uint32s
    proc = run("train.py", f"--data_dir={bad}", f"--out_dir={tmp_path / 'run2'}", "--max_iters=1", *small, ok=False)
    assert "not whole uint32 tokens" in proc.stderr, proc.stderr
