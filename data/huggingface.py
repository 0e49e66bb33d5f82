"""
Released checkpoints as loopgpt models: the looped models (Ouro, Huginn-0125, Parcae,
Nanbeige's looped Llama), plain Llama-family stacks (Llama, SmolLM, TinyLlama, Qwen2, Qwen3) and
loopgpt's own exports. For sampling and evaluation at any loop budget (sample.py / eval.py
--init_from=hf:NAME), uptraining and fine-tuning (train.py --init_from=hf:NAME) and tokenizing
data with the model's tokenizer (data/*/prepare.py --tokenizer=hf:NAME).

NAME is a hub id (ByteDance/Ouro-1.4B), fetched once into data/hf/<owner>--<name>/, or a
local folder holding the same files. Everything is read with the standard library, numpy
and torch (no transformers, no safetensors package):

  config.json        the architecture: which format (model_type, or Parcae's _class_name),
                     mapped onto loopgpt's model keys; what loopgpt cannot express is refused
                     in one line rather than loaded wrong
  model.safetensors  the weights (or model.safetensors.index.json and its shards; Parcae:
                     pytorch_model.bin), memory-mapped and kept in their dtype, so a 3.5B
                     bf16 model loads in about its 7 GB: an 8-byte little-endian header length,
                     a JSON header {name: {dtype, shape, data_offsets}}, then the raw tensors
  tokenizer.json     a byte-level BPE (GPT-2's byte alphabet) -> tiktoken mergeable ranks

How each format maps onto loopgpt (its section below has the tensor names):
  llama, qwen2   a plain stack: n_core = layers, n_loops = 1
  qwen3          the same, with its gained per-head q/k norms before RoPE (qk_gains)
  nanbeige       Nanbeige4.2's looped Llama: the stack num_loops times, the final norm at every
                 loop boundary (loop_norm_f), head_dim twice d / heads
  ouro           the whole stack looped total_ut_steps times, branch norms, loop_norm_f and
                 the exit gate
  huginn_raven   prelude / 4-block core / coda of sandwich blocks, the adapter, embed_scale
                 sqrt(d), ln_f also before the coda (coda_norm), q/k biases, adjacent-pair RoPE
  Parcae         prelude / core / coda, the diagonal injection with ln_prelude and C, QK-norm
                 after adjacent-pair RoPE, 0.5 relu², value embeddings
  loopgpt        export() below: loopgpt's own model keys and state dict names
HF's RoPE pairs dimension i with i + head_dim/2, which is loopgpt's apply_rotary; Huginn's and
Parcae's pair adjacent dimensions, and their q and k rows are permuted per head to match.

Environment: HF_ENDPOINT (default https://huggingface.co; the tests point it at a file://
folder) and HF_TOKEN for gated models.
"""

import json
import math
import mmap
import os
import struct

import numpy as np
import torch

from data.common import download

HF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
ST_DTYPES = {v: k for k, v in DTYPES.items()}

# GPT-2's split, used by a ByteLevel pre-tokenizer with use_regex (the tokenizers library's)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# the same after a Digits(individual_digits) pre-tokenizer (SmolLM): every digit a piece of
# its own, and a run of spaces before a digit ends where the digit's piece begins
GPT2_DIGITS_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


# ---- fetching ----------------------------------------------------------------------------------

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the second: Parcae's release


def hf_folder(name, weights=True):
    """The local folder holding NAME's files: NAME itself if it is a folder, else the cache
    data/hf/<owner>--<name>/, filled from the hub on first use (config.json, tokenizer.json if
    the repository has one and, with weights, the safetensors or pytorch_model.bin). Offline:
    SystemExit with one line."""
    if os.path.isdir(name):
        return name
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise ValueError(f"{name!r} is neither a folder nor a hub id like owner/name")
    folder = os.path.join(HF_DIR, name.replace("/", "--"))
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    headers = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else None

    def fetch(file, missing_ok=False):
        path = os.path.join(folder, file)
        if os.path.exists(path):
            return path
        return download(f"{endpoint}/{name}/resolve/main/{file}", path, headers=headers, missing_ok=missing_ok)

    fetch("config.json")
    fetch("tokenizer.json", missing_ok=True)  # (Parcae's tokenizer is a repository of its own)
    fetch("tokenizer_config.json", missing_ok=True)  # (where eos_token is, if config.json has no eos_token_id)
    if weights and not any(os.path.exists(os.path.join(folder, f)) for f in WEIGHT_FILES):
        index = fetch("model.safetensors.index.json", missing_ok=True)
        if index is not None:
            with open(index) as f:
                for shard in sorted(set(json.load(f)["weight_map"].values())):
                    fetch(shard)
        elif fetch("model.safetensors", missing_ok=True) is None and fetch("pytorch_model.bin", missing_ok=True) is None:
            raise SystemExit(f"error: {name} has no model.safetensors (or index) and no pytorch_model.bin")
    return folder


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


