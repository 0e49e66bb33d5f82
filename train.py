"""
Train a LoopGPT. One file, nanoGPT-style:

    python train.py                                  # config `tiny`: CPU, built-in corpus, minutes
    python train.py --config base_loop --n_loops=8   # a named config, then --key=value overrides
    torchrun --nproc_per_node=2 train.py --config tiny   # DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=8 train.py --fsdp=True ...  # FSDP2: for a model past one GPU
    python train.py --resume=True                    # continue exactly from out_dir/ckpt.pt

Read in this order: the training objectives (Objective, the papers' losses around the model,
the module DDP wraps), the token files' readers, FSDP's sharding, then main(): settings, data,
model and optimizer (or a conversion, or a resume), the eval helpers, the training loop.

Settings come from TrainConfig (configs/__init__.py) and LoopGPTConfig (loopgpt.py), then configs/NAME.py,
then the command line. Every process sees different batches; the batch of global
micro-step m at step s depends only on (seed, s, m), so a run on W processes sees the
same global batch as one process, and a resumed run sees the batches it would have seen.
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict

from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from configs import (TrainConfig, autocast_context, detect_device, fail, get_lr, gpu_peak_flops, make_dir,
                     model_config_defaults, parse_args, parse_exit, train_config_defaults)
from loopgpt import (CHECKPOINT_VERSION, INIT_CORES, Attention, Block, LoopGPT, LoopGPTConfig, activation_bytes, check_fits,
                     compile_blocks, confidence_logit, configure_optimizer, exit_probability, flops_per_token,
                     init_from_source, layer_similarity, load_checkpoint, model_from_checkpoint, muon_momentum,
                     per_sequence_problem, save_checkpoint, summary, unrolled_blocks)
from data.common import token_dtype
from data.huggingface import build_model as build_hf_model, hf_folder, load_model as load_hf_model
from data.tokenizer import load_tokenizer, token_byte_lengths
from eval import budget_sweep, score_batches, sweep_routes


# ---- the training objectives ----------------------------------------------------------------------
# The model returns the cross-entropy of its last loop; every other loss of the papers reads the
# loop's states through trunk(record=...) and lives here, in a module around the model
# (x-transformers' AutoregressiveWrapper). DDP wraps it, so a second route or a teacher runs
# inside one DDP forward.

class Objective(nn.Module):
    """
    loss = Objective(model, ...)(idx, targets, loops=M | depths=(B,), short=..., step_weights=...)

    The cross-entropy at budget M, plus what the run's settings add:
    - step_weights (per-step supervision, FLT's STEP / FEW): Σ_t w_t CE_t / Σ_t w_t, CE_t the
      loss of the shared coda and head on loop t's state.
    - gate_stage (Ouro, Zhu et al. 2025, arXiv 2510.25741; needs exit_gate). Stage 1 (Eq. 4):
      Σ_t p_t CE_t - gate_beta * H(p), p_t = λ_t Π_{j<t}(1-λ_j), the last loop takes the rest.
      Stage 2 (Eq. 5-6, the LM frozen): (1/T) Σ_{t=2..T} BCE(1 - λ_t, σ(gate_k (I_t - gate_gamma)))
      with I_t = max(0, CE_{t-1} - CE_t) detached: continue after loops that still helped.
    - short, an auxiliary short route: a schedule (list) is LoopFormer's shortcut route, run
      as a second forward; an int S is the early-exit baselines' prefix route, the first S
      loops of the full route read off its intermediate state (no second forward). Adds
      lambda_short * CE(short) + lambda_cons * MSE(sg(h_full), h_short), h the hidden state
      after the final norm (Jeddi et al. 2025).
    - depths (Parcae's per-sequence depth): row b runs depths[b] loops (see loopgpt's Parcae section).
    - routing='mor': + lambda_router * Σ_i mean BCE(σ(s_i), selected_i) over recursion i's
      candidates (MoR's auxiliary loss: the router's sigmoid learns to say who is kept).
    - LoopUS (Park et al. 2026, arXiv 2605.11011), trained at a random depth M with gradients
      through its last w = bptt_k loops: + lambda_mono * SiLU(CE_M - sg(CE_{M-w})) (L_Mono, the
      window must not make the prediction worse; no term when M <= w) and, with
      confidence_head, + BCE(σ(q_M), 1[argmax p_M = y]) per token (L_Q): the last loop's
      confidence logit learns whether its prediction is right.
    - teacher (MELT's phase 2, distill=True): see distill.
    With loss_chunk = R > 0 the plain loss (no per-step losses, short route, confidence head or
    L_Mono: nothing else reads the logits) of a micro-batch of more than R tokens goes through
    the head R tokens at a time (LoopGPT.chunked_loss): the same number, without the whole logits.
    """

    def __init__(self, model, lambda_short=0.1, lambda_cons=0.1, gate_stage=0, gate_beta=0.1, gate_k=50.0,
                 gate_gamma=0.005, lambda_mono=0.0, lambda_router=1e-3, teacher=None, lambda_attn=0.1, loss_chunk=0):
        super().__init__()
        self.model, self.teacher = model, teacher
        self.lambda_short, self.lambda_cons, self.lambda_mono, self.lambda_router = (lambda_short, lambda_cons,
                                                                                     lambda_mono, lambda_router)
        self.gate_stage, self.gate_beta, self.gate_k, self.gate_gamma = gate_stage, gate_beta, gate_k, gate_gamma
        self.lambda_attn, self.loss_chunk = lambda_attn, loss_chunk

    def forward(self, idx, targets=None, loops=None, depths=None, short=None, step_weights=None, distill=False):
        model, cfg = self.model, self.model.config
        if distill:
            return self.distill(idx, loops)
        if depths is not None:
            if short is not None:
                raise ValueError("per-sequence depths go with loops only (no short route)")
            loops = int(depths.max())
            problem = per_sequence_problem(cfg)
            if problem:
                raise ValueError(problem)
        per_step = step_weights is not None or self.gate_stage
        if per_step and (short is not None or (step_weights is not None and self.gate_stage)):
            raise ValueError("use one of: a short route, step_weights, gate_stage")
        if self.lambda_mono and (per_step or short is not None or depths is not None):
            raise ValueError("lambda_mono (LoopUS) goes with a plain training forward: no step_weights, gate_stage, "
                             "short route or per-sequence depths")
        steps = model.steps(loops)
        record = {}  # each loop's state, MoR's routes, LoopUS's updates
        # only the cross-entropy reads the logits: it can go through the head a chunk at a time
        chunked = (self.loss_chunk and targets.numel() > self.loss_chunk and not per_step and short is None
                   and not cfg.confidence_head and not self.lambda_mono)
        with torch.no_grad() if self.gate_stage == 2 else nullcontext():  # stage 2 trains the gate only
            h = model.norm_f(model.trunk(idx, steps, record=record, depths=depths))
            logits = None if chunked else model.logits(h)
        y = targets.reshape(-1)
        if chunked:
            loss = model.chunked_loss(h, y, self.loss_chunk)
        elif per_step:
            loss = self.per_step_loss(record["states"], logits, targets, step_weights)
        else:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y, ignore_index=-1)
        if cfg.confidence_head and self.gate_stage != 2:  # LoopUS's L_Q: is the last loop's argmax right, per token
            valid = y != -1
            right = (logits.detach().argmax(-1).reshape(-1) == y).float()
            q = confidence_logit(model, record["updates"][-1]).reshape(-1)
            loss = loss + F.binary_cross_entropy_with_logits(q[valid], right[valid])
        if self.lambda_mono and len(steps) > (cfg.bptt_k or 1):
            with torch.no_grad():  # LoopUS's L_Mono against the state where the gradient window starts
                start = record["states"][len(steps) - (cfg.bptt_k or 1) - 1]
                start = model.logits(model.norm_f(model.run_coda(start)))
                ce_start = F.cross_entropy(start.view(-1, start.size(-1)), y, ignore_index=-1)
            ce = F.cross_entropy(logits.view(-1, logits.size(-1)), y, ignore_index=-1)
            loss = loss + self.lambda_mono * F.silu(ce - ce_start)
        if per_step:
            return loss
        if short is not None:
            if isinstance(short, int):
                if not 1 <= short <= len(steps):
                    raise ValueError(f"prefix route of {short} loops in a route of {len(steps)}")
                h_short = model.norm_f(model.run_coda(record["states"][short - 1]))
            else:
                h_short = model.norm_f(model.trunk(idx, model.steps(None, short)))
            ce_short = F.cross_entropy(model.logits(h_short).view(-1, logits.size(-1)), y, ignore_index=-1)
            # stop-gradient on the full route: the short route learns to match it, not vice versa
            loss = loss + self.lambda_short * ce_short + self.lambda_cons * F.mse_loss(h_short, h.detach())
        if record.get("routes"):  # MoR code: Σ over recursions of the mean BCE over that recursion's candidates
            loss = loss + self.lambda_router * sum(F.binary_cross_entropy_with_logits(s[c], k[c].float())
                                                   for s, c, k in record["routes"])
        return loss

    def per_step_loss(self, states, logits, targets, step_weights):
        """Losses that read every loop's state: per-step supervision, Ouro's gate."""
        model, gate_stage = self.model, self.gate_stage
        M, V = len(states), logits.size(-1)
        if gate_stage and not model.config.exit_gate:
            raise ValueError("gate_stage needs a model with exit_gate=True")
        if gate_stage == 2 and M < 2:
            raise ValueError("gate stage 2 compares consecutive loops: it needs at least 2")
        y = targets.reshape(-1)
        valid = (y != -1).float()

        def ce(lg):  # per-token cross-entropy, (B*T,)
            return F.cross_entropy(lg.view(-1, V), y, ignore_index=-1, reduction="none")

        with torch.no_grad() if gate_stage == 2 else nullcontext():
            # the last loop's logits are the forward's; earlier loops go through the coda and head
            ce_t = torch.stack([ce(model.logits(model.norm_f(model.run_coda(s)))) for s in states[:-1]] + [ce(logits)])
        if step_weights is not None:
            w = torch.as_tensor(step_weights, dtype=ce_t.dtype, device=ce_t.device)
            if w.numel() != M or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"step_weights needs {M} weights >= 0 with a positive sum, got {step_weights}")
            return (w @ (ce_t * valid).sum(1)) / (w.sum() * valid.sum())
        stacked = torch.stack(states)
        lam = exit_probability(model, stacked.detach() if gate_stage == 2 else stacked).view(M, -1)  # λ_t per token
        if gate_stage == 1:
            survive = torch.cumprod(torch.cat([torch.ones_like(lam[:1]), 1 - lam[:-1]]), dim=0)  # Π_{j<t}(1-λ_j)
            p = torch.cat([lam[:-1] * survive[:-1], survive[-1:]])  # the last loop takes the rest
            entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(0)
            return (((p * ce_t).sum(0) - self.gate_beta * entropy) * valid).sum() / valid.sum()
        # Ouro Eq. 5-6: I_t = max(0, CE_{t-1} - CE_t), what loop t gained, detached; the
        # gate after loop t learns to continue (1 - λ_t) where that gain was large:
        # (1/T) Σ_{t=2..T} mean_tokens BCE(1 - λ_t, σ(k (I_t - γ))), divided by T, not T-1, as written
        improve = (ce_t[:-1] - ce_t[1:]).clamp_min(0)
        target = torch.sigmoid(self.gate_k * (improve - self.gate_gamma))
        bce = F.binary_cross_entropy(1 - lam[1:], target, reduction="none")
        return (bce * valid).sum() / (valid.sum() * M)

    def distill(self, idx, loops):
        """
        MELT's phase 2, attention-aligned distillation (arXiv 2605.07721): the frozen looped
        model it was converted from teaches it, L = KL(p_teacher || p_student) + lambda_attn *
        mean over every (layer, loop) visit of MSE(o_student, sg(o_teacher)), o the attention
        output (after its projection). The paper's weight is 0.1; the form of its KD term is not
        given: here the token-mean KL at temperature 1, and the MSE a mean over elements.
        """
        attention = lambda m: [a for a in m.modules() if isinstance(a, Attention)]  # noqa: E731
        pairs = list(zip(attention(self.model), attention(self.teacher)))
        outputs = {}  # attention module -> {visit slot: [outputs, chunk after chunk]}

        def keep(module, args, out):  # (Attention.forward's fourth argument is the visit's slot)
            outputs.setdefault(module, {}).setdefault(args[3], []).append(out)
        hooks = [a.register_forward_hook(keep) for pair in pairs for a in pair]
        try:
            with torch.no_grad():
                t_logits, _ = self.teacher(idx, loops=loops)
            s_logits, _ = self.model(idx, loops=loops)
        finally:
            for hook in hooks:
                hook.remove()
        kd = F.kl_div(F.log_softmax(s_logits, -1).flatten(0, 1), F.log_softmax(t_logits, -1).flatten(0, 1),
                      log_target=True, reduction="batchmean")
        mse = [F.mse_loss(torch.cat(outputs[s][slot], dim=1), torch.cat(outputs[t][slot], dim=1))
               for s, t in pairs for slot in outputs.get(s, {})]
        return kd + self.lambda_attn * torch.stack(mse).mean()


def sample_short_route(L, rng):
    """
    LoopFormer's random shortcut route on the 1/L grid: S ~ U{1..L-1} steps;
    each of the first S-1 steps draws its size from {1/L, 2/L, ...}, leaving at least 1/L
    for every step still to come; the last step takes the rest. rng: numpy Generator.
    """
    S = int(rng.integers(1, L))
    units, left = [], L
    for k in range(S - 1):
        u = int(rng.integers(1, left - (S - 1 - k) + 1))  # leave >= 1 unit per later step
        units.append(u)
        left -= u
    units.append(left)
    return [u / L for u in units]


@torch.no_grad()
def residual_rms(model, idx, loops=None, record=None):
    """FLT's stability diagnostic: RMS over features of each loop's output h_t, averaged
    over batch and sequence; one float per loop t = 1..M. record: as in trunk."""
    record = {} if record is None else record
    model.trunk(idx, model.steps(loops), record=record)
    return [s.float().pow(2).mean(-1).sqrt().mean().item() for s in record["states"]]


# ---- the token files ------------------------------------------------------------------------------

def load_split(data_dir, meta, split, suffix="", dtype=None):
    """data_dir/{split}{suffix}.bin as a read-only memmap: the tokens in the dtype the dataset's
    meta.json records (uint16, or uint32 for a vocabulary above 65,536; uint16 when it records
    none), or dtype (a task's uint8 masks and groups)."""
    return np.memmap(os.path.join(data_dir, f"{split}{suffix}.bin"), dtype=dtype or token_dtype(meta), mode="r")


def text_batch(data, rng, B, T):
    """B random windows of T + 1 tokens from data (a split's tokens): inputs and next-token targets, int64."""
    ix = rng.integers(0, len(data) - T - 1, size=B)
    x = torch.from_numpy(np.stack([data[i:i + T].astype(np.int64) for i in ix]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + T].astype(np.int64) for i in ix]))
    return x, y


# ---- FSDP (fsdp=True) -----------------------------------------------------------------------------
# DDP keeps the whole model, its gradients and its optimizer state on every GPU (16 bytes a
# parameter with AdamW in fp32). FSDP2 (torch's fully_shard) keeps 1/W of each on each of the
# W ranks and all-gathers a block's weights just before the block runs. Checkpoints stay one
# whole state dict, written by rank 0, the format one process writes and reads.

def shard(objective):
    """
    Shard every block, then the root (the Objective: embedding, head, norms, the extensions'
    small parts). A prelude or coda block is gathered for its forward, freed, gathered again
    for its backward. A core block runs every loop: gathered per visit it would cost 2 x
    n_loops all-gathers a step, so it stays whole from its first visit until reshard_core
    after the step's last backward (one all-gather a step; the whole core stays in memory).
    """
    core = set(objective.model.core)
    for module in objective.modules():
        if isinstance(module, Block):  # (a MELT teacher's blocks too)
            fully_shard(module, reshard_after_forward=module not in core)
            if module in core:
                module.set_reshard_after_backward(False)  # (backward would free it after each loop's)
    fully_shard(objective)


def reshard_core(model):
    """Free the core's gathered weights (before the optimizer changes the shards they came from)."""
    for block in model.core:
        block.reshard()


def whole(t):
    """A DTensor (a shard, or a partial result such as a norm) as the whole tensor, gathered
    on every rank (every rank must call it, in the same order); other values as they are."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gathered_state(state, keep):
    """An optimizer's state_dict() with every shard gathered whole onto the CPU: the format
    one process saves (keep=False, for ranks that only take part in the gathers: no copy)."""
    if isinstance(state, dict):
        return {k: gathered_state(v, keep) for k, v in state.items()}
    if isinstance(state, DTensor):
        full = state.full_tensor()
        return full.cpu() if keep else None
    return state


def sharded_state(state, optimizer):
    """A whole optimizer state dict (as saved) made ready for an optimizer over sharded
    parameters: each state tensor the shape of its parameter becomes this rank's shard of it."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = dict(state, state={})
    for i, s in state["state"].items():
        p = params[i]
        out["state"][i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                           if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                           for k, v in s.items()}
    return out


def main():
    # ---- configuration -----------------------------------------------------------------------

    train_defaults = train_config_defaults()
    model_defaults = model_config_defaults()
    args, explicit = parse_args(sys.argv[1:], {**train_defaults, **model_defaults}, default_config="tiny")
    try:  # TrainConfig checks its own settings (configs/__init__.py); the model's and the data's are below
        tc = TrainConfig(**{k: args[k] for k in train_defaults})
    except ValueError as e:
        fail(str(e))

    # ---- distributed setup -------------------------------------------------------------------

    ddp = int(os.environ.get("RANK", -1)) != -1  # under torchrun: DDP, or FSDP with fsdp=True
    if tc.fsdp and not ddp:
        fail("fsdp=True shards the model over torchrun's processes: torchrun --nproc_per_node=N train.py ... "
             "(N = 1 runs too, without any saving)")
    fsdp = tc.fsdp and not tc.eval_only  # (an evaluation alone has no gradients or optimizer state to shard)
    device = detect_device(tc.device)
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        # device_id binds NCCL to this rank's GPU (without it, barrier() guesses and warns)
        cuda = device.startswith("cuda")
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    else:
        rank, local_rank, world = 0, 0, 1
    master = rank == 0
    if tc.grad_accum_steps % world:
        fail(f"grad_accum_steps={tc.grad_accum_steps} must be divisible by the number of processes ({world})")
    accum_local = tc.grad_accum_steps // world
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cuda":  # fp32 matmuls (dtype=float32) may use TF32 tensor cores
        torch.set_float32_matmul_precision("high")
    autocast, dtype = autocast_context(device, tc.dtype)  # bf16 autocast on CUDA by default


    def log(msg):
        if master:
            tqdm.write(msg)


    # ---- data --------------------------------------------------------------------------------

    data_dir = tc.data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", tc.dataset)
    meta_path = os.path.join(data_dir, "meta.json")
    stale = False  # a task made by an older generator is made again (rank 0 checks, the others wait)
    if master and tc.dataset.startswith("tasks/") and os.path.exists(meta_path):
        from data.tasks.prepare import VERSION as TASKS_VERSION
        with open(meta_path) as f:
            stale = json.load(f).get("version") != TASKS_VERSION
    if stale or not os.path.exists(meta_path):
        if tc.dataset == "pydoc":  # the built-in corpus needs no network: make it on first use
            if master:
                print(f"first use: preparing the built-in corpus (Python's pydoc topics) into {data_dir} ...")
                from data.pydoc.prepare import prepare
                prepare(out_dir=data_dir)
        elif tc.dataset.startswith("tasks/"):  # synthetic tasks: generated offline in seconds
            from data.tasks.prepare import TASKS, prepare as prepare_task
            task = tc.dataset.split("/", 1)[1]
            if task not in TASKS:
                fail(f"dataset '{tc.dataset}': unknown task (valid: {', '.join('tasks/' + t for t in TASKS)})")
            if master:
                print(f"{'made by an older generator, regenerating' if stale else 'first use: generating'} "
                      f"the '{task}' task into {data_dir} ...")
                prepare_task(task, out_dir=data_dir)
        else:
            fail(f"dataset '{tc.dataset}' is not prepared (no {meta_path}); prepare it with: "
                 f"python data/{tc.dataset}/prepare.py")
    if ddp and tc.init_from.startswith("hf:") and not tc.resume and local_rank == 0:
        hf_folder(tc.init_from[3:])  # one download per machine: its other ranks read these files
    if ddp:
        dist.barrier()  # the other ranks wait for rank 0 to prepare the data (and a released model)
    remake = f"delete {data_dir} and prepare it again" + ("" if tc.dataset in ("pydoc",) or tc.dataset.startswith("tasks/")
                                                         else f": python data/{tc.dataset}/prepare.py")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        enc = load_tokenizer(meta["tokenizer"])
        tokens_dtype = token_dtype(meta)  # uint16, or uint32 above 65,536 tokens
    except RuntimeError as e:  # GPT-2's BPE files need a network the first time
        fail(str(e))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, not a tokenizer, ...
        fail(f"{meta_path} is not a dataset description this code reads ({type(e).__name__}: {e}); {remake}")
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path) or os.path.getsize(path) % tokens_dtype.itemsize:
            fail(f"{path} is missing or truncated (not whole {tokens_dtype} tokens); {remake}")
    token_bytes = torch.tensor(token_byte_lengths(enc), dtype=torch.float32, device=device)
    is_task = meta.get("format") == "task"  # rows of prompt + answer, loss on the answer only


    def split_file(split, suffix="", dtype=None):
        return load_split(data_dir, meta, split, suffix, dtype)


    def to_device(*tensors):
        if device_type == "cuda":
            return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
        return tensors


    def task_rows(split, ix):
        """Task rows ix: inputs, targets (-1 off the answer) and groups."""
        L = meta["row_len"]
        rows = split_file(split).reshape(-1, L)[ix].astype(np.int64)
        mask = split_file(split, "_mask", np.uint8).reshape(-1, L)[ix]
        y = np.where(mask[:, 1:] == 1, rows[:, 1:], -1)
        return torch.from_numpy(rows[:, :-1]), torch.from_numpy(y), split_file(split, "_group", np.uint8)[ix]


    def get_batch(split, rng, B, T):
        if is_task:  # B random examples
            x, y, _ = task_rows(split, np.sort(rng.integers(0, meta[f"{split}_rows"], size=B)))
            return to_device(x, y)
        data = split_file(split)  # a fresh memmap per batch avoids a known memory leak (nanoGPT)
        if len(data) <= T + 1:
            fail(f"{split}.bin has {len(data)} tokens, fewer than block_size+1={T + 1}")
        return to_device(*text_batch(data, rng, B, T))


    # ---- model, optimizer, resume -----------------------------------------------------------

    def cfg_shape(c):
        return f"{c.n_prelude} + {c.n_core}⊗{c.n_loops} + {c.n_coda}"


    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    model_keys = {k: args[k] for k in model_defaults}
    source = None  # uptraining: the pretrained model this run starts from
    teacher = None  # MELT's phase 2: the looped model this one was converted from, frozen
    if tc.init_from and not tc.resume:
        if tc.init_core not in INIT_CORES:
            fail(f"init_core={tc.init_core!r} (valid: {', '.join(INIT_CORES)})")
        try:
            if tc.init_from.startswith("hf:"):  # a released model, looped or plain (data/huggingface.py)
                hf_keys, hf_weights, hf_tokenizer = load_hf_model(tc.init_from[3:])
                source = build_hf_model(hf_keys, hf_weights, torch.float32)
                hf_keys = source.config.to_dict()  # (with what the weights decided, e.g. Parcae's value_embeds)
                del hf_weights
                source_ckpt = {"model_config": hf_keys, "data_meta": {"tokenizer": hf_tokenizer}, "iter_num": None}
            else:
                source_ckpt = load_checkpoint(os.path.join(tc.init_from, "ckpt.pt"))
                source = model_from_checkpoint(source_ckpt)
            try:
                source_depth = len(unrolled_blocks(source))
            except ValueError:
                source_depth = None  # a loop with injection etc.: only a model of its own shape starts from it
        except (ValueError, SystemExit) as e:  # (SystemExit: a download that failed, in one line)
            fail(f"init_from={tc.init_from}: {str(e).removeprefix('error: ')}")
        if source_ckpt["data_meta"].get("tokenizer") != meta["tokenizer"]:
            fail(f"init_from={tc.init_from} was trained with another tokenizer than {data_dir} has" +
                 (f"; tokenize the data with it: python data/{tc.dataset}/prepare.py --tokenizer={tc.init_from} "
                  f"--out_dir=DIR, then --data_dir=DIR" if tc.init_from.startswith("hf:") else ""))
        # the source's model keys unless given here (on the command line, or in a config named
        # there: the default config's keys do not count); its layers decide the loop count
        named = any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:])
        given = {k for k, src in explicit.items() if src == "command line" or named}
        model_keys.update({k: v for k, v in source_ckpt["model_config"].items() if k not in given})
        if "n_loops" not in given and source_depth is not None:
            replaced = source_depth - model_keys["n_prelude"] - model_keys["n_coda"]
            model_keys["n_loops"] = max(1, replaced // max(1, model_keys["n_core"]))
    if "vocab_size" not in explicit and source is None:  # from the data, padded to a multiple of 64 for fast matmuls
        model_keys["vocab_size"] = (enc.n_vocab + 63) // 64 * 64
    if model_keys["vocab_size"] < enc.n_vocab:
        fail(f"vocab_size={model_keys['vocab_size']} is smaller than the tokenizer's {enc.n_vocab} tokens")
    iter_num, best_val_loss = 0, float("inf")
    if tc.resume:
        try:
            ckpt = load_checkpoint(ckpt_path)
        except ValueError as e:
            fail(str(e))
        if ckpt["data_meta"].get("tokenizer") != meta["tokenizer"]:
            fail(f"{ckpt_path} was trained with another tokenizer than {data_dir} has")
        if ckpt["version"] < 3 and ckpt["model_config"].get("lora_rank") and not tc.eval_only:
            # (its weights load: model_from_checkpoint moves them into the layers; its optimizer's state is
            # in the old parameter order)
            fail(f"{ckpt_path} keeps per-loop LoRA in the layout before checkpoint version 3: its weights load for "
                 f"sampling and evaluation, but its optimizer state cannot resume; start a new run from it with "
                 f"--init_from={tc.out_dir} --out_dir=NEW")
        # the checkpoint's model config wins, except for keys given on the command line (e.g.
        # n_loops); a config file's model keys never silently reinterpret trained weights
        changed = {k: model_keys[k] for k, src in explicit.items() if k in model_defaults and src == "command line"}
        kept = [f"{k} (checkpoint {ckpt['model_config'][k]!r}, config {model_keys[k]!r})" for k, src in explicit.items()
                if src == "config" and k in ckpt["model_config"] and ckpt["model_config"][k] != model_keys[k]
                and k != "vocab_size"]
        if kept and master:
            print(f"note: the checkpoint's model settings win over configs/{args['config']}.py for: {', '.join(kept)}; "
                  f"give --key=value to change them")
        try:
            model = model_from_checkpoint(ckpt, changed)
        except ValueError as e:
            fail(str(e))
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    else:
        torch.manual_seed(tc.seed)
        try:  # a bad or impossible model (e.g. position tables larger than memory) stops here
            model = LoopGPT(LoopGPTConfig(**model_keys))
        except ValueError as e:
            fail(str(e))
        if source is not None:
            try:
                lora_errors = init_from_source(model, source, tc.init_core)
            except ValueError as e:
                fail(f"init_from={tc.init_from}: {e}")
            if master and source_depth is None:  # the same loop, copied as it is
                new = sorted({n.split(".")[0] if not n.startswith("core.") else n.split(".")[2]
                              for n in model.state_dict() if n not in source.state_dict()})
                print(f"initialised from {tc.init_from}/ckpt.pt (trained {source_ckpt['iter_num']} steps): the same "
                      f"{cfg_shape(model.config)} loop, copied; new parameters keep their init: {', '.join(new) or 'none'}")
            elif master:
                c = model.config
                trained = "" if source_ckpt["iter_num"] is None else f", trained {source_ckpt['iter_num']} steps"
                print(f"initialised from {tc.init_from}{'' if tc.init_from.startswith('hf:') else '/ckpt.pt'} "
                      f"({source_depth} layers{trained}): {cfg_shape(c)}, core from "
                      f"init_core={tc.init_core}" + "".join(f"; {k} from SVD, mean relative error {sum(v) / len(v):.3g}"
                                                            for k, v in lora_errors.items()))
                # the staged dynamics LoopUS splits by: how much each source layer turns the state
                T_sim = min(model_keys["block_size"], source.config.block_size)
                sims = layer_similarity(source, get_batch("val", np.random.default_rng([tc.seed, 4]), 4, T_sim)[0].cpu())
                print("source layers' cos(input, output): " + " ".join(f"{s:.2f}" for s in sims) +
                      " (a middle run of high values loops well)")
            teacher = source if tc.melt_distill else None  # MELT's phase 2 distills from the source
            del source
    cfg = model.config
    if cfg.tie_embeddings and tc.embedding_lr:
        fail("tie_embeddings=True: wte is lm_head, one matrix trained at head_lr; embedding_lr would be ignored")
    if tc.loop_sampling == "per_sequence" and per_sequence_problem(cfg):
        fail(f"loop_sampling=per_sequence: {per_sequence_problem(cfg)}")
    sweep_exits = []  # (spec, (kind, threshold)) for eval_only's sweep, checked now rather than after the budgets
    for spec in filter(None, tc.sweep_exits.split(",")):
        try:
            sweep_exits.append((spec, parse_exit(spec, cfg)))
        except ValueError as e:
            fail(f"sweep_exits: '{spec}': {e}")
    if tc.gate_stage and not cfg.exit_gate:
        fail("gate_stage trains Ouro's exit gate: the model needs exit_gate=True")
    if (tc.melt_transition or tc.melt_distill) and not cfg.melt:
        fail("melt_transition / melt_distill post-train a MELT model: it needs melt=True")
    if tc.melt_transition < 0 or tc.lambda_attn < 0:
        fail("need melt_transition >= 0 and lambda_attn >= 0")
    if tc.melt_distill:
        if not tc.init_from or tc.init_from.startswith("hf:"):
            fail("melt_distill distills from the looped model this one was converted from: give its --init_from=OUT_DIR")
        if tc.objective != "final" or tc.step_loss != "final" or tc.gate_stage or tc.loop_sampling == "per_sequence":
            fail("melt_distill has its own loss: objective=final, step_loss=final, no gate_stage, a depth shared by the batch")
        try:  # (loaded above as the conversion's source, except on resume)
            teacher = teacher or model_from_checkpoint(load_checkpoint(os.path.join(tc.init_from, "ckpt.pt")))
        except ValueError as e:
            fail(f"init_from={tc.init_from}: {e}")
        if teacher.config.melt or any(getattr(teacher.config, k) != getattr(cfg, k) for k in ("n_prelude", "n_core", "n_coda")):
            fail(f"melt_distill: init_from={tc.init_from} must be the looped model of this shape this one was converted from")
        teacher.to(device).eval().requires_grad_(False)
    model.to(device)
    if tc.gate_stage == 2:  # Ouro's stage 2: the LM is frozen, only the exit gate learns
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("exit_gate"))
    frozen = tuple(filter(None, tc.freeze.split(",")))
    if frozen:
        names = [name for name, _ in model.named_parameters()]
        under = lambda name, f: name == f or name.startswith((f + ".", f + "_"))  # noqa: E731
        unknown = [f for f in frozen if not any(under(n, f) for n in names)]
        if unknown:
            fail(f"freeze={tc.freeze!r}: no parameter is named {', '.join(unknown)}; names start with "
                 f"{', '.join(sorted({n.split('.')[0] for n in names}))}")
        for name, p in model.named_parameters():
            if any(under(name, f) for f in frozen):
                p.requires_grad_(False)
        if cfg.tie_embeddings and "wte" in frozen:
            fail("freeze=wte with tie_embeddings=True would freeze the head too (it is the same matrix)")
    raw_model = model
    compile_kwargs = {"mode": tc.compile_mode} if tc.compile_mode else {}
    if tc.compile and tc.compile_scope == "blocks":
        # compile each block, not the model: the loop stays in Python, so every budget M (a
        # depth sampled per step, an eval sweep) reuses the same compiled blocks. Compiling
        # the whole model would unroll the loop and compile once more for every new M.
        # (Under FSDP the compiled blocks are then sharded: FSDP's gathers run in hooks that
        # dynamo skips, so all blocks still share one graph with no graph break, in either order.)
        compile_blocks(raw_model, **compile_kwargs)
    # the training loss around the model (the objectives above); DDP wraps it, teacher and all,
    # or FSDP shards it (the optimizer is then made over the shards)
    model = Objective(raw_model, tc.lambda_short, tc.lambda_cons, tc.gate_stage, tc.gate_beta, tc.gate_k, tc.gate_gamma,
                      tc.lambda_mono, teacher=teacher, lambda_attn=tc.lambda_attn, loss_chunk=tc.loss_chunk)
    if fsdp:
        shard(model)
    elif ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    if tc.compile and tc.compile_scope == "step":
        # the whole training forward and loss as one graph (the loop unrolled): one launch
        # stream with no Python between blocks, which a small width (each kernel short) needs
        # on a GPU. A new budget M compiles again, so it suits a fixed train budget; the
        # evaluation runs the model itself, eagerly.
        model = torch.compile(model, dynamic=False, **compile_kwargs)
    optimizer = configure_optimizer(raw_model, tc.weight_decay, tc.learning_rate, (tc.beta1, tc.beta2), tc.optimizer,
                                    tc.muon_lr, tc.embedding_lr, tc.head_lr, tc.adam_eps)
    if tc.resume and not tc.eval_only:  # (an evaluation needs no optimizer state)
        trained_with = ckpt["train_config"].get("optimizer", "adamw")
        if trained_with != tc.optimizer:
            fail(f"{ckpt_path} was trained with optimizer={trained_with}; resume with that (got optimizer={tc.optimizer})")
        if ckpt["train_config"].get("gate_stage") == 2 or tc.gate_stage != 2:
            for key in ("embedding_lr", "head_lr"):  # set or not decides the groups (wte and lm_head have one shape)
                if bool(ckpt["train_config"].get(key, 0.0)) != bool(getattr(tc, key)):
                    fail(f"{ckpt_path} was trained with {key}={ckpt['train_config'].get(key, 0.0)}, this run has "
                         f"{key}={getattr(tc, key)}: set or not (0) decides the optimizer's groups; resume as trained")
            settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            optimizer.load_state_dict(sharded_state(ckpt["optimizer"], optimizer) if fsdp else ckpt["optimizer"])
            for group, fresh in zip(optimizer.param_groups, settings):  # the loaded groups bring the checkpoint's
                group.update(fresh)  # settings: this run's lr_scale (learning_rate, muon_lr, ...), eps, decay win
        elif master:  # e.g. stage 2 starting from a stage-1 checkpoint: other parameters train now
            print("note: gate_stage=2 trains only the exit gate: it gets a fresh optimizer")
    if tc.resume:
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device_type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        del ckpt

    if tc.objective == "shortcut" and cfg.modulation != "loopformer":
        fail("objective=shortcut samples schedules with unequal steps: it needs modulation=loopformer")
    if tc.objective != "final" and cfg.n_loops < 2:
        fail(f"objective={tc.objective} needs a short route shorter than the full one: n_loops >= 2")
    T = cfg.block_size
    if is_task:  # a step reads whole examples: rows of row_len tokens
        T = meta["row_len"] - 1
        if T > cfg.block_size:
            fail(f"task rows have {T} tokens, more than block_size={cfg.block_size}")
    tokens_per_step = tc.batch_size * T * tc.grad_accum_steps
    eval_budgets = tc.eval_budgets or tuple(sorted({1, max(1, cfg.n_loops // 2), cfg.n_loops, 2 * cfg.n_loops}))
    if any(m < 1 for m in eval_budgets):
        fail(f"eval_budgets must all be >= 1, got {eval_budgets}")
    deepest = max(tc.loop_max or cfg.n_loops, cfg.n_loops, *eval_budgets)
    try:  # what a training step keeps for backward at the deepest budget, and one eval's cache-free forward
        check_fits(activation_bytes(cfg, tc.batch_size, T, deepest), f"a training step at {deepest} loops, "
                   f"batch_size={tc.batch_size}, {T} tokens (activations, roughly)", device)
    except ValueError as e:
        fail(f"{e}; lower batch_size, block_size or the loops, or set bptt_k / checkpoint_loops=True")
    eval_tasks = []
    if tc.eval_tasks:  # checked now, not at the first eval: a missing download fails before training
        from eval import EVAL_DATA, evaluate_tasks, resolve_tasks
        eval_tasks = resolve_tasks(tc.eval_tasks, EVAL_DATA)
    peak_flops = gpu_peak_flops(device)[0] if device_type == "cuda" else None

    if master:
        make_dir(tc.out_dir)
        print(summary(raw_model))
        what = (f"{meta['task']} task, {meta['train_rows']:,} train / {meta['val_rows']:,} val examples" if is_task else
                f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, vocab {enc.n_vocab}")
        print(f"data: {data_dir} ({what}) | "
              f"device {device} x{world}, {dtype} | {tokens_per_step:,} tokens/step | "
              f"{'resuming at step ' + str(iter_num) if tc.resume else 'from ' + tc.init_from if tc.init_from else 'from scratch'}")


    def recurrence_target(step, L):
        """The target depth L at this step: L, or during the recurrence curriculum's warmup
        (McLeish et al. 2025, arXiv 2511.07384) max(1, ceil(L f(step / W)))."""
        W = tc.recurrence_warmup * tc.max_iters
        if step >= W:
            return L
        u = step / W
        return max(1, math.ceil(L * (u if tc.recurrence_schedule == "linear" else 1 - math.sqrt(1 - u))))


    def sample_depth(step, m):
        """Loops for this step: an int, the same on every rank (seeded by the step alone), or
        for per_sequence a (batch_size,) tensor of per-row depths for global micro-step m."""
        L = recurrence_target(step, cfg.n_loops)
        rng = np.random.default_rng([tc.seed, 3, step] + ([m] if tc.loop_sampling == "per_sequence" else []))
        size = tc.batch_size if tc.loop_sampling == "per_sequence" else None
        if tc.loop_sampling == "fixed":
            M = np.full(size or (), L)
        elif tc.loop_sampling == "uniform":
            top = recurrence_target(step, tc.loop_max or cfg.n_loops)
            M = rng.integers(min(tc.loop_min, top), top + 1, size=size)
        elif tc.loop_sampling == "poisson_lognormal":  # Huginn: a log-normal Poisson with mean ~ L, plus one
            tau = rng.normal(math.log(L) - tc.loop_sigma ** 2 / 2, tc.loop_sigma, size=size)
            M = rng.poisson(np.exp(tau)) + 1
        else:  # per_sequence, Parcae: max(1, Poisson(L)) for each row (mean ~ L, variance ~ L)
            M = rng.poisson(L, size=size)
        sampled = tc.loop_sampling != "fixed"  # loop_min / loop_max bound sampled depths only
        cap = tc.loop_max if tc.loop_max and sampled and tc.loop_sampling != "uniform" else None
        if tc.curriculum_start:  # L_max(s) = min(L_target, L0 + k s)
            curriculum = int(tc.curriculum_start + tc.curriculum_rate * step)
            cap = curriculum if cap is None else min(cap, curriculum)
        M = np.clip(M, tc.loop_min if sampled else 1, cap)
        return torch.as_tensor(M, device=device) if size else int(M)


    def val_batches():
        """The eval batches, split over the ranks: for text eval_iters fixed random batches (the
        same at every eval); for a task every val example, in order, with its group."""
        if not is_task:
            for i in range(rank, tc.eval_iters, world):
                yield *get_batch("val", np.random.default_rng([tc.seed, 1, i]), tc.batch_size, T), None
            return
        n = meta["val_rows"]
        for start in range(rank * tc.batch_size, n, world * tc.batch_size):
            x, y, group = task_rows("val", np.arange(start, min(start + tc.batch_size, n)))
            yield *to_device(x, y), torch.from_numpy(group.astype(np.int64)).to(device)


    def reduce_sum(t):
        """t summed over the processes (what eval.py's scoring calls to combine their shares)."""
        if ddp:
            dist.all_reduce(t)
        return t


    def accuracy_lines(acc):
        """Human-readable exact match: one line over the budgets, one per budget by group."""
        lines = ["    exact match: " + "  ".join(f"M={M} {100 * a['acc']:.1f}%" for M, a in acc.items())]
        for M, a in acc.items():
            lines.append(f"      M={M} by {meta['group_name']}: " +
                         " ".join(f"{g}:{100 * v:.0f}%" for g, v in a["by_group"].items()))
        return lines


    def eval_model():
        """The model evaluations run. Under FSDP a whole copy on every rank (uncompiled; the
        weights once more, for the eval): the ranks score different batches, at depths and
        with exits that differ, so they cannot keep FSDP's per-block gathers in step."""
        if not fsdp:
            return raw_model
        weights = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True))
        copy = build_hf_model(cfg.to_dict(), weights).to(device)  # (built on the meta device: no random init first)
        if cfg.melt:
            copy.melt_alpha = raw_model.melt_alpha
        return copy


    @torch.no_grad()
    def evaluate():
        model = eval_model().eval()
        # val loss and bits per byte at every eval budget (one pass to the largest), tasks' exact match per group
        res = score_batches(model, val_batches(), [(f"M={M}", {"loops": M}) for M in eval_budgets], autocast,
                            token_bytes, meta["val_groups"] if is_task else None, reduce_sum)
        results = {M: res[f"M={M}"] for M in eval_budgets}
        # FLT's stability diagnostic: RMS of each loop's output h_t, at the train budget, on one val batch
        x, _ = get_batch("val", np.random.default_rng([tc.seed, 1, 0]), tc.batch_size, T)
        record = {}  # (MoR: the router's choices on the same batch, for the recursions per token)
        with autocast:
            rms = residual_rms(model, x, cfg.n_loops, record)
        routes = record.get("routes", [])
        raw_model.train()
        return results, rms, sum(sel.float().mean().item() for _, _, sel in routes) or None


    @torch.no_grad()
    def evaluate_on_tasks():
        """eval.py's tasks at the eval budgets (nanochat runs CORE this way): one line, and log.jsonl."""
        routes = [(f"M={M}", {"loops": M}) for M in eval_budgets]
        res = evaluate_tasks(eval_model(), enc, eval_tasks, routes, device, autocast, {**meta, "data_dir": data_dir},
                             max_per_task=tc.eval_tasks_max, max_text_tokens=tc.eval_iters * tc.batch_size * T, rank=rank,
                             world=world, reduce=reduce_sum)
        parts = []
        for label, r in res.items():
            if label == "CORE":
                parts.append("CORE " + "/".join(f"{r[n]:.3f}" for n, _ in routes))
            elif "bpb" in r[routes[0][0]]:
                parts.append(f"{label} bpb " + "/".join(f"{r[n]['bpb']:.3f}" for n, _ in routes))
            else:
                parts.append(f"{label} " + "/".join(f"{100 * r[n]['acc']:.0f}" for n, _ in routes))
        log(f"    tasks at M={','.join(map(str, eval_budgets))} (accuracy %): " + " | ".join(parts))
        write_jsonl({"type": "tasks", "step": iter_num, "max_per_task": tc.eval_tasks_max, "results": res})


    def checkpoint():
        """Rank 0 writes the checkpoint; under FSDP every rank first takes part in gathering it whole."""
        weights, optimizer_state = raw_model.state_dict(), optimizer.state_dict()
        if fsdp:  # (cpu_offload: rank 0 keeps each gathered tensor on the CPU, the others drop it)
            weights = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if cfg.tie_embeddings and master:  # one tensor under both names, as raw_model.state_dict() has it
                weights["lm_head.weight"] = weights["wte.weight"]
            optimizer_state = gathered_state(optimizer_state, keep=master)
        if not master:
            return
        save_checkpoint({
            "version": CHECKPOINT_VERSION,
            "model": weights,
            "optimizer": optimizer_state,
            "model_config": cfg.to_dict(),
            "train_config": asdict(tc),
            "iter_num": iter_num,
            "best_val_loss": best_val_loss,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None},
            "data_meta": meta,
        }, ckpt_path)


    def write_jsonl(record):
        if master:
            with open(os.path.join(tc.out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")


    # ---- the training loop -----------------------------------------------------------------

    # what this run is, first in the log: enough to recompute its FLOPs and compare runs later
    write_jsonl({"type": "config", "step": iter_num, "model": cfg.to_dict(), "train": asdict(tc), "device": device,
                 "device_name": torch.cuda.get_device_name(device) if device_type == "cuda" else "cpu",
                 "world": world, "dtype": dtype, "tokens_per_step": tokens_per_step})
    if tc.eval_only:  # eval.py's budget sweep, on the val batches every eval of training reads
        raw_model.eval()
        text, record = budget_sweep(raw_model, tqdm(val_batches(), desc="sweep", disable=not master, leave=False),
                                    sweep_routes(raw_model, sweep_exits, tc.sweep_max_steps), autocast, token_bytes,
                                    meta["val_groups"] if is_task else None, meta.get("group_name"), reduce_sum)
        log(text)
        write_jsonl({"type": "budget_sweep", "step": iter_num, **record})
        if ddp:
            dist.destroy_process_group()
        sys.exit(0)

    if tc.init_from and not tc.resume:  # what the conversion alone gives, before any uptraining
        res, rms, _ = evaluate()
        log("step 0 (converted, before training) | val loss (bpb): "
            + "  ".join(f"M={M} {r['loss']:.3f} ({r['bpb']:.3f})" for M, r in res.items()))
        write_jsonl({"type": "eval", "step": 0, "train_loss": None, "val": {str(M): r for M, r in res.items()},
                     "residual_rms": rms, "converted_from": tc.init_from})
    pbar = tqdm(total=tc.max_iters, initial=iter_num, disable=not master, dynamic_ncols=True, desc="train")
    t_start = time.time()
    tok_per_s = None
    last_saved = iter_num if tc.resume else None  # the step of the checkpoint on disk
    try:
        while iter_num < tc.max_iters:
            t0 = time.time()
            lr = get_lr(iter_num, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]  # e.g. Muon's matrices: muon_lr / learning_rate
                if group.get("use_muon"):
                    group["momentum"] = muon_momentum(iter_num, tc.muon_momentum_warmup)
            loss_sum = torch.zeros((), device=device)
            loops_used = []
            for micro in range(accum_local):
                m = rank * accum_local + micro  # this process's share of the global micro-steps
                x, y = get_batch("train", np.random.default_rng([tc.seed, 0, iter_num, m]), tc.batch_size, T)
                if ddp and not fsdp:  # all-reduce gradients only on the last micro-step
                    model.require_backward_grad_sync = micro == accum_local - 1
                # (FSDP reduce-scatters every micro-step's gradients into the shards: skipping that with
                # set_requires_gradient_sync would hold every parameter's whole gradient in between)
                depth = sample_depth(iter_num, m)
                route = {"depths": depth} if torch.is_tensor(depth) else {"loops": depth}
                loops_used.append(depth.float().mean().item() if torch.is_tensor(depth) else depth)
                # the auxiliary short route, seeded by the local micro-step: every rank draws the same one
                # (LoopFormer's code draws one per rank, seed 1337 + rank), so a micro-step's gradient is one route's
                short = None
                if tc.objective != "final":
                    route_rng = np.random.default_rng([tc.seed, 2, iter_num, micro])
                    short = (sample_short_route(cfg.n_loops, route_rng) if tc.objective == "shortcut"
                             else int(route_rng.integers(1, cfg.n_loops)))
                extra = {}
                if tc.step_loss != "final":  # per-step supervision: all loops, or the last third (FLT's FEW)
                    M = route["loops"]
                    extra["step_weights"] = [1.0 if tc.step_loss == "all" or t >= 2 * M // 3 else 0.0 for t in range(M)]
                if cfg.melt:  # MELT's phase 1: α from 0 to 1 over melt_transition steps
                    raw_model.melt_alpha = min(1.0, iter_num / tc.melt_transition) if tc.melt_transition else 1.0
                with autocast:  # (MELT's phase 2 distills from the teacher after its transition)
                    loss = model(x, y, short=short, distill=teacher is not None and iter_num >= tc.melt_transition,
                                 **route, **extra)
                (loss / accum_local).backward()
                loss_sum += loss.detach()
            if fsdp:  # (the core stayed whole over the micro-steps; the optimizer now changes its shards)
                reshard_core(raw_model)
            if ddp:
                dist.all_reduce(loss_sum)
                if tc.loop_sampling != "per_sequence":  # by construction every rank ran the same depth: check it
                    depths = torch.tensor([loops_used[0], -loops_used[0]], device=device)
                    dist.all_reduce(depths, op=dist.ReduceOp.MAX)
                    if depths[0] != -depths[1]:
                        fail(f"ranks disagree on the loop count at step {iter_num}: {depths.tolist()}")
            train_loss = loss_sum.item() / tc.grad_accum_steps
            mean_loops = sum(loops_used) / len(loops_used)
            if not math.isfinite(train_loss):
                pbar.close()
                fail(f"loss is {train_loss} at step {iter_num + 1}: training stopped, nothing saved; "
                     f"the last good checkpoint (if any) is still {ckpt_path}. Try a lower learning_rate.")
            # FLT's stability diagnostic: gradient L2 norm of the first core block's MLP, before clipping
            mlp_grads = [whole(p.grad.norm()) for p in raw_model.core[0].mlp.parameters() if p.grad is not None]
            mlp_grad_norm = torch.linalg.vector_norm(torch.stack(mlp_grads)).item() if mlp_grads else 0.0
            grad_norm = whole(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                             tc.grad_clip if tc.grad_clip > 0 else float("inf")))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1

            dt = time.time() - t0
            if iter_num > 1 or tc.resume:  # the first step pays for warm-up; keep it out of the average
                tok_per_s = tokens_per_step / dt if tok_per_s is None else 0.9 * tok_per_s + 0.1 * tokens_per_step / dt
            mfu = (flops_per_token(raw_model, max(1, round(mean_loops))) * tok_per_s / (peak_flops * world)
                   if (peak_flops and tok_per_s) else None)
            pbar.update(1)
            pbar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_per_s or 0:,.0f}",
                             mfu=f"{100 * mfu:.1f}%" if mfu else "n/a")
            if iter_num % tc.log_interval == 0:
                write_jsonl({"type": "train", "step": iter_num, "loss": train_loss, "lr": lr, "loops": mean_loops,
                             "grad_norm": grad_norm.item(), "core0_mlp_grad_norm": mlp_grad_norm, "tok_per_s": tok_per_s, "mfu": mfu,
                             "step_ms": 1000 * dt, "elapsed_s": time.time() - t_start,
                             "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device_type == "cuda" else None})

            if iter_num % tc.eval_interval == 0 or iter_num == tc.max_iters:
                res, rms, recursions = evaluate()
                val = res[cfg.n_loops]["loss"] if cfg.n_loops in res else min(r["loss"] for r in res.values())
                per_budget = "  ".join(f"M={M} {r['loss']:.3f} ({r['bpb']:.3f})" for M, r in res.items())
                log(f"step {iter_num}/{tc.max_iters} | train {train_loss:.3f} | val loss (bpb): {per_budget} | "
                    f"lr {lr:.2e} | {time.time() - t_start:.0f}s")
                log(f"    residual rms per loop: {' '.join(f'{r:.2f}' for r in rms)} | "
                    f"core[0] mlp grad norm {mlp_grad_norm:.3f}"
                    + (f" | MoR recursions/token {recursions:.2f} of {cfg.n_loops}" if recursions else ""))
                if is_task:
                    log("\n".join(accuracy_lines({M: r["accuracy"] for M, r in res.items()})))
                write_jsonl({"type": "eval", "step": iter_num, "train_loss": train_loss,
                             "val": {str(M): r for M, r in res.items()}, "residual_rms": rms, "mor_recursions": recursions,
                             "core0_mlp_grad_norm": mlp_grad_norm, "elapsed_s": time.time() - t_start})
                improved = val < best_val_loss
                best_val_loss = min(best_val_loss, val)
                if tc.always_save_checkpoint or improved or iter_num == tc.max_iters:
                    checkpoint()
                    last_saved = iter_num
            if eval_tasks and (iter_num == tc.max_iters or (tc.eval_tasks_interval and iter_num % tc.eval_tasks_interval == 0)):
                evaluate_on_tasks()
    except KeyboardInterrupt:  # Ctrl-C: no traceback; the checkpoint on disk is whole (written by rename)
        pbar.close()
        if os.path.exists(ckpt_path + ".tmp"):
            os.remove(ckpt_path + ".tmp")
        again = " ".join(["python train.py", *sys.argv[1:]] + ([] if tc.resume else ["--resume=True"]))
        saved = (f"the last checkpoint, step {last_saved}, is {ckpt_path}; continue with: {again}" if last_saved is not None
                 else "no checkpoint was written yet")
        log(f"interrupted at step {iter_num}/{tc.max_iters}: {saved}")
        sys.exit(130)
    pbar.close()
    if master:
        print(f"done: {iter_num} steps in {time.time() - t_start:.0f}s; checkpoint {ckpt_path}, log {tc.out_dir}/log.jsonl")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
