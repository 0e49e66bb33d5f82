"""
The command line every script shares: named configs (configs/NAME.py, plain values) and
TrainConfig (which checks itself), read nanoGPT's way (defaults -> --config NAME -> --key=value); the device and
the mixed precision they name; one-line errors (fail) and Ctrl-C without a traceback; a
plain table for the terminal. The model's flags live in loopgpt.LoopGPTConfig.
"""

import difflib
import math
import os
import re
import sys
import textwrap
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch

from loopgpt import LoopGPTConfig, check_schedule

CONFIGS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(CONFIGS_DIR)


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"          # where ckpt.pt and log.jsonl go
    dataset: str = "pydoc"        # a folder data/<dataset>/ with train.bin, val.bin, meta.json
    data_dir: str = ""            # override the folder
    eval_interval: int = 100      # evaluate (and save the checkpoint) every this many steps
    eval_iters: int = 20          # val batches per budget
    eval_budgets: tuple = ()      # loop budgets to evaluate; () = 1, L/2, L, 2L
    eval_only: bool = False       # with resume=True: eval.py's budget_sweep (M = 1..2L, exits, schedules), then exit
    sweep_max_steps: int = 4      # eval_only, modulation=loopformer: every schedule of <= this many steps
    sweep_exits: str = ""         # eval_only: per-token exits to evaluate, e.g. "kl:1e-3,latent:0.03,gate:0.9"
    eval_tasks: str = ""          # eval.py's tasks at the eval budgets during training, e.g. "core" (nanochat's CORE)
    eval_tasks_interval: int = 0  # every this many steps; 0 = at the last step only
    eval_tasks_max: int = 500     # items per task (nanochat: 500 during training); 0 = all
    log_interval: int = 10        # a line of the log (and log.jsonl) every this many steps
    always_save_checkpoint: bool = True  # False: save only when the val loss improves, and at the end
    resume: bool = False          # go on from out_dir's checkpoint, exactly (model, optimizer, data position, RNG)
    # uptraining (loopgpt.init_from_source): start from the checkpoint in this out_dir, a plain
    # stack (or a loop without injection), its layers split into this run's prelude, core and
    # coda; model keys not given here are the source's, n_loops = the replaced layers / n_core
    init_from: str = ""
    init_core: str = "average"    # what each core block starts as: lower | stepwise | average
    seed: int = 1337
    # objective: final = CE at the train budget; shortcut = LoopFormer's shortcut-consistency
    # (a random short route as a second forward); prefix = the early-exit baselines' short
    # route, the first S loops of the full route. Both add lambda_short * CE(short) +
    # lambda_cons * MSE(sg(h_full), h_short)
    objective: str = "final"
    lambda_short: float = 0.1
    lambda_cons: float = 0.1
    # loops per step: fixed = n_loops; uniform = U{loop_min..loop_max or n_loops};
    # poisson_lognormal = Huginn's Poisson(e^τ) + 1, τ ~ N(log n_loops - σ²/2, σ = loop_sigma);
    # per_sequence = Parcae: every row draws its own depth max(1, Poisson(n_loops)) and runs
    # its own loops (with bptt_k, its last min(depth, bptt_k) with gradient). Otherwise every
    # DDP rank uses the same depth in a step. loop_max > 0 caps the sampled depth.
    loop_sampling: str = "fixed"
    loop_min: int = 1
    loop_max: int = 0
    loop_sigma: float = 0.5
    # exits: step_loss = final | all | last_third: supervise every loop's state
    # through the shared coda and head (FLT's STEP / FEW). gate_stage (needs exit_gate=True):
    # 1 = Ouro's stage 1, Σ p_t CE_t - gate_beta H(p); 2 = train the gate alone, the LM frozen
    step_loss: str = "final"
    gate_stage: int = 0
    gate_beta: float = 0.1
    gate_k: float = 50.0
    gate_gamma: float = 0.005
    # depth curriculum: the depth is capped at curriculum_start + curriculum_rate * step (0 = off)
    curriculum_start: int = 0
    curriculum_rate: float = 0.0
    # recurrence curriculum (McLeish et al.'s retrofitting): over the first recurrence_warmup of
    # max_iters the target depth L (fixed, uniform's top, the Poisson samplers' mean) grows from
    # 1 to n_loops, L(s) = max(1, ceil(n_loops f(s / W))), f(u) = u (linear) or 1 - sqrt(1 - u)
    recurrence_warmup: float = 0.0
    recurrence_schedule: str = "linear"
    # LoopUS: lambda_mono * SiLU(CE_M - sg(CE_{M - bptt_k})), the gradient window must not hurt
    lambda_mono: float = 0.0
    # parameters that do not train: comma-separated name prefixes, e.g. wte,prelude (LoopUS keeps
    # the pretrained embedding and encoder fixed)
    freeze: str = ""
    # MELT's post-training of a looped model converted with melt=True (init_from=its checkpoint):
    # phase 1 over the first melt_transition steps attends to α MELT K/V + (1 - α) the loop's own,
    # α = step / melt_transition; phase 2 (melt_distill) then distills from the init_from model:
    # KL(teacher || student) + lambda_attn * MSE of every attention output
    melt_transition: int = 0
    melt_distill: bool = False
    lambda_attn: float = 0.1
    # batch: tokens per step = batch_size * block_size * grad_accum_steps (global)
    batch_size: int = 16          # rows per micro-step per process
    grad_accum_steps: int = 1     # global micro-steps per step, split over processes
    # the training loss of a micro-batch of more than loss_chunk tokens goes through the head and
    # the cross-entropy loss_chunk tokens at a time, so its (tokens, vocab) logits are never whole
    # (loopgpt.ChunkedHeadLoss: the same loss to float precision, one more head matmul in backward;
    # only where nothing else reads the logits). 0 = off; a smaller micro-batch (every CPU config's)
    # keeps the whole-logits path bit for bit
    loss_chunk: int = 8192
    # optimizer: adamw, or muon (Muon for the blocks' matrices at muon_lr, AdamW for the rest
    # at learning_rate; MuonAdamW in loopgpt.py); warmup then cosine (or warmup-stable-decay) to min_lr, the
    # same shape for every group (min_lr / learning_rate is the floor's fraction of each peak)
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    muon_momentum_warmup: int = 0  # Muon's momentum 0.85 -> 0.95 over this many steps (FLT: 300); 0 = 0.95
    learning_rate: float = 3e-3
    # wte and lm_head in AdamW groups of their own (FLT: 0.2 and 0.004 x (d/768)^-0.5);
    # 0 = learning_rate. Tied embeddings are one matrix, one group: it takes head_lr
    embedding_lr: float = 0.0
    head_lr: float = 0.0
    min_lr: float = 3e-4
    max_iters: int = 1000
    lr_decay_iters: int = 0       # 0 = max_iters; set it larger to stop a run early on purpose
    warmup_iters: int = 50
    lr_schedule: str = "cosine"   # cosine | wsd
    wsd_decay_frac: float = 0.2   # wsd: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8        # AdamW's eps (FLT/nanochat: 1e-10)
    grad_clip: float = 1.0        # 0 = off
    # system
    device: str = ""              # "" = cuda if available, else cpu
    dtype: str = ""               # bfloat16 (autocast) | float32; "" = bfloat16 on CUDA, float32 on CPU
    compile: bool = False         # torch.compile, as compile_scope says
    compile_scope: str = "blocks"  # blocks: each block (every budget reuses them) | step: the training forward and loss whole, the loop unrolled (one graph per budget)
    compile_mode: str = ""        # torch.compile's mode: "" (default) | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    # under torchrun: shard weights, gradients and optimizer state over the processes (FSDP2)
    # instead of DDP's full copy on each, for a model whose training state is past one GPU
    fsdp: bool = False

    def __post_init__(self):
        """A bad setting stops here, before any data or model is made: the first problem, one
        line that names the key, as a ValueError (train.py prints it through fail). Checks
        that need the model or the data are train.py's."""
        problem = next(self.problems(), None)
        if problem:
            raise ValueError(problem)

    def problems(self):
        """Every problem of these settings on their own, one line each, in the order checked."""
        if not (0 < self.learning_rate < math.inf and 0 <= self.min_lr < math.inf):
            yield f"need a finite learning_rate > 0 and min_lr >= 0, got {self.learning_rate} and {self.min_lr}"
        if not (self.embedding_lr >= 0 and self.head_lr >= 0 and self.adam_eps > 0 and self.muon_momentum_warmup >= 0):
            yield "need embedding_lr >= 0 and head_lr >= 0 (0 = learning_rate), adam_eps > 0 and muon_momentum_warmup >= 0"
        for key, valid in (("lr_schedule", ("cosine", "wsd")), ("optimizer", ("adamw", "muon")),
                           ("objective", ("final", "shortcut", "prefix")),
                           ("loop_sampling", ("fixed", "uniform", "poisson_lognormal", "per_sequence")),
                           ("step_loss", ("final", "all", "last_third")), ("gate_stage", (0, 1, 2)),
                           ("recurrence_schedule", ("linear", "1-sqrt"))):
            if getattr(self, key) not in valid:
                yield f"{key}={getattr(self, key)!r} (valid: {', '.join(map(str, valid))})"
        for key, valid in (("compile_scope", ("blocks", "step")),
                           ("compile_mode", ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))):
            if getattr(self, key) not in valid:
                yield f"{key}={getattr(self, key)!r} (valid: {', '.join(repr(v) for v in valid)})"
        if self.fsdp and self.compile and self.compile_scope == "step":
            yield "compile_scope=step with fsdp=True is untested together: use compile_scope=blocks (they shard cleanly)"
        if self.loop_sampling != "fixed" and self.objective != "final":
            yield f"objective={self.objective} draws its short route from a fixed full route: use loop_sampling=fixed"
        shared_depth = self.objective == "final" and self.loop_sampling != "per_sequence"  # one depth for the batch
        if (self.step_loss != "final" or self.gate_stage) and not shared_depth:
            yield "step_loss / gate_stage go with objective=final and a depth shared by the batch"
        if self.loop_min < 1 or self.loop_max < 0 or self.curriculum_start < 0 or self.curriculum_rate < 0:
            yield "need loop_min >= 1, loop_max >= 0, curriculum_start >= 0 and curriculum_rate >= 0"
        if not (0 <= self.recurrence_warmup <= 1 and self.lambda_mono >= 0):
            yield (f"need 0 <= recurrence_warmup <= 1 (a fraction of max_iters) and lambda_mono >= 0, got "
                   f"{self.recurrence_warmup} and {self.lambda_mono}")
        if self.lambda_mono and (self.step_loss != "final" or self.gate_stage or not shared_depth):
            yield ("lambda_mono (LoopUS) goes with objective=final, step_loss=final, no gate_stage and a depth shared "
                   "by the batch")
        if self.loop_sampling != "fixed" and self.loop_max and self.loop_min > self.loop_max:  # (fixed ignores them)
            yield f"loop_min={self.loop_min} > loop_max={self.loop_max}"
        if not (self.weight_decay >= 0 and self.grad_clip >= 0 and self.warmup_iters >= 0 and self.lr_decay_iters >= 0
                and self.muon_lr > 0 and 0 <= self.seed < 2**63 and 0 <= self.wsd_decay_frac <= 1):
            yield ("need weight_decay >= 0, grad_clip >= 0 (0 = off), warmup_iters >= 0, lr_decay_iters >= 0, "
                   "muon_lr > 0, 0 <= seed < 2^63 and 0 <= wsd_decay_frac <= 1")
        if not (self.lambda_short >= 0 and self.lambda_cons >= 0 and self.loop_sigma >= 0 and self.gate_beta >= 0
                and self.gate_k > 0 and self.sweep_max_steps >= 1 and self.eval_tasks_interval >= 0
                and self.eval_tasks_max >= 0):
            yield ("need lambda_short, lambda_cons, loop_sigma, gate_beta >= 0, gate_k > 0, sweep_max_steps >= 1, "
                   "eval_tasks_interval >= 0 (0 = the last step only) and eval_tasks_max >= 0 (0 = all)")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            yield f"need 0 <= beta1, beta2 < 1, got {self.beta1}, {self.beta2}"
        if self.loss_chunk < 0:
            yield f"loss_chunk must be >= 0 (tokens per chunk of the loss; 0 = off), got {self.loss_chunk}"
        if self.eval_only and not self.resume:
            yield "eval_only evaluates a checkpoint: add --resume=True"
        for key in ("max_iters", "eval_interval", "eval_iters", "batch_size", "grad_accum_steps", "log_interval"):
            if getattr(self, key) < 1:
                yield f"{key} must be >= 1, got {getattr(self, key)}"