# ---- reading weights ---------------------------------------------------------------------------

def read_safetensors(path):
    """{name: tensor} from one .safetensors file, in the file's dtypes, memory-mapped: the
    tensors are views of the file's pages (copy-on-write), read from disk as they are used."""
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable, as torch.frombuffer wants
        except ValueError:  # an empty file
            raise ValueError(f"{path} is not a safetensors file (empty)") from None
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (struct.error, ValueError) as e:
        raise ValueError(f"{path} is not a safetensors file ({e})") from None
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: {key} has dtype {info['dtype']}, not one of {', '.join(DTYPES)}")
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        count = (end - begin) // dtype.itemsize
        if 8 + n + end > len(data) or count != int(np.prod(info["shape"], dtype=np.int64)):
            raise ValueError(f"{path} is truncated or corrupt ({key})")
        t = torch.frombuffer(data, dtype=dtype, count=count, offset=8 + n + begin) if count else torch.empty(0, dtype=dtype)
        tensors[key] = t.reshape(info["shape"])
    return tensors


def read_weights(folder):
    """{name: tensor} of every weight file in folder, in the checkpoint's dtypes."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        tensors = {}
        for shard in sorted(set(read_json(index)["weight_map"].values())):
            tensors.update(read_safetensors(os.path.join(folder, shard)))
        return tensors
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return read_safetensors(os.path.join(folder, "model.safetensors"))
    path = os.path.join(folder, "pytorch_model.bin")
    try:  # a pickle, read the safe way (tensors only), memory-mapped
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{folder} has no model.safetensors (or index) and no pytorch_model.bin") from None
    except Exception as e:
        raise ValueError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


# ---- config and weights: one section per format -----------------------------------------------
#
# Each format is two functions: NAME_keys(config dict) -> loopgpt model keys (refusing, in one
# ValueError, what loopgpt cannot express) and NAME_weights(tensors, keys, config) -> loopgpt's
# state dict, taking every tensor it uses out of `tensors` (what is left over is an error).

class Tensors(dict):
    """The checkpoint's tensors by name; take() removes one, or says it is missing."""

    def take(self, name):
        if name not in self:
            raise ValueError(f"the checkpoint has no {name}")
        return self.pop(name)


def rope_settings(hf):
    """(theta, type) from either layout: transformers 4.x keeps rope_theta and rope_scaling at
    the top level, 5.x a rope_parameters block. loopgpt has plain RoPE: any other type is
    refused rather than loaded silently with the wrong positions."""
    params = hf.get("rope_parameters") or {}
    if params and not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"rope_parameters={params}: one RoPE for every layer is what loopgpt reads")
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"rope_type={kind!r} ({params or scaling}): loopgpt implements plain RoPE only")
    return float(theta)


def adjacent_to_halves(w, head_dim):
    """Rows of q or k (or their biases) for RoPE on adjacent pairs (2i, 2i+1), reordered per
    head for loopgpt's pairs (i, i + hd/2): the same rotations, so the same attention scores."""
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return w.unflatten(0, (-1, head_dim))[:, order].flatten(0, 1)


# ---- Llama, Qwen2 (plain stacks) ----


def llama_keys(hf):
    kind = hf.get("model_type")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    problems = []
    try:
        theta = rope_settings(hf)
    except ValueError as e:
        problems.append(str(e))
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (loopgpt's swiglu is silu)")
    if kind in ("llama", "qwen3") and hf.get("attention_bias"):
        problems.append("attention_bias=True (a bias on o_proj too; loopgpt's output projections have none)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=True")
    if hf.get("use_sliding_window") or (kind == "llama" and hf.get("sliding_window")):
        problems.append("sliding-window attention")
    if problems:
        raise ValueError("this checkpoint is not expressible in loopgpt: " + "; ".join(problems))
    return dict(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048), n_embd=d,
                n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or d // heads,
                n_prelude=0, n_core=hf["num_hidden_layers"], n_coda=0, n_loops=1, injection="none",
                state_init="prelude", norm_gains=True, norm_eps=hf.get("rms_norm_eps", 1e-6),
                embed_norm=False, qkv_bias=kind == "qwen2", qk_norm=False, qk_gains=kind == "qwen3", mlp="swiglu",
                mlp_ratio=hf["intermediate_size"] / d, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                softcap=0.0, rope_base=theta)


