"""eval.py: the budget-sharing forward, the prompts, the scoring of the three task types and of
text (checked against a hand-made model whose every answer is known), CORE's aggregation, the
command line (table, JSONL, plot, errors), the downloads on local files, and tasks during training."""

import json
import math
import os
import random
import subprocess
import sys
import zipfile
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eval as ev  # noqa: E402
from loopgpt import CHECKPOINT_VERSION, LoopGPT, LoopGPTConfig, save_checkpoint  # noqa: E402
from data.tokenizer import EOT, SPLIT_PATTERN, load_tokenizer  # noqa: E402
from script_runner import run_script  # noqa: E402


# ---- the budget-sharing forward -------------------------------------------------------------

@pytest.mark.parametrize("flags", [
    dict(injection="add"),
    dict(injection="none", norm_state=True),
    dict(injection="full_attn"),
    dict(injection="diag", state_init="randn_small", norm_gains=True),
    dict(injection="concat", block_norm="sandwich", state_init="randn"),
    dict(injection="add", modulation="tmlt", lora_rank=2),
    dict(injection="add", modulation="loopformer"),
    dict(injection="none", routing="mor", n_loops=5),
])
def test_logits_at_budgets_equal_one_forward_per_budget(flags):
    torch.manual_seed(0)
    cfg = dict(n_prelude=1, n_core=2, n_coda=1, n_loops=3, n_embd=32, n_head=2, vocab_size=64, block_size=16)
    model = LoopGPT(LoopGPTConfig(**{**cfg, **flags})).eval()
    for p in model.parameters():  # no zero-initialised branch hides a wrong state
        torch.nn.init.normal_(p, std=0.1)
    idx = torch.randint(0, 64, (2, 16))
    budgets = [1, 2, 3, 5]
    shared = dict(model.logits_at_budgets(idx, budgets))
    where = torch.rand(2, 16) < 0.3
    picked = dict(model.logits_at_budgets(idx, budgets, where))
    for M in budgets:
        full = model(idx, loops=M)[0]
        torch.testing.assert_close(shared[M], full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(picked[M], full[where], rtol=1e-5, atol=1e-5)


# ---- a hand-made model whose answers are known ------------------------------------------------

ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # the model's "language": each byte is followed by the next one, cyclically
SHARP = 10.0  # the logit of the predicted token; every other token has 0
GOOD = math.log(1 + 256 * math.exp(-SHARP))  # the loss of a predicted token (vocab 257: bytes + EOT)
BAD = SHARP + GOOD  # the loss of any other


def byte_tokenizer():
    """Bytes as tokens (no merges), the document token last: token = byte, easy to reason about."""
    return load_tokenizer({"kind": "bpe", "name": "bytes", "pattern": SPLIT_PATTERN,
                           "ranks": [bytes([i]).hex() for i in range(256)], "eot": EOT})


def predicted(byte, M):
    """The hand model's guess after `byte`: the next letter of ALPHABET at M >= 2, the one after at M = 1."""
    c = chr(byte)
    return ord(ALPHABET[(ALPHABET.index(c) + (1 if M >= 2 else 2)) % len(ALPHABET)]) if c in ALPHABET else ord("a")


class HandModel(torch.nn.Module):
    """Logit SHARP on predicted(token), 0 elsewhere: one more loop makes it right."""
    config = SimpleNamespace(block_size=64, n_loops=2, routing="none")

    def logits_at_budgets(self, idx, budgets, where):
        for M in budgets:
            target = torch.tensor([predicted(t, M) for t in range(257)])[idx[where]]
            yield M, torch.zeros(len(target), 257).scatter_(-1, target.unsqueeze(-1), SHARP)


def hand_loss(text, span, M):
    """Mean loss over the last `span` bytes of text, by the rule (the reference the evaluator must match)."""
    b = text.encode()
    return float(np.mean([GOOD if predicted(b[i - 1], M) == b[i] else BAD for i in range(len(b) - span, len(b))]))


ITEMS = {
    "mc": [  # gold "abc" follows the rule at M >= 2; "bdf" follows the M = 1 rule
        {"query": "xyz", "choices": ["abc", "acd", "bdf"], "gold": 0},
        # mean, not sum: the gold choice has one wrong token in 8, the other is one wrong token
        # (and the right one at M = 1)
        {"query": "q", "choices": ["abcdefgz", "b"], "gold": 0},
    ],
    "schema": [  # "xyz" + " abc" follows the rule at M >= 2; "xy" + " " is right at M = 1 only
        {"context_options": ["the xyz", "the xy"], "continuation": "abc", "gold": 0},
    ],
    "lm": [  # greedy decoding writes " abc" after "xyz" at M >= 2, never at M = 1
        {"context": " wxyz  ", "continuation": "abc"},
        {"context": "wxyz", "continuation": "abd"},  # wrong at every budget
    ],
}


def write_tasks(folder, with_bundle=True):
    """The test tasks as JSONL files, and (optionally) a miniature DCLM bundle listing them as CORE."""
    data = os.path.join(folder, "eval_bundle", "eval_data", "x")
    os.makedirs(data, exist_ok=True)
    for name, items in ITEMS.items():
        with open(os.path.join(data, f"{name}.jsonl"), "w") as f:
            f.write("".join(json.dumps(it) + "\n" for it in items))
    if with_bundle:
        with open(os.path.join(folder, "eval_bundle", "core.yaml"), "w") as f:
            f.write("icl_tasks:\n"
                    "-\n  label: mc\n  dataset_uri: x/mc.jsonl\n  num_fewshot: [0]\n  icl_task_type: multiple_choice\n"
                    "-\n  label: schema\n  dataset_uri: x/schema.jsonl\n  num_fewshot: [0]\n  icl_task_type: schema\n"
                    "-\n  label: lm\n  dataset_uri: x/lm.jsonl\n  num_fewshot: [0]\n  icl_task_type: language_modeling\n"
                    "  continuation_delimiter: ' '\n")
        with open(os.path.join(folder, "eval_bundle", "eval_meta_data.csv"), "w") as f:
            f.write("Eval Task,Task Category,Task Type,#shots,Random baseline\n"
                    "mc,x,multiple choice,0,25\nschema,x,schema,0,50\nlm,x,language modeling,0,0\n")
    return folder


def test_scoring_matches_the_hand_computed_losses(tmp_path):
    """Every row's mean loss over its span and its exact match, against the rule by hand."""
    enc = byte_tokenizer()
    routes = [("M=1", {"loops": 1}), ("M=2", {"loops": 2})]
    cases = [  # (kind, item, texts of the rows, span length of each row)
        ("multiple_choice", ITEMS["mc"][1], ["q abcdefgz", "q b"], [8, 1]),
        ("schema", ITEMS["schema"][0], ["the xyz abc", "the xy abc"], [4, 4]),  # the shared suffix " abc"
        ("language_modeling", ITEMS["lm"][0], ["wxyz abc"], [4]),               # context stripped, " abc"
    ]
    for kind, item, texts, spans in cases:
        rows = ev.tokenize(enc, ev.render(item, kind, [], " "), kind, block_size=64)
        assert [bytes(r[1:]).decode() for r, _, _ in rows] == texts
        assert [end - start for _, start, end in rows] == spans
        loss, exact, _ = ev.score_rows(HandModel(), rows, routes, "cpu", nullcontext(), 1024)
        for M in (1, 2):
            want = [hand_loss(t, n, M) for t, n in zip(texts, spans)]
            torch.testing.assert_close(loss[f"M={M}"], torch.tensor(want), rtol=1e-5, atol=1e-5)
            assert exact[f"M={M}"].tolist() == [w == GOOD for w in want]


def test_tasks_end_to_end_with_the_hand_model(tmp_path):
    """resolve -> load -> render -> score -> accuracy -> CORE, from files, at two budgets."""
    folder = write_tasks(str(tmp_path))
    tasks = ev.resolve_tasks("core", folder)
    routes = [("M=1", {"loops": 1}), ("M=2", {"loops": 2})]
    res = ev.evaluate_tasks(HandModel(), byte_tokenizer(), tasks, routes, "cpu", nullcontext(), {}, folder)
    # M=2: both MC items right (mean, not sum), the schema right, 1 of 2 LM items; M=1: all wrong
    assert {t: (res[t]["M=1"]["acc"], res[t]["M=2"]["acc"]) for t in ("mc", "schema", "lm")} == {
        "mc": (0.0, 1.0), "schema": (0.0, 1.0), "lm": (0.0, 0.5)}
    centered = {1: [(0 - .25) / .75, (0 - .5) / .5, 0.0], 2: [1.0, 1.0, 0.5]}
    for M in (1, 2):
        assert res["CORE"][f"M={M}"] == pytest.approx(np.mean(centered[M]))
    # split over two "processes": the same counts
    items = ev.load_items(dict(tasks[0]))
    parts = [ev.eval_task(HandModel(), byte_tokenizer(), tasks[0], items, routes, "cpu", nullcontext(),
                          rank=r, world=2)["M=2"] for r in (0, 1)]
    assert sum(p["n"] for p in parts) == 2 and sum(p["acc"] * p["n"] for p in parts) == 2


def test_fewshot_prompts_are_rendered_as_nanochat_does():
    items = [{"query": f"Q{i}?", "choices": ["x", "y"], "gold": i % 2} for i in range(6)]
    for i in range(6):
        shots = ev.fewshot_examples(items, i, 2)
        assert items[i] not in shots and len(shots) == 2
        assert shots == ev.fewshot_examples(items, i, 2)  # the same every time
        want = [items[j] for j in random.Random(1234 + i).sample([j for j in range(6) if j != i], 2)]
        assert shots == want
    pairs = ev.render(items[0], "multiple_choice", [items[1], items[2]], "\nAnswer: ")
    assert [c + x for c, x in pairs] == ["Q1?\nAnswer: y\n\nQ2?\nAnswer: x\n\nQ0?\nAnswer: x",
                                         "Q1?\nAnswer: y\n\nQ2?\nAnswer: x\n\nQ0?\nAnswer: y"]
    lm = [{"context": " c0 ", "continuation": "w0"}, {"context": "ctx", "continuation": "word"}]
    assert ev.render(lm[1], "language_modeling", [lm[0]], " ") == [("c0 w0\n\nctx ", "word")]
    schema = {"context_options": ["A1", "A2"], "continuation": "cont.", "gold": 1}
    assert ev.render(schema, "schema", [{"context_options": ["E1", "E2"], "continuation": "ec", "gold": 1}], " ") == [
        ("E2 ec\n\nA1 ", "cont."), ("E2 ec\n\nA2 ", "cont.")]


def test_long_rows_keep_their_last_tokens():
    enc = byte_tokenizer()
    rows = ev.tokenize(enc, [("x" * 50 + " ", "abc"), ("x" * 50 + " ", "pqr")], "multiple_choice", block_size=16)
    for tokens, start, end in rows:
        assert len(tokens) == 16 and end == 16 and bytes(tokens[start:end]) in (b"abc", b"pqr")


def test_text_windows_score_every_token_once_with_context():
    for n, bs, stride in [(100, 16, 8), (100, 16, 16), (17, 16, 8), (5, 16, 8), (64, 8, 3)]:
        scored = []
        for begin, end, first in ev.text_windows(n, bs, stride):
            assert end - begin <= bs and begin <= first - 1 and end <= n - 1
            assert first - 1 - begin >= min(bs - stride, first - 1)  # context before the first scored token
            scored += range(first, end + 1)
        assert scored == list(range(1, n))


def test_text_metrics_match_the_hand_computation():
    enc = byte_tokenizer()
    text = "abcdefg xyz hello world"
    tokens = np.array([enc.eot_token] + list(text.encode()) + [enc.eot_token] + list(b"abc"), dtype=np.int64)
    token_bytes = torch.tensor([1.0] * 256 + [0.0])
    routes = [("M=1", {"loops": 1}), ("M=2", {"loops": 2})]
    for stride in (0, 5):
        res = ev.eval_text(HandModel(), tokens, token_bytes, routes, "cpu", nullcontext(), stride=stride)
        for M in (1, 2):
            losses = [GOOD if predicted(int(a), M) == int(b) else BAD for a, b in zip(tokens[:-1], tokens[1:])]
            counted = [lo for lo, b in zip(losses, tokens[1:]) if b != enc.eot_token]  # the document token has no bytes
            r = res[f"M={M}"]
            assert r["tokens"] == len(tokens) - 1
            assert r["loss"] == pytest.approx(np.mean(losses))
            assert r["ppl"] == pytest.approx(math.exp(np.mean(losses)))
            assert r["bpb"] == pytest.approx(sum(counted) / math.log(2) / len(counted))


# ---- the command line, on a small real checkpoint --------------------------------------------

def run_eval(*args, ok=True):
    """`python eval.py ARGS` as a user runs it (forked from a warm interpreter: tests/script_runner.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_script(["eval.py", *args], cwd=ROOT, env=env)
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    if not ok:
        assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("error:"), proc.stderr
    return proc


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A random-weight loopgpt checkpoint with the byte tokenizer, its val split, the test tasks and WikiText-2."""
    root = tmp_path_factory.mktemp("evalcli")
    enc = byte_tokenizer()
    tok = {"kind": "bpe", "name": "bytes", "pattern": SPLIT_PATTERN, "ranks": [bytes([i]).hex() for i in range(256)],
           "eot": EOT}
    data = root / "data"
    data.mkdir()
    np.array([enc.eot_token] + list(b"some held-out text " * 20), dtype=np.uint16).tofile(data / "val.bin")
    write_tasks(str(root))
    (root / "wikitext-2").mkdir()
    (root / "wikitext-2" / "wiki.test.tokens").write_text(" \n = Title = \n\n Some text , with @-@ tokens . \n" * 5)
    for name, flags in (("plain", dict(injection="add")), ("loopformer", dict(modulation="loopformer"))):
        torch.manual_seed(0)
        cfg = LoopGPTConfig(n_prelude=1, n_core=1, n_coda=1, n_loops=2, n_embd=32, n_head=2, vocab_size=320,
                            block_size=32, **flags)
        out = root / name
        out.mkdir()
        save_checkpoint({"version": CHECKPOINT_VERSION, "model": LoopGPT(cfg).state_dict(), "model_config": cfg.to_dict(),
                         "train_config": {"data_dir": str(data)}, "iter_num": 7, "best_val_loss": 9.0,
                         "data_meta": {"tokenizer": tok}}, str(out / "ckpt.pt"))
    return root


def test_cli_table_jsonl_and_plot(checkpoint_dir, monkeypatch):
    out = checkpoint_dir / "plain"
    proc = run_eval(f"--out_dir={out}", f"--data_dir={checkpoint_dir}", "--tasks=core,wikitext2,bpb",
                    "--budgets=1,2,3", "--exit=kl:1e-3")
    for row in ("mc acc %", "schema acc %", "lm acc %", "wikitext2 bpb", "wikitext2 ppl", "bpb", "CORE (centered)",
                "mean loops", "kl:1e-3@3"):
        assert row in proc.stdout, proc.stdout
    record = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 7 and [n for n, _ in record["routes"]] == ["M=1", "M=2", "M=3", "kl:1e-3@3"]
    assert set(record["results"]) == {"mc", "schema", "lm", "wikitext2", "bpb", "CORE"}
    assert 1 <= record["results"]["mc"]["kl:1e-3@3"]["mean_loops"] <= 3
    assert 1 <= record["results"]["bpb"]["kl:1e-3@3"]["mean_loops"] <= 3
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the lead plot over runs reads the JSONL back: the latest curve, not a later one-budget record
    monkeypatch.setattr(sys, "argv", ["eval.py", f"--out_dir={out}", f"--data_dir={checkpoint_dir}", "--tasks=wikitext2",
                                      "--budgets=2", "--plot=False"])
    ev.main()
    run_eval(f"--runs={out},{out}", "--metric=wikitext2", f"--plot_file={checkpoint_dir / 'lead.png'}")
    assert (checkpoint_dir / "lead.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_schedules_for_loopformer(checkpoint_dir):
    out = checkpoint_dir / "loopformer"
    proc = run_eval(f"--out_dir={out}", f"--data_dir={checkpoint_dir}", "--tasks=mc,bpb", "--budgets=1,2",
                    "--schedule=0.25,0.75/1,1", "--plot=False")
    assert "sched 0.25,0.75" in proc.stdout and "sched 1,1" in proc.stdout
    assert not (out / "eval.png").exists()


def test_cli_kv_sharing_columns(checkpoint_dir, monkeypatch):
    # teacher-forced decoding through the exact cache ("none") reproduces each budget's column;
    # a shared cache is its own column per budget, and at M = 1 sharing changes nothing
    out = checkpoint_dir / "plain"
    monkeypatch.setattr(sys, "argv", ["eval.py", f"--out_dir={out}", f"--data_dir={checkpoint_dir}",
                                      "--tasks=wikitext2", "--budgets=1,3", "--kv_sharing=none,last", "--plot=False"])
    ev.main()
    res = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])["results"]["wikitext2"]
    for M in (1, 3):
        assert res[f"kv none M={M}"]["bpb"] == pytest.approx(res[f"M={M}"]["bpb"], rel=1e-5)
    assert res["kv last M=1"]["bpb"] == pytest.approx(res["M=1"]["bpb"], rel=1e-5)


