"""MSDeformAttnPixelDecoder + PSALMMultiScaleMaskedTransformerDecoder: golden parity and behaviour."""

import pytest
import torch
from detectron2.modeling import build_backbone
from safetensors.torch import load_file

from psalm.checkpoint import load_strict
from psalm.checkpoint.vision_keys import official_pixel_decoder_to_psalm, official_predictor_to_psalm
from psalm.config import get_psalm_cfg
from psalm.modeling import build_pixel_decoder, build_transformer_decoder

from .conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny" / "Base-PSALM-tiny.yaml")
STAGES = ("aux0", "aux1", "aux2", "final")


def _build(impl="auto", opts=()):
    cfg = get_psalm_cfg(TINY, ["MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL", impl, *opts])
    shapes = build_backbone(cfg).output_shape()  # the tiny Swin: res2..res5 = 8/16/32/64 channels
    pixel_decoder = build_pixel_decoder(cfg, shapes)
    predictor = build_transformer_decoder(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM)
    return cfg, pixel_decoder, predictor


@pytest.fixture(scope="module")
def golden(golden_dir):
    sd = load_file(golden_dir / "psalm_e2e" / "state_dict.safetensors")
    ins = load_file(golden_dir / "pixel_decoder_and_predictor" / "inputs.safetensors")
    ref = load_file(golden_dir / "pixel_decoder_and_predictor" / "outputs.safetensors")
    return sd, ins, ref


def _load_official(sd, pixel_decoder, predictor):
    pd_conv = official_pixel_decoder_to_psalm(sd, dst_prefix="")
    pr_conv = official_predictor_to_psalm(sd, dst_prefix="")
    assert sorted(pr_conv.dropped) == ["predictor.SEG_query_embed.weight", "predictor.query_feat.weight"]
    load_strict(pixel_decoder, pd_conv.state_dict, allow_missing=pd_conv.allowed_missing)
    load_strict(predictor, pr_conv.state_dict, allow_missing=pr_conv.allowed_missing)


def _run(pixel_decoder, predictor, ins, dtype):
    x = {k: v.to(dtype) for k, v in ins.items()}
    with torch.no_grad():
        mask_features, enc, ms = pixel_decoder({k: x[k] for k in ("res2", "res3", "res4", "res5")})
        out = predictor(
            ms,
            mask_features,
            x["seg_query"],
            x["SEG_embedding"],
            x["class_name_embedding"],
            [x["region_embedding.0"], x["region_embedding.1"]],
        )
    return mask_features, enc, ms, out


@pytest.mark.parametrize(
    "impl,dtype,map_tol,logit_tol",
    [
        ("pytorch", torch.float64, 1e-6, 1e-7),
        ("kernel", torch.float64, 1e-6, 1e-7),
        ("kernel", torch.float32, 5e-5, 5e-5),
    ],
)
def test_golden_parity(golden, impl, dtype, map_tol, logit_tol):
    sd, ins, ref = golden
    _, pixel_decoder, predictor = _build(impl)
    _load_official(sd, pixel_decoder, predictor)
    pixel_decoder.eval().to(dtype)
    predictor.eval().to(dtype)
    mask_features, enc, ms, out = _run(pixel_decoder, predictor, ins, dtype)

    def check(name, ours, tol):
        r = ref[name].double()
        assert ours.shape == r.shape, name
        err = (ours.double() - r).abs().max().item()
        assert err <= tol, f"{name}: max abs diff {err:.3g} > {tol}"

    check("pixel_decoder.mask_features", mask_features, map_tol)
    check("pixel_decoder.transformer_encoder_features", enc, map_tol)
    assert len(ms) == 3
    for i, f in enumerate(ms):
        check(f"pixel_decoder.multi_scale_features.{i}", f, map_tol)
    stages = out["aux_outputs"] + [out]
    assert len(stages) == len(STAGES)
    for name, pred in zip(STAGES, stages):
        check(f"predictor.{name}.pred_masks", pred["pred_masks"], map_tol)
        check(f"predictor.{name}.pred_SEG_logits", pred["pred_refer_logits"], logit_tol)
        check(f"predictor.{name}.pred_class_name_logits", pred["pred_class_logits"], logit_tol)
        assert len(pred["pred_region_logits"]) == 2
        for b, logits in enumerate(pred["pred_region_logits"]):
            check(f"predictor.{name}.pred_region_logits.{b}", logits, logit_tol)