def llama_layer(t, hf, ours, keys):
    """One Llama decoder layer (attention, SwiGLU, their two norms) into core layer `ours`."""
    sd = {ours + "norm_1.weight": t.take(hf + "input_layernorm.weight"),
          ours + "norm_2.weight": t.take(hf + "post_attention_layernorm.weight")}
    for x in "qkv":
        sd[ours + f"attn.{x}.weight"] = t.take(hf + f"self_attn.{x}_proj.weight")
        if keys["qkv_bias"]:
            sd[ours + f"attn.{x}.bias"] = t.take(hf + f"self_attn.{x}_proj.bias")
    if keys.get("qk_gains"):  # Qwen3: each head's q and k normed with a gain, before RoPE
        sd[ours + "attn.q.norm.weight"] = t.take(hf + "self_attn.q_norm.weight")
        sd[ours + "attn.k.norm.weight"] = t.take(hf + "self_attn.k_norm.weight")
    sd[ours + "attn.proj.weight"] = t.take(hf + "self_attn.o_proj.weight")
    sd[ours + "mlp.fc.weight"] = torch.cat([t.take(hf + "mlp.gate_proj.weight"), t.take(hf + "mlp.up_proj.weight")])
    sd[ours + "mlp.proj.weight"] = t.take(hf + "mlp.down_proj.weight")
    return sd


def head(t, keys, sd, embed, head_name="lm_head.weight"):
    """The embedding and the head; a tied checkpoint may store the head's copy or not."""
    sd["wte.weight"] = t.take(embed)
    copy = t.pop(head_name, None)
    if keys["tie_embeddings"]:
        sd["lm_head.weight"] = sd["wte.weight"]
    elif copy is None:
        raise ValueError(f"the checkpoint has no {head_name} and its embeddings are not tied")
    else:
        sd["lm_head.weight"] = copy
    return sd


def llama_weights(t, keys, hf):
    sd = head(t, keys, {"norm_f.weight": t.take("model.norm.weight")}, "model.embed_tokens.weight")
    for i in range(keys["n_core"]):
        sd.update(llama_layer(t, f"model.layers.{i}.", f"core.{i}.", keys))
    for name in [n for n in t if n.endswith("rotary_emb.inv_freq")]:  # old exports keep RoPE's table
        del t[name]
    return sd


# ---- Nanbeige4.2 looped (model_type 'nanbeige') ----
# A Llama stack looped num_loops times (len(loop_loss_weights) + 1 if those are given), the
# final norm at every loop boundary unless skip_loop_final_norm (then once, at the end: a
# plain loop); Llama's tensor names.

NANBEIGE_EXTRAS = ("enable_hyper_connection", "enable_mhc", "enable_depth_attention", "enable_double_loop_split",
                   "loop_share_kv", "emb_neighbor_num", "qk_layernorm", "attention_bias")


def nanbeige_keys(hf):
    extras = [f"{k}={hf[k]!r}" for k in NANBEIGE_EXTRAS if hf.get(k)]
    if hf.get("pretraining_tp", 1) != 1:
        extras.append(f"pretraining_tp={hf['pretraining_tp']}")
    if extras:
        raise ValueError("this Nanbeige checkpoint is not expressible in loopgpt: " + ", ".join(extras))
    loops = len(hf["loop_loss_weights"]) + 1 if hf.get("loop_loss_weights") else int(hf.get("num_loops") or 1)
    keys = llama_keys({**hf, "model_type": "llama"})
    return dict(keys, n_loops=loops, loop_norm_f=loops > 1 and not hf.get("skip_loop_final_norm"))


# ---- Ouro (Zhu et al. 2025, arXiv 2510.25741; model_type 'ouro') ----
# The whole stack looped total_ut_steps times; four norms per layer, the *_2 ones on the
# attention's and MLP's outputs (block_norm='branch'); model.norm after every loop, and what
# it gives is the next loop's input, the exit gate's and the head's (loop_norm_f).

def ouro_keys(hf):
    keys = llama_keys({**hf, "model_type": "llama"})
    return dict(keys, n_loops=int(hf.get("total_ut_steps", 4)), block_norm="branch", loop_norm_f=True, exit_gate=True)