def get_lr(it, tc):
    """The learning rate at step `it` (every group runs at this times its lr_scale): linear
    warmup over warmup_iters (0 = none), then cosine to min_lr at lr_decay_iters (or
    max_iters), or with lr_schedule=wsd constant until the last wsd_decay_frac of the steps,
    then linear to min_lr (FLT/nanochat: no warmup, the last 20% down to 0)."""
    decay_iters = tc.lr_decay_iters or tc.max_iters
    if it < tc.warmup_iters:
        return tc.learning_rate * (it + 1) / tc.warmup_iters
    if it >= decay_iters:
        return tc.min_lr
    if tc.lr_schedule == "cosine":
        ratio = (it - tc.warmup_iters) / max(1, decay_iters - tc.warmup_iters)
        return tc.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (tc.learning_rate - tc.min_lr)
    decay_start = decay_iters - int(tc.wsd_decay_frac * decay_iters)  # wsd: stable, then linear decay
    if it < decay_start:
        return tc.learning_rate
    return tc.learning_rate + (tc.min_lr - tc.learning_rate) * (it - decay_start) / max(1, decay_iters - decay_start)


def _interrupted(kind, value, tb):
    """Ctrl-C anywhere in a script that imports this: one line, not a traceback (Python still
    exits with the status of SIGINT, 130 in a shell). train.py says more: where to resume."""
    if issubclass(kind, KeyboardInterrupt):
        print("\ninterrupted", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


sys.excepthook = _interrupted


def fail(msg):
    """Stop with one readable line on stderr and exit code 1: no traceback for bad input."""
    raise SystemExit(f"error: {msg}")


def available_configs():
    return sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py") and not f.startswith("_"))


def key_notes(*paths):
    """{key: what it does} for --help, from where each key is defined: a dataclass field
    (`name: type = value  # note`, or a block of comments just above a group of fields) or a
    script's defaults (`"name": value,  # note` or `name=value,  # note`). The first file that
    documents a key wins."""
    notes = {}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        block, after_comment, last = [], False, None  # comments just above a group of fields; the last note
        for line in lines:
            stripped, indent = line.strip(), len(line) - len(line.lstrip())
            if stripped.startswith("#"):
                if last and indent > last[1] + 4:  # a note continued on the next line, under itself
                    notes[last[0]] += " " + stripped.lstrip("# ")
                    continue
                block = (block if after_comment else []) + [stripped.lstrip("# ")]
                after_comment, last = True, None
                continue
            after_comment, last = False, None
            m = (re.match(r'\s+"?([A-Za-z_]\w*)"?\s*:\s*[^#]*?(?:#\s*(.+))?$', line) or
                 re.match(r'\s+([A-Za-z_]\w*)=[^=][^#]*,\s*(?:#\s*(.+))?$', line))
            note = m and (m.group(2) or " ".join(block))
            if note and (m.group(2) or len(note.split()) >= 3) and m.group(1) not in notes:  # (no heading: "# I/O")
                notes[m.group(1)] = note
                last = (m.group(1), indent) if m.group(2) else None
            if not m:
                block = []
    return notes


def _unknown_key(key, valid, where):
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    fail(f"unknown key '{key}' {where}{hint}. Valid keys: {', '.join(sorted(valid))}")


def coerce(key, value, default):
    """Turn a command-line string into the type of the key's default value."""
    try:
        if isinstance(default, bool):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            return tuple(int(v) for v in value.split(",") if v.strip())
        return value
    except ValueError:
        kind = "comma-separated integers" if isinstance(default, tuple) else type(default).__name__
        fail(f"--{key}={value}: expected {kind} (default is {default!r})")


def _check_type(key, value, default, where):
    ok = (isinstance(value, type(default)) or
          (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)) or
          (isinstance(default, tuple) and isinstance(value, list)))
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, bool):
        ok = False
    if not ok:
        fail(f"{key}={value!r} {where}: expected {type(default).__name__} (default is {default!r})")
    return tuple(value) if isinstance(default, tuple) else (float(value) if isinstance(default, float) else value)