def _random_inputs(cfg, B=2, S=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = {f"res{i}": torch.randn(B, 8 * 2 ** (i - 2), S // 2**i, S // 2**i, generator=g) for i in range(2, 6)}
    D, Q = cfg.MODEL.MASK_FORMER.HIDDEN_DIM, cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
    return feats, torch.randn(B, Q, D, generator=g), g


def test_outputs_conditions_and_aux_layout():
    cfg, pixel_decoder, predictor = _build("pytorch")
    pixel_decoder.eval()
    predictor.eval()
    feats, queries, g = _random_inputs(cfg)
    D = queries.shape[-1]
    with torch.no_grad():
        mask_features, _, ms = pixel_decoder(feats)
        assert [tuple(f.shape[-2:]) for f in ms] == [(4, 4), (8, 8), (16, 16)]
        assert mask_features.shape == (2, cfg.MODEL.SEM_SEG_HEAD.MASK_DIM, 32, 32)
        # referring only: the other heads are None at every stage
        out = predictor(ms, mask_features, queries, refer_embeddings=torch.randn(2, 1, D, generator=g))
        assert len(out["aux_outputs"]) == cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1
        for pred in out["aux_outputs"] + [out]:
            assert pred["pred_masks"].shape == (2, 10, 32, 32)
            assert pred["pred_refer_logits"].shape == (2, 10, 1)
            assert pred["pred_class_logits"] is None and pred["pred_region_logits"] is None
        # the first aux entry is the heads on the raw queries: it does not depend on the decoder layers
        with torch.no_grad():
            predictor.transformer_ffn_layers[0].linear2.bias.add_(1.0)
        out2 = predictor(ms, mask_features, queries)
        assert torch.equal(out2["aux_outputs"][0]["pred_masks"], out["aux_outputs"][0]["pred_masks"])
        assert not torch.allclose(out2["pred_masks"], out["pred_masks"])
        assert out2["pred_refer_logits"] is None


def test_fully_masked_queries_attend_everywhere():
    """A query whose previous mask is negative everywhere attends to every position (row unmasked).

    With a constant mask embedding, ``mask_features > 0`` makes every mask logit negative (all rows
    fully masked -> must be unmasked) and ``mask_features < 0`` makes them all positive (nothing
    masked). The query features, hence the class logits, must then be identical in both runs.
    """
    cfg, pixel_decoder, predictor = _build("pytorch")
    predictor.eval()
    feats, queries, g = _random_inputs(cfg)
    classes = torch.randn(2, 4, queries.shape[-1], generator=g)
    with torch.no_grad():
        last = predictor.mask_embed.layers[-1]
        last.weight.zero_()
        last.bias.fill_(-1.0)
        mask_features, _, ms = pixel_decoder.eval()(feats)
        positive = mask_features.abs() + 0.1
        all_masked = predictor(ms, positive, queries, class_embeddings=classes)
        none_masked = predictor(ms, -positive, queries, class_embeddings=classes)
    assert (all_masked["pred_masks"] < 0).all() and (none_masked["pred_masks"] > 0).all()
    assert torch.isfinite(all_masked["pred_class_logits"]).all()
    torch.testing.assert_close(all_masked["pred_class_logits"], none_masked["pred_class_logits"])


def test_pre_norm_and_input_projection_build():
    cfg, pixel_decoder, predictor = _build(
        "pytorch", ["MODEL.MASK_FORMER.PRE_NORM", "True", "MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ", "True"]
    )
    assert any(k.startswith("input_proj.0.") for k in predictor.state_dict())
    feats, queries, g = _random_inputs(cfg)
    mask_features, _, ms = pixel_decoder(feats)
    out = predictor(ms, mask_features, queries, class_embeddings=torch.randn(2, 4, queries.shape[-1], generator=g))
    assert out["pred_class_logits"].shape == (2, 10, 4)
    out["pred_masks"].sum().backward()
    assert predictor.query_embed.weight.grad is not None and pixel_decoder.mask_features.weight.grad is not None


def test_bad_inputs_raise():
    cfg, pixel_decoder, predictor = _build("pytorch")
    feats, queries, _ = _random_inputs(cfg)
    with torch.no_grad():
        mask_features, _, ms = pixel_decoder(feats)
        with pytest.raises(ValueError, match="NUM_OBJECT_QUERIES"):
            predictor(ms, mask_features, queries[:, :5])
        with pytest.raises(ValueError, match="multi-scale"):
            predictor(ms[:2], mask_features, queries)
        with pytest.raises(ValueError, match="region_embeddings"):
            predictor(ms, mask_features, queries, region_embeddings=[torch.randn(2, 64)])
        with pytest.raises(KeyError, match="res2"):
            pixel_decoder({k: v for k, v in feats.items() if k != "res2"})
    with pytest.raises(ValueError, match="multiple of 32"):
        _build("pytorch", ["MODEL.SEM_SEG_HEAD.CONVS_DIM", "48"])


def _random_conditions(D, g):
    """Category, sentence and region conditions for a batch of 2 (K + 1 = 4 categories; 3 and 1 regions)."""
    return {
        "refer_embeddings": torch.randn(2, 1, D, generator=g),
        "class_embeddings": torch.randn(2, 4, D, generator=g),
        "region_embeddings": [torch.randn(3, D, generator=g), torch.randn(1, D, generator=g)],
    }


def _assert_same_predictions(a, b):
    """Bitwise-equal masks and class / refer / region logits at every prediction stage."""
    for pa, pb in zip(a["aux_outputs"] + [a], b["aux_outputs"] + [b]):
        for k in ("pred_masks", "pred_class_logits", "pred_refer_logits"):
            torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0)
        assert len(pa["pred_region_logits"]) == len(pb["pred_region_logits"])
        for ra, rb in zip(pa["pred_region_logits"], pb["pred_region_logits"]):
            torch.testing.assert_close(ra, rb, rtol=0, atol=0)
