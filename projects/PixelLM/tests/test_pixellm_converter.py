"""The converter on a checkpoint written in the release layout from a tiny random PixelLM (no golden
data needed): ``.bin`` shards + index, LoRA merged (plain LLaMA keys), no vision tower, the
transformers-4.31 rotary buffers and the unused prompt-encoder modules present, + an HF CLIP dir."""
import json
import re

import pytest
import torch



def _to_release(sd: dict, spec: dict) -> tuple[dict, dict]:
    """Our keys -> the release's (the inverse of the converter), and the CLIP dir state dict."""
    rel, clip = {}, {}
    inv = {"proj_in": "0", "layers.0": "1", "proj_out": "2"}
    for k, v in sd.items():
        if k.startswith("vision_tower.clip."):
            clip["vision_model." + k[len("vision_tower.clip."):]] = v
            continue
        if k.startswith("llm.lm_head"):
            nk = k[len("llm."):]
        elif k.startswith("llm."):
            nk = k[len("llm."):]
        elif k.startswith(("mm_projector.", "out_mm_projector.", "image_feature_neck.")):
            nk = "model." + k
        elif k.startswith("text_hidden_fcs."):
            nk = "model.text_hidden_fcs.0." + k[len("text_hidden_fcs."):]
        elif k == "prompt_encoder.pe_layer.pe.positional_embedding":
            nk = "model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
        elif k.startswith("prompt_encoder."):
            nk = "model." + k
        elif k.startswith("mask_decoder."):
            r = k[len("mask_decoder."):]
            r = re.sub(r"\.layer_norm(\d)\.", r".norm\1.", r).replace(".layer_norm_final_attn.", ".norm_final_attn.")
            r = re.sub(r"^(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.(proj_in|layers\.0|proj_out)\.",
                       lambda m: f"{m.group(1)}.layers.{inv[m.group(2)]}.", r)
            r = r.replace("pe1.pe.positional_embedding", "pe1.positional_encoding_gaussian_matrix")
            nk = "model.mask_decoder." + r
        else:
            raise AssertionError(k)
        rel[nk] = v
    d = spec["llm"]["hidden_size"] // spec["llm"]["num_attention_heads"]
    for i in range(spec["llm"]["num_hidden_layers"]):
        rel[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    dim = spec["decoder"]["dim"]
    for i in range(4):
        rel[f"model.prompt_encoder.point_embeddings.{i}.weight"] = torch.randn(1, dim)
    rel["model.prompt_encoder.not_a_point_embed.weight"] = torch.randn(1, dim)
    rel["model.prompt_encoder.mask_downscaling.0.weight"] = torch.randn(4, 1, 2, 2)
    return rel, clip


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from safetensors.torch import save_file

    from pixellm.modeling.build import pixellm_module_tree

    spec = {"format": "psalm-pixellm-1",
            "llm": dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=256, rope_theta=10000.0,
                        hidden_act="silu", tie_word_embeddings=False),
            "vision": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=12, num_attention_heads=2, patch_size=14,
                           image_size=56, hidden_act="quick_gelu", layer_norm_eps=1e-5),
            "decoder": dict(dim=16, depth=2, num_heads=2, mlp_dim=32, iou_head_hidden_dim=16),
            "codebook": {"tokens_per_scale": 3, "scales": 2, "ids": list(range(32, 38))},
            "taps": [-2, -11], "llm_grid": 2, "pad_aware": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    torch.manual_seed(0)
    model = pixellm_module_tree(spec).eval()
    sd = model.state_dict()
    # the release's CLIP dir holds the PRE-interpolation 336-px-style table: 2x2 grid + CLS
    clip_pe = torch.randn(5, 16)
    rel, clip = _to_release(sd, spec)
    clip["vision_model.embeddings.position_embedding.weight"] = clip_pe
    tmp = tmp_path_factory.mktemp("pixellm_release")
    rel_dir = tmp / "hf_model"
    rel_dir.mkdir()
    keys = sorted(rel)
    shards = {"pytorch_model-00001-of-00002.bin": keys[:40], "pytorch_model-00002-of-00002.bin": keys[40:]}
    wm = {}
    for name, ks in shards.items():
        torch.save({k: rel[k] for k in ks}, rel_dir / name)
        wm.update({k: name for k in ks})
    (rel_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    llm = spec["llm"]
    (rel_dir / "config.json").write_text(json.dumps({
        "model_type": "llava", "architectures": ["PixelLMForCausalLM"], "image_feature_scale_num": 2,
        "mm_vision_select_layer": -2, "resize_vision_tower_size": 56, "pad_train_clip_images": True,
        "vocab_size": llm["vocab_size"], "hidden_size": llm["hidden_size"], "intermediate_size": llm["intermediate_size"],
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 256, "hidden_act": "silu", "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}))
    (rel_dir / "added_tokens.json").write_text(json.dumps({f"[SEG{i}]": 32 + i for i in range(6)} | {"<im_start>": 38, "<im_end>": 39}))
    clip_dir = tmp / "clip"
    clip_dir.mkdir()
    save_file({k: v.contiguous() for k, v in clip.items()}, str(clip_dir / "model.safetensors"))
    (clip_dir / "config.json").write_text(json.dumps(dict(spec["vision"], image_size=28, model_type="clip_vision_model")))
    return {"dir": rel_dir, "clip": clip_dir, "model": model, "spec": spec, "clip_pe": clip_pe, "tmp": tmp}


def test_convert_and_load_reproduces_the_model(release):
    from pixellm import get_pixellm_cfg
    from pixellm.checkpoint import convert_release
    from pixellm.modeling.meta_arch import PixelLM
    from pixellm.modeling.vision import interpolate_position_embedding

    out = release["tmp"] / "model"
    conv = convert_release(release["dir"], release["clip"], out, decoder_num_heads=2, dtype=None)
    assert conv.spec["taps"] == [-2, -11] and conv.spec["codebook"]["ids"] == list(range(32, 38))
    assert sorted({re.sub(r"\d+", "N", k) for k in conv.dropped}) == [
        "model.layers.N.self_attn.rotary_emb.inv_freq", "model.prompt_encoder.mask_downscaling.N.weight",
        "model.prompt_encoder.not_a_point_embed.weight", "model.prompt_encoder.point_embeddings.N.weight"]
    cfg = get_pixellm_cfg(None, ["MODEL.PIXELLM.MODEL_DIR", str(out)])
    m = PixelLM(cfg).eval()
    ref = release["model"].state_dict()
    got = m.state_dict()
    pe_key = "vision_tower.clip.embeddings.position_embedding.weight"
    assert torch.equal(got[pe_key], interpolate_position_embedding(release["clip_pe"], 4, compat=True))
    assert all(torch.equal(got[k], ref[k]) for k in ref if k != pe_key)


@pytest.mark.parametrize("problem", ["unexpected", "missing", "shape", "vision_tower"])
def test_convert_reports_bad_keys(release, tmp_path, problem):
    from pixellm.checkpoint import convert_release, load_release_state_dict
    from psalm.checkpoint.strict import IncompatibleKeysError

    sd = load_release_state_dict(release["dir"])
    bad = tmp_path / "hf_model"
    bad.mkdir()
    for f in ("config.json", "added_tokens.json"):
        (bad / f).write_text((release["dir"] / f).read_text())
    if problem == "unexpected":
        sd["model.extra_head.weight"] = torch.zeros(3)
    elif problem == "missing":
        del sd["model.mask_decoder.level_embed.weight"]
    elif problem == "shape":
        sd["model.out_mm_projector.2.bias"] = torch.zeros(7)
    else:
        sd["model.vision_tower.vision_tower.x"] = torch.zeros(1)
    torch.save(sd, bad / "pytorch_model.bin")
    err = ValueError if problem == "vision_tower" else IncompatibleKeysError
    with pytest.raises(err) as e:
        convert_release(bad, release["clip"], decoder_num_heads=2)
    word = {"unexpected": "extra_head", "missing": "level_embed", "shape": "out_mm_projector.2.bias",
            "vision_tower": "vision_tower"}[problem]
    assert word in str(e.value)
