"""Every script's bad inputs end in one line on stderr, a non-zero exit status and no traceback.
Each script's cases run in one subprocess (runpy, as `python SCRIPT ARGS` runs it), so the
sweep costs one interpreter start per script rather than one per case (and that one is forked
from a warm interpreter: tests/script_runner.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from loopgpt import CHECKPOINT_VERSION, LoopGPT, LoopGPTConfig, save_checkpoint  # noqa: E402
from script_runner import run_script  # noqa: E402  (the sweep's one interpreter, forked warm)

RUNNER = r"""
import contextlib, io, json, runpy, sys, traceback
results = []
for script, args in json.loads(sys.argv[1]):
    err, code, tb = io.StringIO(), 0, False
    sys.argv = [script, *args]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:  # what the interpreter would print and return
            code = e.code if isinstance(e.code, int) else 1
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=err)
        except BaseException:
            code, tb = 1, True
            traceback.print_exc(file=err)
    results.append({"code": code, "traceback": tb or "Traceback" in err.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Files a user might point a script at: a prepared dataset, a checkpoint, and broken ones."""
    root = tmp_path_factory.mktemp("bad")
    from data.pydoc.prepare import prepare
    prepare(out_dir=str(root / "data"))
    (root / "afile").write_text("x")
    (root / "nonutf8.txt").write_bytes(b"\xff\xfe bad")
    for name, meta in (("badjson", "{bad json"), ("badtok", '{"tokenizer": {"kind": "zzz"}}')):
        (root / name).mkdir()
        (root / name / "meta.json").write_text(meta)
    (root / "oddbin").mkdir()
    (root / "oddbin" / "meta.json").write_bytes((root / "data" / "meta.json").read_bytes())
    (root / "oddbin" / "train.bin").write_bytes((root / "data" / "train.bin").read_bytes()[:1001])
    (root / "oddbin" / "val.bin").write_bytes((root / "data" / "val.bin").read_bytes())
    (root / "trunc").mkdir()
    (root / "badlog").mkdir()
    (root / "badlog" / "log.jsonl").write_text("{nope\n")
    cfg = LoopGPTConfig(n_prelude=1, n_core=1, n_coda=1, n_loops=2, n_embd=32, n_head=2, vocab_size=2112, block_size=32)
    meta = json.loads((root / "data" / "meta.json").read_text())
    (root / "ckpt").mkdir()
    save_checkpoint({"version": CHECKPOINT_VERSION, "model": LoopGPT(cfg).state_dict(), "model_config": cfg.to_dict(),
                     "train_config": {"data_dir": str(root / "data")}, "iter_num": 1, "best_val_loss": 9.0,
                     "data_meta": meta}, str(root / "ckpt" / "ckpt.pt"))
    (root / "trunc" / "ckpt.pt").write_bytes((root / "ckpt" / "ckpt.pt").read_bytes()[:1000])
    (root / "junk").mkdir()
    (root / "junk" / "ckpt.pt").write_bytes(b"this is not a checkpoint")
    ckpt = torch.load(root / "ckpt" / "ckpt.pt", weights_only=True)
    # checkpoints from other versions: a future one, and version-1 models that compute differently now
    for name, version, config in (("v7", 7, {}), ("v1mor", 1, {"routing": "mor"}),
                                  ("v1sandwich", 1, {"injection": "concat", "block_norm": "sandwich"})):
        (root / name).mkdir()
        torch.save(dict(ckpt, version=version, model_config={**ckpt["model_config"], **config}), root / name / "ckpt.pt")
    (root / "oldeval").mkdir()  # records eval.py and train.py wrote in another version
    (root / "oldeval" / "eval.jsonl").write_text('{"results": {"bpb": 3}}\n["x"]\n')
    (root / "oldeval" / "log.jsonl").write_text('{"type": "eval", "step": 1, "val": {"1": 3}}\n')
    (root / "oldplot").mkdir()
    (root / "oldplot" / "eval.jsonl").write_text('{"results": {"bpb": 3}}\n["x"]\n')
    (root / "oldplot" / "log.jsonl").write_text('{"type": "eval", "step": 1, "val": {"1": {"loss": 3.0}}}\n')
    return root


def cases(fx):
    """(script, args, what stderr must say) for every script."""
    data, ck = f"--data_dir={fx / 'data'}", f"--out_dir={fx / 'ckpt'}"
    small = [data, "--max_iters=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=2",
             f"--out_dir={fx / 'out'}"]
    return {
        "train.py": [
            (["--config", "no_such_config"], ("unknown config 'no_such_config'", "tiny")),
            (["--n_lops=3"], ("unknown key 'n_lops'", "n_loops", "max_iters")), (["--max_iters=ten"], ("--max_iters=ten", "int")),
            (["--injection=bogus", data], "valid: none, add"), (["--learning_rate=nan"], "finite learning_rate"),
            (["--compile_scope=model"], "compile_scope='model' (valid: 'blocks', 'step')"),
            (["--dataset=nowhere"], "python data/nowhere/prepare.py"),
            ([f"--out_dir={fx / 'nockpt'}", "--resume=True", data], "no checkpoint"),
            ([f"--out_dir={fx / 'junk'}", "--resume=True", data], "cannot read checkpoint"),
            ([f"--seed={2**64}"], "seed < 2^63"),
            ([data, f"--init_from={fx / 'nockpt'}"], ("init_from=", "no checkpoint")),
            ([data, f"--init_from={fx / 'ckpt'}", "--init_core=middle"], "init_core='middle'"),
            ([data, f"--init_from={fx / 'ckpt'}", "--n_embd=64"], "n_embd=32 there, 64 here"),
            ([data, f"--init_from=hf:{fx / 'nowhere'}"], ("init_from=hf:", "neither a folder nor a hub id")),
            ([data, "--lora_rank=2", "--lora_targets=q,mlp"], ("lora_targets='q,mlp'", "q,k,v,o,fc,down")),
            (["--device=foo"], "is not a device"), ([data, "--block_size=100000000"], "GiB, more than"),
            (["--block_size=-5"], "block_size"), (["--n_head=0"], "n_head"),
            ([*small, "--n_loops=100000"], "a training step at"), ([*small, f"--out_dir={fx / 'afile'}"], "cannot create"),
            ([f"--data_dir={fx / 'afile'}"], "cannot create"), ([f"--data_dir={fx / 'badjson'}"], "not a dataset description"),
            ([f"--data_dir={fx / 'badtok'}"], "unknown tokenizer kind"), ([f"--data_dir={fx / 'oddbin'}"], "truncated"),
            (["--grad_clip=-1"], "grad_clip >= 0"), (["--weight_decay=-1"], "weight_decay >= 0"),
            (["--warmup_iters=-5"], "warmup_iters"), (["--seed=-1"], "0 <= seed"), (["--beta1=2"], "beta1"),
            (["--loop_sampling=uniform", "--loop_min=3", "--loop_max=2"], "loop_min=3 > loop_max=2"), ([*small, "--softcap=-1"], "softcap"),
            (["--lambda_short=-1"], "lambda_short"), ([*small, "--sweep_exits=zzz"], "sweep_exits: 'zzz'"),
            ([f"--out_dir={fx / 'trunc'}", "--resume=True", data], "cannot read checkpoint"),
        ],
        "sample.py": [
            ([ck, "--top_k=-5"], "--top_k=-5: need top_k >= 0"), ([ck, "--budgets=10000000"], "the KV cache"),
            ([ck, "--budgets=0,2"], "loop budget must be an integer >= 1"), ([ck, "--budgets=x"], "comma-separated integers"),
            ([ck, f"--start=FILE:{fx / 'nonutf8.txt'}"], "as UTF-8 text"), ([ck, "--device=foo"], "is not a device"),
            ([ck, "--seed=-1"], "seed in [0, 2^63)"), ([ck, f"--seed={2**64}"], "seed in [0, 2^63)"),
            ([ck, "--temperature=inf"], "finite and >= 0"), ([ck, "--threads=100000"], "cores"),
            ([ck, "--min_loops=0"], "min_loops >= 1"), ([ck, "--min_loops=3"], "it needs --exit"),
            ([ck, "--kv_sharing=half"], "valid: none, first, last, mean, window:N"),
            ([ck, "--kv_sharing=last", "--exit=kl:1e-3"], "no --exit"),
            ([ck, "--exit=kl"], ("--exit=kl", "kl:1e-3")), ([ck, "--exit=zz:1"], "kind in"),
            ([ck, "--schedule=3,3"], "--schedule=3,3"), ([ck, "--schedule=a,b"], "not a comma-separated list"),
            ([f"--out_dir={fx / 'trunc'}"], "cannot read checkpoint"), ([f"--out_dir={fx / 'junk'}"], "cannot read checkpoint"),
            ([f"--out_dir={fx / 'nockpt'}"], ("no checkpoint", "python train.py")),
            ([f"--out_dir={fx / 'v7'}"], "checkpoint version 7"), ([f"--out_dir={fx / 'v1mor'}"], "MoR routing did not yet follow"),
            ([f"--out_dir={fx / 'v1sandwich'}"], "sandwich adapter"),
        ],
        "eval.py": [
            ([ck, "--budgets=10000000"], "GiB, more than"), ([ck, "--device=foo"], "is not a device"),
            ([f"--runs={fx / 'badlog'}"], "cannot read"), ([f"--runs={fx / 'oldeval'}"], "another version"),
            ([f"--runs={fx / 'oldplot'}", f"--plot_file={fx / 'p.png'}"], "no 'bpb' at two budgets"),
            ([ck, "--stride=100000"], "--stride=100000"), ([ck, "--exit=gate:0.9"], "exit_gate=True"),
        ],
        "bench.py": [(["--device=foo"], "is not a device"), (["--seed=-1"], "0 <= seed"),
                     (["--memory_probe=zzz"], "three integers"), (["--loss_probe=-1"], "an integer >= 0"),
                     (["--load_probe=nowhere,float32"], "FOLDER,DTYPE")],
        "tests/gpu_check.py": [([f"--out_dir={fx / 'afile'}"], "cannot create"),
                                 ([f"--out_dir={fx / 'gc'}", "--steps=-1"], "steps >= 0"),
                                 ([f"--out_dir={fx / 'gc'}", "--only=zzz"], "the steps are")],
        "data/pydoc/prepare.py": [(["--vocab_size=10"], "257 to 4294967296"), ([f"--out_dir={fx / 'afile'}"], "cannot create"),
                                  (["--vocab_size=abc"], "invalid int value")],
        "data/shakespeare/prepare.py": [([f"--input={fx / 'nonutf8.txt'}", "--tokenizer=bpe", f"--out_dir={fx / 's'}"],
                                         "as UTF-8 text")],
        "data/tasks/prepare.py": [(["--task=addition", "--train_rows=-1", f"--out_dir={fx / 't'}"], "train_rows >= 1"),
                                  (["--task=bogus"], "invalid choice: 'bogus'")],
        "data/eval/prepare.py": [([f"--out_dir={fx / 'afile'}"], "cannot create")],
    }


@pytest.mark.parametrize("script", ["train.py", "sample.py", "eval.py", "bench.py", "tests/gpu_check.py",
                                    "data/pydoc/prepare.py", "data/shakespeare/prepare.py", "data/tasks/prepare.py",
                                    "data/eval/prepare.py"])
def test_bad_inputs_end_in_one_line(fx, script):
    todo = cases(fx)[script]
    proc = run_script(["-c", RUNNER, json.dumps([(script, args) for args, _ in todo])], cwd=ROOT,
                      env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for (args, message), r in zip(todo, json.loads(proc.stdout.splitlines()[-1])):
        lines = [line for line in r["stderr"].splitlines() if line.strip()]
        assert r["code"] != 0 and not r["traceback"], (script, args, r["stderr"])
        wanted = (message,) if isinstance(message, str) else message
        assert lines and lines[-1].startswith("error") and all(m in lines[-1] for m in wanted), (script, args, r["stderr"])


def test_ctrl_c_stops_training_cleanly(fx, tmp_path):
    """SIGINT mid-run: exit 130, no traceback, one line with the step and the resume command, the checkpoint whole."""
    import signal
    import time
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", f"--data_dir={fx / 'data'}", f"--out_dir={out}", "--max_iters=100000",
           "--eval_interval=2", "--eval_iters=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=2"]
    # (a shell that started us in the background ignores SIGINT, and children inherit that: undo it)
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (out / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert "interrupted at step" in stdout and "--resume=True" in stdout, stdout[-2000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] >= 2 and not (out / "ckpt.pt.tmp").exists()


def test_kv_cache_estimate_is_what_is_allocated_and_too_much_is_refused():
    from loopgpt import check_fits
    from sample import kv_cache_bytes
    model = LoopGPT(LoopGPTConfig(n_kv_head=2, n_head=4, block_size=16)).eval()
    for B, M in ((1, 4), (3, 7)):
        cache = model.new_cache(M)
        with torch.no_grad():
            model(torch.zeros(B, 5, dtype=torch.long), loops=M, cache=cache)
        assert kv_cache_bytes(model, B, M) == 2 * cache.k.numel() * cache.k.element_size()
    with pytest.raises(ValueError, match="GiB, more than the"):
        check_fits(2 ** 60, "a petabyte")
    with pytest.raises(ValueError, match="position tables"):
        LoopGPT(LoopGPTConfig(block_size=2 ** 40))
