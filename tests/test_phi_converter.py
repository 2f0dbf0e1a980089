"""Phi key conversion: fused qkv, official keys, an HF phi-1_5-format directory, tools/convert_phi.py."""

import json
import pathlib
import sys

import pytest
import torch

from psalm.checkpoint import load_strict
from psalm.checkpoint.phi_keys import (
    fuse_qkv,
    hf_phi_to_psalm,
    official_llm_to_psalm,
    read_hf_phi_dir,
    split_fused_qkv,
)
from psalm.config import get_psalm_cfg
from psalm.modeling.llm import build_llm, load_tokenizer, tokenizer_vocab_plan
from psalm.data.tokenizer import build_tiny_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
HEADS, HIDDEN = 4, 64


def phi15_config(vocab: int) -> dict:
    """config.json as microsoft/phi-1_5 publishes it (transformers 4.37 layout), tiny sizes."""
    return {
        "_name_or_path": "microsoft/phi-1_5",
        "architectures": ["PhiForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "embd_pdrop": 0.0,
        "eos_token_id": None,
        "hidden_act": "gelu_new",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": 256,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048,
        "model_type": "phi",
        "num_attention_heads": HEADS,
        "num_hidden_layers": 2,
        "num_key_value_heads": None,
        "partial_rotary_factor": 0.5,
        "qk_layernorm": False,
        "resid_pdrop": 0.0,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.37.0",
        "use_cache": True,
        "vocab_size": vocab,
    }


def phi15_state_dict(vocab: int) -> dict:
    """Random fp16 weights under the real phi-1_5 names (q/k/v_proj, dense, fc1/fc2, lm_head with bias)."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (vocab, HIDDEN),
        "model.final_layernorm.weight": (HIDDEN,),
        "model.final_layernorm.bias": (HIDDEN,),
        "lm_head.weight": (vocab, HIDDEN),
        "lm_head.bias": (vocab,),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "dense"):
            shapes[f"{p}self_attn.{n}.weight"], shapes[f"{p}self_attn.{n}.bias"] = (HIDDEN, HIDDEN), (HIDDEN,)
        shapes[f"{p}mlp.fc1.weight"], shapes[f"{p}mlp.fc1.bias"] = (256, HIDDEN), (256,)
        shapes[f"{p}mlp.fc2.weight"], shapes[f"{p}mlp.fc2.bias"] = (HIDDEN, 256), (HIDDEN,)
        shapes[f"{p}input_layernorm.weight"], shapes[f"{p}input_layernorm.bias"] = (HIDDEN,), (HIDDEN,)
    sd = {k: (torch.randn(s, generator=g) * (0.3 if len(s) == 2 else 0.1)) for k, s in shapes.items()}
    for k in sd:
        if "layernorm.weight" in k:
            sd[k] += 1.0
    return {k: v.half() for k, v in sd.items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A phi-1_5-format directory: config.json, model.safetensors (fp16) and a base tokenizer (no pad)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("phi15")
    tok = build_tiny_tokenizer(add_psalm_tokens=False)
    tok.save_pretrained(str(d))
    vocab = len(tok) + 7  # like phi-1_5: 51200 rows for 50295 tokens
    (d / "config.json").write_text(json.dumps(phi15_config(vocab)))
    save_file(phi15_state_dict(vocab), str(d / "model.safetensors"))
    return d


def tiny_cfg(hf_dir, vocab, tokenizer_dir=""):
    cfg = get_psalm_cfg()
    llm = cfg.MODEL.PSALM.LLM
    llm.NAME_OR_PATH, llm.VOCAB_SIZE, llm.HIDDEN_SIZE, llm.INTERMEDIATE_SIZE = str(hf_dir), vocab, HIDDEN, 256
    llm.NUM_HIDDEN_LAYERS, llm.NUM_ATTENTION_HEADS = 2, HEADS
    cfg.MODEL.PSALM.TOKENIZER = str(tokenizer_dir)
    return cfg


def test_split_fused_qkv_is_interleaved_per_head():
    nh, hd, hin = 3, 2, 5
    fused = torch.arange(3 * nh * hd * hin, dtype=torch.float64).reshape(3 * nh * hd, hin)
    q, k, v = split_fused_qkv(fused, nh)
    for h in range(nh):  # rows of head h: [q_h (hd rows), k_h, v_h]
        base = h * 3 * hd
        assert torch.equal(q[h * hd : (h + 1) * hd], fused[base : base + hd])
        assert torch.equal(k[h * hd : (h + 1) * hd], fused[base + hd : base + 2 * hd])
        assert torch.equal(v[h * hd : (h + 1) * hd], fused[base + 2 * hd : base + 3 * hd])
    assert torch.equal(fuse_qkv(q, k, v, nh), fused)
    bias = torch.randn(3 * nh * hd)
    assert torch.equal(fuse_qkv(*split_fused_qkv(bias, nh), nh), bias)
    with pytest.raises(ValueError, match="num_heads"):
        split_fused_qkv(fused, 4)


@pytest.mark.golden
def test_official_golden_keys_load_strictly(golden_dir):
    from safetensors.torch import load_file

    sd = load_file(str(golden_dir / "psalm_e2e" / "state_dict.safetensors"))
    conv = official_llm_to_psalm(sd, HEADS, dst_prefix="llm.")
    assert not any(k.startswith(("llm.model.vision_tower", "llm.model.mm_projector")) for k in conv.state_dict)
    assert "llm.model.layers.0.self_attn.q_proj.weight" in conv.state_dict and not conv.dropped
    cfg = get_psalm_cfg()
    llm_cfg = cfg.MODEL.PSALM.LLM
    llm_cfg.VOCAB_SIZE, llm_cfg.HIDDEN_SIZE, llm_cfg.INTERMEDIATE_SIZE = 387, HIDDEN, 256
    llm_cfg.NUM_HIDDEN_LAYERS, llm_cfg.NUM_ATTENTION_HEADS = 2, HEADS
    model = build_llm(cfg, device="meta")
    report = load_strict(model, {k[len("llm.") :]: v for k, v in conv.state_dict.items()})
    # embed, 2 x (q, k, v, dense, fc1, fc2, input_layernorm: weight + bias), final_layernorm, lm_head
    assert report.ok and len(conv.state_dict) == len(model.state_dict()) == 1 + 2 * 14 + 2 + 1


def test_hf_directory_conversion_and_vocab_resize(hf_dir):
    sd, config = read_hf_phi_dir(hf_dir)
    tok = load_tokenizer(hf_dir)  # adds [PAD] then [SEG]
    base, mean_ids = tokenizer_vocab_plan(tok)
    assert base == len(tok) - 2 and mean_ids == [base] and sd["model.embed_tokens.weight"].shape[0] == base + 7
    conv = hf_phi_to_psalm(sd, config, num_base_tokens=base, target_vocab_size=len(tok), mean_init_ids=mean_ids)
    assert list(conv.dropped) == ["lm_head.bias"]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        w, src = conv.state_dict[key], sd[key]
        assert w.shape == (len(tok), HIDDEN)
        assert torch.equal(w[:base], src[:base])
        assert torch.allclose(w[base].float(), src[:base].float().mean(0), atol=1e-3)  # [PAD] = mean (fp16)
        assert not torch.equal(w[base + 1], src[base + 1])  # [SEG] is new, not the checkpoint's spare row
    again = hf_phi_to_psalm(sd, config, num_base_tokens=base, target_vocab_size=len(tok), mean_init_ids=mean_ids)
    assert torch.equal(again.state_dict["lm_head.weight"], conv.state_dict["lm_head.weight"])  # seeded
    other = hf_phi_to_psalm(sd, config, base, len(tok), mean_ids, seed=1)
    assert not torch.equal(other.state_dict["lm_head.weight"][-1], conv.state_dict["lm_head.weight"][-1])
    with pytest.raises(ValueError, match="num_base_tokens"):
        hf_phi_to_psalm(sd, config, target_vocab_size=len(tok))
    # a checkpoint that already has the wanted rows (PSALM-trained vocabulary) is not re-initialised
    same = hf_phi_to_psalm(sd, config, base, base + 7, mean_ids)
    assert torch.equal(same.state_dict["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    # the transformers-4.36 fused layout converts to the same weights
    fused = {k: v for k, v in sd.items() if not any(n in k for n in ("q_proj", "k_proj", "v_proj"))}
    for i in range(2):
        p = f"model.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            fused[f"{p}query_key_value.{kind}"] = fuse_qkv(
                *(sd[f"{p}{n}.{kind}"] for n in ("q_proj", "k_proj", "v_proj")), HEADS
            )
    conv2 = hf_phi_to_psalm(fused, config, base, len(tok), mean_ids)
    assert conv2.state_dict.keys() == conv.state_dict.keys()
    assert all(torch.equal(conv2.state_dict[k], conv.state_dict[k]) for k in conv.state_dict)
    with pytest.raises(ValueError, match="remote-code"):
        hf_phi_to_psalm({"transformer.h.0.mixer.Wqkv.weight": torch.zeros(3, 3)}, config)


def test_build_llm_from_hf_dir_matches_transformers(hf_dir):
    """Our LLM built from the directory equals transformers' own PhiForCausalLM on the base tokens."""
    from transformers import PhiForCausalLM

    tok = load_tokenizer(hf_dir)
    ours = build_llm(tiny_cfg(hf_dir, len(tok)), tokenizer=tok).eval()
    assert ours.lm_head.bias is None and ours.model.embed_tokens.weight.dtype == torch.float32
    ref = PhiForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.tensor([tok.encode("This is an image, Please do Panoptic Segmentation.", add_special_tokens=False)])
    assert int(ids.max()) < len(tok) - 2
    with torch.no_grad():
        h_ours = ours.model(input_ids=ids, use_cache=False).last_hidden_state
        h_ref = ref.model(input_ids=ids, use_cache=False).last_hidden_state
        assert (h_ours - h_ref).abs().max() < 1e-5
        logits_ref = ref.lm_head(h_ref) - ref.lm_head.bias
        assert (ours.lm_head(h_ours)[..., : len(tok) - 2] - logits_ref[..., : len(tok) - 2]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="disagrees"):
        cfg = tiny_cfg(hf_dir, len(tok))
        cfg.MODEL.PSALM.LLM.INTERMEDIATE_SIZE = 128
        build_llm(cfg, tokenizer=tok)
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_llm(tiny_cfg(hf_dir / "missing", len(tok)), tokenizer=tok)


def test_convert_phi_cli(hf_dir, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import convert_phi
    finally:
        sys.path.pop(0)
    vocab = len(build_tiny_tokenizer())
    out = tmp_path / "phi.pth"
    opts = [
        "MODEL.PSALM.LLM.VOCAB_SIZE",
        str(vocab),
        "MODEL.PSALM.LLM.HIDDEN_SIZE",
        str(HIDDEN),
        "MODEL.PSALM.LLM.INTERMEDIATE_SIZE",
        "256",
        "MODEL.PSALM.LLM.NUM_HIDDEN_LAYERS",
        "2",
        "MODEL.PSALM.LLM.NUM_ATTENTION_HEADS",
        str(HEADS),
    ]
    rc = convert_phi.main(
        ["--hf-dir", str(hf_dir), "--output", str(out), "--save-tokenizer", str(tmp_path / "tok"), *opts]
    )
    assert rc == 0
    ckpt = torch.load(out, weights_only=True)
    assert all(k.startswith("llm.") for k in ckpt["model"]) and "lm_head.bias" in ckpt["dropped"]
    tok = load_tokenizer(tmp_path / "tok")
    assert len(tok) == vocab and tok.convert_tokens_to_ids("[SEG]") == vocab - 1
    cfg = tiny_cfg("", vocab)
    model = build_llm(cfg, tokenizer=tok, init_weights=False)
    assert load_strict(model, {k[4:]: v for k, v in ckpt["model"].items()}).ok
    # the default (full-size) config does not describe the dir: its tokenizer (checked first) or its architecture
    with pytest.raises(ValueError, match="disagrees|does not match the model's embedding rows"):
        convert_phi.main(["--hf-dir", str(hf_dir), "--output", str(tmp_path / "x.pth")])
    assert not (tmp_path / "x.pth").exists()
