"""Mask2Former .pkl -> psalm conversion: a real-format tiny pkl round trip, strict loading, clear failures."""

import importlib.util
import pickle
import re

import numpy as np
import pytest
import torch
from detectron2.modeling import build_backbone
from torch import nn

from psalm.checkpoint import IncompatibleKeysError
from psalm.checkpoint.mask2former import convert_mask2former_checkpoint, load_mask2former_into
from psalm.config import get_psalm_cfg
from psalm.modeling import build_pixel_decoder, build_transformer_decoder

from .conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny" / "Base-PSALM-tiny.yaml")


def _modules(seed=0):
    torch.manual_seed(seed)
    cfg = get_psalm_cfg(TINY, ["MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL", "pytorch"])
    m = nn.Module()
    m.backbone = build_backbone(cfg)
    m.pixel_decoder = build_pixel_decoder(cfg, m.backbone.output_shape())
    m.predictor = build_transformer_decoder(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM)
    return m


# --- our names -> Mask2Former names, written independently of psalm.checkpoint.vision_keys ---------

_BLOCK = re.compile(r"backbone\.model\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)")
_BLOCK_NAMES = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.o_proj": "attn.proj",
    "attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
}


def _to_pkl_name(key):
    """Mask2Former name of one of our keys; None for the fused q/k/v (handled separately) and new keys."""
    if m := _BLOCK.fullmatch(key):
        i, j, rest = m.groups()
        if rest.startswith("attention.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            return None
        for ours, theirs in _BLOCK_NAMES.items():
            if rest.startswith(ours):
                rest = theirs + rest[len(ours) :]
        return f"backbone.layers.{i}.blocks.{j}.{rest}"
    for ours, theirs in (
        ("backbone.model.swin.embeddings.patch_embeddings.projection.", "backbone.patch_embed.proj."),
        ("backbone.model.swin.embeddings.norm.", "backbone.patch_embed.norm."),
        ("backbone.model.swin.encoder.", "backbone."),
    ):
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    if m := re.fullmatch(r"backbone\.model\.hidden_states_norms\.stage(\d)\.(\w+)", key):
        return f"backbone.norm{int(m[1]) - 1}.{m[2]}"
    if re.fullmatch(r"pixel_decoder\.(adapter|layer)_\d+\.bias", key):
        return None  # PSALM's conv biases: not in Mask2Former
    if key.startswith("pixel_decoder."):
        return "sem_seg_head." + key
    if key.startswith("predictor.") and not key.startswith(
        ("predictor.class_head", "predictor.refer_head", "predictor.region_head")
    ):
        return "sem_seg_head." + key
    return None


def _make_pkl_state(seed=1):
    """(Mask2Former-layout numpy dict, the values expected in our modules after conversion)."""
    ours = _modules(seed=123).state_dict()
    g = torch.Generator().manual_seed(seed)
    truth = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in ours.items()}
    pkl = {}
    for k, v in truth.items():
        name = _to_pkl_name(k)
        if name is not None:
            pkl[name] = v.numpy()
    m = _modules(seed=123)
    for i, stage in enumerate(m.backbone.model.swin.encoder.layers):
        for j, blk in enumerate(stage.blocks):
            base = f"backbone.model.swin.encoder.layers.{i}.blocks.{j}.attention."
            for p in ("weight", "bias"):
                pkl[f"backbone.layers.{i}.blocks.{j}.attn.qkv.{p}"] = torch.cat(
                    [truth[f"{base}{n}.{p}"] for n in ("q_proj", "k_proj", "v_proj")]
                ).numpy()
            rpi = blk.attention.relative_position_bias.relative_position_index
            pkl[f"backbone.layers.{i}.blocks.{j}.attn.relative_position_index"] = rpi.view(144, 144).numpy()
    D = truth["predictor.query_embed.weight"].shape[1]
    pkl["sem_seg_head.predictor.class_embed.weight"] = np.random.randn(134, D).astype(np.float32)
    pkl["sem_seg_head.predictor.class_embed.bias"] = np.zeros(134, np.float32)
    pkl["sem_seg_head.predictor.static_query.weight"] = np.random.randn(10, D).astype(np.float32)  # old name
    pkl["criterion.empty_weight"] = np.ones(134, np.float32)
    return pkl, truth


def _write_pkl(path, model_dict):
    with open(path, "wb") as f:
        pickle.dump({"model": model_dict, "__author__": "test", "matching_heuristics": True}, f)
    return path


