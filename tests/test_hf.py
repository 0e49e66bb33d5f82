"""
Hugging Face Llama-family checkpoints (data/huggingface.py), offline: each test writes a small
random checkpoint in the hub's format (config.json, safetensors, tokenizer.json) and checks
loopgpt's reading of it against a reference Llama forward written here from the equations.
"""

import json
import os
import shutil
import struct
import sys

import pytest
import regex
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data.huggingface as hf  # noqa: E402
from data.tokenizer import load_tokenizer, train_bpe  # noqa: E402
from data.common import storage_dtype  # noqa: E402
from loopgpt import LoopGPT, LoopGPTConfig, init_from_source  # noqa: E402

ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
SPECIALS = ["<|endoftext|>", "<|im_start|>"]  # at ids 0 and 1, before the bytes (as SmolLM's)
TEXT = ("def f(x):\n    return x + 12345  # add 7 to the 2024 numbers\n\nThe quick brown fox, "
        "it's 99 years old; we'll see.  Spaces   1 2  3 and tabs\there. ") * 20


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def byte_level(b):
    """Bytes in GPT-2's printable byte alphabet (the inverse of hf.byte_alphabet, built here)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, n = {}, 0
    for x in range(256):
        table[x] = chr(x) if x in printable else chr(256 + n)
        n += x not in printable
    return "".join(table[x] for x in b)


def tokenizer_json(vocab_size=300):
    """A byte-level BPE in tokenizer.json's format (Digits + ByteLevel, as SmolLM), merged tokens
    numbered in merge order; returns (json dict, {bytes: id})."""
    ranks = train_bpe([TEXT], vocab_size)  # bytes 0..255, then merges in order
    ids = {b: i + len(SPECIALS) for b, i in ranks.items()}
    merges = []
    for b, i in sorted(ranks.items(), key=lambda kv: kv[1])[256:]:
        a = next(b[:k] for k in range(1, len(b)) if ranks.get(b[:k], 1 << 30) < i and ranks.get(b[k:], 1 << 30) < i)
        merges.append(f"{byte_level(a)} {byte_level(b[len(a):])}")
    vocab = {byte_level(b): i for b, i in ids.items()}
    vocab.update({s: i for i, s in enumerate(SPECIALS)})
    tok = {"version": "1.0", "normalizer": None,
           "added_tokens": [{"id": i, "content": s, "special": True} for i, s in enumerate(SPECIALS)],
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
               {"type": "Digits", "individual_digits": True},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
           "model": {"type": "BPE", "byte_fallback": False, "vocab": vocab, "merges": merges}}
    return tok, ids


def llama_config(kind="llama", tie=True, n_kv=2, layers=6, **kw):
    return dict(model_type=kind, vocab_size=320, hidden_size=32, intermediate_size=80, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=n_kv, rms_norm_eps=1e-5, rope_theta=5000.0,
                max_position_embeddings=64, tie_word_embeddings=tie, hidden_act="silu", eos_token_id=0, **kw)


def random_weights(c, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, hd, I = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"], c["intermediate_size"]

    def w(*shape, std=0.1):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def gain():  # norm gains near 1, different per channel: a missed gain shows
        return (1 + 0.3 * torch.randn(d, generator=g)).to(dtype)

    # a small embedding, as trained models have: RMS 0.02, so rms_norm_eps = 1e-5 matters
    t = {"model.embed_tokens.weight": w(c["vocab_size"], d, std=0.02), "model.norm.weight": gain()}
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = w(c["vocab_size"], d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"] = gain(), gain()
        t[p + "self_attn.q_proj.weight"] = w(c["num_attention_heads"] * hd, d)
        t[p + "self_attn.k_proj.weight"] = w(c["num_key_value_heads"] * hd, d)
        t[p + "self_attn.v_proj.weight"] = w(c["num_key_value_heads"] * hd, d)
        t[p + "self_attn.o_proj.weight"] = w(d, c["num_attention_heads"] * hd)
        if c["model_type"] == "qwen2":
            for x, n in (("q", c["num_attention_heads"]), ("k", c["num_key_value_heads"]), ("v", c["num_key_value_heads"])):
                t[p + f"self_attn.{x}_proj.bias"] = w(n * hd, std=0.5)
        if c["model_type"] == "qwen3":  # a gain per head dimension, shared by the heads
            t[p + "self_attn.q_norm.weight"], t[p + "self_attn.k_norm.weight"] = gain()[:hd], gain()[:hd]
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = w(I, d), w(I, d)
        t[p + "mlp.down_proj.weight"] = w(d, I)
    return t


def write_checkpoint(folder, config, tensors, shards=1):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json()[0], f)
    if shards == 1:
        write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
        return
    names, weight_map = sorted(tensors), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        write_safetensors(os.path.join(folder, file), {n: tensors[n] for n in part})
        weight_map.update({n: file for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def reference_logits(t, c, idx):
    """A Llama forward from the equations, on the HF tensors (float64): RMSNorm with eps and
    gain; RoPE rotating each head's halves (rotate_half); GQA by repeating K/V heads; causal
    softmax attention; SwiGLU down(silu(gate x) * up x); final norm; head (tied or not)."""
    t = {k: v.double() for k, v in t.items()}
    H, Hkv, d = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    hd, T = d // H, idx.size(1)

    def rms(x, g):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]) * g

    inv = 1.0 / c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    def rope(x):
        rotated = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + rotated * sin

    x = t["model.embed_tokens.weight"][idx]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, t[p + "input_layernorm.weight"])

        def proj(name, n):
            y = a @ t[p + f"self_attn.{name}_proj.weight"].T
            if p + f"self_attn.{name}_proj.bias" in t:
                y = y + t[p + f"self_attn.{name}_proj.bias"]
            y = y.view(idx.size(0), T, n, hd)
            if p + f"self_attn.{name}_norm.weight" in t:  # Qwen3: each head normed, with a gain, before RoPE
                y = rms(y, t[p + f"self_attn.{name}_norm.weight"])
            return y.transpose(1, 2)

        q, k, v = rope(proj("q", H)), rope(proj("k", Hkv)), proj("v", Hkv)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / hd ** 0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(idx.size(0), T, d)
        x = x + y @ t[p + "self_attn.o_proj.weight"].T
        m = rms(x, t[p + "post_attention_layernorm.weight"])
        gate, up = m @ t[p + "mlp.gate_proj.weight"].T, m @ t[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ t[p + "mlp.down_proj.weight"].T
    x = rms(x, t["model.norm.weight"])
    return x @ t["lm_head.weight" if "lm_head.weight" in t else "model.embed_tokens.weight"].T


def loopgpt_model(folder):
    keys, weights, tok = hf.load_model(str(folder))
    model = LoopGPT(LoopGPTConfig(**keys))
    model.load_state_dict(weights)
    return model.eval(), tok


CASES = {"llama tied GQA": (llama_config(), torch.float32, 1),
         "llama untied MHA bf16, 3 shards": (llama_config(tie=False, n_kv=4), torch.bfloat16, 3),
         "qwen2 biases": (llama_config(kind="qwen2", tie=False), torch.float32, 1),
         "qwen3 q/k norm gains": (llama_config(kind="qwen3", head_dim=8), torch.float32, 1)}


@pytest.mark.parametrize("case", CASES)
def test_loaded_model_matches_a_reference_llama_forward(case, tmp_path):
    c, dtype, shards = CASES[case]
    t = random_weights(c, dtype)
    write_checkpoint(tmp_path, c, t, shards)
    model, _ = loopgpt_model(tmp_path)
    idx = torch.randint(0, c["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(idx)
    ref = reference_logits(t, c, idx)
    assert ref.std() > 0.1  # not a degenerate comparison
    assert (logits.double() - ref).abs().max() < 2e-5
    if case == "qwen3 q/k norm gains":  # the gains matter (and sit before RoPE: they do not commute with it)
        plain = {k: torch.ones_like(v) if k.endswith(("q_norm.weight", "k_norm.weight")) else v for k, v in t.items()}
        assert (logits.double() - reference_logits(plain, c, idx)).abs().max() > 1e-3
    if case == "llama tied GQA":  # each convention the mapping depends on, broken one at a time, shows
        for broken in ({"rms_norm_eps": 1e-8}, {"rope_theta": 10000.0}):
            assert (logits.double() - reference_logits(t, {**c, **broken}, idx)).abs().max() > 1e-3
        swapped = dict(t)
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}.mlp."
            swapped[p + "gate_proj.weight"], swapped[p + "up_proj.weight"] = t[p + "up_proj.weight"], t[p + "gate_proj.weight"]
        assert (logits.double() - reference_logits(swapped, c, idx)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_a_converted_model_without_sharing_reproduces_the_hf_model(tmp_path, kind):
    c = llama_config(kind=kind)
    t = random_weights(c)
    write_checkpoint(tmp_path, c, t)
    source, _ = loopgpt_model(tmp_path)
    keys = dict(source.config.to_dict(), n_prelude=2, n_core=3, n_coda=1, n_loops=1)
    if kind == "qwen3":  # the q/k norms read the LoRA-adapted projections (B = 0 at init: the same)
        keys.update(lora_rank=2, lora_targets="q,k")
    target = LoopGPT(LoopGPTConfig(**keys)).eval()
    init_from_source(target, source, "average")
    idx = torch.randint(0, c["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (target(idx)[0].double() - reference_logits(t, c, idx)).abs().max() < 2e-5


def test_fetching_from_the_hub_and_offline(tmp_path, monkeypatch, capsys):
    hub = tmp_path / "hub"
    c = llama_config()
    write_checkpoint(hub / "org" / "tiny" / "resolve" / "main", c, random_weights(c), shards=2)
    monkeypatch.setattr(hf, "HF_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", hub.as_uri())
    folder = hf.hf_folder("org/tiny")
    assert folder == str(tmp_path / "cache" / "org--tiny")
    assert sorted(os.listdir(folder)) == ["config.json", "model-00001-of-00002.safetensors",
                                          "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                          "tokenizer.json"]
    keys, weights, tok = hf.load_model("org/tiny")  # from the cache now
    assert keys["n_core"] == 6 and tok["eot"] == "<|endoftext|>"
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: offline
    with pytest.raises(SystemExit) as e:
        hf.hf_folder("org/other")
    assert str(e.value).startswith("error: could not download http://127.0.0.1:9/org/other/resolve/main/config.json")
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "cache" / "org--other" / "config.json.part")


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma"}, "model_type='gemma'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type='llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'"),
    ({"attention_bias": True}, "o_proj"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_what_loopgpt_cannot_express_says_so(change, message):
    with pytest.raises(ValueError, match=message):
        hf.model_keys({**llama_config(), **change})


def test_a_missing_or_extra_tensor_is_an_error(tmp_path):
    c = llama_config()
    t = random_weights(c)
    for broken, message in (({k: v for k, v in t.items() if "layers.3.mlp.up" not in k}, "no model.layers.3.mlp.up"),
                            ({**t, "model.layers.9.extra": t["model.norm.weight"]}, "does not use")):
        with pytest.raises(ValueError, match=message):
            hf.state_dict(broken, hf.model_keys(c))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a safetensors file"):
        hf.read_safetensors(str(tmp_path / "bad.safetensors"))


def hf_pretokenize(text):
    """The Digits(individual_digits) + ByteLevel(use_regex) pre-tokenizer as the tokenizers
    library runs it: split off every digit, then GPT-2's regex inside each piece."""
    pieces = [p for p in regex.split(r"(\p{N})", text) if p]
    return [m for p in pieces for m in regex.findall(hf.GPT2_PATTERN, p)]


