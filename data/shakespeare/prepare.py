"""
Tiny Shakespeare (~1 MB), as in nanoGPT. Needs a network for the download
(and for the GPT-2 BPE files, unless --tokenizer=bpe).

The text is split 90/10 by characters, cut at a line boundary; each split is
one document. Tokenize with GPT-2's BPE (default) or train our own BPE on the
train split (--tokenizer=bpe --vocab_size=N).

    python data/shakespeare/prepare.py [--tokenizer=gpt2|bpe|hf:NAME] [--vocab_size=2048]
                                       [--input=FILE] [--out_dir=DIR]
"""

import hashlib
import os
import sys

# make the repo root importable when run as a script
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from data.common import ArgumentParser, check_vocab_size, download, hf_tokenizer, read_text, write_dataset  # noqa: E402
from data.tokenizer import load_tokenizer, tokenizer_to_dict, train_bpe  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def split_text(text, val_frac=0.1):
    """(train, val): cut at (1 - val_frac) of the characters, moved forward to the
    next line start so no line is torn in half. train + val == text."""
    cut = int(len(text) * (1 - val_frac))
    nl = text.find("\n", cut)
    if nl != -1:
        cut = nl + 1
    return text[:cut], text[cut:]


def make_tokenizer(kind, train_text, vocab_size):
    """Tokenizer dict: GPT-2's BPE, or a BPE trained on train_text."""
    if kind == "gpt2":
        tok = tokenizer_to_dict(None)
        try:
            load_tokenizer(tok)  # fail early (and in one line) when offline
        except RuntimeError as e:
            raise SystemExit(f"error: {e} (try --tokenizer=bpe)") from None
        return tok
    if kind == "bpe":
        return tokenizer_to_dict(train_bpe([train_text], vocab_size), name=f"shakespeare-bpe-{vocab_size}")
    if kind.startswith("hf:"):
        return hf_tokenizer(kind)
    raise SystemExit(f"error: unknown --tokenizer={kind} (use gpt2, bpe or hf:NAME)")


def prepare(input_path=None, out_dir=None, tokenizer="gpt2", vocab_size=2048):
    """Build the dataset into out_dir (default: this folder) and return out_dir.
    input_path: a local text file; default downloads input.txt into this folder."""
    out_dir = out_dir or HERE
    source = URL if input_path is None else os.path.abspath(input_path)
    if input_path is None:
        input_path = os.path.join(HERE, "input.txt")
        if not os.path.exists(input_path):
            download(URL, input_path)
    text = read_text(input_path)
    if len(text) < 100:
        raise SystemExit(f"error: {input_path} has {len(text)} characters: too little text to split into train and val")
    train, val = split_text(text)
    print(f"{input_path}: {len(text):,} chars; train {len(train):,}, val {len(val):,}")
    tok = make_tokenizer(tokenizer, train, vocab_size)
    meta = write_dataset(out_dir, [train], [val], tok, {
        "source": source,
        "corpus_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    })
    print(f"wrote {out_dir}: train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens, "
          f"vocab {meta['vocab_size']}")
    return out_dir


def main(argv=None):
    parser = ArgumentParser(description="prepare tiny Shakespeare")
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2, bpe (trained here) or hf:NAME (a Hugging Face model's)")
    parser.add_argument("--vocab_size", type=int, default=2048, help="for --tokenizer=bpe")
    parser.add_argument("--input", default=None, help="local text file instead of the download")
    parser.add_argument("--out_dir", default=None, help="default: data/shakespeare/")
    args = parser.parse_args(argv)
    if args.tokenizer == "bpe":
        check_vocab_size(args.vocab_size)
    return prepare(args.input, args.out_dir, args.tokenizer, args.vocab_size)


if __name__ == "__main__":
    main()