def test_roundtrip_tiny_pkl_loads_strictly(tmp_path):
    pkl, truth = _make_pkl_state()
    conv = convert_mask2former_checkpoint(_write_pkl(tmp_path / "m2f.pkl", pkl))
    assert conv.dropped["sem_seg_head.predictor.class_embed.weight"]
    assert "sem_seg_head.predictor.query_feat.weight" in conv.dropped  # static_query renamed, then dropped
    assert "criterion.empty_weight" in conv.dropped
    assert sum("relative_position_index" in k for k in conv.dropped) == 8
    assert "pixel_decoder.adapter_1.bias" in conv.allowed_missing
    assert "pixel_decoder.layer_1.bias" in conv.allowed_missing
    assert "predictor.class_head.layers.0.weight" in conv.allowed_missing

    model = _modules(seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reports = load_mask2former_into(model, conv)
    assert set(reports) == {"backbone", "pixel_decoder", "predictor"}
    after = model.state_dict()
    for k, v in after.items():
        if k in conv.allowed_missing:
            torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)  # kept initial value
        else:
            torch.testing.assert_close(v, truth[k], rtol=0, atol=0, msg=k)  # the pkl's value, incl. split qkv
    assert not after["pixel_decoder.adapter_1.bias"].any()  # zero init, as the official initialisation


def test_query_embed_truncation_only_when_asked(tmp_path):
    pkl, truth = _make_pkl_state()
    big = np.random.randn(200, pkl["sem_seg_head.predictor.query_embed.weight"].shape[1]).astype(np.float32)
    pkl["sem_seg_head.predictor.query_embed.weight"] = big
    path = _write_pkl(tmp_path / "m2f_200q.pkl", pkl)
    with pytest.raises(IncompatibleKeysError, match=r"predictor[\s\S]*query_embed\.weight: \(200, 64\) vs \(10, 64\)"):
        load_mask2former_into(_modules(), convert_mask2former_checkpoint(path))
    model = _modules()
    load_mask2former_into(model, convert_mask2former_checkpoint(path, num_queries=10))
    torch.testing.assert_close(model.predictor.query_embed.weight, torch.from_numpy(big[:10]), rtol=0, atol=0)


def test_wrong_shape_and_stray_keys_fail_clearly(tmp_path):
    pkl, _ = _make_pkl_state()
    bad = dict(pkl)
    bad["sem_seg_head.pixel_decoder.mask_features.weight"] = np.zeros((16, 64, 1, 1), np.float32)
    with pytest.raises(
        IncompatibleKeysError, match=r"mis-shaped[\s\S]*mask_features\.weight: \(16, 64, 1, 1\) vs \(32, 64, 1, 1\)"
    ):
        load_mask2former_into(_modules(), convert_mask2former_checkpoint(_write_pkl(tmp_path / "a.pkl", bad)))

    stray = dict(pkl)
    stray["sem_seg_head.pixel_decoder.extra_conv.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(IncompatibleKeysError, match=r"unexpected key\(s\):\s+extra_conv\.weight"):
        load_mask2former_into(_modules(), convert_mask2former_checkpoint(_write_pkl(tmp_path / "b.pkl", stray)))

    missing = dict(pkl)
    del missing["backbone.norm3.weight"]
    with pytest.raises(IncompatibleKeysError, match=r"missing key\(s\):\s+model\.hidden_states_norms\.stage4\.weight"):
        load_mask2former_into(_modules(), convert_mask2former_checkpoint(_write_pkl(tmp_path / "c.pkl", missing)))

    foreign = dict(pkl)
    foreign["roi_heads.box_predictor.weight"] = np.zeros((2, 2), np.float32)
    path = _write_pkl(tmp_path / "d.pkl", foreign)
    with pytest.raises(ValueError, match="roi_heads.box_predictor.weight"):
        convert_mask2former_checkpoint(path)
    conv = convert_mask2former_checkpoint(path, drop=["roi_heads.*"])
    assert conv.dropped["roi_heads.box_predictor.weight"].startswith("dropped on request")

    with open(tmp_path / "e.pkl", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(ValueError, match="pickled dict"):
        convert_mask2former_checkpoint(tmp_path / "e.pkl")


def test_cli_writes_checked_checkpoint(tmp_path):
    spec = importlib.util.spec_from_file_location("convert_mask2former", REPO_ROOT / "tools" / "convert_mask2former.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    pkl, truth = _make_pkl_state()
    src = _write_pkl(tmp_path / "m2f.pkl", pkl)
    out = tmp_path / "m2f_psalm.pth"
    assert cli.main(["--input", str(src), "--output", str(out), "--config-file", TINY]) == 0
    saved = torch.load(out, weights_only=True)
    assert set(saved["model"]) == set(truth) - set(saved["allowed_missing"])
    torch.testing.assert_close(
        saved["model"]["backbone.model.swin.encoder.layers.1.blocks.0.attention.k_proj.weight"],
        truth["backbone.model.swin.encoder.layers.1.blocks.0.attention.k_proj.weight"],
    )
    # a config that does not match the pkl: nothing is written
    bad_out = tmp_path / "bad.pth"
    with pytest.raises(IncompatibleKeysError):
        cli.main(
            ["--input", str(src), "--output", str(bad_out), "--config-file", TINY, "MODEL.SEM_SEG_HEAD.MASK_DIM", "16"]
        )
    assert not bad_out.exists()