def test_tokenizer_json_becomes_the_same_bpe(tmp_path):
    c = llama_config()
    write_checkpoint(tmp_path, c, random_weights(c))
    tok = hf.load_tokenizer_dict(str(tmp_path))
    enc = load_tokenizer(tok)
    _, ids = tokenizer_json()
    # the split: one regex does what the two pre-tokenizers do one after the other
    for text in (TEXT, "a  1", "x 12\n\n  3 ", "  42  ", "1 2 3\t4"):
        assert regex.findall(tok["pattern"], text) == hf_pretokenize(text)
    # the ids: bytes at 2.. after the two special tokens, each merged token where tokenizer.json put it
    reference = load_tokenizer({"kind": "bpe", "name": "ref", "pattern": tok["pattern"], "eot": "<|endoftext|>",
                                "ranks": [b.hex() for b, _ in sorted(((b, i) for b, i in ids.items()), key=lambda x: x[1])]})
    assert enc.encode_ordinary(TEXT) == [i + len(SPECIALS) for i in reference.encode_ordinary(TEXT)]
    assert enc.eot_token == 0 and enc.decode(enc.encode_ordinary(TEXT)) == TEXT
    assert enc.encode("<|im_start|>hi", allowed_special="all")[0] == 1


def test_tokenizers_loopgpt_cannot_reproduce_say_why(tmp_path):
    tok, _ = tokenizer_json()
    c = llama_config()
    def fallback_without_every_byte(t):  # (with all 256 byte characters as tokens, byte fallback never fires)
        t["model"].update(byte_fallback=True)
        t["model"]["vocab"].pop(byte_level(b"~"))

    for change, message in ((fallback_without_every_byte, r"\(byte fallback to <0x..> tokens\)"),
                            (lambda t: t.update(normalizer={"type": "NFC"}), r"\(a NFC normalizer\)"),
                            (lambda t: t["model"].update(type="Unigram"), r"\(a Unigram model\)"),
                            (lambda t: t["pre_tokenizer"].update(pretokenizers=[{"type": "Metaspace"}]), "pre-tokenizer"),
                            (lambda t: t["model"]["merges"].reverse(), "merge order")):
        broken = json.loads(json.dumps(tok))
        change(broken)
        os.makedirs(tmp_path, exist_ok=True)
        with open(tmp_path / "tokenizer.json", "w") as f:
            json.dump(broken, f)
        with open(tmp_path / "config.json", "w") as f:
            json.dump(c, f)
        with pytest.raises(ValueError, match=message):
            hf.load_tokenizer_dict(str(tmp_path))


