"""
Hugging Face Llama-family checkpoints (Llama, SmolLM, TinyLlama, Qwen2) as loopgpt models,
for uptraining (train.py --init_from=hf:NAME) and for tokenizing data with the model's
tokenizer (data/*/prepare.py --tokenizer=hf:NAME).

NAME is a hub id (HuggingFaceTB/SmolLM2-135M), fetched once into data/hf/<owner>--<name>/,
or a local folder holding the same files. The hub serves three things, and we read each
with the standard library, numpy and torch (no transformers, no safetensors package):

  config.json        the architecture -> loopgpt model keys for a plain stack (n_core = layers,
                     n_loops = 1): RMSNorm with gains and its eps, SwiGLU, RoPE with its theta,
                     GQA, no QK-norm, no softcap, no embedding norm, Qwen2's q/k/v biases
  model.safetensors  the weights (or model.safetensors.index.json and its shards): an 8-byte
                     little-endian header length, a JSON header {name: {dtype, shape,
                     data_offsets}}, then the raw little-endian tensors
  tokenizer.json     a byte-level BPE (GPT-2's byte alphabet) -> tiktoken mergeable ranks

The name mapping, per layer i (Llama's names on the left):
  model.embed_tokens                      wte
  model.layers.i.input_layernorm          core.i.norm_1
  model.layers.i.self_attn.{q,k,v}_proj   core.i.attn.{q,k,v}      (weights and Qwen2's biases)
  model.layers.i.self_attn.o_proj         core.i.attn.proj
  model.layers.i.post_attention_layernorm core.i.norm_2
  model.layers.i.mlp.{gate,up}_proj       core.i.mlp.fc = [gate; up] (rows stacked)
  model.layers.i.mlp.down_proj            core.i.mlp.proj
  model.norm, lm_head                     norm_f, lm_head          (lm_head = wte when tied)
RoPE needs no permutation: HF stores q and k for rotate_half, pairing dimension i with
i + head_dim/2, which is loopgpt's apply_rotary.

Environment: HF_ENDPOINT (default https://huggingface.co; the tests point it at a file://
folder) and HF_TOKEN for gated models.
"""

import json
import os
import struct

import numpy as np
import torch

from data.common import download

HF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
MODEL_TYPES = ("llama", "qwen2")
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# GPT-2's split, used by a ByteLevel pre-tokenizer with use_regex (the tokenizers library's)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# the same after a Digits(individual_digits) pre-tokenizer (SmolLM): every digit a piece of
# its own, and a run of spaces before a digit ends where the digit's piece begins
GPT2_DIGITS_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


# ---- fetching ----------------------------------------------------------------------------------

def hf_folder(name, weights=True):
    """The local folder holding NAME's files: NAME itself if it is a folder, else the cache
    data/hf/<owner>--<name>/, filled from the hub on first use (config.json, tokenizer.json
    and, with weights, the safetensors). Offline: SystemExit with one line."""
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
    fetch("tokenizer.json")
    if weights and not os.path.exists(os.path.join(folder, "model.safetensors")):
        index = fetch("model.safetensors.index.json", missing_ok=True)
        if index is None:
            fetch("model.safetensors")
        else:
            with open(index) as f:
                for shard in sorted(set(json.load(f)["weight_map"].values())):
                    fetch(shard)
    return folder


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


# ---- safetensors -------------------------------------------------------------------------------

def read_safetensors(path):
    """{name: float32 tensor} from one .safetensors file."""
    with open(path, "rb") as f:
        data = bytearray(f.read())  # writable: torch.frombuffer wants that
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
        tensors[key] = t.reshape(info["shape"]).float()  # .float() copies: the bytes can go
    return tensors


def read_weights(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index):
        return read_safetensors(os.path.join(folder, "model.safetensors"))
    tensors = {}
    for shard in sorted(set(read_json(index)["weight_map"].values())):
        tensors.update(read_safetensors(os.path.join(folder, shard)))
    return tensors


# ---- config and weights ------------------------------------------------------------------------

