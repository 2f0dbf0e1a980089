"""Strict converter for the authors' checkpoint layout (spec B4) and LLM init from a local HF Qwen2 directory."""
import pytest
import torch

from pixelsail_testing import PROJECT


def _official_layout(model):
    """Our state dict written back in the authors' key layout (the inverse of the converter's table)."""
    out = {}
    for k, v in model.state_dict().items():
        if k in ("vis_embed.weight", "vp_embed.weight"):
            out["single_transformer.model." + k] = v.clone()
        elif k.startswith("llm.model."):
            out["single_transformer.model." + k[len("llm.model."):]] = v.clone()
        elif k.startswith("llm.lm_head."):
            out["single_transformer.lm_head." + k[len("llm.lm_head."):]] = v.clone()
        elif k.startswith("mask_head."):
            out[k[len("mask_head."):]] = v.clone()
        else:
            raise AssertionError(f"unexpected model key {k}")
    return out


def test_converter_roundtrip_strict(make_model, tmp_path):
    from psalm.checkpoint.strict import IncompatibleKeysError

    from pixel_sail.converter import load_official_checkpoint

    src = make_model(seed=1)
    sd = _official_layout(src)
    assert "single_transformer.model.vis_embed.weight" in sd and "upsample_blocks.0.2.depthwise.weight" in sd
    sd["radio_distill_linear.weight"] = torch.zeros(4, 4)
    sd["mask2former_distill_linear.weight"] = torch.zeros(256, 16)
    path = tmp_path / "iter_100.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    dst = make_model(seed=2)
    conv = load_official_checkpoint(dst, str(path))
    assert set(conv.dropped) == {"radio_distill_linear.weight", "mask2former_distill_linear.weight"}
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    inp_model = make_model(seed=3)
    # unexpected / missing / mis-shaped keys are errors, and nothing is loaded
    before = {k: v.clone() for k, v in inp_model.state_dict().items()}
    for bad, match in (({**sd, "extra.weight": torch.zeros(1)}, "unexpected"),
                       ({k: v for k, v in sd.items() if not k.startswith("image_feature_projector.2")}, "missing"),
                       ({**sd, "seg_token_projector.2.weight": torch.zeros(3, 3)}, "mis-shaped")):
        with pytest.raises(IncompatibleKeysError, match=match):
            load_official_checkpoint(inp_model, bad)
    for k, v in inp_model.state_dict().items():
        assert torch.equal(v, before[k])
    # a tied lm_head may be absent from the file
    tied = {k: v for k, v in sd.items() if not k.startswith("single_transformer.lm_head")}
    conv = load_official_checkpoint(make_model(seed=4), tied)
    assert conv.allowed_missing == ["llm.lm_head.weight"]


