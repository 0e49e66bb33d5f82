"""
Synthetic reasoning tasks where the number of loops matters, no network.

Each example is a prompt and an answer in plain ASCII, one character per token (the
tokenizer is the 256 single bytes plus EOT, served by tiktoken like the BPE ones):

  addition  "12840+57300=" -> "69140" + "0"   4821 + 375 = 5196 with every number
            written least-significant digit first and zero-padded to a fixed width (digits
            for the operands, digits+1 for the sum): REVERSED digits, so that answer digit i
            needs only the operands' digits i, at fixed offsets, and the carry from digit
            i-1, the order a person adds in. The carry chain is what needs depth. Group: the
            larger operand's length n, drawn from 1..digits.
  phop      "cabdcbadbca...|3=" -> "b"   p-hop induction (Sanford et al. 2024, used by
            Saunshi et al. 2025): from the last symbol, a hop moves to the symbol just
            after the previous occurrence of the current symbol; the answer is the symbol
            reached after p hops, p in 1..max_hops.
  hops      "....dBA=" -> "k"   multi-hop composition over parametric knowledge (Kohli et al.
            2026): one fixed random knowledge graph per seed, `entities` letters a.. and
            `relations` capital letters A.., each relation a random permutation of the
            entities. The prompt is an entity and h relations applied left to right ("dBA="
            is A(B(d))), left-padded with "." to one width for every h (so the answer
            sits at the same position whatever h is: longer chains test depth, not length). Train holds every atomic fact (the 1-hop questions: the knowledge,
            repeated to be as common as an average hop count) and at most 3/4 of the
            2..max_hops compositions; val holds unseen compositions of 2..max_hops hops
            (in distribution) and of max_hops+1..max_hops+ood_hops (out of distribution).
            Looping suits it: each loop can carry the entity one relation further.
  parity    "0110100=" -> "1"   the parity of n bits, n in 1..digits.

Rows on disk (train.py reads them when meta.json says "format": "task"):
    {split}.bin       uint16 (rows, row_len): EOT, prompt, answer, EOT, then EOT padding
                      (meta.json's "dtype"; uint32 only for a tokenizer above 65,536 tokens)
    {split}_mask.bin  uint8, same shape: 1 where the token is answer (or its closing EOT),
                      the only positions the loss and the exact-match accuracy look at
    {split}_group.bin uint8 (rows,): what the task varies (digits, p or hop count)
Examples are deterministic given (task, seed, sizes); val holds no prompt that train has.

    python data/tasks/prepare.py --task=phop [--train_rows=20000 --val_rows=1000 --seed=0]
train.py prepares a task on first use (configs set dataset = "tasks/<task>").
"""

import json
import os
import random
import shutil
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from data.common import ArgumentParser, out_folder, storage_dtype  # noqa: E402
from data.tokenizer import load_tokenizer, tokenizer_to_dict  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = 2  # bumped when a generator changes; train.py then makes the task again
TASKS = ("addition", "phop", "hops", "parity")
# what each task varies, and its default range
DEFAULTS = {"addition": dict(digits=5), "phop": dict(length=16, symbols=4, max_hops=4),
            "hops": dict(entities=16, relations=8, max_hops=3, ood_hops=3), "parity": dict(digits=16)}
GROUP_NAMES = {"addition": "digits", "phop": "hops", "hops": "hops", "parity": "bits"}


def byte_tokenizer():
    """The 256 single bytes and EOT: one token per ASCII character, no merges."""
    return tokenizer_to_dict({bytes([i]): i for i in range(256)}, name="tasks-bytes")


# ---- generators: (prompt, answer, group) from a random.Random --------------------------------

def addition(rng, digits, **_):
    n = rng.randint(1, digits)
    a = rng.randint(10 ** (n - 1) if n > 1 else 0, 10 ** n - 1)
    b = rng.randint(0, 10 ** n - 1)
    if rng.random() < 0.5:
        a, b = b, a
    rev = lambda v, width: str(v).zfill(width)[::-1]  # noqa: E731
    return f"{rev(a, digits)}+{rev(b, digits)}=", rev(a + b, digits + 1), n


def phop_answer(seq, p):
    """Follow p hops from the last position; None if some hop has no previous occurrence."""
    pos = len(seq) - 1
    for _ in range(p):
        prev = seq.rfind(seq[pos], 0, pos)
        if prev < 0:
            return None
        pos = prev + 1
    return seq[pos]


def phop(rng, length, symbols, max_hops, **_):
    alphabet = "abcdefghijklmnopqrstuvwxyz"[:symbols]
    p = rng.randint(1, max_hops)
    while True:
        seq = "".join(rng.choice(alphabet) for _ in range(length))
        answer = phop_answer(seq, p)
        if answer is not None:
            return f"{seq}|{p}=", answer, p


ENTITIES, RELATIONS = "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def hops_graph(rng, entities, relations):
    """The knowledge: relation -> {entity: entity}, each a random permutation (no relation
    has shortcuts like a common sink that would let deep questions be guessed)."""
    names = ENTITIES[:entities]
    return {r: dict(zip(names, rng.sample(names, entities))) for r in RELATIONS[:relations]}


def hops(rng, graph, h, width):
    start = node = rng.choice(sorted(graph["A"]))
    chain = "".join(rng.choice(sorted(graph)) for _ in range(h))
    for r in chain:  # left to right: "dBA=" is A(B(d))
        node = graph[r][node]
    # left-padded with "." to one width for every h: the answer is read at the same position
    # whatever the hop count, so a longer question tests depth, not unseen positions
    return f"{start}{chain}=".rjust(width, "."), node, h


