"""train.py and sample.py end to end, run as a user runs them: config errors, resume exactness,
NaN stop, checkpoints, a 2-process torchrun (gloo) against one process, sampling."""

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from script_runner import run_script  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a very small model so that each run takes seconds
SMALL = ["--n_embd=32", "--n_head=2", "--n_prelude=1", "--n_core=1", "--n_coda=1", "--n_loops=2",
         "--block_size=32", "--batch_size=4", "--eval_iters=2", "--warmup_iters=2", "--log_interval=1"]


def run(script, *args, ok=True, cmd=None):
    """`python SCRIPT ARGS` as a user runs it (forked from a warm interpreter: tests/script_runner.py);
    `cmd` (torchrun) as a real subprocess."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if cmd:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    else:
        proc = run_script([script, *args], cwd=ROOT, env=env, timeout=300)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{script} failed:\n{proc.stdout}\n{proc.stderr}")
    if not ok:
        assert proc.returncode != 0, proc.stdout
        assert "Traceback" not in proc.stderr, proc.stderr  # bad input: one clear line, no traceback
    return proc


_corpus = []  # the folder data_dir made, for the other modules that import the fixture


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The built-in corpus, made once a session and shared (read-only: train.py only reads it) by
    every module that imports this fixture, rather than made again for each of them."""
    if _corpus:
        return _corpus[0]
    # train.py prepares the built-in corpus on first use: exercise exactly that path
    d = tmp_path_factory.mktemp("data") / "pydoc"
    proc = run("train.py", f"--data_dir={d}", f"--out_dir={d.parent / 'out0'}", "--max_iters=1", *SMALL)
    assert "preparing the built-in corpus" in proc.stdout
    assert (d / "meta.json").exists()
    _corpus.append(str(d))
    return str(d)