def test_convert_official_cli(make_model, tmp_path, tiny_tokenizer_dir):
    import importlib.util

    src = make_model(seed=5)
    torch.save(_official_layout(src), tmp_path / "ckpt.pth")
    spec = importlib.util.spec_from_file_location("pixel_sail_convert", PROJECT / "convert_official.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--config-file", str(PROJECT / "configs/tiny/pixelsail_tiny.yaml"), "--checkpoint", str(tmp_path / "ckpt.pth"),
              "--output", str(tmp_path / "out"), "MODEL.PIXEL_SAIL.TOKENIZER", tiny_tokenizer_dir])
    saved = torch.load(tmp_path / "out" / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert torch.equal(saved["vis_embed.weight"], src.vis_embed.weight)
    assert (tmp_path / "out" / "config.yaml").is_file()


def test_llm_init_from_local_qwen2_dir(tiny_cfg, tiny_tokenizer_dir, tmp_path):
    """INIT 'pretrained': the weights of a local HF Qwen2 directory (written here in the HF format) are
    loaded, the tokenizer gets the official tokens and the embeddings grow to hold them; a dimension that
    disagrees with the directory's config.json is an error; INIT 'pretrained' without a directory too."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from pixel_sail import PixelSAIL
    from pixel_sail.tokens import official_special_tokens

    base_tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(base_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    hf.save_pretrained(tmp_path / "qwen")
    base_tok.save_pretrained(tmp_path / "qwen")
    cfg = tiny_cfg.clone()
    cfg.merge_from_list(["MODEL.PIXEL_SAIL.LLM.INIT", "pretrained", "MODEL.PIXEL_SAIL.LLM.NAME_OR_PATH", str(tmp_path / "qwen"),
                         "MODEL.PIXEL_SAIL.TOKENIZER", "", "MODEL.PIXEL_SAIL.LLM.MAX_POSITION_EMBEDDINGS",
                         hf.config.max_position_embeddings, "MODEL.PIXEL_SAIL.LLM.RMS_NORM_EPS", hf.config.rms_norm_eps,
                         "MODEL.PIXEL_SAIL.LLM.ROPE_THETA", float(hf.config.rope_parameters["rope_theta"])])
    model = PixelSAIL(cfg)
    vocab = model.tokenizer.get_vocab()
    assert all(t in vocab for t in official_special_tokens(cfg.MODEL.PIXEL_SAIL.NUM_VISUAL_PROMPTS))
    assert model.llm.get_input_embeddings().weight.shape[0] >= len(model.tokenizer)
    n = len(base_tok)
    torch.testing.assert_close(model.llm.get_input_embeddings().weight[:n], hf.get_input_embeddings().weight)
    torch.testing.assert_close(model.llm.model.layers[1].mlp.down_proj.weight, hf.model.layers[1].mlp.down_proj.weight)
    assert model.llm.model.rotary_emb.mrope_section == [0, 4, 4]
    for key, value, match in (("NUM_HIDDEN_LAYERS", 3, "num_hidden_layers"), ("ROPE_THETA", 123.0, "rope_theta"),
                              ("TIE_WORD_EMBEDDINGS", False, "tie_word_embeddings")):
        bad = cfg.clone()
        bad.merge_from_list([f"MODEL.PIXEL_SAIL.LLM.{key}", value])
        with pytest.raises(ValueError, match=match):
            PixelSAIL(bad)
    nodir = cfg.clone()
    nodir.merge_from_list(["MODEL.PIXEL_SAIL.LLM.NAME_OR_PATH", str(tmp_path / "missing"),
                           "MODEL.PIXEL_SAIL.TOKENIZER", tiny_tokenizer_dir])
    with pytest.raises(FileNotFoundError, match="INIT='random'"):
        PixelSAIL(nodir)


def test_llm_init_checkpoint_fine_tunes_from_model_weights(tiny_cfg, tmp_path):
    """INIT 'checkpoint' (fine-tuning a trained Pixel-SAIL): every key, the LLM's included, comes from
    MODEL.WEIGHTS; a checkpoint without the LLM keys is an error (never a silently random LLM), and so is
    INIT 'random' with a full MODEL.WEIGHTS (two sources for ``llm.*``)."""
    from psalm.checkpoint.strict import IncompatibleKeysError

    from pixel_sail import PixelSAIL
    from pixel_sail.engine import PixelSAILTrainer

    torch.manual_seed(3)
    trained = PixelSAIL(tiny_cfg)
    torch.save({"model": trained.state_dict()}, tmp_path / "trained.pth")
    cfg = tiny_cfg.clone()
    cfg.merge_from_list(["MODEL.PIXEL_SAIL.LLM.INIT", "checkpoint", "MODEL.PSALM.INIT.RANDOM", "[]",
                         "MODEL.WEIGHTS", str(tmp_path / "trained.pth")])
    torch.manual_seed(4)
    model = PixelSAIL(cfg)
    assert not torch.equal(model.llm.model.layers[0].mlp.up_proj.weight, trained.llm.model.layers[0].mlp.up_proj.weight)
    PixelSAILTrainer.initialize_weights(cfg, model)
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    partial = {k: v for k, v in trained.state_dict().items() if not k.startswith("llm.")}
    torch.save({"model": partial}, tmp_path / "no_llm.pth")
    cfg_partial = cfg.clone()
    cfg_partial.merge_from_list(["MODEL.WEIGHTS", str(tmp_path / "no_llm.pth")])
    with pytest.raises(IncompatibleKeysError, match="llm.model.layers.0"):
        PixelSAILTrainer.initialize_weights(cfg_partial, PixelSAIL(cfg_partial))
    cfg_random = cfg.clone()
    cfg_random.merge_from_list(["MODEL.PIXEL_SAIL.LLM.INIT", "random"])
    with pytest.raises(IncompatibleKeysError, match="random initialisation"):
        PixelSAILTrainer.initialize_weights(cfg_random, PixelSAIL(cfg_random))
