"""Tests for data/tokenizer.py: BPE training, the dict format, exact round trips."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.tokenizer import EOT, load_tokenizer, token_byte_lengths, tokenizer_to_dict, train_bpe  # noqa: E402

VOCAB = 512

STRINGS = [
    "",
    "hello world",
    "Hello, World! It's we'll they've I'M",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "   leading and trailing   \t\t \n",
    "numbers 1234567 3.14159 -42 1e10 ٣٤٥",
    "unicode: café naïve Ünïcödé ß ﬁ",
    "emoji: 🙂👍🏽 👨‍👩‍👧‍👦 🇫🇷",
    "CJK: 日本語のテキスト 中文 한국어",
    "control: \x00\x01\x07\x1b[0m \r\n \x0b\x0c \x7f \u200b \u2028 \ufeff",
    "combining: e\u0301 a\u0308 \u0915\u094d\u0937",
    "special as text: <|endoftext|> and <|endoftext",
    "\n\n\n\n",
    " " * 50,
    "a" * 300,
    "x\ty\r\nz\rw",
]


def corpus():
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)[:12]]


@pytest.fixture(scope="module")
def ranks():
    return train_bpe(corpus(), VOCAB)


@pytest.fixture(scope="module")
def enc(ranks):
    return load_tokenizer(tokenizer_to_dict(ranks, name="test"))


def test_ranks_layout(ranks, enc):
    assert len(ranks) == VOCAB - 1
    assert sorted(ranks.values()) == list(range(VOCAB - 1))
    assert all(ranks[bytes([i])] == i for i in range(256))
    assert enc.n_vocab == VOCAB
    assert enc.eot_token == VOCAB - 1
    assert enc.decode([enc.eot_token]) == EOT


def test_deterministic(ranks):
    again = train_bpe(corpus(), VOCAB)
    assert list(again.items()) == list(ranks.items())


@pytest.mark.parametrize("s", STRINGS)
def test_round_trip(enc, s):
    ids = enc.encode_ordinary(s)
    assert enc.decode(ids) == s
    assert enc.eot_token not in ids  # EOT only ever comes from dataset code
    assert enc.encode(s, allowed_special=set(), disallowed_special=()) == ids


def test_round_trip_corpus(enc):
    text = "\n".join(corpus())
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")) / 2  # merges actually compress


def test_dict_survives_json(ranks, enc):
    d = tokenizer_to_dict(ranks, name="test")
    assert d["kind"] == "bpe" and d["eot"] == EOT and len(d["ranks"]) == VOCAB - 1
    enc2 = load_tokenizer(json.loads(json.dumps(d)))
    for s in STRINGS:
        assert enc2.encode_ordinary(s) == enc.encode_ordinary(s)
    assert enc2.eot_token == enc.eot_token and enc2.n_vocab == enc.n_vocab


def test_dict_survives_torch_load(ranks, tmp_path):
    torch = pytest.importorskip("torch")
    d = tokenizer_to_dict(ranks, name="test")
    torch.save({"tokenizer": d}, tmp_path / "ck.pt")
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["tokenizer"] == d


def test_token_byte_lengths(enc):
    lengths = token_byte_lengths(enc)
    assert len(lengths) == enc.n_vocab
    assert lengths[enc.eot_token] == 0
    assert all(n == 1 for n in lengths[:256]) and all(n >= 2 for n in lengths[256:-1])
    for s in STRINGS:
        assert sum(lengths[i] for i in enc.encode_ordinary(s)) == len(s.encode("utf-8"))


def test_small_random_corpora():
    # tiny alphabets make many competing merge paths; ids must stay contiguous
    # (a byte string reached twice must not get a second id) and round trip.
    import random
    for seed in range(20):
        rng = random.Random(seed)
        doc = " ".join("".join(rng.choice("abc") for _ in range(rng.randint(2, 12))) for _ in range(30))
        r = train_bpe([doc], 280)
        assert sorted(r.values()) == list(range(279))
        enc = load_tokenizer(tokenizer_to_dict(r, name="t"))
        assert enc.decode(enc.encode_ordinary(doc)) == doc


def test_too_small_corpus_is_an_error():
    with pytest.raises(ValueError, match="corpus too small"):
        train_bpe(["ab"], 300)


def test_gpt2_dict():
    assert tokenizer_to_dict(None) == {"kind": "gpt2"}
    try:
        enc = load_tokenizer({"kind": "gpt2"})
    except RuntimeError as e:  # offline: a clear one-line error
        assert "network" in str(e) and "\n" not in str(e)
    else:
        assert enc.n_vocab == 50257 and enc.eot_token == 50256