def records(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def test_config_forms(data_dir, tmp_path):
    # `--config NAME` and `--config=NAME` both work
    for form in (["--config", "base_loop"], ["--config=base_loop"]):
        run("train.py", *form, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=1", *SMALL)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(data_dir, tmp_path, optimizer):
    common = [f"--data_dir={data_dir}", "--eval_interval=4", "--lr_decay_iters=8", f"--optimizer={optimizer}", *SMALL]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run("train.py", f"--out_dir={straight}", "--max_iters=8", *common)
    run("train.py", f"--out_dir={split}", "--max_iters=4", *common)
    run("train.py", f"--out_dir={split}", "--max_iters=8", "--resume=True", *common)
    a, b = records(straight, "train"), records(split, "train")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-6)
    ea, eb = records(straight, "eval")[-1], records(split, "eval")[-1]
    for m in ea["val"]:
        assert ea["val"][m]["loss"] == pytest.approx(eb["val"][m]["loss"], rel=1e-6)
    ca = torch.load(straight / "ckpt.pt", weights_only=True)
    cb = torch.load(split / "ckpt.pt", weights_only=True)
    assert ca["iter_num"] == cb["iter_num"] == 8
    for k in ca["model"]:
        torch.testing.assert_close(ca["model"][k], cb["model"][k], atol=1e-6, rtol=1e-5)
    # the checkpoint is self-contained: config as a plain dict, tokenizer, optimizer, RNG
    assert isinstance(ca["model_config"], dict) and ca["model_config"]["n_loops"] == 2
    assert ca["data_meta"]["tokenizer"]["kind"] == "bpe" and "optimizer" in ca and "rng" in ca

    # a NaN loss stops training with a clear message and leaves the last good checkpoint alone
    before = os.path.getmtime(split / "ckpt.pt")
    p = run("train.py", f"--out_dir={split}", "--max_iters=12", "--resume=True", "--learning_rate=1e30", "--min_lr=1e30",
            *common, ok=False)  # an absurd step size blows the weights up within a few steps
    assert "loss is nan" in p.stderr or "loss is inf" in p.stderr
    assert os.path.getmtime(split / "ckpt.pt") == before
    assert torch.load(split / "ckpt.pt", weights_only=True)["iter_num"] == 8
    other = "adamw" if optimizer == "muon" else "muon"  # its optimizer state would not fit
    p = run("train.py", f"--out_dir={split}", "--max_iters=12", "--resume=True", *common, f"--optimizer={other}", ok=False)
    assert f"trained with optimizer={optimizer}" in p.stderr


def test_loss_chunk_trains_as_the_whole_logits(data_dir, tmp_path):
    # --loss_chunk=48 on SMALL's 4 x 32 = 128 tokens: the head and the loss in chunks of 48, 48
    # and 32 tokens; the same losses as the whole logits (--loss_chunk=0), step after step
    common = [f"--data_dir={data_dir}", "--max_iters=4", "--eval_interval=4", *SMALL]
    run("train.py", f"--out_dir={tmp_path / 'whole'}", "--loss_chunk=0", *common)
    run("train.py", f"--out_dir={tmp_path / 'chunked'}", "--loss_chunk=48", *common)
    whole, chunked = records(tmp_path / "whole", "train"), records(tmp_path / "chunked", "train")
    assert len(whole) == len(chunked) == 4
    for a, b in zip(whole, chunked):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    va, vb = records(tmp_path / "whole", "eval")[-1]["val"], records(tmp_path / "chunked", "eval")[-1]["val"]
    for m in va:
        assert va[m]["loss"] == pytest.approx(vb[m]["loss"], rel=1e-6)
    p = run("train.py", "--loss_chunk=-1", f"--data_dir={data_dir}", ok=False)
    assert "loss_chunk must be >= 0" in p.stderr


def test_lr_schedule_without_warmup_wsd_to_zero():
    # FLT's schedule: no warmup, constant, then the last 20% linearly to 0 (configs/flt_small.py)
    from configs import TrainConfig, get_lr
    tc = TrainConfig(learning_rate=1.0, min_lr=0.0, warmup_iters=0, lr_schedule="wsd", wsd_decay_frac=0.2,
                     max_iters=100)
    for it, lr in ((0, 1.0), (50, 1.0), (79, 1.0), (80, 1.0), (85, 0.75), (90, 0.5), (99, 0.05), (100, 0.0)):
        assert get_lr(it, tc) == pytest.approx(lr), it
    # cosine without warmup starts at the peak and ends at min_lr = 0
    tc = TrainConfig(learning_rate=1.0, min_lr=0.0, warmup_iters=0, max_iters=100)
    assert get_lr(0, tc) == 1.0 and get_lr(50, tc) == pytest.approx(0.5) and get_lr(100, tc) == 0.0


# FLT's recipe (configs/flt_small.py) at test size: Muon at its momentum warmup, wte and lm_head
# in AdamW groups of their own, eps 1e-10, no warmup, wsd to 0
FLT_RECIPE = ["--optimizer=muon", "--embedding_lr=0.05", "--head_lr=0.004", "--learning_rate=0.004",
              "--adam_eps=1e-10", "--beta1=0.8", "--weight_decay=0", "--warmup_iters=0", "--lr_schedule=wsd",
              "--min_lr=0", "--muon_momentum_warmup=6"]


def test_resume_keeps_the_flt_recipes_groups(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--eval_interval=4", *SMALL, *FLT_RECIPE, "--wsd_decay_frac=0.5"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run("train.py", f"--out_dir={straight}", "--max_iters=8", *common)
    run("train.py", f"--out_dir={split}", "--max_iters=4", "--lr_decay_iters=8", *common)
    run("train.py", f"--out_dir={split}", "--max_iters=8", "--resume=True", *common)
    a, b = records(straight, "train"), records(split, "train")
    assert [r["lr"] for r in a] == pytest.approx([0.004] * 5 + [0.003, 0.002, 0.001])  # wsd: the last half to 0
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-6) and ra["lr"] == rb["lr"]
    ga = torch.load(straight / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    gb = torch.load(split / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    keys = ("lr_scale", "lr", "eps", "betas", "momentum", "weight_decay", "use_muon", "params")
    assert [{k: g[k] for k in keys} for g in ga] == [{k: g[k] for k in keys} for g in gb]
    scales = sorted(g["lr_scale"] for g in ga)
    assert scales == pytest.approx(sorted([1.0, 0.05 / 0.004, 0.02 / 0.004])) and {g["eps"] for g in ga} == {1e-10}
    assert {g["momentum"] for g in ga if g["use_muon"]} == {0.95}  # step 7 of a 6-step warmup
    # other groups than the checkpoint's optimizer state has: a clear error, not swapped state
    p = run("train.py", f"--out_dir={split}", "--max_iters=9", "--resume=True", *common, "--embedding_lr=0", ok=False)
    assert "embedding_lr=0.05" in p.stderr and "resume as trained" in p.stderr
    p = run("train.py", f"--out_dir={tmp_path / 'tied'}", "--max_iters=1", *common, "--tie_embeddings=True", ok=False)
    assert "embedding_lr would be ignored" in p.stderr


def test_resume_keeps_the_checkpoints_model_over_a_config_file(data_dir, tmp_path):
    # configs/base_loop.py says injection="none"; the checkpoint was trained with "add": an
    # eval with --config base_loop must run the trained model, and say that it does
    common = ["--config", "base_loop", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=1", *SMALL]
    run("train.py", *common, "--injection=add")
    p = run("train.py", *common, "--eval_only=True", "--resume=True")
    assert "injection (checkpoint 'add', config 'none')" in p.stdout and "injection=add" in p.stdout
    p = run("train.py", *common, "--eval_only=True", "--resume=True", "--injection=none")  # the command line wins
    assert "injection=none" in p.stdout and "win over" not in p.stdout


def test_version_1_checkpoints_still_load(data_dir, tmp_path):
    # version 1 (before MoR and the sandwich adapter followed their authors' code) still loads;
    # those two models and other versions are refused (tests/test_bad_inputs.py)
    run("train.py", f"--out_dir={tmp_path}", f"--data_dir={data_dir}", "--max_iters=1", *SMALL)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    torch.save(dict(ckpt, version=1), tmp_path / "ckpt.pt")
    run("sample.py", f"--out_dir={tmp_path}", "--max_new_tokens=2")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_torchrun_two_processes_match_one(data_dir, tmp_path, optimizer):
    # same global batch (2 micro-steps of 4 rows): 1 process accumulates both, 2 processes one
    # each; the depth is sampled per step (Huginn) and must be the same on both ranks
    # (train.py checks that with an all-reduce and stops if not)
    common = [f"--data_dir={data_dir}", "--max_iters=3", "--eval_interval=3", "--grad_accum_steps=2",
              "--loop_sampling=poisson_lognormal", f"--optimizer={optimizer}", *SMALL]
    run("train.py", f"--out_dir={tmp_path / 'one'}", *common)
    run("torchrun", cmd=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         "train.py", f"--out_dir={tmp_path / 'two'}", *common])
    one, two = records(tmp_path / "one", "train"), records(tmp_path / "two", "train")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["loops"] == b["loops"]
    va, vb = records(tmp_path / "one", "eval")[-1]["val"], records(tmp_path / "two", "eval")[-1]["val"]
    for m in va:
        assert va[m]["loss"] == pytest.approx(vb[m]["loss"], rel=1e-5)


def test_sample_budgets_side_by_side(data_dir, tmp_path):
    run("train.py", f"--out_dir={tmp_path}", f"--data_dir={data_dir}", "--max_iters=2", *SMALL)
    p = run("sample.py", f"--out_dir={tmp_path}", "--budgets=1,2,4", "--max_new_tokens=40",
            "--start=def f(x):", "--seed=3")
    for M in (1, 2, 4):
        assert f"M={M} | effective depth" in p.stdout
    assert "tokens/s" in p.stdout
    # a prompt longer than the context is cropped with a notice
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the quick brown fox " * 50)
    p = run("sample.py", f"--out_dir={tmp_path}", f"--start=FILE:{prompt}", "--max_new_tokens=5")
    assert "keeping the last block_size=32" in p.stdout


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                                         if f.endswith(".py") and not f.startswith("_")))  # _*: shared parts
def test_every_config_builds_a_model(name):
    # each configs/NAME.py uses only known keys of the right type and makes a valid model
    from configs import model_config_defaults, parse_args, train_config_defaults
    from loopgpt import LoopGPT, LoopGPTConfig
    model_defaults = model_config_defaults()
    values, _ = parse_args(["--config", name], {**train_config_defaults(), **model_defaults})
    with torch.device("meta"):  # shapes only: the GPU configs have up to a billion parameters
        model = LoopGPT(LoopGPTConfig(**{k: values[k] for k in model_defaults}))
    assert model.num_params() > 0 and values["max_iters"] >= 1


def test_command_line_forms(capsys):
    # --key=value, --config NAME, a bare boolean flag (--compile means --compile=True), --help
    from configs import model_config_defaults, parse_args, train_config_defaults
    defaults = {**train_config_defaults(), **model_config_defaults()}
    values, explicit = parse_args(["--config", "tiny", "--compile", "--max_iters=7"], defaults)
    assert values["compile"] is True and values["max_iters"] == 7 and explicit["compile"] == "command line"
    with pytest.raises(SystemExit, match="use --max_iters=value"):
        parse_args(["--max_iters"], defaults)
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"], defaults)
    assert e.value.code == 0 and "--max_iters=" in capsys.readouterr().out


def test_help_says_what_every_key_does():
    # --help prints each key's note from where it is defined: a field's own comment, the comment
    # block above a group of fields, a script's defaults (a note continued on the next line too)
    for script, notes in (("train.py", {"n_loops": "L: loops at train time", "loop_min": "poisson_lognormal = Huginn",
                                        "batch_size": "rows per micro-step"}),
                          ("sample.py", {"schedule": 'several separated by "/"', "temperature": "0 = greedy"})):
        out = run(script, "--help").stdout
        keys = [line.split("=")[0][4:] for line in out.splitlines() if line.startswith("  --")]
        described = {k for k, nxt in zip(keys, out.split("\n  --")[1:]) if "\n      " in nxt}
        for key, note in notes.items():
            assert note in " ".join(out.split("\n  --" + key + "=")[1].split("\n  --")[0].split()), key
        if script == "train.py":  # every training and model key
            assert described == set(keys), sorted(set(keys) - described)


LOOPFORMER = ["--config=loopformer_3x8_tiny", "--n_embd=32", "--n_head=2", "--n_core=1", "--n_loops=4",
              "--block_size=32", "--batch_size=4", "--eval_iters=2", "--warmup_iters=2", "--log_interval=1"]


def test_loopformer_trains_sweeps_budgets_and_samples_schedules(data_dir, tmp_path):
    run("train.py", *LOOPFORMER, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=3")
    p = run("train.py", *LOOPFORMER, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=3",
            "--eval_only=True", "--resume=True")
    assert "every schedule of M steps on the 1/4 grid" in p.stdout
    sweep = records(tmp_path, "budget_sweep")[-1]
    assert set(sweep["budgets"]) == {str(M) for M in range(1, 9)}
    # L = 4: 3 schedules of 2 steps (1+3, 2+2, 3+1), 3 of 3 steps; sorted best first
    assert [len(sweep["schedules"][m]) for m in ("2", "3")] == [3, 3]
    losses = [r["loss"] for r in sweep["schedules"]["2"]]
    assert losses == sorted(losses)
    p = run("sample.py", f"--out_dir={tmp_path}", "--budgets=2", "--schedule=2,1,1/0.5,0.5", "--max_new_tokens=5")
    assert "schedule 2,1,1" in p.stdout and "schedule 0.5,0.5" in p.stdout and "M=2 |" in p.stdout
    p = run("sample.py", f"--out_dir={tmp_path}", "--schedule=0.5,0.6", ok=False)
    assert "sum to 1" in p.stderr


def test_prefix_objective_and_objective_errors(data_dir, tmp_path):
    args = [a for a in LOOPFORMER if not a.startswith("--config")]
    run("train.py", "--config=tmlt_ee_3x8_tiny", *args, f"--data_dir={data_dir}", f"--out_dir={tmp_path}",
        "--max_iters=2")
    assert records(tmp_path, "train")[-1]["loss"] > 0
    p = run("train.py", "--config=base_loop_3x8_tiny", *args, "--objective=shortcut", f"--data_dir={data_dir}",
            ok=False)
    assert "needs modulation=loopformer" in p.stderr
    p = run("train.py", *args, "--eval_only=True", f"--data_dir={data_dir}", ok=False)
    assert "add --resume=True" in p.stderr


def test_depth_sampling_and_curriculum(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--max_iters=6", "--eval_interval=6", *SMALL]
    run("train.py", f"--out_dir={tmp_path / 'u'}", "--loop_sampling=uniform", "--loop_min=1", "--loop_max=5",
        "--curriculum_start=1", "--curriculum_rate=0.5", *common)
    loops = [r["loops"] for r in records(tmp_path / "u", "train")]
    for step, M in enumerate(loops):  # record k is step k+1, which drew its depth at step k
        assert 1 <= M <= min(5, int(1 + 0.5 * step))
    p = run("train.py", f"--out_dir={tmp_path / 'p'}", "--loop_sampling=per_sequence", *common, ok=False)
    assert "random or zero state_init" in p.stderr and "Traceback" not in p.stderr  # tiny's add + prelude
    run("train.py", f"--out_dir={tmp_path / 'p'}", "--loop_sampling=per_sequence", "--bptt_k=2",
        "--checkpoint_loops=True", "--state_init=randn_small", *common, "--n_loops=8", "--batch_size=32")
    loops = [r["loops"] for r in records(tmp_path / "p", "train")]
    assert len(set(loops)) > 1 and any(not float(M).is_integer() for M in loops)  # per-row depths average
    assert 7.4 < sum(loops) / len(loops) < 8.6  # Parcae's law max(1, Poisson(8)): mean ~8 (Huginn's +1 law: 9)
    # fixed depth is n_loops: loop_min / loop_max (left over from a sampled config) do not move it
    run("train.py", f"--out_dir={tmp_path / 'f'}", "--loop_min=3", "--loop_max=1", *common)
    assert {r["loops"] for r in records(tmp_path / "f", "train")} == {2}
    p = run("train.py", "--loop_sampling=sometimes", f"--data_dir={data_dir}", ok=False)
    assert "valid: fixed, uniform, poisson_lognormal, per_sequence" in p.stderr


def test_exit_training_stages_and_sampling_with_exits(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--eval_interval=2", "--exit_gate=True", *SMALL]
    run("train.py", *common, "--max_iters=2", "--gate_stage=1")
    before = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    p = run("train.py", *common, "--max_iters=4", "--lr_decay_iters=4", "--gate_stage=2", "--resume=True")
    assert "fresh optimizer" in p.stdout
    after = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    for k in before:  # stage 2 moved the gate and nothing else
        assert torch.equal(before[k], after[k]) != k.startswith("exit_gate"), k
    p = run("sample.py", f"--out_dir={tmp_path}", "--budgets=4", "--exit=gate:0.5", "--max_new_tokens=8")
    assert "[exit gate:0.5] loops per token: mean" in p.stdout
    p = run("sample.py", f"--out_dir={tmp_path}", "--exit=kl", ok=False)
    assert "--exit=kl" in p.stderr and "kl:1e-3" in p.stderr
    run("train.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'steps'}", "--max_iters=2",
        "--step_loss=last_third", *SMALL)


def test_budget_sweep_fit_and_exit_eval(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", *SMALL, "--max_iters=2", "--n_loops=3"]
    run("train.py", *common)
    p = run("train.py", *common, "--eval_only=True", "--resume=True", "--sweep_exits=latent:1e-12,latent:1e9")
    assert "fit of val loss over M = 1..3 (Parcae)" in p.stdout and "per-token early exit" in p.stdout
    sweep = records(tmp_path, "budget_sweep")[-1]
    assert set(sweep["fit"]) == {"eps_inf", "A", "k", "max_residual"}
    never, always = sweep["exits"]["latent:1e-12"], sweep["exits"]["latent:1e9"]
    # teacher-forced decoding through the cache with an exit that never fires is the full forward
    assert never["mean_loops"] == 3 and never["loss"] == pytest.approx(sweep["budgets"]["3"]["loss"], rel=1e-5)
    assert always["mean_loops"] == 1
    p = run("train.py", *common, "--eval_only=True", "--resume=True", "--sweep_exits=gate:0.5", ok=False)
    assert "exit_gate=True" in p.stderr


def test_mor_trains_logs_recursions_sweeps_and_samples(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", *SMALL, "--n_loops=3", "--eval_budgets=1,3"]
    p = run("train.py", "--config=mor_tiny", *common, "--max_iters=2", "--eval_interval=2")
    assert "routing=mor" in p.stdout and "MoR recursions/token" in p.stdout
    ev = records(tmp_path, "eval")[-1]
    assert 1 < ev["mor_recursions"] < 3  # capacities 1, 2/3, 1/3: about 2 on average
    run("train.py", "--config=mor_tiny", *common, "--max_iters=2", "--eval_only=True", "--resume=True")
    assert set(records(tmp_path, "budget_sweep")[-1]["budgets"]) == {"1", "2", "3"}  # no M > L for MoR
    p = run("sample.py", f"--out_dir={tmp_path}", "--budgets=3", "--max_new_tokens=12")
    assert "[MoR routing] loops per token: mean" in p.stdout
    p = run("sample.py", f"--out_dir={tmp_path}", "--budgets=4", ok=False)
    assert "budget 4 is too many" in p.stderr