def test_cli_under_torchrun_matches_one_process(checkpoint_dir, tmp_path):
    """Items and windows split over 2 processes (gloo), summed: the same numbers as one process."""
    args = [f"--data_dir={checkpoint_dir}", "--tasks=core,bpb", "--budgets=1,2", "--plot=False"]
    records = []
    for n, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        out.mkdir()
        (out / "ckpt.pt").write_bytes((checkpoint_dir / "plain" / "ckpt.pt").read_bytes())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "eval.py",
               f"--out_dir={out}", *args]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        records.append(json.loads((out / "eval.jsonl").read_text())["results"])
    assert records[0]["mc"] == records[1]["mc"] and records[0]["CORE"] == pytest.approx(records[1]["CORE"])
    assert records[0]["bpb"]["M=2"]["bpb"] == pytest.approx(records[1]["bpb"]["M=2"]["bpb"], rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--tasks=nosuchtask"], "unknown task 'nosuchtask'"),
    (["--tasks=mc:x"], "shot count"),
    (["--tasks=missing.jsonl"], "no task file"),
    (["--budgets=0"], "--budgets=0"),
    (["--schedule=0.5,0.25"], "--schedule"),
    (["--exit=gate:0.9"], "--exit=gate:0.9"),
    (["--kv_sharing=half"], "--kv_sharing=half"),
    (["--max_per_task=-1"], "max_per_task"),
    (["--runs=/nonexistent"], "no log.jsonl or eval.jsonl"),
    (["--tasks=wikitext2", "--data_dir=/nonexistent"], "python data/eval/prepare.py"),
    (["--tasks=core", "--data_dir=/nonexistent"], "python data/eval/prepare.py"),
    (["--tasks=bpd", "--data_dir=/nonexistent"], "'bpd' is no built-in task"),
])
def test_cli_bad_input_gives_one_line(checkpoint_dir, monkeypatch, args, message):
    """(in-process, for speed: the message a user sees is the SystemExit's)"""
    monkeypatch.setattr(sys, "argv", ["eval.py", f"--out_dir={checkpoint_dir / 'plain'}", f"--data_dir={checkpoint_dir}",
                                      *args])
    with pytest.raises(SystemExit) as e:
        ev.main()
    assert str(e.value).startswith("error:") and message in str(e.value) and "\n" not in str(e.value)


