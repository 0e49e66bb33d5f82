"""The lens (sample.py's lens: what each loop would predict, from one forward): each loop read
as the model run at that budget, KL and movement by hand, the exits decode_with_exit would
take, Ouro's λ, LoopUS's confidence and MoR's depth; the terminal view and the picture
through sample.py --lens, and eval.py's lens task, as a user runs them."""

import json
import os
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eval as ev  # noqa: E402
from loopgpt import LoopGPT, LoopGPTConfig, confidence_logit, load_checkpoint, model_from_checkpoint  # noqa: E402
from sample import decode_with_exit, lens, lens_view  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from test_train import SMALL, run  # noqa: E402
from test_train import data_dir  # noqa: E402,F401  (the module-scoped prepared corpus)


def random_model(seed=0, **flags):
    """A small model with every weight drawn (no zero-initialised branch hides a wrong state)."""
    torch.manual_seed(seed)
    cfg = dict(n_prelude=1, n_core=2, n_coda=1, n_loops=3, n_embd=32, n_head=2, vocab_size=64, block_size=16)
    model = LoopGPT(LoopGPTConfig(**{**cfg, **flags})).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        model.lm_head.weight.normal_(std=1.0)  # trained-like logits: loops change the prediction
    return model


PREFIX_MODELS = {  # loop t of one forward is the model run at budget t (as logits_at_budgets holds)
    "none": dict(injection="none"),
    "add": dict(injection="add"),
    "concat": dict(injection="concat", block_norm="sandwich", state_init="randn"),
    "full_attn": dict(injection="full_attn"),
    "diag": dict(injection="diag", state_init="randn_small", norm_gains=True),
    "ouro": dict(injection="none", norm_state=True, exit_gate=True),
    "loopus": dict(injection="none", selective_gate=True, confidence_head=True),
    "mor": dict(injection="none", routing="mor", n_loops=5),
    "tmlt_lora": dict(injection="add", modulation="tmlt", lora_rank=2),
}


@pytest.mark.parametrize("name", PREFIX_MODELS)
def test_each_loop_is_the_model_run_at_that_budget(name):
    model = random_model(**PREFIX_MODELS[name])
    idx = torch.randint(0, 64, (2, 16))
    M = 5
    out = lens(model, idx, loops=M)
    assert set(out) >= {"token", "prob", "final", "kl", "kl_prev", "move"} and out["token"].shape == (M, 2, 16)
    last = F.softmax(model(idx, loops=M)[0], -1)
    for t in range(1, M + 1):
        p = F.softmax(model(idx, loops=t)[0], -1)  # the model's own output at budget t
        assert torch.equal(out["token"][t - 1], p.argmax(-1))
        torch.testing.assert_close(out["prob"][t - 1], p.max(-1).values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["final"][t - 1], p.gather(-1, last.argmax(-1, keepdim=True))[..., 0],
                                   rtol=1e-5, atol=1e-6)
        record = {}
        model.trunk(idx, model.steps(t), record=record)
        if "lam" in out:  # Ouro's λ_t: the gate on loop t's state, σ(w · norm(h_t) + b)
            lam = torch.sigmoid(model.exit_gate(F.rms_norm(record["states"][-1], (32,))))[..., 0]
            torch.testing.assert_close(out["lam"][t - 1], lam, rtol=1e-5, atol=1e-6)
        if "conf" in out:  # LoopUS: σ of the confidence head on loop t's update, before the gate
            conf = torch.sigmoid(confidence_logit(model, record["updates"][-1]))
            torch.testing.assert_close(out["conf"][t - 1], conf, rtol=1e-5, atol=1e-6)
    assert out["kl"][-1].abs().max() == 0 and out["kl"][:-1].max() > 1e-3
    assert ("lam" in out) == (name == "ouro") and ("conf" in out) == (name == "loopus")
    assert ("depth" in out) == (name == "mor")
    if name == "mor":  # a token's depth: its state moves at loops 1..depth and never after
        depth = out["depth"]
        assert depth.min() >= 1 and depth.max() == M and len(set(depth.flatten().tolist())) > 2
        moved = out["move"] > 0
        assert torch.equal(moved.sum(0), depth) and torch.equal(moved, torch.arange(M).view(-1, 1, 1) < depth)


@pytest.mark.parametrize("flags", [dict(injection="add", modulation="loopformer"),
                                   dict(injection="add", melt=True, melt_chunk=4)])
