"""
Byte-level BPE tokenizer: a small, fast trainer, served through tiktoken.

We train the merges ourselves (pure Python, incremental pair counts) and hand
the resulting mergeable ranks to `tiktoken.Encoding`, which does the actual
encoding/decoding in Rust. A tokenizer is described by a plain dict (only
str/int/list/dict inside) so it can live in meta.json and in checkpoints that
are loaded with `torch.load(weights_only=True)`:

    {"kind": "bpe", "name": ..., "pattern": ..., "ranks": [hex, ...], "eot": EOT}
    {"kind": "gpt2"}
    {"kind": "hf", "name": ..., "pattern": ..., "ranks": [hex or None, ...], "specials": {text: id}, "eot": ...}
        (a Hugging Face byte-level BPE, made by data/huggingface.py; None marks a special token's id)

Token ids: 0..255 are the single bytes, then the merges in the order they were
learned, and the one special token EOT comes last (id = vocab_size - 1).
"""

import heapq
from collections import Counter, defaultdict

import regex
import tiktoken

# GPT-4 (cl100k) style split: contractions, words with an optional leading
# non-letter, numbers in groups of at most 3 digits, punctuation runs, newlines
# and whitespace. Every character is matched by some branch, so the chunks
# always concatenate back to the input (nothing is silently dropped).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
EOT = "<|endoftext|>"


def _merge(word, a, b, new_id):
    """Replace every non-overlapping (a, b) in word, left to right, by new_id."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(docs, vocab_size, pattern=SPLIT_PATTERN, progress=False):
    """
    Learn byte-level BPE merges on docs (a list of str). Returns mergeable ranks
    {token bytes: id} with vocab_size - 1 entries (the EOT special takes the
    last id). Deterministic: ties in pair counts go to the smallest (id, id) pair.
    """
    n_ranks = vocab_size - 1
    assert n_ranks >= 256, "vocab_size must be at least 257 (256 bytes + EOT)"

    # 1) pre-tokenise and count unique chunks: BPE never merges across chunk
    # boundaries, so each distinct chunk only has to be processed once.
    pat = regex.compile(pattern)
    counts = Counter()
    for doc in docs:
        counts.update(pat.findall(doc))
    chunks = sorted(counts)  # fixed order, independent of dict/hash order
    words = [list(c.encode("utf-8")) for c in chunks]
    freqs = [counts[c] for c in chunks]

    # 2) initial pair counts, plus an index pair -> words containing it, so a
    # merge only touches the words it affects instead of re-scanning them all.
    pair_counts = defaultdict(int)
    where = defaultdict(set)
    for i, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            pair_counts[p] += f
            where[p].add(i)
    # max-heap of (-count, pair) with lazy deletion: an entry is valid only if
    # its count still equals the live count. Ties pop the smallest pair.
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([i]) for i in range(256)]  # id -> bytes
    ranks = {b: i for i, b in enumerate(vocab)}  # bytes -> id
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_ranks - 256, desc="bpe merges", unit="merge")

    while len(vocab) < n_ranks:
        while heap:
            negc, pair = heapq.heappop(heap)
            if pair_counts.get(pair) == -negc:
                break
        else:
            raise ValueError(f"corpus too small: ran out of pairs at {len(vocab)} "
                             f"tokens, can't reach vocab_size={vocab_size}")
        a, b = pair
        new_bytes = vocab[a] + vocab[b]
        # tiktoken keys ranks by bytes, so a byte string reached through a
        # different merge path must reuse its id rather than get a second one.
        # We still apply the merge to the words; it just adds no new token.
        new_id = ranks.get(new_bytes)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(new_bytes)
            ranks[new_bytes] = new_id
            if bar:
                bar.update(1)

        changed = set()
        for i in where.pop(pair):
            w = words[i]
            merged = _merge(w, a, b, new_id)
            if len(merged) == len(w):
                continue  # stale index entry: the pair is no longer in this word
            f = freqs[i]
            for p in zip(w, w[1:]):
                pair_counts[p] -= f
                changed.add(p)
            for p in zip(merged, merged[1:]):
                pair_counts[p] += f
                where[p].add(i)
                changed.add(p)
            words[i] = merged
        for p in changed:
            c = pair_counts[p]
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:  # gone from every word
                del pair_counts[p]
                where.pop(p, None)
    if bar:
        bar.close()
    return ranks


def tokenizer_to_dict(ranks=None, name="bpe", pattern=SPLIT_PATTERN):
    """Plain-dict description of a tokenizer; ranks=None means GPT-2's BPE."""
    if ranks is None:
        return {"kind": "gpt2"}
    by_id = sorted(ranks.items(), key=lambda kv: kv[1])
    assert [i for _, i in by_id] == list(range(len(by_id))), "ranks must be 0..n-1"
    return {"kind": "bpe", "name": name, "pattern": pattern,
            "ranks": [b.hex() for b, _ in by_id], "eot": EOT}


class HFEncoding(tiktoken.Encoding):
    """A Hugging Face tokenizer's document token need not be called <|endoftext|>."""

    @property
    def eot_token(self):
        return self.eot


def load_tokenizer(d):
    """Build a tiktoken.Encoding from a dict made by tokenizer_to_dict."""
    if d["kind"] == "gpt2":
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline: tiktoken fetches the files on first use
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise RuntimeError("the GPT-2 BPE files could not be loaded (tiktoken needs "
                               f"a network the first time to download them): {reason}") from None
    if d["kind"] == "hf":
        ranks = {bytes.fromhex(h): i for i, h in enumerate(d["ranks"]) if h is not None}
        enc = HFEncoding(name=d["name"], pat_str=d["pattern"], mergeable_ranks=ranks, special_tokens=d["specials"])
        enc.eot = d["specials"][d["eot"]]
        return enc
    if d["kind"] != "bpe":
        raise ValueError(f"unknown tokenizer kind {d['kind']!r}")
    ranks = {bytes.fromhex(h): i for i, h in enumerate(d["ranks"])}
    return tiktoken.Encoding(name=d["name"], pat_str=d["pattern"], mergeable_ranks=ranks,
                             special_tokens={d["eot"]: len(ranks)})


def token_byte_lengths(enc):
    """Length in bytes of every token id (0 for special tokens); for bits-per-byte."""
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    lengths = []
    for i in range(enc.n_vocab):
        if i in special:
            lengths.append(0)
            continue
        try:
            lengths.append(len(enc.decode_single_token_bytes(i)))
        except KeyError:  # a hole in the id space (not a real token)
            lengths.append(0)
    return lengths