def test_cli_a_bad_task_file_fails_before_any_compute(checkpoint_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "?"}\n')
    proc = run_eval(f"--out_dir={checkpoint_dir / 'plain'}", f"--tasks=bpb,{bad}", ok=False)
    assert "none of: multiple choice" in proc.stderr and "tasks:" not in proc.stderr


# ---- the downloads, from local archives ------------------------------------------------------

def test_prepare_unpacks_local_archives(tmp_path):
    from data.eval.prepare import prepare
    src = tmp_path / "src"
    write_tasks(str(src))
    bundle_zip, wiki_zip = tmp_path / "eval_bundle.zip", tmp_path / "wikitext-2-v1.zip"
    with zipfile.ZipFile(bundle_zip, "w") as z:
        for path in src.rglob("*"):
            if path.is_file():
                z.write(path, path.relative_to(src))
    with zipfile.ZipFile(wiki_zip, "w") as z:
        z.writestr("wikitext-2/wiki.test.tokens", " = A = \n")
    out = tmp_path / "out"
    prepare(out_dir=str(out), bundle_url=bundle_zip.as_uri(), wikitext_url=wiki_zip.as_uri())
    assert (out / "eval_bundle" / "core.yaml").is_file() and (out / "wikitext-2" / "wiki.test.tokens").is_file()
    assert not list(out.glob("*.zip"))
    assert set(ev.core_table(str(out))) == {"mc", "schema", "lm"}
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(SystemExit, match="not a valid zip"):
        prepare(("wikitext2",), str(tmp_path / "out2"), wikitext_url=(tmp_path / "broken.zip").as_uri())
    with pytest.raises(SystemExit, match="could not download"):
        prepare(("core",), str(tmp_path / "out3"), bundle_url=(tmp_path / "absent.zip").as_uri())


