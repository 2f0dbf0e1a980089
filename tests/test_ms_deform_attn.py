"""Multi-scale deformable attention: compiled kernel == PyTorch reference; explicit implementation choice."""

import logging

import pytest
import torch

from psalm.modeling.pixel_decoder import ms_deform_attn as mda
from psalm.modeling.pixel_decoder.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn_kernel,
    ms_deform_attn_pytorch,
    resolve_deform_attn_impl,
)

SHAPES = [(6, 4), (3, 5), (2, 2)]  # (H, W) per level, deliberately non-square


def _inputs(dtype, N=2, Lq=7, M=2, D=4, P=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    starts = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    S, L = int(shapes.prod(1).sum()), len(SHAPES)
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype)
    # some points fall outside [0, 1] to exercise zero padding
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=dtype) * 1.3 - 0.15
    w = torch.rand(N, Lq, M, L, P, generator=g, dtype=dtype)
    w = w / w.flatten(-2).sum(-1)[..., None, None]
    return value, shapes, starts, loc, w


def test_reference_samples_pixel_centres_exactly():
    """A point at pixel centre ((x + .5) / W, (y + .5) / H) with weight 1 reads value[y, x] (align_corners=False)."""
    value, shapes, _, _, _ = _inputs(torch.float64, N=1, Lq=1, M=1, P=1)
    loc = torch.zeros(1, 1, 1, 3, 1, 2, dtype=torch.float64)
    weights = torch.zeros(1, 1, 1, 3, 1, dtype=torch.float64)
    y, x = 4, 1  # on level 0 (6 x 4)
    loc[0, 0, 0, 0, 0] = torch.tensor([(x + 0.5) / 4, (y + 0.5) / 6])
    weights[0, 0, 0, 0, 0] = 1.0
    out = ms_deform_attn_pytorch(value, shapes, loc, weights)
    torch.testing.assert_close(out[0, 0], value[0, y * 4 + x, 0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_kernel_matches_reference_forward_backward(dtype, tol):
    pytest.importorskip("torch_ms_deform_attn")
    value, shapes, starts, loc, w = _inputs(dtype)
    grads = []
    for fn in ("kernel", "pytorch"):
        v, l, a = (t.clone().requires_grad_(True) for t in (value, loc, w))
        if fn == "kernel":
            out = ms_deform_attn_kernel(v, shapes, starts, l, a, im2col_step=2)
        else:
            out = ms_deform_attn_pytorch(v, shapes, l, a)
        upstream = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
        (out * upstream).sum().backward()
        grads.append((out.detach(), v.grad, l.grad, a.grad))
    for name, k, r in zip(("output", "d value", "d locations", "d weights"), *grads):
        err = (k - r).abs().max().item()
        assert err <= tol * max(1.0, r.abs().max().item()), f"{name}: kernel vs reference {err:.3g}"


def test_reference_gradcheck():
    value, shapes, _, loc, w = _inputs(torch.float64, N=1, Lq=2, M=1, D=2, P=1)
    # keep points away from pixel-centre lines where bilinear interpolation is not differentiable
    loc = (loc.clamp(0.05, 0.95) * 1000).round() / 1000 + 3e-4
    assert torch.autograd.gradcheck(
        lambda v, l, a: ms_deform_attn_pytorch(v, shapes, l, a),
        (value.requires_grad_(), loc.requires_grad_(), w.requires_grad_()),
    )


@pytest.mark.parametrize("impl", ["pytorch", "kernel"])
def test_module_same_result_for_both_impls(impl):
    if impl == "kernel":
        pytest.importorskip("torch_ms_deform_attn")
    torch.manual_seed(0)
    ref_mod = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3, impl="pytorch").double()
    mod = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3, impl=impl).double()
    mod.load_state_dict(ref_mod.state_dict())
    _, shapes, starts, _, _ = _inputs(torch.float64)
    S = int(shapes.prod(1).sum())
    src = torch.randn(2, S, 16, dtype=torch.float64)
    ref_pts = torch.rand(2, S, 3, 2, dtype=torch.float64)
    pad = torch.zeros(2, S, dtype=torch.bool)
    pad[1, -4:] = True
    torch.testing.assert_close(
        mod(src, ref_pts, src, shapes, starts, pad), ref_mod(src, ref_pts, src, shapes, starts, pad), rtol=0, atol=1e-12
    )


