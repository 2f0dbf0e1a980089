"""PSALMSwinTransformer: golden parity with the official Swin, pad-then-shift semantics, config plumbing."""

import json

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import BACKBONE_REGISTRY, ShapeSpec, build_backbone
from safetensors.torch import load_file

from psalm.checkpoint import load_strict
from psalm.checkpoint.vision_keys import official_backbone_to_psalm
from psalm.config import get_psalm_cfg
from psalm.modeling import PSALMSwinTransformer

from .conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny" / "Base-PSALM-tiny.yaml")


def _official_swin_state_dict(golden_dir):
    """The official Swin state dict (133 keys, official names, under ``model.vision_tower.``)."""
    sd_all = load_file(golden_dir / "psalm_e2e" / "state_dict.safetensors")
    sd = {k: v for k, v in sd_all.items() if k.startswith("model.vision_tower.")}
    rpi = load_file(golden_dir / "psalm_e2e" / "relative_position_index.safetensors")["relative_position_index"]
    for k in json.loads((golden_dir / "swin" / "manifest.json").read_text())["rpi_keys"]:
        sd["model.vision_tower." + k] = rpi.long().clone()
    return sd


@pytest.fixture(scope="module")
def golden_swin(golden_dir):
    cfg = get_psalm_cfg(TINY)
    model = build_backbone(cfg)
    converted = official_backbone_to_psalm(_official_swin_state_dict(golden_dir), dst_prefix="")
    assert len(converted.dropped) == 8  # the relative_position_index buffers, reported
    load_strict(model, converted.state_dict, allow_missing=converted.allowed_missing)
    return model.eval()


@pytest.mark.parametrize("name", ["x_200x264", "x_384x384"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 2e-5)])
def test_golden_parity(golden_swin, golden_dir, name, dtype, tol):
    ins = load_file(golden_dir / "swin" / "inputs.safetensors")
    ref = load_file(golden_dir / "swin" / "outputs.safetensors")
    model = golden_swin.to(dtype)
    with torch.no_grad():
        feats = model((ins[f"{name}.u8"].to(dtype) - 128) / 32)
    assert list(feats) == ["res2", "res3", "res4", "res5"]
    for k, f in feats.items():
        r = ref[f"{name}.fp64.{k}"].double()
        assert f.shape == r.shape, k
        err = (f.double() - r).abs().max().item()
        assert err <= tol, f"{name} {k} ({dtype}): max abs diff {err:.3g} > {tol}"


# ------------------------------------------------------------- pad-then-shift, independent reference


def _window_labels(size, window, shift):
    """Region id per row/col for the shifted-window mask (the classic three-slice construction)."""
    lab = torch.zeros(size, dtype=torch.long)
    lab[size - window : size - shift] = 1
    lab[size - shift :] = 2
    return lab


def _to_windows(x, ws):  # [B, H, W, C] -> [B * nW, ws*ws, C]
    B, H, W, C = x.shape
    return x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)


def _from_windows(w, ws, B, H, W):
    C = w.shape[-1]
    return w.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def _ref_block(x, hw, blk, heads, ws, shift, pad_first):
    """One Swin block written from the paper/official description, not from transformers.

    ``pad_first=True``: LN -> pad to a multiple of ``ws`` -> roll by -shift -> windows (mask on the
    padded map). ``pad_first=False``: roll the unpadded map, then pad (timm's order).
    """
    h, w = hw
    B, L, C = x.shape
    att = blk.attention
    y = F.layer_norm(x, (C,), blk.layernorm_before.weight, blk.layernorm_before.bias, 1e-5).view(B, h, w, C)
    Hp, Wp = -(-h // ws) * ws, -(-w // ws) * ws
    if pad_first:
        y = F.pad(y, (0, 0, 0, Wp - w, 0, Hp - h))
        y = torch.roll(y, (-shift, -shift), (1, 2)) if shift else y
    else:
        y = torch.roll(y, (-shift, -shift), (1, 2)) if shift else y
        y = F.pad(y, (0, 0, 0, Wp - w, 0, Hp - h))
    win = _to_windows(y, ws)  # [B*nW, N, C]
    hd = C // heads
    q, k, v = (
        F.linear(win, p.weight, p.bias).view(win.shape[0], -1, heads, hd).transpose(1, 2)
        for p in (att.q_proj, att.k_proj, att.v_proj)
    )
    # relative position bias: index (dy + ws - 1) * (2ws - 1) + (dx + ws - 1)
    yy, xx = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    idx = (yy[:, None] - yy[None, :] + ws - 1) * (2 * ws - 1) + (xx[:, None] - xx[None, :] + ws - 1)
    bias = att.relative_position_bias.relative_position_bias_table[idx].permute(2, 0, 1)  # [heads, N, N]
    logits = (q * hd**-0.5) @ k.transpose(-1, -2) + bias
    if shift:
        lab = _window_labels(Hp, ws, shift)[:, None] * 3 + _window_labels(Wp, ws, shift)[None, :]
        lab = _to_windows(lab[None, :, :, None].to(x.dtype), ws)[..., 0]  # [nW, N]
        mask = (lab[:, :, None] != lab[:, None, :]).to(x.dtype) * -100.0
        nW = mask.shape[0]
        logits = (logits.view(B, nW, heads, ws * ws, ws * ws) + mask[None, :, None]).view_as(logits)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(win.shape[0], -1, C)
    out = _from_windows(F.linear(out, att.o_proj.weight, att.o_proj.bias), ws, B, Hp, Wp)
    if pad_first:
        out = torch.roll(out, (shift, shift), (1, 2)) if shift else out
        out = out[:, :h, :w]
    else:
        out = out[:, :h, :w]
        out = torch.roll(out, (shift, shift), (1, 2)) if shift else out
    x = x + out.reshape(B, L, C)
    z = F.layer_norm(x, (C,), blk.layernorm_after.weight, blk.layernorm_after.bias, 1e-5)
    return x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(z)))