def parse_args(argv, defaults, allow_config=True, default_config=None):
    """
    defaults: {key: default value}; the default's type is the key's type.
    Returns (values, explicit): explicit maps each key set by hand to where, "config" or
    "command line". Accepts `--config NAME`, `--config=NAME` and `--key=value`, in any
    order; the config file is applied first.
    """
    values, explicit = dict(defaults), {}
    config_name, overrides = default_config, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            config = "[--config NAME] " if allow_config else ""
            notes = key_notes(sys.argv[0], os.path.join(ROOT, "loopgpt.py"), __file__)
            print(f"usage: python {os.path.basename(sys.argv[0])} {config}[--key=value ...]; the keys, their "
                  f"defaults and what they do:\n" + "\n".join(
                      f"  --{k}={v!r}" + ("\n" + textwrap.fill(notes[k], 100, initial_indent=" " * 6,
                                                                subsequent_indent=" " * 6) if k in notes else "")
                      for k, v in defaults.items()))
            raise SystemExit(0)
        if not arg.startswith("--"):
            fail(f"unexpected argument '{arg}': use --key=value")
        key, eq, val = arg[2:].partition("=")
        if key == "config" and allow_config:
            if not eq:
                if not args:
                    fail(f"--config needs a name. Available: {', '.join(available_configs())}")
                val = args.pop(0)
            config_name = val
        elif not eq and isinstance(defaults.get(key), bool):  # a bare flag: --quick means --quick=True
            overrides.append((key, "True"))
        elif not eq:
            fail(f"'{arg}': use --{key}=value")
        else:
            overrides.append((key, val))
    if config_name is not None:
        path = os.path.join(CONFIGS_DIR, f"{config_name}.py")
        if config_name not in available_configs():  # (files starting with _ are shared parts, not configs)
            fail(f"unknown config '{config_name}'. Available: {', '.join(available_configs())}")
        namespace = {}
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), namespace)
        for key, val in namespace.items():
            if key.startswith("_") or callable(val) or type(val).__name__ == "module":
                continue
            if key not in defaults:
                _unknown_key(key, defaults, f"in configs/{config_name}.py")
            values[key] = _check_type(key, val, defaults[key], f"in configs/{config_name}.py")
            explicit[key] = "config"
    for key, val in overrides:
        if key not in defaults:
            _unknown_key(key, defaults, "on the command line")
        values[key] = coerce(key, val, defaults[key])
        explicit[key] = "command line"
    values["config"] = config_name or ""
    return values, explicit