def ouro_weights(t, keys, hf):
    sd = head(t, keys, {"norm_f.weight": t.take("model.norm.weight"),
                        "exit_gate.weight": t.take("model.early_exit_gate.weight"),
                        "exit_gate.bias": t.take("model.early_exit_gate.bias")}, "model.embed_tokens.weight")
    for i in range(keys["n_core"]):
        hf, ours = f"model.layers.{i}.", f"core.{i}."
        sd.update(llama_layer(t, hf, ours, keys))
        sd[ours + "norm_3.weight"] = t.take(hf + "input_layernorm_2.weight")
        sd[ours + "norm_4.weight"] = t.take(hf + "post_attention_layernorm_2.weight")
    return sd


# ---- Huginn-0125 (Geiping et al. 2025, arXiv 2502.05171; model_type 'huginn_raven') ----

def huginn_keys(hf):
    d, heads = hf.get("n_embd", 5280), hf.get("n_heads", hf.get("num_attention_heads", 55))
    expected = dict(block_class_name="SandwichBlock", injection_type="linear", mlp_class_name="GatedMLP",
                    nonlin_name="SiLU", bias=False)
    problems = [f"{k}={hf[k]!r} (loopgpt reads {v!r})" for k, v in expected.items() if k in hf and hf[k] != v]
    if hf.get("state_init", "like-init") not in ("like-init", "zero"):
        problems.append(f"state_init={hf['state_init']!r}")
    if problems:
        raise ValueError("this Huginn checkpoint is not expressible in loopgpt: " + "; ".join(problems))
    return dict(vocab_size=hf.get("padded_vocab_size") or hf.get("vocab_size", 65536), block_size=hf.get("block_size", 4096),
                n_embd=d, n_head=heads, n_kv_head=heads, n_prelude=hf.get("n_layers_in_prelude", 2),
                n_core=hf.get("n_layers_in_recurrent_block", 4), n_coda=hf.get("n_layers_in_coda", 2),
                n_loops=hf.get("mean_recurrence", 32), bptt_k=hf.get("mean_backprop_depth", 8), injection="concat",
                state_init="zero" if hf.get("state_init") == "zero" else "randn", block_norm="sandwich",
                norm_gains=True, norm_eps=hf.get("norm_eps", 1e-6), embed_norm=False, embed_scale=math.sqrt(d),
                coda_norm=True, qkv_bias=bool(hf.get("qk_bias", True)), qk_norm=False, mlp="swiglu",
                mlp_ratio=hf.get("intermediate_size", 17920) / d, tie_embeddings=bool(hf.get("tie_embeddings", True)),
                softcap=0.0, rope_base=float(hf.get("rope_base", 50000.0)), init="huginn")


def huginn_weights(t, keys, hf):
    d, hd, H = keys["n_embd"], keys["n_embd"] // keys["n_head"], keys["n_head"]
    t.pop("freqs_cis", None)  # RoPE's table, recomputed
    sd = head(t, keys, {"norm_f.weight": t.take("transformer.ln_f.weight"),
                        "adapter.weight": t.take("transformer.adapter.weight")}, "transformer.wte.weight")
    blocks = [("prelude", i, f"prelude.{i}.") for i in range(keys["n_prelude"])]
    blocks += [("core_block", i, f"core.{i}.") for i in range(keys["n_core"])]
    blocks += [("coda", i, f"coda.{i}.") for i in range(keys["n_coda"])]
    for part, i, ours in blocks:
        hf = f"transformer.{part}.{i}."
        # Huginn's norm_2 follows attention's residual add and norm_3 precedes the MLP: our norm_3 and norm_2
        for theirs, mine in (("norm_1", "norm_1"), ("norm_2", "norm_3"), ("norm_3", "norm_2"), ("norm_4", "norm_4")):
            sd[ours + f"{mine}.weight"] = t.take(hf + f"{theirs}.weight")
        q, k, v = t.take(hf + "attn.Wqkv.weight").split([d, d, d])  # rows [q; k; v]
        sd[ours + "attn.q.weight"], sd[ours + "attn.k.weight"] = adjacent_to_halves(q, hd), adjacent_to_halves(k, hd)
        sd[ours + "attn.v.weight"] = v
        if keys["qkv_bias"]:  # qk_bias (2, 1, heads, hd), added before RoPE: q's and k's biases, v's zero
            qb, kb = t.take(hf + "attn.qk_bias").reshape(2, H * hd)
            sd[ours + "attn.q.bias"], sd[ours + "attn.k.bias"] = adjacent_to_halves(qb, hd), adjacent_to_halves(kb, hd)
            sd[ours + "attn.v.bias"] = torch.zeros_like(qb)
        sd[ours + "attn.proj.weight"] = t.take(hf + "attn.proj.weight")
        sd[ours + "mlp.fc.weight"] = t.take(hf + "mlp.fc.weight")  # rows [gate; up], as ours
        sd[ours + "mlp.proj.weight"] = t.take(hf + "mlp.proj.weight")
    return sd