def _ref_res2(model, img, heads, ws, pad_first):
    emb = model.model.swin.embeddings
    x = F.conv2d(img, emb.patch_embeddings.projection.weight, emb.patch_embeddings.projection.bias, stride=4)
    B, C, h, w = x.shape
    x = F.layer_norm(x.flatten(2).transpose(1, 2), (C,), emb.norm.weight, emb.norm.bias, 1e-5)
    for j, blk in enumerate(model.model.swin.encoder.layers[0].blocks):
        x = _ref_block(x, (h, w), blk, heads, ws, shift=(ws // 2) * (j % 2), pad_first=pad_first)
    n = model.model.hidden_states_norms["stage1"]
    return F.layer_norm(x, (C,), n.weight, n.bias, 1e-5).transpose(1, 2).reshape(B, C, h, w)


def test_pad_then_shift_against_independent_reference():
    torch.manual_seed(0)
    heads, ws = 2, 4
    model = (
        PSALMSwinTransformer(
            embed_dim=8, depths=(2, 2, 2, 2), num_heads=(heads, 2, 4, 8), window_size=ws, drop_path_rate=0.0
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name and p.dim() == 1 else torch.randn_like(p) * 0.5)
    img = torch.randn(2, 3, 24, 28, dtype=torch.float64)  # 6 x 7 patches: padded to 8 x 8 in every block
    with torch.no_grad():
        ours = model(img)["res2"]
        ref_pad_first = _ref_res2(model, img, heads, ws, pad_first=True)
        ref_shift_first = _ref_res2(model, img, heads, ws, pad_first=False)
    assert ours.shape == (2, 8, 6, 7)
    assert (ours - ref_pad_first).abs().max() < 1e-10
    # the other order is a genuinely different function on this input: the test can tell them apart
    assert (ours - ref_shift_first).abs().max() > 1e-2


# ----------------------------------------------------------------------------------- config plumbing


def test_build_from_config_outputs_and_shapes():
    cfg = get_psalm_cfg(TINY)
    model = BACKBONE_REGISTRY.get("PSALMSwinTransformer")(cfg, ShapeSpec(channels=3))
    shapes = model.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "res2": (8, 4),
        "res3": (16, 8),
        "res4": (32, 16),
        "res5": (64, 32),
    }
    assert model.model.config._attn_implementation == "sdpa"
    assert "model.swin.layernorm.weight" not in model.state_dict()  # no dead parameters
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 96))
    for k, s in shapes.items():
        assert out[k].shape == (1, s.channels, 64 // s.stride, 96 // s.stride)

    cfg.MODEL.SWIN.OUT_FEATURES = ["res5", "res3"]
    cfg.MODEL.SWIN.ATTN_IMPLEMENTATION = "eager"
    model = build_backbone(cfg)
    assert list(model.output_shape()) == ["res3", "res5"]
    assert model.model.config._attn_implementation == "eager"


def test_drop_path_follows_config_and_mode():
    cfg = get_psalm_cfg(TINY, ["MODEL.SWIN.DROP_PATH_RATE", "0.3"])
    model = build_backbone(cfg)
    rates = [
        b.drop_path.drop_prob
        for s in model.model.swin.encoder.layers
        for b in s.blocks
        if b.drop_path.__class__.__name__ != "Identity"
    ]
    assert rates and max(rates) == pytest.approx(0.3)  # linear rule, last block gets the full rate
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        model.train()
        a, b = model(x)["res5"], model(x)["res5"]
        assert not torch.equal(a, b)  # stochastic depth active in training mode
        model.eval()
        assert torch.equal(model(x)["res5"], model(x)["res5"])


@pytest.mark.parametrize(
    "key,value,msg",
    [
        ("QK_SCALE", 0.5, "QK_SCALE"),
        ("APE", True, "APE"),
        ("ATTN_IMPLEMENTATION", "flash", "ATTN_IMPLEMENTATION"),
        ("OUT_FEATURES", ["res6"], "OUT_FEATURES"),
    ],
)
def test_bad_config_raises(key, value, msg):
    cfg = get_psalm_cfg(TINY)
    cfg.MODEL.SWIN[key] = value
    with pytest.raises(ValueError, match=msg):
        build_backbone(cfg)


def test_converter_rejects_nonstandard_relative_position_index(golden_dir):
    sd = _official_swin_state_dict(golden_dir)
    key = "model.vision_tower.layers.0.blocks.0.attn.relative_position_index"
    sd[key] = sd[key].flip(0)
    with pytest.raises(ValueError, match="relative-position index"):
        official_backbone_to_psalm(sd)


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    plain = build_backbone(get_psalm_cfg(TINY)).train()
    ckpt = build_backbone(get_psalm_cfg(TINY, ["MODEL.SWIN.USE_CHECKPOINT", "True"])).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.model.swin.encoder.layers[0].gradient_checkpointing
    x = torch.randn(1, 3, 64, 64)
    grads = []
    for model in (plain, ckpt):
        sum(f.square().sum() for f in model(x).values()).backward()
        grads.append(model.model.swin.embeddings.patch_embeddings.projection.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])
