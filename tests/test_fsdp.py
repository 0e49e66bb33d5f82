"""train.py --fsdp=True (FSDP2, torch's fully_shard) under a 2-process torchrun (gloo): the same
losses as DDP, checkpoints in the one-process format, exact resume, and its one-line errors."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from test_train import SMALL, records, run  # noqa: E402
from test_train import data_dir  # noqa: E402,F401  (the module-scoped prepared corpus)

# mlp_ratio 3.97: 127 hidden units, so the MLP's matrices split unevenly over 2 ranks (64 + 63 rows)
FSDP_SMALL = [*SMALL, "--mlp_ratio=3.97"]


def torchrun(out_dir, *args):
    return run("torchrun", cmd=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                "train.py", f"--out_dir={out_dir}", *args])


def assert_same_run(a_dir, b_dir, rel, norm_rel):
    """The train records (loss, gradient norms, loops) and the last eval's val losses of two runs.
    (A gradient norm is an fp32 sum of squares, 65k of them in lm_head alone: summed shard by shard
    it moves by ~5e-6, measured against fp64, where the gradients themselves agree to 1e-7.)"""
    a, b = records(a_dir, "train"), records(b_dir, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for ra, rb in zip(a, b):
        assert ra["loops"] == rb["loops"] and rb["loss"] == pytest.approx(ra["loss"], rel=rel), ra["step"]
        for key in ("grad_norm", "core0_mlp_grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=norm_rel), (ra["step"], key)
    va, vb = records(a_dir, "eval")[-1]["val"], records(b_dir, "eval")[-1]["val"]
    for M in va:
        assert vb[M]["loss"] == pytest.approx(va[M]["loss"], rel=rel)


def test_fsdp_matches_ddp_and_its_checkpoint_is_the_one_process_format(data_dir, tmp_path):  # noqa: F811
    # 4 global micro-steps: each rank accumulates 2 (FSDP reduce-scatters both); a depth sampled per step.
    # Muon for the blocks' matrices, AdamW for the embedding, head and vectors: both optimizers' paths
    common = [f"--data_dir={data_dir}", "--max_iters=3", "--eval_interval=3", "--grad_accum_steps=4",
              "--loop_sampling=poisson_lognormal", "--optimizer=muon", *FSDP_SMALL]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    torchrun(ddp, *common)
    torchrun(fsdp, *common, "--fsdp=True")
    assert_same_run(ddp, fsdp, rel=1e-5, norm_rel=1e-4)
    # the checkpoint: whole tensors, the same keys, shapes and optimizer layout as DDP's (rank 0's state_dict())
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (ddp, fsdp))
    assert a.keys() == b.keys() and a["iter_num"] == b["iter_num"] == 3
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert b["model"][k].shape == a["model"][k].shape and b["model"][k].device.type == "cpu"
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-5, rtol=1e-4)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, state in a["optimizer"]["state"].items():
        assert state.keys() == b["optimizer"]["state"][i].keys()
        for k, v in state.items():
            assert type(b["optimizer"]["state"][i][k]) is torch.Tensor
            torch.testing.assert_close(b["optimizer"]["state"][i][k], v, atol=1e-5, rtol=1e-3)
    # one process reads it: the same val loss as the FSDP run's last eval (the same val batches), and samples
    run("train.py", f"--out_dir={fsdp}", *common, "--eval_only=True", "--resume=True")
    sweep, val = records(fsdp, "budget_sweep")[-1]["budgets"], records(fsdp, "eval")[-1]["val"]
    for M in val:
        assert sweep[M]["loss"] == pytest.approx(val[M]["loss"], rel=1e-5)
    p = run("sample.py", f"--out_dir={fsdp}", "--budgets=2", "--max_new_tokens=4")
    assert "M=2 |" in p.stdout


def test_fsdp_resumes_exactly(data_dir, tmp_path):  # noqa: F811
    # Muon's momentum and AdamW's moments (embeddings, head, vectors) sharded on load, gathered on save;
    # tied embeddings: one matrix, in the root's shard, saved once under both names
    common = [f"--data_dir={data_dir}", "--eval_interval=2", "--lr_decay_iters=4", "--grad_accum_steps=4",
              "--optimizer=muon", "--tie_embeddings=True", "--head_lr=0.004", "--fsdp=True", *FSDP_SMALL]
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun(straight, "--max_iters=4", *common)
    torchrun(split, "--max_iters=2", *common)
    torchrun(split, "--max_iters=4", "--resume=True", *common)
    assert [r["step"] for r in records(split, "train")] == [1, 2, 3, 4]
    assert_same_run(straight, split, rel=1e-6, norm_rel=1e-6)
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (straight, split))
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-6, rtol=1e-5)
    assert b["model"]["wte.weight"].data_ptr() == b["model"]["lm_head.weight"].data_ptr()


def test_fsdp_errors(data_dir, tmp_path):  # noqa: F811
    p = run("train.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--fsdp=True", *SMALL, ok=False)
    assert "fsdp=True shards the model over torchrun's processes" in p.stderr