# ---- tasks during training ------------------------------------------------------------------

def test_training_evaluates_tasks_and_logs_them(tmp_path):
    from data.pydoc.prepare import prepare
    data = tmp_path / "pydoc"
    prepare(out_dir=str(data))
    write_tasks(str(tmp_path), with_bundle=False)
    task = tmp_path / "eval_bundle" / "eval_data" / "x" / "mc.jsonl"
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_script(["train.py", f"--data_dir={data}", f"--out_dir={out}", "--n_embd=32",
                       "--n_head=2", "--block_size=32", "--batch_size=2", "--max_iters=4", "--eval_interval=2",
                       "--eval_iters=1", f"--eval_tasks={task},bpb", "--eval_tasks_interval=2",
                       "--eval_budgets=1,2"], cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "tasks at M=1,2 (accuracy %): mc" in proc.stderr + proc.stdout
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    tasks = [r for r in records if r["type"] == "tasks"]
    assert [r["step"] for r in tasks] == [2, 4] and set(tasks[0]["results"]) == {"mc", "bpb"}
    assert tasks[0]["results"]["mc"]["M=2"]["n"] == 2


def test_cli_sweep_on_task_rows_fit_and_every_schedule(tmp_path):
    """The budget sweep's parts in eval.py: a task dataset's `bpb` scores the val rows' answers
    (exact match per group), the fit of the loss over M = 1..L, and with --sweep_max_steps
    every LoopFormer schedule on the 1/L grid, in a table of its own and the record's sweep."""
    from data.tasks.prepare import prepare
    data = tmp_path / "phop"
    prepare("phop", out_dir=str(data), train_rows=50, val_rows=40)
    meta = json.loads((data / "meta.json").read_text())
    torch.manual_seed(0)
    cfg = LoopGPTConfig(n_prelude=0, n_core=1, n_coda=0, n_loops=4, n_embd=32, n_head=2, vocab_size=320,
                        block_size=meta["row_len"], injection="none", modulation="loopformer")
    out = tmp_path / "out"
    out.mkdir()
    save_checkpoint({"version": CHECKPOINT_VERSION, "model": LoopGPT(cfg).state_dict(), "model_config": cfg.to_dict(),
                     "train_config": {"data_dir": str(data)}, "iter_num": 3, "best_val_loss": 9.0, "data_meta": meta},
                    str(out / "ckpt.pt"))
    proc = run_eval(f"--out_dir={out}", "--tasks=bpb", "--sweep_max_steps=3", "--exit=latent:1e-12", "--plot=False")
    assert "exact %" in proc.stdout and "fit of bpb loss over M = 1..4 (Parcae)" in proc.stdout
    assert "every schedule of M steps on the 1/4 grid" in proc.stdout and "sched 1,3" not in proc.stdout  # not columns
    record = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    res, sweep = record["results"]["bpb"], record["sweep"]["bpb"]
    assert list(res) == [f"M={M}" for M in range(1, 9)] + ["latent:1e-12@8"]
    assert set(res["M=1"]["accuracy"]["by_group"]) == {str(g) for g in meta["val_groups"]}
    # at init LoopFormer's loops leave the state as it is (adaLN-Zero): the exit leaves at the first
    # loop, scored over the same answer tokens as every budget
    assert res["latent:1e-12@8"]["mean_loops"] == 1
    assert res["latent:1e-12@8"]["loss"] == pytest.approx(res["M=8"]["loss"], rel=1e-5)
    assert res["latent:1e-12@8"]["accuracy"] == res["M=8"]["accuracy"]
    assert set(sweep["fit"]) == {"eps_inf", "A", "k", "max_residual"}
    # L = 4: 3 schedules of 2 steps and 3 of 3, best first; the uniform one is the budget
    assert [len(sweep["schedules"][m]) for m in ("2", "3")] == [3, 3]
    losses = [r["loss"] for r in sweep["schedules"]["2"]]
    assert losses == sorted(losses)
    uniform = next(r for r in sweep["schedules"]["2"] if r["units"] == [2, 2])
    assert uniform["loss"] == pytest.approx(res["M=2"]["loss"], rel=1e-5)


def test_compositions_and_the_saturation_fit():
    assert sorted(ev.compositions(4, 2)) == [(1, 3), (2, 2), (3, 1)]
    assert len(list(ev.compositions(8, 4))) == math.comb(7, 3)
    Ms = np.arange(1, 9)
    fit = ev.fit_saturation(Ms, 3.5 + 2.0 * np.exp(-0.7 * Ms))
    assert fit["eps_inf"] == pytest.approx(3.5, abs=1e-3) and fit["A"] == pytest.approx(2.0, rel=1e-2)
    assert fit["k"] == pytest.approx(0.7, rel=1e-2) and fit["max_residual"] < 1e-3
