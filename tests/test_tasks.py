"""Synthetic reasoning tasks: generators checked against independent computations, the
on-disk rows, and train.py's answer-only loss and exact-match accuracy on hand-made data."""

import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.common import token_dtype  # noqa: E402
from data.tasks.prepare import TASKS, prepare  # noqa: E402
from tests.test_train import records, run  # noqa: E402

EOT = 256


def load(d, split):
    meta = json.load(open(os.path.join(d, "meta.json")))
    L = meta["row_len"]
    rows = np.fromfile(os.path.join(d, f"{split}.bin"), dtype=token_dtype(meta)).reshape(-1, L)
    mask = np.fromfile(os.path.join(d, f"{split}_mask.bin"), dtype=np.uint8).reshape(-1, L)
    groups = np.fromfile(os.path.join(d, f"{split}_group.bin"), dtype=np.uint8)
    return meta, rows, mask, groups


def examples(d, split):
    """(prompt, answer, group) decoded back from the rows: the answer is the masked part."""
    _, rows, mask, groups = load(d, split)
    out = []
    for row, m, g in zip(rows, mask, groups):
        assert row[0] == EOT and m[0] == 0
        idx = np.flatnonzero(m)
        assert len(idx) and (np.diff(idx) == 1).all() and row[idx[-1]] == EOT  # one answer span, then EOT
        assert (row[idx[-1] + 1:] == EOT).all() and not m[idx[-1] + 1:].any()  # padding is never scored
        prompt = bytes(row[1:idx[0]].tolist()).decode("ascii")
        out.append((prompt, bytes(row[idx[0]:idx[-1]].tolist()).decode("ascii"), int(g)))
    return out


# independent solutions, written without the generators' code


def solve(task, prompt):
    if task == "addition":  # fixed-width numbers, least significant digit first
        a, b = (int(v[::-1]) for v in prompt.rstrip("=").split("+"))
        width = len(prompt.split("+")[0])
        return str(a + b).zfill(width + 1)[::-1], len(str(max(a, b)))
    if task == "parity":
        bits = prompt.rstrip("=")
        return str(sum(map(int, bits)) & 1), len(bits)
    if task == "phop":
        seq, p = prompt.rstrip("=").split("|")
        i = len(seq) - 1
        for _ in range(int(p)):
            i = max(j for j in range(i) if seq[j] == seq[i]) + 1
        return seq[i], int(p)
    raise ValueError(task)


def knowledge(d):
    """hops: the graph, read back from train's 1-hop questions ("dB=" -> k), as {(d, B): k}."""
    facts = {}
    for prompt, answer, group in examples(d, "train"):
        if group == 1:
            prompt = prompt.lstrip(".")
            assert len(prompt) == 3 and prompt[2] == "="
            facts[prompt[0], prompt[1]] = answer
    return facts


def solve_hops(facts, prompt):
    assert len(prompt) == 8, prompt  # left-padded with "." to 1 + 6 hops + "="
    prompt = prompt.lstrip(".")
    node, relations = prompt[0], prompt[1:-1]
    for r in relations:  # left to right: "dBA=" is A(B(d))
        node = facts[node, r]
    return node, len(relations)


@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("tasks")
    return {t: prepare(t, out_dir=str(base / t), train_rows=600, val_rows=200) for t in TASKS}


@pytest.mark.parametrize("task", TASKS)
def test_answers_match_an_independent_solution(task, task_dirs):
    facts = knowledge(task_dirs[task]) if task == "hops" else None
    for split in ("train", "val"):
        for prompt, answer, group in examples(task_dirs[task], split):
            expected = solve_hops(facts, prompt) if task == "hops" else solve(task, prompt)
            assert (answer, group) == expected, (split, prompt, answer, group)


@pytest.mark.parametrize("task", TASKS)
def test_generation_is_deterministic_and_splits_are_disjoint(task, task_dirs, tmp_path):
    again = prepare(task, out_dir=str(tmp_path / "again"), train_rows=600, val_rows=200)
    other = prepare(task, out_dir=str(tmp_path / "other"), train_rows=600, val_rows=200, seed=1)
    for split in ("train", "val"):
        assert all((a == b).all() for a, b in zip(load(task_dirs[task], split)[1:], load(again, split)[1:]))
    assert examples(other, "train") != examples(task_dirs[task], "train")
    train = {p for p, _, _ in examples(task_dirs[task], "train")}
    val = [p for p, _, _ in examples(task_dirs[task], "val")]
    assert len(set(val)) == len(val) and not train & set(val)


def test_hops_knowledge_and_out_of_distribution_split(task_dirs):
    meta = load(task_dirs["hops"], "train")[0]
    assert meta["train_groups"] == [1, 2, 3] and meta["val_groups"] == [2, 3, 4, 5, 6]
    # train holds every atomic fact, each relation a permutation of the 16 entities
    facts = knowledge(task_dirs["hops"])
    entities, relations = "abcdefghijklmnop", "ABCDEFGH"
    assert set(facts) == {(e, r) for e in entities for r in relations}
    for r in relations:
        assert sorted(facts[e, r] for e in entities) == list(entities)
    # compositions: each hop count as common as the others, in train and in val
    train = [g for _, _, g in examples(task_dirs["hops"], "train")]
    val = [g for _, _, g in examples(task_dirs["hops"], "val")]
    assert train.count(2) == train.count(3) == 300 and train.count(1) == 2 * 128
    assert all(val.count(h) == 40 for h in range(2, 7))
    with pytest.raises(ValueError, match="unknown task"):
        prepare("sorting")
    with pytest.raises(ValueError, match="max_hops >= 2"):
        prepare("hops", max_hops=1)


