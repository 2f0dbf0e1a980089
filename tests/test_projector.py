"""Vision-language projectors: golden parity of the official swin_conv projector, token layout, config."""

import pytest
import torch
from detectron2.modeling import build_backbone
from safetensors.torch import load_file

from psalm.checkpoint import load_strict
from psalm.checkpoint.vision_keys import official_backbone_to_psalm, official_projector_to_psalm
from psalm.config import get_psalm_cfg
from psalm.modeling.projector import LinearProjector, SwinConvProjector, build_projector

from .conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny" / "Base-PSALM-tiny.yaml")


@pytest.fixture(scope="module")
def golden_vision(golden_dir):
    """(res5 computed by our converted Swin in fp64, the e2e tensors, the projector state dict)."""
    cfg = get_psalm_cfg(TINY)
    sd = load_file(golden_dir / "psalm_e2e" / "state_dict.safetensors")
    tensors = load_file(golden_dir / "psalm_e2e" / "tensors.safetensors")
    backbone = build_backbone(cfg)
    load_strict(backbone, official_backbone_to_psalm(sd, dst_prefix="").state_dict)
    # the mapper's model input, bit-exactly: fp32 normalisation, then fp64 (README of psalm_e2e)
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
    image = ((tensors["image.mapper_u8_chw"].float() - mean) / std)[None].double()
    with torch.no_grad():
        res5 = backbone.eval().double()(image)["res5"]
    # the stored res5 is fp32-rounded; ours is the fp64 computation of the same function
    assert (res5 - tensors["image.swin.res5"].double()).abs().max() <= 1e-6
    return cfg, res5, tensors, official_projector_to_psalm(sd, dst_prefix="")


def test_swin_conv_golden_parity(golden_vision):
    cfg, res5, tensors, converted = golden_vision
    projector = build_projector(cfg, in_channels=64, out_dim=cfg.MODEL.PSALM.LLM.HIDDEN_SIZE)
    assert isinstance(projector, SwinConvProjector) and projector.conv2_twice
    load_strict(projector, converted.state_dict, allow_missing=converted.allowed_missing)
    projector.eval().double()  # BatchNorm uses the checkpoint's running statistics
    with torch.no_grad():
        tokens = projector(res5)
    ref = tensors["image.projector_tokens"]
    assert tokens.shape == ref.shape == (1, 16, 64)  # (256 / 64)^2 tokens, row-major 4 x 4
    assert (tokens - ref).abs().max() <= 1e-6

    # the conv2-twice compat flag matters for the released weights
    projector.conv2_twice = False
    with torch.no_grad():
        assert (projector(res5) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("name,cls", [("swin_conv", SwinConvProjector), ("linear", LinearProjector)])
def test_build_and_token_count(name, cls):
    cfg = get_psalm_cfg(TINY, ["MODEL.PSALM.PROJECTOR.NAME", name])
    projector = build_projector(cfg, in_channels=64, out_dim=48)
    assert isinstance(projector, cls)
    S = cfg.INPUT.IMAGE_SIZE  # 256 -> res5 8 x 8 -> 16 tokens
    tokens = projector(torch.randn(2, 64, S // 32, S // 32))
    assert tokens.shape == (2, (S // 64) ** 2, 48)
    tokens.sum().backward()
    assert all(p.grad is not None for p in projector.parameters())


def test_linear_projector_row_major_cells():
    torch.manual_seed(0)
    projector = LinearProjector(4, 6)
    x = torch.randn(1, 4, 6, 8)  # 3 x 4 token grid
    base = projector(x)
    r, c = 2, 1
    y = x.clone()
    y[:, :, 2 * r + 1, 2 * c] += 1.0  # one res5 pixel inside cell (r, c)
    changed = (projector(y) - base).abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [r * 4 + c]


def test_bad_inputs_raise():
    cfg = get_psalm_cfg(TINY, ["MODEL.PSALM.PROJECTOR.NAME", "mlp2x"])
    with pytest.raises(ValueError, match="PROJECTOR.NAME"):
        build_projector(cfg, 64, 64)
    with pytest.raises(ValueError, match="even res5 size"):
        LinearProjector(4, 6)(torch.randn(1, 4, 3, 4))