def test_bf16_autocast_samples_in_fp32(monkeypatch):
    """Under bf16 autocast the offsets / softmax / sampling run in float32; the result stays close to fp32."""
    torch.manual_seed(0)
    mod = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3, impl="pytorch")
    with torch.no_grad():
        mod.sampling_offsets.weight.normal_(std=0.5)
        mod.attention_weights.weight.normal_(std=0.5)
    _, shapes, starts, _, _ = _inputs(torch.float32)
    S = int(shapes.prod(1).sum())
    src, ref_pts = torch.randn(1, S, 16), torch.rand(1, S, 3, 2)
    seen = []
    real = mda.multi_scale_deformable_attention

    def spy(value, spatial_shapes, level_start_index, locations, weights, *args, **kwargs):
        seen.append((value.dtype, locations.dtype, weights.dtype))
        return real(value, spatial_shapes, level_start_index, locations, weights, *args, **kwargs)

    monkeypatch.setattr(mda, "multi_scale_deformable_attention", spy)
    with torch.no_grad():
        full = mod(src, ref_pts, src, shapes, starts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = mod(src, ref_pts, src, shapes, starts)
    assert seen[1] == (torch.float32, torch.float32, torch.float32)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.05 * full.abs().max()


def test_impl_resolution(monkeypatch, caplog):
    with pytest.raises(ValueError, match="DEFORM_ATTN_IMPL"):
        resolve_deform_attn_impl("cuda")
    assert resolve_deform_attn_impl("pytorch") == "pytorch"

    monkeypatch.setattr(mda, "_import_kernel", lambda: (None, ImportError("No module named 'torch_ms_deform_attn'")))
    with pytest.raises(RuntimeError, match="torch-ms-deform-attn"):
        resolve_deform_attn_impl("kernel")
    with pytest.raises(RuntimeError, match="not importable"):
        MSDeformAttn(16, 3, 2, 3, impl="kernel")

    monkeypatch.setattr(mda, "_logged_auto_choice", False)
    with caplog.at_level(logging.INFO, logger=mda.__name__):
        assert resolve_deform_attn_impl("auto") == "pytorch"
        assert resolve_deform_attn_impl("auto") == "pytorch"
    assert len([r for r in caplog.records if "deformable attention" in r.getMessage()]) == 1  # logged once


def test_auto_picks_kernel_when_available():
    pytest.importorskip("torch_ms_deform_attn")
    assert resolve_deform_attn_impl("auto") == "kernel"
    assert MSDeformAttn(16, 3, 2, 3, impl="auto").impl == "kernel"


def test_spatial_shapes_list_gives_the_same_result():
    torch.manual_seed(0)
    mod = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3, impl="pytorch").double()
    _, shapes, starts, _, _ = _inputs(torch.float64)
    S = int(shapes.prod(1).sum())
    src = torch.randn(2, S, 16, dtype=torch.float64)
    ref_pts = torch.rand(2, S, 3, 2, dtype=torch.float64)
    assert torch.equal(mod(src, ref_pts, src, shapes, starts, spatial_shapes_list=SHAPES),
                       mod(src, ref_pts, src, shapes, starts))
    with pytest.raises(ValueError, match="cover"):
        mod(src, ref_pts, src, shapes, starts, spatial_shapes_list=[(6, 4), (3, 5), (2, 3)])


def test_pixel_decoder_reads_no_shape_from_a_tensor(monkeypatch):
    """The encoder's levels come from the maps' sizes: no ``tolist()`` host sync in any layer."""
    from detectron2.modeling import build_backbone

    from psalm.config import get_psalm_cfg
    from psalm.modeling import build_pixel_decoder

    from .conftest import REPO_ROOT

    cfg = get_psalm_cfg(str(REPO_ROOT / "configs" / "tiny" / "Base-PSALM-tiny.yaml"),
                        ["MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL", "pytorch"])
    torch.manual_seed(0)
    decoder = build_pixel_decoder(cfg, build_backbone(cfg).output_shape()).eval()
    feats = {f"res{i}": torch.randn(1, 8 * 2 ** (i - 2), 128 // 2**i, 128 // 2**i) for i in range(2, 6)}
    with torch.no_grad():
        ref = decoder(feats)[0]  # before the patch (the same code path)
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(tuple(self.shape)) or real(self))
    with torch.no_grad():
        out = decoder(feats)[0]
    assert calls == [] and torch.equal(out, ref)