# ---- Parcae (Prairie et al. 2026, arXiv 2604.12946; config.json with _class_name ParcaeConfig) ----

# (embedding scale, logit scale) of the init strategies whose code gives them (parcae's
# utils/init.py); the others are refused rather than guessed
PARCAE_SCALES = {"scaled-zero": lambda d: (1.0, 1.0), "scaled": lambda d: (1.0, 1.0), "small": lambda d: (1.0, 1.0),
                 "takase": lambda d: (math.sqrt(d), 1.0),
                 "takase-scaled": lambda d: (math.sqrt(d), math.sqrt(2 / 5) / math.sqrt(d))}


def parcae_keys(hf):
    d = hf["n_embd"]
    heads = hf["num_attention_heads"]
    expected = dict(block_class_name="TransformerPreNormBlock", norm_class_name="RMSNorm", mlp_class_name="BaseMLP",
                    nonlin_name="ReLU2", injection_type="diagonal", bias=False, qk_bias=False, prelude_norm=True,
                    recurrent_embedding_dimension=d, recurrent_intermediation_embedding_dimension=hf["intermediate_size"],
                    clip_qkv=None, use_abacus=False)
    problems = [f"{k}={hf.get(k)!r} (loopgpt reads {v!r})" for k, v in expected.items() if hf.get(k, v) != v]
    if hf.get("recurrent_num_attention_heads") not in (None, heads):
        problems.append(f"recurrent_num_attention_heads={hf['recurrent_num_attention_heads']}")
    if hf.get("state_init", "like-init") != "like-init":
        problems.append(f"state_init={hf['state_init']!r}")
    if hf.get("init_strategy", "scaled") not in PARCAE_SCALES:
        problems.append(f"init_strategy={hf.get('init_strategy')!r} (its embedding and logit scales)")
    if problems:
        raise ValueError("this Parcae checkpoint is not expressible in loopgpt: " + "; ".join(problems))
    embed_scale = PARCAE_SCALES[hf.get("init_strategy", "scaled")](d)[0]
    vocab = hf.get("padded_vocab_size") or -(-hf["vocab_size"] // hf.get("padding_multiple", 512)) * hf.get(
        "padding_multiple", 512)
    return dict(vocab_size=vocab, block_size=hf.get("block_size", 4096), n_embd=d, n_head=heads,
                n_kv_head=hf.get("num_key_value_heads") or heads, n_prelude=hf["n_layers_in_prelude"],
                n_core=hf["n_layers_in_recurrent_block"], n_coda=hf["n_layers_in_coda"],
                n_loops=hf.get("mean_recurrence", 8), bptt_k=hf.get("mean_backprop_depth", 4), injection="diag",
                state_init="randn_small", norm_gains=True, norm_eps=hf.get("norm_eps", 1e-5), embed_norm=False,
                embed_scale=embed_scale, qk_norm=bool(hf.get("qk_norm")), mlp="relu2", mlp_ratio=hf["intermediate_size"] / d,
                tie_embeddings=bool(hf.get("tie_embeddings")), softcap=float(hf.get("logit_softcap") or 0.0),
                rope_base=50000.0, init="parcae")  # (its from_pretrained ignores rope_settings: base 50,000)


def parcae_value_blocks(t, keys):
    """The blocks (0-based over prelude, core, coda) that have both a value-embedding table and
    a gate: the ones Parcae's forward adds the embedding in."""
    names = [f"prelude.{i}" for i in range(keys["n_prelude"])] + [f"core_block.{i}" for i in range(keys["n_core"])]
    names += [f"coda.{i}" for i in range(keys["n_coda"])]
    return [i for i, n in enumerate(names) if f"value_embeds.{i}.weight" in t and f"transformer.{n}.attn.ve_gate.weight" in t]


