"""
loopgpt's loader of released looped models (data/huggingface.py) held against the authors' own
code on the same random weights. Not a test file (pytest does not collect it): it needs the
authors' code and transformers, which the project does not depend on. For each family given,
it builds a tiny model with the authors' classes (float32, seeded, every weight random: norm
gains, biases, gates, value embeddings), saves it in the release layout with the family's own
saver, runs the authors' forward, loads the saved folder with hf.model_from_hf, and prints:

  logits     max |loopgpt - theirs| of the logits at the budgets they ran (scale: max |their logit|)
  states     max |diff| of each loop's state, at the largest budget
  loop lgts  each budget's logits read off ONE loopgpt pass (logits_at_budgets) against theirs
  cache      loopgpt's KV-cached decode (prefill 5, then token by token) against its full
             forward, at budgets 1, L, L+1 (L = the released loop count)
  note       Ouro: its exit probability λ_t per loop; Parcae: the blocks given value embeddings

    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch "transformers>=4.56,<4.58" \\
        safetensors huggingface_hub numpy tiktoken
    /tmp/refvenv/bin/python tests/official_released.py --huginn=PATH/recurrent-pretraining \\
        --parcae=PATH/parcae --ouro=DIR_WITH_modeling_ouro.py --nanbeige=DIR_WITH_modeling_nanbeige.py \\
        --llama_export --qwen3 [--out=/tmp/official]  # any subset of the families

The authors' code, and how each file is found:
  --huginn    github.com/seal-rg/recurrent-pretraining; recpre/raven_modeling_minimal.py and
              raven_config_minimal.py (the files the HF release tomg-group-umd/huginn-0125 ships)
  --parcae    github.com/sandyresearch/parcae; its package parcae_lm (config parcae-small-140m,
              shrunk; saved with parcae_lm.save_pretrained, model.pt renamed pytorch_model.bin)
  --ouro      a folder with modeling_ouro.py + configuration_ouro.py, the remote code of the
              Hugging Face repository ByteDance/Ouro-1.4B (2.6B has the same), or a third-party copy
  --nanbeige  a folder with modeling_nanbeige.py + configuration_nanbeige.py, the remote code of
              Nanbeige/Nanbeige4.2-3B on Hugging Face, or a third-party copy
  --llama_export  no code: a plain LoopGPT exported with hf.export(layout='llama') and read by
              transformers' LlamaForCausalLM
  --qwen3     no code: transformers' own Qwen3ForCausalLM (an uptraining source) read by loopgpt
transformers 4.56-4.57: Ouro's cache assigns Cache.key_cache (read-only before 4.56), and
transformers 5.x breaks both remote codes (Ouro's RoPE init and mask kwargs; Nanbeige's inv_freq
loads as zeros). Where a family draws a random initial state, both sides start from zero
(Huginn init_scale=0, Parcae state_init='zero'; loopgpt: model.state_noise.zero_()).
Expect every difference at float32 round-off: about 1e-6 of the logits' scale, 1e-5 at most.
"""

import importlib
import math
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data.huggingface as hf  # noqa: E402
from loopgpt import LoopGPT, LoopGPTConfig, exit_probability  # noqa: E402

torch.set_grad_enabled(False)
IDS = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(7))  # (within every tiny vocabulary)


def diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def package(name, folder):
    """Import `folder`'s modules as the package `name` without running its __init__.py (Huginn's
    recpre/__init__ imports the training stack); the remote-code files import each other relatively."""
    pkg = types.ModuleType(name)
    pkg.__path__ = [folder]
    sys.modules[name] = pkg
    return lambda module: importlib.import_module(f"{name}.{module}")


def randomise(model, seed):
    """Every parameter random and seeded. Gains 1 + 0.3 N, so that a gain read as 1 + w, or not
    read at all, shows; biases, gates, A_log, dt_bias 0.5 N; matrices N / sqrt(fan-in)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # (a tied head appears once)
        r = torch.randn(p.shape, generator=g)
        if p.ndim == 1 and ("norm" in name or "ln_" in name):
            p.copy_(1 + 0.3 * r)
        elif p.ndim == 2 and "embed" not in name and "wte" not in name:
            p.copy_(r / math.sqrt(p.shape[1]))
        else:  # token and value embeddings, biases
            p.copy_(0.5 * r)
    return model.eval()


def at_budgets(forward, last_core_block, budgets=(1, 2, 4)):
    """The authors' logits at each budget (a forward each) and, at the largest, each loop's state:
    the last core block's output (Huginn and Parcae: nothing else runs between loops)."""
    states, logits = [], {}
    hook = last_core_block.register_forward_hook(lambda m, i, o: states.append(o))
    for M in budgets:
        states.clear()
        logits[M] = forward(M)
    hook.remove()
    return dict(logits=logits, states=list(states), loop_logits=logits)