def test_the_last_loop_is_the_forward_under_schedules_and_melt(flags):
    # LoopFormer's loop t depends on the schedule, MELT's earlier chunks on M: only the last loop
    # is a forward of its own; the lens reads the loops of that one forward
    model = random_model(**flags)
    idx = torch.randint(0, 64, (2, 16))
    routes = [{"loops": 4}] + ([{"schedule": [0.5, 0.25, 0.25]}] if flags.get("modulation") else [])
    for route in routes:
        out = lens(model, idx, **route)
        p = F.softmax(model(idx, **route)[0], -1)
        assert out["token"].size(0) == len(model.steps(**route))
        assert torch.equal(out["token"][-1], p.argmax(-1))
        torch.testing.assert_close(out["prob"][-1], p.max(-1).values, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(out["move"]).all() and out["kl"][-1].abs().max() == 0


def test_kl_and_movement_by_hand():
    # one block, no prelude or coda, LTi: x_1 = f(e), x_t = f(norm(e + x_{t-1})), p_t = softmax(W norm(x_t))
    model = random_model(injection="add", n_prelude=0, n_core=1, n_coda=0, softcap=0.0)
    idx = torch.randint(0, 64, (1, 9))
    M, L = 4, 2
    out = lens(model, idx, loops=M, anchor=L)
    rope = (model.rope_cos[:9], model.rope_sin[:9])
    e = F.rms_norm(model.wte(idx), (32,))
    xs = [e]  # x_0 = h_0 = e
    for t in range(M):
        xs.append(model.core[0](xs[-1] if t == 0 else F.rms_norm(e + xs[-1], (32,)), rope))
    p = [torch.full((1, 9, 64), 1 / 64, dtype=torch.float64)] + [
        F.softmax(F.rms_norm(x, (32,)) @ model.lm_head.weight.T, -1).double() for x in xs[1:]]
    kl = lambda a, b: (a * (a / b).log()).sum(-1)  # noqa: E731  KL(a || b)
    for t in range(1, M + 1):
        x, x_prev = xs[t].double(), xs[t - 1].double()
        torch.testing.assert_close(out["move"][t - 1].double(), (x - x_prev).norm(dim=-1) / x.norm(dim=-1), rtol=1e-5,
                                   atol=1e-7)
        torch.testing.assert_close(out["kl"][t - 1].double(), kl(p[t], p[M]), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out["kl_prev"][t - 1].double(), kl(p[t - 1], p[t]), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out["kl_anchor"][t - 1].double(), kl(p[t], p[L]), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out["move_anchor"][t - 1].double(),
                                   (x - xs[L].double()).norm(dim=-1) / x.norm(dim=-1), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out["prob"][t - 1].double(), p[t].max(-1).values, rtol=1e-5, atol=1e-7)
    assert out["kl"][:-1].min() > 0 and out["kl_anchor"][L - 1].abs().max() == 0


@pytest.mark.parametrize("kind, thresholds, flags", [
    ("kl", (0.3, 0.1, 0.03, 0.01), dict(injection="add", n_coda=0)),  # (a coda: see lens's docstring)
    ("latent", (0.5, 0.3, 0.2, 0.1), dict(injection="full_attn")),
    ("gate", (0.3, 0.5, 0.7, 0.9), dict(injection="none", norm_state=True, exit_gate=True)),
    ("confidence", (0.3, 0.5, 0.6, 0.7), dict(injection="none", selective_gate=True, confidence_head=True)),
])
def test_the_exit_loop_is_where_decoding_would_stop(kind, thresholds, flags):
    # decode_with_exit on the last token, after a prefill at the full budget (as generate runs
    # the prompt), stops each row where the lens says the exit would stop that position (the
    # loop's K/V of the earlier positions are the same in both; the coda's are not, hence no
    # coda for the KL exit)
    model = random_model(**flags)
    if kind == "gate":
        with torch.no_grad():
            model.exit_gate.weight.normal_(std=2.0)  # λ differs from loop to loop and row to row
    idx = torch.randint(0, 64, (6, 10))
    M, seen = 6, set()
    for q in thresholds:
        for min_loops in (1, 2):
            out = lens(model, idx, loops=M, exit=(kind, q), min_loops=min_loops)
            cache = model.new_cache(M)
            model(idx[:, :-1], loops=M, cache=cache)
            _, used = decode_with_exit(model, idx[:, -1:], model.steps(M), cache, (kind, q), min_loops)
            assert torch.equal(out["exit"][:, -1], used), (q, min_loops)
            assert out["exit"].min() >= min_loops
            seen.update(out["exit"].flatten().tolist())
    assert len(seen) >= 3, seen  # the thresholds made the rows stop at different loops


def test_bad_inputs_are_one_line_errors():
    model = random_model(injection="add")
    idx = torch.randint(0, 64, (1, 8))
    for kwargs, message in ((dict(idx=idx, loops=0), "budget must be an integer >= 1"),
                            (dict(idx=torch.zeros(1, 17, dtype=torch.long)), "exceeds block_size=16"),
                            (dict(idx=idx[0]), r"\(B, T\)"), (dict(idx=idx, loops=3, anchor=4), "anchor loop 4"),
                            (dict(idx=idx, exit=("gate", 0.5)), "exit_gate=True")):
        with pytest.raises(ValueError, match=message) as e:
            lens(model, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="capacity"):
        lens(random_model(injection="none", routing="mor"), idx, loops=4)
    with pytest.raises(ValueError, match="eval mode"):
        lens(model.train(), idx)


# ---- the view -----------------------------------------------------------------------------------

def test_the_view_marks_what_changed_and_windows_long_prompts():
    enc = SimpleNamespace(decode=lambda ids: {0: " a", 1: "b\n", 2: "c", 3: "dddddddddd"}[ids[0]], n_vocab=4)
    token = torch.tensor([[0, 1, 2, 3, 0], [0, 1, 3, 3, 0], [0, 2, 3, 3, 1]]).view(3, 1, 5)
    ones = torch.ones(3, 1, 5)
    out = {"token": token, "prob": ones * 0.5, "final": ones * 0.25, "move": ones * 0.1,
           "kl": ones * torch.tensor([2.0, 1.0, 0.0]).view(3, 1, 1), "exit": torch.tensor([[3, 3, 2, 1, 1]])}
    text = lens_view(out, enc, [0, 1, 2, 3, 0], positions=3, tty=False, exit_name="kl:0.1")
    lines = text.splitlines()
    assert "positions 2..4 of 5 (the last --lens_positions=3)" in lines[0] and "\033[" not in text
    rows = {line.split()[0] + line.split()[1]: line for line in lines if line.startswith("loop")}
    cells = lambda row: row.split(" | ")[0].split()[2:]  # noqa: E731
    assert cells(rows["loop1"]) == ["c", "ddddd…", "·a"]
    assert cells(rows["loop2"]) == ["ddddd…*", "ddddd…", "·a"]  # position 2 changed c -> d
    assert cells(rows["loop3"]) == ["ddddd…", "ddddd…", "b\\n*"]  # position 4 changed a -> b\n
    changed = [line.split(" | ")[1].split()[2] for line in lines if line.startswith("loop")]
    assert changed == ["-", "0.20", "0.40"]  # of all 5 positions (loop 3: 1 and 4), not only the window
    assert re.search(r"^exit\s+2\s+1\s+1\s+\| the loop --exit=kl:0.1 stops at, mean 2.00 of 3", text, re.M)
    tty = lens_view(out, enc, [0, 1, 2, 3, 0], positions=3, tty=True)
    assert tty.count("\033[1;33m") == 2 and "*" not in tty.split("\n", 3)[3]


# ---- through the scripts ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("lens") / "run"
    run("train.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=40", "--eval_interval=40", *SMALL)
    return out


def view(stdout):
    """sample.py --lens's view: what it prints after its first line and before the picture's path."""
    return stdout.split("\n", 1)[1].split("\n\nwrote ")[0].strip("\n")


PROMPT = "The for statement is used to iterate over the elements of a sequence"


def test_sample_lens_view_and_picture(trained, tmp_path):
    p = run("sample.py", f"--out_dir={trained}", "--lens=True", "--budgets=4", f"--start={PROMPT}", "--exit=kl:0.01",
            "--lens_positions=6")
    assert "\033[" not in p.stdout and f"wrote {trained}/lens.png" in p.stdout
    assert (trained / "lens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the view's cells and markers are the lens of that prompt, computed here
    model = model_from_checkpoint(load_checkpoint(f"{trained}/ckpt.pt")).eval()
    enc = load_tokenizer(load_checkpoint(f"{trained}/ckpt.pt")["data_meta"]["tokenizer"])
    ids = enc.encode(PROMPT)
    out = lens(model, torch.tensor([ids]), loops=4, exit=("kl", 0.01))
    assert view(p.stdout) == lens_view(out, enc, ids, 6, exit_name="kl:0.01")
    png = tmp_path / "pics" / "kl.png"
    p = run("sample.py", f"--out_dir={trained}", "--lens=True", f"--lens_png={png}", "--lens_color=kl", "--start=def f")
    assert png.read_bytes()[:4] == b"\x89PNG" and "loop 2" in p.stdout and "loop 3" not in p.stdout  # (L=2)
    # the same weights as a released model read through --init_from=hf: give the same view
    run("export.py", f"--out_dir={trained}", f"--to={tmp_path / 'hub'}")
    q = run("sample.py", f"--init_from=hf:{tmp_path / 'hub'}", f"--out_dir={tmp_path / 'hf'}", "--lens=True",
            "--start=def f", "--lens_color=kl")
    assert view(q.stdout) == view(p.stdout) and (tmp_path / "hf" / "lens.png").exists()
    for args, message in ((["--budgets=2,3"], "--lens shows one route"), (["--lens_color=x"], "--lens_color=x"),
                          (["--lens_positions=0"], "lens_positions >= 1"), (["--kv_sharing=last"], "no --kv_sharing"),
                          (["--exit=gate:0.5"], "exit_gate=True")):
        p = run("sample.py", f"--out_dir={trained}", "--lens=True", *args, ok=False)
        assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_eval_lens_through_the_script_and_batched_as_one_window_at_a_time(trained, tmp_path):
    p = run("eval.py", f"--out_dir={trained}", "--tasks=bpb,lens", "--max_text_tokens=600", "--batch_tokens=96")
    record = json.loads((trained / "eval.jsonl").read_text().splitlines()[-1])
    res = record["results"]["lens"]
    assert [n for n, _ in record["routes"]] == ["M=1", "M=2", "M=3", "M=4"]  # 1..2L, L = 2
    assert res["M=1"]["changed"] is None and res["M=4"]["kl"] == 0 and "kl_L" not in res["M=2"]
    assert all(0 <= res[f"M={t}"]["changed"] <= 1 for t in (2, 3, 4)) and res["M=3"]["kl_L"] > 0
    assert "lens changed %" in p.stdout and "lens (loop t of one M=4 forward, 599 positions)" in p.stdout
    assert (trained / "eval.png").exists()
    # the same numbers with every window run alone through the lens, by hand
    model = model_from_checkpoint(load_checkpoint(f"{trained}/ckpt.pt")).eval()
    import numpy as np
    tokens = np.fromfile(os.path.join(record_data_dir(trained), "val.bin"), dtype=np.uint16)[:600].astype(np.int64)
    sums = torch.zeros(5, 4, dtype=torch.float64)
    n = 0
    for begin, end, first in ev.text_windows(len(tokens), 32, 16):
        out = lens(model, torch.from_numpy(tokens[begin:end])[None], loops=4, anchor=2)
        keep = slice(first - 1 - begin, end - begin)
        tok = out["token"][:, 0, keep]
        changed = torch.cat([torch.zeros_like(tok[:1]), tok[1:] != tok[:-1]]).double()
        for i, v in enumerate([changed, out["kl"][:, 0, keep], out["move"][:, 0, keep], out["kl_anchor"][:, 0, keep],
                               out["move_anchor"][:, 0, keep]]):
            sums[i] += v.double().sum(-1)
        n += tok.size(1)
    assert n == 599
    for t in range(1, 5):
        got = res[f"M={t}"]
        for i, key in enumerate(("changed", "kl", "move", "kl_L", "move_L")):
            if got.get(key) is not None:
                assert got[key] == pytest.approx(sums[i, t - 1].item() / n, rel=1e-4, abs=1e-7), (t, key)
    # runs side by side (LT / LTi / FLT): --runs with --metric=lens; this one has no budget past L
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(trained / "ckpt.pt", other / "ckpt.pt")
    run("eval.py", f"--out_dir={other}", "--tasks=lens", "--max_text_tokens=300", "--budgets=1,2")
    p = run("eval.py", f"--runs={trained},{other}", "--metric=lens", f"--plot_file={tmp_path / 'lens_runs.png'}")
    assert (tmp_path / "lens_runs.png").read_bytes()[:4] == b"\x89PNG"
    run("export.py", f"--out_dir={trained}", f"--to={tmp_path / 'hub'}")
    p = run("eval.py", f"--init_from=hf:{tmp_path / 'hub'}", "--tasks=lens", f"--out_dir={tmp_path / 'ev'}", ok=False)
    assert "--tasks=lens reads a checkpoint's own" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = run("train.py", f"--data_dir={record_data_dir(trained)}", f"--out_dir={tmp_path / 'x'}", "--eval_tasks=lens",
            *SMALL, ok=False)
    assert "not a training eval" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def record_data_dir(out):
    """The corpus a run was trained on (its checkpoint's train config)."""
    return load_checkpoint(f"{out}/ckpt.pt")["train_config"]["data_dir"]