def train_config_defaults():
    return {f.name: f.default for f in fields(TrainConfig)}


def model_config_defaults():
    return {f.name: f.default for f in fields(LoopGPTConfig)}


def detect_device(requested=""):
    if not requested:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(requested)
    except RuntimeError:
        fail(f"device={requested!r} is not a device (use cpu, cuda or cuda:N)")
    if dev.type not in ("cpu", "cuda"):
        fail(f"device={requested!r}: loopgpt runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"device={requested} but CUDA is not available here; use --device=cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        fail(f"device={requested} but this machine has {torch.cuda.device_count()} GPU(s)")
    return requested


def make_dir(path, what="out_dir"):
    """Create a folder for our outputs, or stop with one line (a file in the way, no permission)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(f"{what}={path}: cannot create the folder ({e.strerror or e})")
    if not os.access(path, os.W_OK):
        fail(f"{what}={path}: the folder is not writable")
    return path


def autocast_context(device, dtype=""):
    """(context manager, dtype name) for mixed precision on `device`. "bfloat16" runs the
    matmuls and attention in bf16 under torch.autocast (on CPU too: that is how the GPU
    path is rehearsed without a GPU); "float32" runs everything in fp32; "" picks bfloat16
    on CUDA and float32 elsewhere (bf16 matmuls are slow on most CPUs)."""
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype == "float16":
        fail("dtype=float16 would need a gradient scaler, which loopgpt does not have: use dtype=bfloat16")
    if dtype not in ("bfloat16", "float32"):
        fail(f"dtype={dtype!r} (valid: bfloat16, float32)")
    if dtype == "float32":
        return nullcontext(), dtype
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16), dtype


# datasheet dense bf16 peaks (FLOP/s), the MFU denominator on a GPU; the first name that
# occurs in the device's name wins, so the more specific names come first
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("4090", 165e12), ("3090", 71e12))


def peak_bf16_flops(name):
    """Datasheet dense bf16 FLOP/s of the GPU called `name`, or None if it is not in the table."""
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def gpu_peak_flops(device):
    """(peak bf16 FLOP/s or None if the card is not in the table, the card's name)."""
    name = torch.cuda.get_device_name(device)
    return peak_bf16_flops(name), name


def print_table(rows, header):
    """A plain aligned table for the terminal."""
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cols]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- schedules, exits and KV sharing typed as text ---------------------------------------------

def parse_schedule(text, cfg):
    """A schedule typed as text: '3,2,2,1' in units of 1/L (integers summing to L = n_loops)
    or '0.5,0.25,0.25' as fractions summing to 1. Returns the checked step sizes."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"'{text}' is not a comma-separated list of numbers") from None
    L = cfg.n_loops
    if all(v.is_integer() for v in values) and sum(values) == L:
        values = [v / L for v in values]
    try:
        return check_schedule(values, modulation=cfg.modulation)
    except ValueError as e:
        raise ValueError(f"{e} (step sizes in units of 1/L summing to L={L}, or fractions summing to 1)") from None


EXITS = ("kl", "latent", "gate", "gate_all", "confidence")  # sample.py's decode_with_exit


def check_exit(exit, cfg):
    """An exit (kind, threshold) the model can run, or a ValueError."""
    if not (isinstance(exit, (tuple, list)) and len(exit) == 2 and exit[0] in EXITS):
        raise ValueError(f"exit must be (kind, threshold) with kind in {EXITS}, got {exit!r}")
    gate = exit[0].startswith("gate") or exit[0] == "confidence"
    if not (isinstance(exit[1], (int, float)) and exit[1] > 0) or (gate and not exit[1] <= 1):
        raise ValueError(f"exit threshold must be > 0 (and <= 1 for gate), got {exit[1]!r}")
    if cfg.routing == "mor":
        raise ValueError("routing='mor' already chooses each token's depth: no exit criterion on top")
    if exit[0].startswith("gate") and not cfg.exit_gate:
        raise ValueError("exit=('gate', q) needs a model trained with exit_gate=True")
    if exit[0] == "confidence" and not cfg.confidence_head:
        raise ValueError("exit=('confidence', q) needs a model trained with confidence_head=True")


def parse_exit(text, cfg):
    """An exit typed as text, 'kind:threshold' (e.g. 'kl:1e-3'), checked against the model."""
    kind, _, value = text.partition(":")
    try:
        exit = (kind, float(value))
        check_exit(exit, cfg)
    except ValueError as e:
        raise ValueError(f"{e}. Examples: kl:1e-3, latent:0.03, gate:0.9, gate_all:0.9, confidence:0.6") from None
    return exit


KV_SHARINGS = ("none", "first", "last", "mean", "window:N")  # sample.py's SharedKVCache


def parse_kv_sharing(text):
    """'none' | 'first' | 'last' | 'mean' | 'window:N' (N >= 1) -> (kind, N), or a ValueError."""
    kind, _, n = str(text).partition(":")
    if kind == "window" and n.isdigit() and int(n) >= 1:
        return kind, int(n)
    if kind in ("none", "first", "last", "mean") and not n:
        return kind, 0
    raise ValueError(f"kv_sharing={text!r} (valid: {', '.join(KV_SHARINGS)})")