# ---- the four families, each with its authors' classes -----------------------------------------

def ouro(path, out):
    code = package("ouro_code", path)
    cfg = code("configuration_ouro").OuroConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e6,
        total_ut_steps=3, early_exit_threshold=1.0, tie_word_embeddings=False)  # the release's keys, shrunk
    cfg._attn_implementation = "eager"
    model = randomise(code("modeling_ouro").OuroForCausalLM(cfg), 1)
    model.save_pretrained(out)
    _, hidden, gates = model.model(input_ids=IDS, use_cache=False)  # each loop's normed state, gate logit
    return dict(logits={3: model(IDS, use_cache=False).logits},  # threshold 1.0: the last loop
                states=hidden, normed=True, exit=[torch.sigmoid(g[..., 0]) for g in gates],
                loop_logits={t + 1: model.lm_head(h).float() for t, h in enumerate(hidden)})


def nanbeige(path, out):
    code = package("nanbeige_code", path)
    cfg = code("configuration_nanbeige").NanbeigeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=7e7,
        num_loops=3, tie_word_embeddings=False)  # head_dim != 64 / 4, as in the release (128 != 3072 / 48)
    cfg._attn_implementation = "eager"
    model = randomise(code("modeling_nanbeige").NanbeigeForCausalLM(cfg), 2)
    model.save_pretrained(out)
    states = []  # the final norm ends every loop: its output is the loop's state
    hook = model.model.norm.register_forward_hook(lambda m, i, o: states.append(o))
    logits = model(IDS, use_cache=False).logits
    hook.remove()
    return dict(logits={3: logits}, states=states, normed=True,
                loop_logits={t + 1: model.lm_head(h).float() for t, h in enumerate(states)})


def huginn(path, out):
    code = package("huginn_code", os.path.join(path, "recpre"))
    cfg = code("raven_config_minimal").RavenConfig(
        n_embd=64, n_heads=4, n_layers=5, block_size=64, vocab_size=256, tie_embeddings=True, intermediate_size=96,
        bias=False, norm_eps=1e-6, n_layers_in_prelude=1, n_layers_in_recurrent_block=2, n_layers_in_coda=2,
        mean_recurrence=4, mean_backprop_depth=2, qk_bias=True, rope_base=50_000)
    model = randomise(code("raven_modeling_minimal").RavenForCausalLM(cfg), 3)
    model.save_pretrained(out)
    return at_budgets(lambda M: model(IDS, num_steps=M, init_scale=0.0).logits, model.transformer.core_block[-1])


def parcae(path, out, n_prelude=2):
    """n_prelude=2: 2/2/2 blocks as parcae-140m, value embeddings on blocks 1, 3, 5. n_prelude=1:
    the tables and the gates land on different blocks, and Parcae then adds no value embedding."""
    sys.path.insert(0, path)
    import parcae_lm
    cfg = parcae_lm.create_config(  # the release's own config, shrunk
        "parcae-small-140m", block_size=64, vocab_size=250, n_embd=64, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=96, recurrent_embedding_dimension=64, recurrent_intermediation_embedding_dimension=96,
        n_layers_in_prelude=n_prelude)
    model = randomise(cfg.construct_model(), 4 + n_prelude)
    parcae_lm.save_pretrained(model, out)  # writes model.pt; the hub's repositories hold pytorch_model.bin
    os.replace(os.path.join(out, "model.pt"), os.path.join(out, "pytorch_model.bin"))
    model.config.state_init = "zero"  # (after saving: config.json keeps the release's like-init)
    # num_steps_pair given: without it even eval draws a Poisson depth per sequence
    forward = lambda M: model(IDS, return_logits=True, num_steps_pair=torch.tensor([M, 0]))["logits"]  # noqa: E731
    return at_budgets(forward, model.transformer.core_block[-1])


# ---- loopgpt's side ----------------------------------------------------------------------------

def cached_vs_full(model, M):
    cache = model.new_cache(M)
    steps = [model(IDS[:, :5], loops=M, cache=cache)[0]]
    steps += [model(IDS[:, i:i + 1], loops=M, cache=cache)[0] for i in range(5, IDS.size(1))]
    return diff(torch.cat(steps, 1), model(IDS, loops=M)[0])


