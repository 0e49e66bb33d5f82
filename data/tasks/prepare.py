"""
Synthetic reasoning tasks where the number of loops matters (DESIGN §9), no network.

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
  hops      "ax:c,bx:a,...|xxa?" -> "b"   multi-hop fact composition: every example has
            its own random knowledge graph (each relation, from "xyzw"[:relations], is a
            random permutation of the `entities` letters), listed in random order; the
            question applies h relations to an entity, written as function application
            ("xyd?" = x(y(d)): the relation next to the entity first). Train holds h = 1..max_hops, val
            h = 1..max_hops+ood_hops: the out-of-distribution split is by hop count.
  parity    "0110100=" -> "1"   the parity of n bits, n in 1..digits.

Rows on disk (train.py reads them when meta.json says "format": "task"):
    {split}.bin       uint16 (rows, row_len): EOT, prompt, answer, EOT, then EOT padding
    {split}_mask.bin  uint8, same shape: 1 where the token is answer (or its closing EOT),
                      the only positions the loss and the exact-match accuracy look at
    {split}_group.bin uint8 (rows,): what the task varies (digits, p or hop count)
Examples are deterministic given (task, seed, sizes); val holds no prompt that train has.

    python data/tasks/prepare.py --task=phop [--train_rows=20000 --val_rows=1000 --seed=0]
train.py prepares a task on first use (configs set dataset = "tasks/<task>").
"""

import argparse
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

from tokenizer import load_tokenizer, tokenizer_to_dict  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("addition", "phop", "hops", "parity")
# what each task varies, and its default range
DEFAULTS = {"addition": dict(digits=5), "phop": dict(length=16, symbols=4, max_hops=4),
            "hops": dict(entities=6, relations=1, max_hops=3, ood_hops=3), "parity": dict(digits=16)}
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


def hops_answer(facts, start, relations):
    node = start
    for r in relations:
        node = facts[node, r]
    return node


def hops(rng, entities, relations, hop_range, **_):
    names, rels = "abcdefghijklmnopqrstuv"[:entities], "xyzw"[:relations]
    # each relation a random permutation: no shortcuts through fixed points shared by all
    facts = {(e, r): t for r in rels for e, t in zip(names, rng.sample(names, len(names)))}
    listing = [f"{e}{r}:{t}" for (e, r), t in facts.items()]
    rng.shuffle(listing)
    h = rng.randint(*hop_range)
    start = rng.choice(names)
    relations = "".join(rng.choice(rels) for _ in range(h))
    # written as function application, the entity last: "xyd?" is x(y(d)), y applied first;
    # then the entity sits right before "?", where the answer is read, whatever h is
    return f"{','.join(listing)}|{relations[::-1]}{start}?", hops_answer(facts, start, relations), h


def parity(rng, digits, **_):
    n = rng.randint(1, digits)
    bits = "".join(rng.choice("01") for _ in range(n))
    return f"{bits}=", str(bits.count("1") % 2), n


GENERATORS = {"addition": addition, "phop": phop, "hops": hops, "parity": parity}


def examples(task, n, rng, seen, hop_range=None, **kw):
    """n examples whose prompts are not in `seen` (and adds them to it)."""
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"{task}: could not find {n} distinct examples; widen the task's ranges")
        prompt, answer, group = GENERATORS[task](rng, hop_range=hop_range, **kw)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append((prompt, answer, group))
    return out


def to_rows(exs, enc):
    """Each example as (EOT + prompt tokens, answer tokens + EOT), and the groups."""
    eot = enc.eot_token
    encoded = [([eot] + enc.encode_ordinary(p), enc.encode_ordinary(a) + [eot]) for p, a, _ in exs]
    return encoded, [g for _, _, g in exs]


def prepare(task, out_dir=None, train_rows=20000, val_rows=1000, seed=0, **overrides):
    """Generate `task` into out_dir (default data/tasks/<task>); returns out_dir."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (valid: {', '.join(TASKS)})")
    kw = {**DEFAULTS[task], **overrides}
    out_dir = out_dir or os.path.join(HERE, task)
    rng, seen = random.Random(f"{task}-{seed}"), set()
    if task == "hops":  # the out-of-distribution split: val also has longer questions
        train = examples(task, train_rows, rng, seen, hop_range=(1, kw["max_hops"]), **kw)
        val = examples(task, val_rows, rng, seen, hop_range=(1, kw["max_hops"] + kw["ood_hops"]), **kw)
    else:
        train = examples(task, train_rows, rng, seen, **kw)
        val = examples(task, val_rows, rng, seen, **kw)
    tok = byte_tokenizer()
    enc = load_tokenizer(tok)
    splits = {name: to_rows(exs, enc) for name, exs in (("train", train), ("val", val))}
    row_len = max(len(p) + len(a) for enc_rows, _ in splits.values() for p, a in enc_rows)

    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):  # a half-written dataset must not look prepared
        os.remove(meta_path)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=out_dir)
    try:
        meta = {"format": "task", "task": task, "params": kw, "seed": seed, "tokenizer": tok,
                "vocab_size": enc.n_vocab, "eot_token": enc.eot_token, "dtype": "uint16", "row_len": row_len,
                "group_name": GROUP_NAMES[task]}
        for split, (rows, groups) in splits.items():
            tokens = np.full((len(rows), row_len), enc.eot_token, dtype=np.uint16)
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
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--out_dir", default=None, help="default: data/tasks/<task>/")
    parser.add_argument("--train_rows", type=int, default=20000)
    parser.add_argument("--val_rows", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prepare(args.task, args.out_dir, args.train_rows, args.val_rows, args.seed)


if __name__ == "__main__":
    main()