def parity(rng, digits, **_):
    n = rng.randint(1, digits)
    bits = "".join(rng.choice("01") for _ in range(n))
    return f"{bits}=", str(bits.count("1") % 2), n


GENERATORS = {"addition": addition, "phop": phop, "parity": parity}


def examples(draw, n, seen):
    """n examples from draw() whose prompts are not in `seen` (and adds them to it)."""
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"could not find {n} distinct examples; widen the task's ranges")
        prompt, answer, group = draw()
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append((prompt, answer, group))
    return out


def hops_splits(rng, seen, train_rows, val_rows, entities, relations, max_hops, ood_hops):
    """Train: every atomic fact, and up to train_rows compositions spread evenly over
    2..max_hops hops, leaving at least a quarter of each hop count's questions unseen; val:
    val_rows unseen questions spread evenly over 2..max_hops+ood_hops hops."""
    if not (2 <= entities <= len(ENTITIES) and 1 <= relations <= len(RELATIONS) and max_hops >= 2 and ood_hops >= 0):
        raise ValueError("hops: need 2 <= entities <= 26, 1 <= relations <= 26, max_hops >= 2, ood_hops >= 0")
    graph = hops_graph(rng, entities, relations)
    width = max_hops + ood_hops + 2
    atomic = [(f"{e}{r}=".rjust(width, "."), t, 1) for r in graph for e, t in graph[r].items()]
    seen.update(p for p, _, _ in atomic)
    per_hop = train_rows // (max_hops - 1)
    train = [ex for h in range(2, max_hops + 1)
             for ex in examples(lambda: hops(rng, graph, h, width), min(per_hop, 3 * entities * relations ** h // 4), seen)]
    train += atomic * max(1, round(len(train) / (max_hops - 1) / len(atomic)))  # the knowledge, as common as a hop count
    hop_counts = range(2, max_hops + ood_hops + 1)
    val = [ex for h in hop_counts for ex in examples(lambda: hops(rng, graph, h, width), val_rows // len(hop_counts), seen)]
    return train, val


def to_rows(exs, enc):
    """Each example as (EOT + prompt tokens, answer tokens + EOT), and the groups."""
    eot = enc.eot_token
    encoded = [([eot] + enc.encode_ordinary(p), enc.encode_ordinary(a) + [eot]) for p, a, _ in exs]
    return encoded, [g for _, _, g in exs]


def prepare(task, out_dir=None, train_rows=20000, val_rows=1000, seed=0, **overrides):
    """Generate `task` into out_dir (default data/tasks/<task>); returns out_dir."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (valid: {', '.join(TASKS)})")
    if train_rows < 1 or val_rows < 1:
        raise SystemExit(f"error: need train_rows >= 1 and val_rows >= 1, got {train_rows} and {val_rows}")
    kw = {**DEFAULTS[task], **overrides}
    out_dir = out_dir or os.path.join(HERE, task)
    rng, seen = random.Random(f"{task}-{seed}"), set()
    if task == "hops":
        train, val = hops_splits(rng, seen, train_rows, val_rows, **kw)
    else:
        draw = lambda: GENERATORS[task](rng, **kw)  # noqa: E731
        train, val = examples(draw, train_rows, seen), examples(draw, val_rows, seen)
    tok = byte_tokenizer()
    enc = load_tokenizer(tok)
    dtype = storage_dtype(enc.n_vocab)  # uint16 (257 tokens); readers take it from meta["dtype"]
    splits = {name: to_rows(exs, enc) for name, exs in (("train", train), ("val", val))}
    row_len = max(len(p) + len(a) for enc_rows, _ in splits.values() for p, a in enc_rows)

    out_folder(out_dir)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):  # a half-written dataset must not look prepared
        os.remove(meta_path)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=out_dir)
    try:
        meta = {"format": "task", "version": VERSION, "task": task, "params": kw, "seed": seed, "tokenizer": tok,
                "vocab_size": enc.n_vocab, "eot_token": enc.eot_token, "dtype": dtype, "row_len": row_len,
                "group_name": GROUP_NAMES[task]}
        for split, (rows, groups) in splits.items():
            tokens = np.full((len(rows), row_len), enc.eot_token, dtype=dtype)
            mask = np.zeros((len(rows), row_len), dtype=np.uint8)
            for i, (p, a) in enumerate(rows):
                tokens[i, :len(p) + len(a)] = p + a
                mask[i, len(p):len(p) + len(a)] = 1
            tokens.tofile(os.path.join(tmp, f"{split}.bin"))
            mask.tofile(os.path.join(tmp, f"{split}_mask.bin"))
            np.array(groups, dtype=np.uint8).tofile(os.path.join(tmp, f"{split}_group.bin"))
            meta[f"{split}_rows"] = len(rows)
            meta[f"{split}_tokens"] = int(tokens.size)
            meta[f"{split}_groups"] = sorted(set(groups))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        for name in sorted(os.listdir(tmp), key=lambda n: n == "meta.json"):  # meta.json last
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out_dir}: {task}, {len(train)} train / {len(val)} val examples, rows of {row_len} tokens "
          f"({GROUP_NAMES[task]} {meta['train_groups']} in train, {meta['val_groups']} in val)")
    return out_dir


def main(argv=None):
    parser = ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--out_dir", default=None, help="default: data/tasks/<task>/")
    parser.add_argument("--train_rows", type=int, default=20000)
    parser.add_argument("--val_rows", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prepare(args.task, args.out_dir, args.train_rows, args.val_rows, args.seed)


if __name__ == "__main__":
    main()