def compare(folder, ref):
    model, _, keys = hf.model_from_hf(folder, dtype=torch.float32)
    if keys.get("state_init") in ("randn", "randn_small"):
        model.state_noise.zero_()  # their zero initial state
    L = model.config.n_loops
    record = {}
    model.trunk(IDS, model.steps(max(ref["logits"])), record=record)
    ours = [model.norm_f(s) if ref.get("normed") else s for s in record["states"]]
    assert len(ours) == len(ref["states"])
    note = "" if ref.get("normed") else f"zero state; M = {', '.join(map(str, ref['logits']))}"
    if keys.get("injection") == "diag":
        note += f"; value_embeds={model.config.value_embeds!r}"
    if "exit" in ref:
        lam = max(diff(exit_probability(model, s)[..., 0], e) for s, e in zip(record["states"], ref["exit"]))
        note = f"exit λ_t {lam:.1e}"
    return (max(diff(model(IDS, loops=M)[0], x) for M, x in ref["logits"].items()),
            max(x.abs().max().item() for x in ref["logits"].values()),
            max(diff(a, b) for a, b in zip(ours, ref["states"])),
            max(diff(x, ref["loop_logits"][M]) for M, x in model.logits_at_budgets(IDS, list(ref["loop_logits"]))),
            max(cached_vs_full(model, M) for M in (1, L, L + 1)), note)


def llama_export(out):
    """A plain LoopGPT (n_loops=1, Llama's block) exported in Llama's layout: transformers' own
    LlamaForCausalLM must give loopgpt's logits, and loopgpt must read the folder back exactly."""
    from transformers import LlamaForCausalLM
    keys = dict(vocab_size=320, block_size=64, n_embd=64, n_head=4, n_kv_head=2, n_prelude=1, n_core=2, n_coda=1,
                n_loops=1, norm_gains=True, norm_eps=1e-5, embed_norm=False, qk_norm=False, mlp="swiglu",
                mlp_ratio=2.5, softcap=0.0, tie_embeddings=False)
    model = randomise(LoopGPT(LoopGPTConfig(**keys)), 5)
    hf.export(model, out, layout="llama")
    theirs = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager").eval()
    ref = theirs(IDS).logits
    back = diff(hf.model_from_hf(out, dtype=torch.float32)[0](IDS)[0], model(IDS)[0])
    return (diff(model(IDS)[0], ref), ref.abs().max().item(), math.nan, math.nan,
            max(cached_vs_full(model, M) for M in (1, 2)), f"read back by loopgpt {back:.1e}")


def qwen3(out):
    """A plain Qwen3 (gained q/k norms before RoPE) from transformers' own Qwen3ForCausalLM, the
    uptraining source loopgpt reads with qk_gains."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-6,
                      rope_theta=1e6, tie_word_embeddings=True, attn_implementation="eager")
    model = randomise(Qwen3ForCausalLM(cfg), 6)
    model.save_pretrained(out)
    ref = model(IDS).logits
    ours = hf.model_from_hf(out, dtype=torch.float32)[0]
    return (diff(ours(IDS)[0], ref), ref.abs().max().item(), math.nan, math.nan,
            max(cached_vs_full(ours, M) for M in (1, 2)), "head_dim 32 where d / heads = 16")


def main():
    args = {k: v if eq else "1" for k, eq, v in (a.removeprefix("--").partition("=") for a in sys.argv[1:])}
    known = {"huginn", "parcae", "ouro", "nanbeige", "llama_export", "qwen3", "out"}
    if not args or set(args) - known:
        sys.exit(__doc__ + f"\nunknown or missing arguments: {sorted(set(args) - known) or 'none given'}")
    import transformers
    transformers.logging.set_verbosity_error()  # (the remote codes' GenerationMixin notices, on every model)
    version = tuple(map(int, transformers.__version__.split(".")[:2]))
    if {"ouro", "nanbeige"} & set(args) and version not in ((4, 56), (4, 57)):
        sys.exit(f"transformers {transformers.__version__}: Ouro's and Nanbeige's remote codes need 4.56-4.57")
    out = args.get("out", "/tmp/official")
    builders = {"ouro": ouro, "nanbeige": nanbeige, "huginn": huginn, "parcae": parcae,
                "parcae_p1r2c2": lambda path, out: parcae(path, out, n_prelude=1)}
    rows = []
    for name, build in builders.items():
        path = args.get(name.split("_")[0])
        if path:
            path = os.path.dirname(path) if path.endswith(".py") else path  # (a file given: its folder)
            folder = os.path.join(out, name)
            torch.manual_seed(0)  # (buffers and anything else the constructors draw)
            rows.append((name, *compare(folder, build(os.path.abspath(path), folder))))
    if "llama_export" in args:
        rows.append(("llama_export", *llama_export(os.path.join(out, "llama_export"))))
    if "qwen3" in args:
        rows.append(("qwen3", *qwen3(os.path.join(out, "qwen3"))))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; the models are in {out}")
    print(f"{'model':20} {'logits':>9} {'(scale)':>8} {'states':>9} {'loop lgts':>9} {'cache':>9}")
    for r in rows:
        e = [f"{x:9.1e}" if not math.isnan(x) else f"{'-':>9}" for x in (r[1], r[3], r[4], r[5])]  # - : no loop
        print(f"{r[0]:20} {e[0]} {r[2]:8.2f} {e[1]} {e[2]} {e[3]}  {r[6]}")


if __name__ == "__main__":
    main()