def write_rows(d, rows, answers, groups):
    """A hand-made task dataset in the on-disk format: row i is EOT + prompt, and its
    answer span (scored) is `answers[i]` tokens long, at the end of the row."""
    os.makedirs(d, exist_ok=True)
    rows = np.array(rows, dtype=np.uint16)
    mask = np.zeros(rows.shape, dtype=np.uint8)
    for i, n in enumerate(answers):
        mask[i, rows.shape[1] - n:] = 1
    for split in ("train", "val"):
        rows.tofile(os.path.join(d, f"{split}.bin"))
        mask.tofile(os.path.join(d, f"{split}_mask.bin"))
        np.array(groups, dtype=np.uint8).tofile(os.path.join(d, f"{split}_group.bin"))
    from data.tasks.prepare import byte_tokenizer
    meta = {"format": "task", "task": "handmade", "tokenizer": byte_tokenizer(), "row_len": rows.shape[1],
            "group_name": "kind", "train_rows": len(rows), "val_rows": len(rows), "train_tokens": rows.size,
            "val_tokens": rows.size, "train_groups": sorted(set(groups)), "val_groups": sorted(set(groups))}
    json.dump(meta, open(os.path.join(d, "meta.json"), "w"))


def test_exact_match_on_a_hand_made_model_and_dataset(tmp_path):
    # a model whose head is all zeros predicts token 0 everywhere (argmax takes the first
    # of equal logits). Rows of kind 1 have answer "\0\0": right. Kind 2 answers "\0A":
    # wrong at one of two tokens, so wrong. Kind 3 answers "\0" but has an "A" before its
    # answer, which is not scored: right. Exact match is then 2/3, and 1 / 0 / 1 by kind.
    d = tmp_path / "data"
    write_rows(d, [[EOT, 66, 0, 0], [EOT, 66, 0, 65], [EOT, 65, 65, 0]] * 4, [2, 2, 1] * 4, [1, 2, 3] * 4)
    common = [f"--data_dir={d}", f"--out_dir={tmp_path}", "--n_embd=32", "--n_head=2", "--n_loops=2",
              "--block_size=8", "--batch_size=5", "--max_iters=1", "--eval_iters=1", "--warmup_iters=1"]
    run("train.py", *common)
    ckpt_path = tmp_path / "ckpt.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["model"]["lm_head.weight"].zero_()
    torch.save(ckpt, ckpt_path)
    p = run("train.py", *common, "--eval_only=True", "--resume=True")
    assert "exact %" in p.stdout and "kind=3" in p.stdout
    for M in ("1", "2", "4"):
        acc = records(tmp_path, "budget_sweep")[-1]["budgets"][M]["accuracy"]
        assert acc["acc"] == pytest.approx(2 / 3)
        assert acc["by_group"] == {"1": 1.0, "2": 0.0, "3": 1.0}
    # the loss saw the answer tokens only: 12 rows x 5/3 answer tokens at log(V) each
    loss = records(tmp_path, "budget_sweep")[-1]["budgets"]["1"]["loss"]
    assert loss == pytest.approx(np.log(320), rel=1e-4)  # uniform over the padded vocab (257 -> 320)


def test_exit_sweep_scores_the_answers_only(tmp_path):
    # eval_only's per-token exits on task rows: the positions off the answer have no target
    # (-1), so they are decoded but not scored (this once ended in "Target -1 is out of
    # bounds"). The same hand-made model and rows: every exit sees the budgets' loss and accuracy
    d = tmp_path / "data"
    write_rows(d, [[EOT, 66, 0, 0], [EOT, 66, 0, 65], [EOT, 65, 65, 0]] * 4, [2, 2, 1] * 4, [1, 2, 3] * 4)
    common = [f"--data_dir={d}", f"--out_dir={tmp_path}", "--n_embd=32", "--n_head=2", "--n_loops=2",
              "--block_size=8", "--batch_size=5", "--max_iters=1", "--eval_iters=1", "--warmup_iters=1"]
    run("train.py", *common)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["model"]["lm_head.weight"].zero_()
    torch.save(ckpt, tmp_path / "ckpt.pt")
    p = run("train.py", *common, "--eval_only=True", "--resume=True", "--sweep_exits=latent:1e-12,kl:1e9")
    assert "per-token early exit" in p.stdout
    sweep = records(tmp_path, "budget_sweep")[-1]
    never, always = sweep["exits"]["latent:1e-12"], sweep["exits"]["kl:1e9"]
    assert never["mean_loops"] == 2 and always["mean_loops"] == 1  # over the answer tokens
    for r in (never, always):
        assert r["loss"] == pytest.approx(sweep["budgets"]["2"]["loss"], rel=1e-5)
        assert r["accuracy"] == sweep["budgets"]["2"]["accuracy"]
        assert r["accuracy"]["by_group"] == {"1": 1.0, "2": 0.0, "3": 1.0}


def test_task_training_logs_accuracy(tmp_path):
    # the path a user takes: a task config, generated on first use, accuracy per budget in the log
    d = tmp_path / "phop"
    p = run("train.py", "--config=task_phop_tiny", f"--data_dir={d}", f"--out_dir={tmp_path}", "--max_iters=2",
            "--eval_interval=2", "--n_embd=32", "--n_head=2", "--batch_size=8", "--eval_budgets=1,2")
    assert "generating the 'phop' task" in p.stdout and "exact match: M=1" in p.stdout and "by hops" in p.stdout
    ev = records(tmp_path, "eval")[-1]
    assert set(ev["val"]["2"]["accuracy"]["by_group"]) == {"1", "2", "3", "4"}