def model_keys(hf):
    """loopgpt model keys (LoopGPTConfig fields) for the HF config dict `hf`, as a plain
    stack; a ValueError names what loopgpt cannot express."""
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise ValueError(f"model_type={kind!r}: loopgpt reads {', '.join(MODEL_TYPES)} (Llama-family) checkpoints")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (loopgpt's swiglu is silu)")
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
        problems.append(f"rope_scaling={scaling} (loopgpt has plain RoPE)")
    if hf.get("head_dim", d // heads) != d // heads:
        problems.append(f"head_dim={hf['head_dim']} is not hidden_size / num_attention_heads = {d // heads}")
    if kind == "llama" and hf.get("attention_bias"):
        problems.append("attention_bias=True (a bias on o_proj too; loopgpt's output projections have none)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=True")
    if hf.get("use_sliding_window") or (kind == "llama" and hf.get("sliding_window")):
        problems.append("sliding-window attention")
    if round(hf["intermediate_size"] / d * d) != hf["intermediate_size"]:
        problems.append(f"intermediate_size={hf['intermediate_size']} is not a whole multiple at hidden_size={d}")
    if problems:
        raise ValueError("this checkpoint is not expressible in loopgpt: " + "; ".join(problems))
    return dict(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048), n_embd=d,
                n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads,
                n_prelude=0, n_core=hf["num_hidden_layers"], n_coda=0, n_loops=1, injection="none",
                state_init="prelude", norm_gains=True, norm_eps=hf.get("rms_norm_eps", 1e-6), embed_norm=False,
                qkv_bias=kind == "qwen2", qk_norm=False, mlp="swiglu", mlp_ratio=hf["intermediate_size"] / d,
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)), softcap=0.0,
                rope_base=float(hf.get("rope_theta", 10000.0)))


def state_dict(tensors, keys):
    """loopgpt's state dict (the plain stack of model_keys) from the HF tensors."""
    t = dict(tensors)

    def take(name):
        if name not in t:
            raise ValueError(f"the checkpoint has no {name}")
        return t.pop(name)

    sd = {"wte.weight": take("model.embed_tokens.weight"), "norm_f.weight": take("model.norm.weight")}
    head = t.pop("lm_head.weight", None)
    if keys["tie_embeddings"]:
        sd["lm_head.weight"] = sd["wte.weight"]
    elif head is None:
        raise ValueError("the checkpoint has no lm_head.weight and tie_word_embeddings is false")
    else:
        sd["lm_head.weight"] = head
    for i in range(keys["n_core"]):
        hf, ours = f"model.layers.{i}.", f"core.{i}."
        sd[ours + "norm_1.weight"] = take(hf + "input_layernorm.weight")
        sd[ours + "norm_2.weight"] = take(hf + "post_attention_layernorm.weight")
        for x in "qkv":
            sd[ours + f"attn.{x}.weight"] = take(hf + f"self_attn.{x}_proj.weight")
            if keys["qkv_bias"]:
                sd[ours + f"attn.{x}.bias"] = take(hf + f"self_attn.{x}_proj.bias")
        sd[ours + "attn.proj.weight"] = take(hf + "self_attn.o_proj.weight")
        sd[ours + "mlp.fc.weight"] = torch.cat([take(hf + "mlp.gate_proj.weight"), take(hf + "mlp.up_proj.weight")])
        sd[ours + "mlp.proj.weight"] = take(hf + "mlp.down_proj.weight")
    t = {k: v for k, v in t.items() if not k.endswith("rotary_emb.inv_freq")}  # old exports keep RoPE's table
    if t:
        raise ValueError(f"the checkpoint has {len(t)} tensors loopgpt does not use, e.g. {sorted(t)[0]}")
    return sd


def load_model(name):
    """(model keys, state dict, tokenizer dict) of the HF checkpoint NAME."""
    folder = hf_folder(name)
    keys = model_keys(read_json(os.path.join(folder, "config.json")))
    return keys, state_dict(read_weights(folder), keys), load_tokenizer_dict(name)


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
    tok, hf = read_json(os.path.join(folder, "tokenizer.json")), read_json(os.path.join(folder, "config.json"))
    model = tok.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or tok.get("normalizer"):
        raise ValueError(f"{name}'s tokenizer is not a plain byte-level BPE (a SentencePiece-style one, with byte "
                         "fallback or a normalizer, e.g. Llama 2 / TinyLlama): loopgpt's tiktoken-based data "
                         "pipeline cannot reproduce it")
    pattern = split_pattern(tok.get("pre_tokenizer"))
    to_byte = byte_alphabet()
    vocab = model["vocab"]
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
    if eot is None:
        raise ValueError(f"{name}: config.json's eos_token_id={eos} is not one of the tokenizer's special tokens")
    if len(ranks) + len([i for i in specials.values() if i >= len(ranks)]) > 65536:
        raise ValueError(f"{name}'s tokenizer has more than 65,536 tokens: loopgpt's token files are uint16")
    return {"kind": "hf", "name": name, "pattern": pattern, "ranks": ranks, "specials": specials, "eot": eot}