def parcae_weights(t, keys, hf):
    """(Also sets keys["value_embeds"]: the blocks that have both a table and a gate.)"""
    hd = keys["n_embd"] // keys["n_head"]
    t.pop("freqs_cis", None)
    keys["value_embeds"] = ",".join(map(str, parcae_value_blocks(t, keys)))
    # its logits are lm_head(ln_f(x)) times a logit scale: folded into ln_f's gain
    logit_scale = PARCAE_SCALES[hf.get("init_strategy", "scaled")](keys["n_embd"])[1] / hf.get("mup_model_scaling_factor", 1)
    sd = head(t, keys, {"norm_f.weight": t.take("transformer.ln_f.weight") * logit_scale,
                        "diag_norm.weight": t.take("transformer.ln_prelude.weight"),
                        "diag_A_log": t.take("transformer.adapter.A_log"),
                        "diag_dt_bias": t.take("transformer.adapter.dt_bias"),
                        "diag_B.weight": t.take("transformer.adapter.B"),
                        "diag_C.weight": t.take("transformer.C.weight")}, "transformer.wte.weight")
    parts = [("prelude", i, f"prelude.{i}.") for i in range(keys["n_prelude"])]
    parts += [("core_block", i, f"core.{i}.") for i in range(keys["n_core"])]
    parts += [("coda", i, f"coda.{i}.") for i in range(keys["n_coda"])]
    with_ve = set(keys["value_embeds"].split(",")) if keys["value_embeds"] else set()
    for b, (part, i, ours) in enumerate(parts):
        hf = f"transformer.{part}.{i}."
        sd[ours + "norm_1.weight"], sd[ours + "norm_2.weight"] = t.take(hf + "norm_1.weight"), t.take(hf + "norm_2.weight")
        sd[ours + "attn.q.weight"] = adjacent_to_halves(t.take(hf + "attn.c_q.weight"), hd)
        sd[ours + "attn.k.weight"] = adjacent_to_halves(t.take(hf + "attn.c_k.weight"), hd)
        sd[ours + "attn.v.weight"] = t.take(hf + "attn.c_v.weight")
        sd[ours + "attn.proj.weight"] = t.take(hf + "attn.c_proj.weight")
        sd[ours + "mlp.fc.weight"] = t.take(hf + "mlp.fc.weight")
        sd[ours + "mlp.proj.weight"] = t.take(hf + "mlp.proj.weight") * 0.5  # its MLP is 0.5 relu(x)²: exact
        gate = t.pop(hf + "attn.ve_gate.weight", None)
        table = t.pop(f"value_embeds.{b}.weight", None)
        if str(b) in with_ve:
            sd[ours + "attn.v.ve_gate.weight"], sd[f"value_embeds.{b}.weight"] = gate, table
    return sd


# ---- loopgpt's own layout (export below) ----

def loopgpt_keys(hf):
    keys = hf.get("loopgpt")
    if not isinstance(keys, dict):
        raise ValueError("config.json with model_type 'loopgpt' has no 'loopgpt' block of model keys")
    return dict(keys)


def loopgpt_weights(t, keys, hf):
    sd = dict(t)
    t.clear()
    if keys.get("tie_embeddings") and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd.get("wte.weight")
    return sd


# ---- one entry point ---------------------------------------------------------------------------

FORMATS = {"llama": (llama_keys, llama_weights), "qwen2": (llama_keys, llama_weights), "qwen3": (llama_keys, llama_weights),
           "nanbeige": (nanbeige_keys, llama_weights), "ouro": (ouro_keys, ouro_weights),
           "huginn_raven": (huginn_keys, huginn_weights), "parcae": (parcae_keys, parcae_weights),
           "loopgpt": (loopgpt_keys, loopgpt_weights)}


def format_of(hf):
    """The format's name for a config.json: its model_type (Parcae's has none, only _class_name)."""
    kind = "parcae" if hf.get("_class_name") == "ParcaeConfig" else hf.get("model_type")
    if kind not in FORMATS:
        raise ValueError(f"model_type={kind!r}: loopgpt reads {', '.join(FORMATS)} checkpoints (Parcae's by its "
                         f"_class_name); not OLMo-2 (norms after each branch and none before it, q/k norms "
                         f"across all heads: not expressible)")
    return kind


def model_keys(hf):
    """loopgpt model keys (LoopGPTConfig fields) for the config dict `hf`."""
    return FORMATS[format_of(hf)][0](hf)


def state_dict(tensors, keys, hf=None):
    """loopgpt's state dict from the checkpoint's tensors (Parcae's also sets keys['value_embeds'])."""
    t = Tensors(tensors)
    sd = FORMATS[format_of(hf) if hf else "llama"][1](t, keys, hf or {})
    if t:
        raise ValueError(f"the checkpoint has {len(t)} tensors loopgpt does not use, e.g. {sorted(t)[0]}")
    return sd


def load_model(name):
    """(model keys, state dict, tokenizer dict or None) of the checkpoint NAME; the tensors are
    the checkpoint's own (memory-mapped, in its dtype)."""
    folder = hf_folder(name)
    hf = read_json(os.path.join(folder, "config.json"))
    keys = model_keys(hf)
    sd = state_dict(read_weights(folder), keys, hf)
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return keys, sd, load_tokenizer_dict(name)
    return keys, sd, hf.get("loopgpt_tokenizer")  # (an export of ours keeps its tokenizer here)