def test_a_tokenizer_above_65536_ids_is_stored_as_uint32(tmp_path):
    """Llama 3 and Qwen2 put their special tokens past the BPE ranks (128,000+, 151,643+): the
    tokenizer converts, and its ids need uint32 token files."""
    tok, _ = tokenizer_json()
    tok["added_tokens"].append({"id": 70000, "content": "<|big|>", "special": True})
    with open(tmp_path / "tokenizer.json", "w") as f:
        json.dump(tok, f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(llama_config(), f)
    enc = load_tokenizer(hf.load_tokenizer_dict(str(tmp_path)))
    assert enc.n_vocab == 70001 and enc.encode("<|big|>", allowed_special="all") == [70000]
    assert storage_dtype(enc.n_vocab) == "uint32"

# ---- through the scripts, as a user runs them ---------------------------------------------------

from test_train import records, run  # noqa: E402
from test_train import data_dir  # noqa: E402,F401  (the module-scoped prepared corpus)


def test_prepare_and_train_from_a_hf_checkpoint(data_dir, tmp_path):
    c = llama_config()
    t = random_weights(c)
    write_checkpoint(tmp_path / "tiny", c, t)
    name = f"hf:{tmp_path / 'tiny'}"
    # the data must be in the model's tokens: the one-line error says how to make it
    p = run("train.py", f"--init_from={name}", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'x'}", ok=False)
    assert f"--tokenizer={name}" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    run("data/pydoc/prepare.py", f"--tokenizer={name}", f"--out_dir={tmp_path / 'data'}")
    common = [f"--init_from={name}", f"--data_dir={tmp_path / 'data'}", "--block_size=32", "--batch_size=4",
              "--eval_iters=2", "--eval_budgets=1", "--max_iters=2", "--eval_interval=2"]
    # nothing shared (1 + 4 + 1, one loop): the conversion is exact (tested in-process above)
    p = run("train.py", *common, "--n_prelude=1", "--n_core=4", "--n_coda=1", f"--out_dir={tmp_path / 'same'}")
    assert "initialised from " + name in p.stdout and "1 + 4⊗1 + 1" in p.stdout
    step0 = records(tmp_path / "same", "eval")[0]
    assert step0["step"] == 0 and step0["val"]["1"]["loss"] > 0
    # a loop: 1 + 2⊗2 + 1 from the 6 layers, trained on
    p = run("train.py", *common, "--n_prelude=1", "--n_core=2", "--n_coda=1", f"--out_dir={tmp_path / 'up'}")
    assert "1 + 2⊗2 + 1" in p.stdout and [e["step"] for e in records(tmp_path / "up", "eval")] == [0, 2]


def test_torchrun_fetches_a_hub_model_once_and_every_rank_reads_it(tmp_path, monkeypatch):
    # under torchrun only each machine's local rank 0 downloads (the weights are not there yet:
    # prepare.py fetched only the tokenizer); the other ranks wait at the barrier, then read
    hub, name = tmp_path / "hub", f"loopgpt-test/tiny{os.getpid()}"
    c = llama_config()
    write_checkpoint(hub / name / "resolve" / "main", c, random_weights(c), shards=2)
    cache = os.path.join(hf.HF_DIR, name.replace("/", "--"))
    monkeypatch.setenv("HF_ENDPOINT", hub.as_uri())
    try:
        run("data/pydoc/prepare.py", f"--tokenizer=hf:{name}", f"--out_dir={tmp_path / 'data'}")
        assert not any(f.endswith(".safetensors") for f in os.listdir(cache))
        run("torchrun", cmd=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", f"--init_from=hf:{name}", f"--data_dir={tmp_path / 'data'}",
                             f"--out_dir={tmp_path / 'out'}", "--n_prelude=1", "--n_core=2", "--n_coda=1",
                             "--block_size=32", "--batch_size=2", "--eval_iters=1", "--eval_budgets=1",
                             "--max_iters=1", "--eval_interval=1"])
        assert sorted(f for f in os.listdir(cache) if f.endswith(".safetensors")) == [
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert records(tmp_path / "out", "config")[0]["world"] == 2
    finally:
        shutil.rmtree(cache, ignore_errors=True)