def build_model(keys, sd, dtype=None):
    """A LoopGPT holding the state dict `sd`, built on the meta device so that no memory goes
    to a random init first: its parameters are sd's tensors (in dtype, default theirs)."""
    from loopgpt import LoopGPT, LoopGPTConfig  # (loopgpt imports nothing from data/)
    dtype = dtype or sd["wte.weight"].dtype
    with torch.device("meta"):
        model = LoopGPT(LoopGPTConfig(**keys))
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if model.config.tie_embeddings:  # (assign replaced the shared parameter: share it again)
        model.lm_head.weight = model.wte.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"the converted weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.init_buffers()
    return model


def model_from_hf(name, dtype=None):
    """(LoopGPT in eval mode, tokenizer dict or None, model keys) for init_from=hf:NAME."""
    keys, sd, tok = load_model(name)
    return build_model(keys, sd, dtype).eval(), tok, keys


# ---- export ------------------------------------------------------------------------------------

def write_safetensors(path, tensors):
    """{name: tensor} as a .safetensors file (atomically: a temporary file, then a rename)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the tensors start 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def export(model, out, tokenizer=None, layout="loopgpt"):
    """Write `model` as config.json + model.safetensors in the folder `out`, which
    init_from=hf:OUT (or the hub, once uploaded) reads back bit for bit. layout='loopgpt'
    keeps loopgpt's model keys and tensor names (any model); layout='llama' writes a plain
    stack (n_loops = 1, no injection, Llama's blocks) as transformers' LlamaForCausalLM, so
    the transformers library loads it too. tokenizer: loopgpt's tokenizer dict (a checkpoint's
    data_meta), kept in config.json as loopgpt_tokenizer for init_from=hf: to read back."""
    cfg = model.config
    sd = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    if layout == "loopgpt":
        config = {"model_type": "loopgpt", "architectures": ["LoopGPT"], "loopgpt": cfg.to_dict()}
    elif layout == "llama":
        config, sd = llama_export(model, sd)
    else:
        raise ValueError(f"layout={layout!r} (valid: loopgpt, llama)")
    if tokenizer is not None:
        config["loopgpt_tokenizer"] = tokenizer
    os.makedirs(out, exist_ok=True)
    write_safetensors(os.path.join(out, "model.safetensors"), sd)
    with open(os.path.join(out, "config.json.tmp"), "w") as f:
        json.dump(config, f, indent=1)
    os.replace(os.path.join(out, "config.json.tmp"), os.path.join(out, "config.json"))


def llama_export(model, sd):
    """(config, tensors) of a plain loopgpt stack in LlamaForCausalLM's layout; a ValueError
    names what Llama cannot hold."""
    cfg = model.config
    plain = dict(n_loops=1, injection="none", state_init="prelude", norm_state=False, block_norm="pre",
                 norm_gains=True, embed_norm=False, embed_scale=1.0, coda_norm=False, loop_norm_f=False,
                 qk_norm=False, mlp="swiglu", softcap=0.0, modulation="none", routing="none", lora_rank=0,
                 exit_gate=False, selective_gate=False, confidence_head=False, melt=False, value_embeds="",
                 qkv_bias=False, qk_gains=False)
    wrong = [f"{k}={getattr(cfg, k)!r}" for k, v in plain.items() if getattr(cfg, k) != v]
    if set(cfg.window_pattern) != {"L"}:
        wrong.append(f"window_pattern={cfg.window_pattern!r}")
    if wrong:
        raise ValueError("layout='llama' holds a plain Llama stack (n_loops=1, norm_gains, swiglu, no QK-norm, "
                         f"soft-cap or embedding norm): this model has {', '.join(wrong)}; use layout='loopgpt'")
    blocks = [*[f"prelude.{i}." for i in range(cfg.n_prelude)], *[f"core.{i}." for i in range(cfg.n_core)],
              *[f"coda.{i}." for i in range(cfg.n_coda)]]
    hidden = round(cfg.mlp_ratio * cfg.n_embd)
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["norm_f.weight"]}
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i, ours in enumerate(blocks):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = sd[ours + "norm_1.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[ours + "norm_2.weight"]
        for x in "qkv":
            out[p + f"self_attn.{x}_proj.weight"] = sd[ours + f"attn.{x}.weight"]
        out[p + "self_attn.o_proj.weight"] = sd[ours + "attn.proj.weight"]
        gate, up = sd[ours + "mlp.fc.weight"].split(hidden)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = sd[ours + "mlp.proj.weight"]
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.n_embd, "intermediate_size": hidden, "num_hidden_layers": len(blocks),
              "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
              "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps or
              torch.finfo(torch.float32).eps, "rope_theta": cfg.rope_base, "tie_word_embeddings": cfg.tie_embeddings,
              "attention_bias": False, "mlp_bias": False, "torch_dtype": str(sd["wte.weight"].dtype).removeprefix("torch.")}
    return config, out


# ---- tokenizer ---------------------------------------------------------------------------------

def byte_alphabet():
    """GPT-2's map from the 256 bytes to printable characters, which byte-level BPE vocabularies
    are written in: printable Latin-1 bytes stand for themselves, the others are moved to 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def split_pattern(pre):
    """The one regex tiktoken splits with, for the pre-tokenizers byte-level BPEs use."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s.get("type") for s in steps]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(byte_level) != 1 or byte_level[0].get("add_prefix_space"):
        raise ValueError(f"pre-tokenizer {kinds}: loopgpt reads byte-level BPEs without a prefix space")
    if kinds == ["ByteLevel"] and byte_level[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level[0].get("use_regex", True):
        return GPT2_DIGITS_PATTERN
    if (kinds == ["Split", "ByteLevel"] and not byte_level[0].get("use_regex", True)
            and steps[0].get("behavior") == "Isolated" and "Regex" in steps[0].get("pattern", {})):
        return steps[0]["pattern"]["Regex"]
    raise ValueError(f"pre-tokenizer {kinds} is not one loopgpt can reproduce with one regex")


def load_tokenizer_dict(name):
    """loopgpt's tokenizer dict (see data/tokenizer.py) for NAME's tokenizer.json: a byte-level
    BPE becomes tiktoken mergeable ranks. tiktoken merges the pair whose merged token has the
    lowest id, the tokenizers library the pair earliest in the merge list: the same thing when
    merged tokens are numbered in merge order, which is checked here."""
    folder = hf_folder(name, weights=False)
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        raise ValueError(f"{name} has no tokenizer.json")
    tok, hf = read_json(os.path.join(folder, "tokenizer.json")), read_json(os.path.join(folder, "config.json"))
    model = tok.get("model", {})
    to_byte = byte_alphabet()
    vocab = model.get("vocab", {})
    # byte fallback never fires where all 256 byte-level characters are tokens (Parcae's has both)
    fallback = model.get("byte_fallback") and not all(c in vocab for c in to_byte)
    normalizer = (tok.get("normalizer") or {}).get("type")
    if model.get("type") != "BPE" or fallback or normalizer:
        found = (f"a {model.get('type')} model" if model.get("type") != "BPE" else
                 "byte fallback to <0x..> tokens" if fallback else f"a {normalizer} normalizer")
        raise ValueError(f"{name}'s tokenizer is not a plain byte-level BPE ({found}): loopgpt's tiktoken-based "
                         "pipeline cannot reproduce it")
    pattern = split_pattern(tok.get("pre_tokenizer"))
    ranks = [None] * (max(vocab.values()) + 1)
    try:
        for text, i in vocab.items():
            ranks[i] = bytes(to_byte[c] for c in text).hex()
    except KeyError:
        raise ValueError(f"{name}'s vocabulary is not written in the byte-level alphabet") from None
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    merged = [vocab.get(a + b, -1) for a, b in merges]
    if any(i < 0 for i in merged) or any(j <= i for i, j in zip(merged, merged[1:])):
        raise ValueError(f"{name}'s merged tokens are not numbered in merge order: tiktoken would merge differently")
    specials = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    for content, i in specials.items():
        if i < len(ranks) and ranks[i] is not None and bytes.fromhex(ranks[i]).decode("utf-8", "replace") != content:
            raise ValueError(f"special token {content!r} reuses the id {i} of a vocabulary token")
        if i < len(ranks):
            ranks[i] = None
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    eot = next((c for c, i in specials.items() if i == eos), None)
    if eos is None:  # (Huginn's and Parcae's configs name none: tokenizer_config.json's eos_token)
        path = os.path.join(folder, "tokenizer_config.json")
        eot = read_json(path).get("eos_token") if os.path.exists(path) else None
        eot = eot.get("content") if isinstance(eot, dict) else eot
    if eot not in specials:
        raise ValueError(f"{name}: its end-of-text token (config.json's eos_token_id={eos}, or tokenizer_config.json's "
                         f"eos_token) is not one of the tokenizer's special tokens")
    return {"kind": "hf", "name": name, "pattern": pattern, "ranks": ranks, "specials": specials, "eot": eot}
