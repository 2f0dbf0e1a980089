"""The research extensions (psalm.modeling.extensions, beyond the paper), selected by name: the decoder's
scoring-head inputs, sentences scored as categories, matching with scores; and that the official modules
contain none of them."""

import pytest
import torch
from detectron2.modeling import build_backbone

from psalm.config import get_psalm_cfg
from psalm.modeling import build_pixel_decoder, build_transformer_decoder
from psalm.modeling.extensions import (
    ExtendedPSALM,
    ExtendedPSALMDecoder,
    ScoreMatchingHungarianMatcher,
    ScoreMatchingSetCriterion,
    mask_shape_grid,
)
from psalm.modeling.meta_arch import PSALM, build_psalm_model
from psalm.modeling.transformer_decoder import PSALMMultiScaleMaskedTransformerDecoder

from .conftest import REPO_ROOT
from .test_criterion import FixedMatcher, _criterion
from .test_matcher import _halves, _logit_map, _pixel_centres
from .test_meta_arch import make_input, tiny_cfg, tokenizer_dir  # noqa: F401 (fixture)
from .test_pixel_decoder_predictor import TINY, _assert_same_predictions, _build, _random_conditions, _random_inputs


EXT_DECODER = ("MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "ExtendedPSALMDecoder")


# ----------------------------------------------------------------------------- ExtendedPSALMDecoder
def test_head_mask_pooling():
    """HEAD_MASK_POOLING: off adds no parameters (official state dict); on, the scoring heads read
    ``decoder_norm(q) + proj(LN(mask-pooled features))`` with the pooling computed as documented, the
    masks are untouched and the scoring losses do not reach the mask head through the pooling."""
    torch.manual_seed(0)
    cfg, pixel_decoder, base = _build("pytorch")
    assert not any(k.startswith("head_pool") for k in base.state_dict())
    _, _, pooled = _build("pytorch", [*EXT_DECODER, "MODEL.EXTENSIONS.HEAD_MASK_POOLING", "mask_features"])
    extra = set(pooled.state_dict()) - set(base.state_dict())
    assert extra == {"head_pool_norm.weight", "head_pool_norm.bias", "head_pool_proj.weight", "head_pool_proj.bias"}
    pooled.load_state_dict(base.state_dict(), strict=False)
    base.eval()
    pooled.eval()
    feats, queries, g = _random_inputs(cfg)
    D = queries.shape[-1]
    conds = _random_conditions(D, g)
    with torch.no_grad():
        mask_features, _, ms = pixel_decoder.eval()(feats)
        with pytest.raises(ValueError, match="pool_features"):
            pooled(ms, mask_features, queries, **conds)
        # a zero projection is the official model exactly
        pooled.head_pool_proj.weight.zero_()
        pooled.head_pool_proj.bias.zero_()
        a = base(ms, mask_features, queries, **conds)
        b = pooled(ms, mask_features, queries, **conds, pool_features=mask_features)
        _assert_same_predictions(a, b)
        # the pooling itself, by hand, for a mask that is (almost) a hard 0/1 box
        logits = torch.full((2, 10, 32, 32), -40.0)
        logits[0, 3, 4:12, 8:20] = 40.0
        pooled.head_pool_norm.weight.fill_(1.0)
        pooled.head_pool_norm.bias.zero_()
        pooled.head_pool_proj.weight.copy_(torch.randn(D, mask_features.shape[1], generator=g))
        got = pooled.mask_pooled(logits, mask_features)
        region = mask_features[0, :, 4:12, 8:20].sum(dim=(-2, -1)) / (8 * 12 + 1)
        want = torch.nn.functional.layer_norm(region, region.shape) @ pooled.head_pool_proj.weight.T
        torch.testing.assert_close(got[0, 3], want, rtol=1e-4, atol=1e-4)
        # empty masks pool to ~0 (the +1 in the denominator), not to NaN
        assert torch.isfinite(got).all()
        # a coarser map: the mask is resized to it (2x2 average of the box = the same box at stride 8)
        coarse = torch.nn.functional.avg_pool2d(mask_features, 2)
        got = pooled.mask_pooled(logits, coarse)
        region = coarse[0, :, 2:6, 4:10].sum(dim=(-2, -1)) / (4 * 6 + 1)
        want = torch.nn.functional.layer_norm(region, region.shape) @ pooled.head_pool_proj.weight.T
        torch.testing.assert_close(got[0, 3], want, rtol=1e-4, atol=1e-4)
        # with a non-zero projection the scores change, the masks do not
        c = pooled(ms, mask_features, queries, **conds, pool_features=mask_features)
        torch.testing.assert_close(c["pred_masks"], a["pred_masks"], rtol=0, atol=0)
        assert not torch.allclose(c["pred_refer_logits"], a["pred_refer_logits"])
    # the pooling weights are detached: the final refer score gives the mask head no gradient
    pooled.train()
    mf = mask_features.clone().requires_grad_()
    out = pooled(ms, mf, queries, **conds, pool_features=mf)
    out["pred_refer_logits"].sum().backward()
    assert all(p.grad is None for p in pooled.mask_embed.parameters())
    assert mf.grad is not None and mf.grad.abs().sum() > 0


def test_head_mask_pooling_on_a_backbone_map():
    """A backbone map as the pooling source: its channels come from the backbone's output_shape."""
    cfg = get_psalm_cfg(TINY, [*EXT_DECODER, "MODEL.EXTENSIONS.HEAD_MASK_POOLING", "res3"])
    shapes = build_backbone(cfg).output_shape()
    predictor = build_transformer_decoder(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, shapes)
    assert predictor.head_pool_proj.in_features == shapes["res3"].channels == 16
    feats, queries, g = _random_inputs(cfg)
    pixel_decoder = build_pixel_decoder(cfg, shapes)
    with torch.no_grad():
        mask_features, _, ms = pixel_decoder(feats)
        out = predictor(ms, mask_features, queries, torch.randn(2, 1, 64, generator=g), pool_features=feats["res3"])
        assert out["pred_refer_logits"].shape == (2, 10, 1)
        with pytest.raises(ValueError, match=r"needs pool_features \[B=2, 16"):
            predictor(ms, mask_features, queries, pool_features=feats["res2"])
    args = type(predictor).from_config(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, shapes)
    with pytest.raises(ValueError, match="both a source and its channels"):
        type(predictor)(**{**args, "head_pool_dim": 0})
    for bad, shape in (("res9", shapes), ("res3", None)):
        cfg.defrost()
        cfg.MODEL.EXTENSIONS.HEAD_MASK_POOLING = bad
        with pytest.raises(ValueError, match="HEAD_MASK_POOLING"):
            build_transformer_decoder(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, shape)


def test_mask_shape_grid_by_hand():
    """``mask_shape_grid`` samples each soft mask at the k x k cell centres of its own box: a filled box
    gives all ones wherever it lies and however large it is, a diamond leaves its corners empty, and an
    empty mask is sampled over the whole map (no NaN, no error)."""
    H = W = 32
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    small_square = (xx > 4) & (xx < 10) & (yy > 20) & (yy < 26)  # pixels x 4..9, y 20..25
    large_box = (xx > 10) & (xx < 30) & (yy > 2) & (yy < 12)  # pixels x 10..29, y 2..11
    diamond = (xx - 16).abs() + (yy - 16).abs() < 6
    masks = torch.stack([small_square, large_box, diamond, torch.zeros(H, W, dtype=torch.bool)]).float()
    logits = (masks * 80 - 40)[None]  # [1, 4, H, W], sigmoid ~ 0 / 1
    grid = mask_shape_grid(logits, 5).reshape(4, 5, 5)
    torch.testing.assert_close(grid[0], torch.ones(5, 5), rtol=0, atol=1e-6)
    torch.testing.assert_close(grid[1], torch.ones(5, 5), rtol=0, atol=1e-6)
    # the diamond spans pixels 11..20 on both axes (10 pixels): cell j is sampled at 11 + 2j + 1, i.e. at
    # the boundary between two pixels, so bilinear sampling averages the two (cell values 0, 0.5 or 1)
    inside = diamond.float()
    want = torch.zeros(5, 5)
    for i in range(5):
        for j in range(5):
            y, x = 11 + 2 * i, 11 + 2 * j
            want[i, j] = inside[y : y + 2, x : x + 2].mean()
    torch.testing.assert_close(grid[2], want, rtol=0, atol=1e-6)
    assert grid[2][0, 0] < 1e-6 and grid[2][2, 2] > 1 - 1e-6  # empty corner, full centre
    torch.testing.assert_close(grid[3], torch.zeros(5, 5), rtol=0, atol=1e-6)
    # a box that touches the border is sampled inside the map (border padding)
    edge = torch.full((1, 1, H, W), -40.0)
    edge[0, 0, :4, :4] = 40.0
    torch.testing.assert_close(mask_shape_grid(edge, 3), torch.ones(1, 1, 9), rtol=0, atol=1e-6)


def test_head_mask_shape_grid():
    """HEAD_MASK_SHAPE_GRID: off adds no parameters; a zero projection reproduces the official outputs
    bitwise; on, the scores change but not the masks, the mask head gets no gradient through the grid,
    and a negative k is a clear error."""
    torch.manual_seed(0)
    cfg, pixel_decoder, base = _build("pytorch")
    assert not any(k.startswith("head_shape") for k in base.state_dict())
    _, _, shaped = _build("pytorch", [*EXT_DECODER, "MODEL.EXTENSIONS.HEAD_MASK_SHAPE_GRID", "4"])
    assert set(shaped.state_dict()) - set(base.state_dict()) == {"head_shape_proj.weight", "head_shape_proj.bias"}
    assert shaped.head_shape_proj.in_features == 16
    shaped.load_state_dict(base.state_dict(), strict=False)
    feats, queries, g = _random_inputs(cfg)
    D = queries.shape[-1]
    conds = _random_conditions(D, g)
    with torch.no_grad():
        mask_features, _, ms = pixel_decoder.eval()(feats)
        a = base.eval()(ms, mask_features, queries, **conds)
        shaped.eval()
        shaped.head_shape_proj.weight.zero_()
        shaped.head_shape_proj.bias.zero_()
        b = shaped(ms, mask_features, queries, **conds)
        _assert_same_predictions(a, b)
        shaped.head_shape_proj.weight.copy_(torch.randn(D, 16, generator=g))
        c = shaped(ms, mask_features, queries, **conds)
        torch.testing.assert_close(c["pred_masks"], a["pred_masks"], rtol=0, atol=0)
        assert not torch.allclose(c["pred_class_logits"], a["pred_class_logits"])
    shaped.train()
    out = shaped(ms, mask_features, queries, **conds)
    out["pred_class_logits"].sum().backward()
    assert all(p.grad is None for p in shaped.mask_embed.parameters())
    assert shaped.head_shape_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="HEAD_MASK_SHAPE_GRID=-1 must be >= 0"):
        _build("pytorch", [*EXT_DECODER, "MODEL.EXTENSIONS.HEAD_MASK_SHAPE_GRID", "-1"])


# ----------------------------------------------------------------------------- MATCH_WITH_SCORES
def test_match_probs_term():
    """Referring / region scores in the cost (MATCH_WITH_SCORES): -cost_class * p per (query, target)."""
    pred = torch.stack([_logit_map(10, -10), _logit_map(2, -2)])[None]
    target = [{"masks": _halves()[:1], "labels": torch.tensor([0])}]
    matcher = ScoreMatchingHungarianMatcher(cost_class=2, cost_mask=5, cost_dice=5, num_points=2000)
    torch.manual_seed(0)
    (rows, _), = matcher(pred, target)
    assert rows.tolist() == [0]  # masks only: the sharp mask wins
    torch.manual_seed(0)
    (rows, _), = matcher(pred, target, pred_match_probs=[torch.tensor([[0.0], [1.0]])])
    assert rows.tolist() == [1]  # the scored query wins
    matcher.sample_points = lambda n, device: _pixel_centres(4, 4)
    base = matcher.cost_matrix(pred[0], _halves()[:1])
    probs = torch.tensor([[0.25], [0.5]])
    torch.testing.assert_close(matcher.with_scores(base, probs), base - 2 * probs)
    with pytest.raises(ValueError, match=r"\[Q, N\]"):
        matcher.with_scores(base, torch.zeros(2, 2))



def test_match_with_scores_passes_sigmoid_scores_per_target():
    matcher = FixedMatcher([([0], [0])])
    crit = _criterion(matcher, deep_supervision=False, cls=ScoreMatchingSetCriterion)
    two = [{"masks": torch.ones(2, 4, 4, dtype=torch.bool), "labels": torch.tensor([0, 0])}]
    refer = torch.tensor([[[0.0], [2.0], [-1.0]]])  # [B=1, Q=3, 1]
    crit({"pred_masks": torch.randn(1, 3, 2, 2), "pred_refer_logits": refer}, two)
    (probs,) = matcher.probs
    assert probs.shape == (3, 2)  # [Q, N]: the one sentence score for every target (gres)
    torch.testing.assert_close(probs, refer[0].sigmoid().expand(3, 2))
    region = torch.tensor([[0.0, 1.0, 2.0], [-2.0, -1.0, 3.0]])  # [R=2, Q=3]
    crit({"pred_masks": torch.randn(1, 3, 2, 2), "pred_region_logits": [region]}, two)
    (probs,) = matcher.probs
    torch.testing.assert_close(probs, region.sigmoid().T)  # [Q, R]: region j's scores for target j
    one = [{"masks": torch.ones(1, 4, 4, dtype=torch.bool), "labels": torch.tensor([0])}]
    crit({"pred_masks": torch.randn(1, 3, 2, 2), "pred_class_logits": torch.randn(1, 3, 3)}, one)
    assert matcher.probs is None  # category tasks keep the softmax class term


# ----------------------------------------------------------------------------- selection and layout
OFFICIAL_FILES = (
    "psalm/modeling/transformer_decoder/psalm_decoder.py",
    "psalm/modeling/meta_arch/psalm.py",
    "psalm/modeling/matcher.py",
    "psalm/modeling/criterion.py",
)
EXTENSION_WORDS = (
    "HEAD_MASK_POOLING", "HEAD_MASK_SHAPE_GRID", "REFER_AS_CLASS", "MATCH_WITH_SCORES",
    "head_pool", "shape_grid", "refer_as_class", "match_with_scores", "match_probs", "pool_features",
)


def test_official_modules_contain_no_extension_option():
    """The official decoder / meta-arch / matcher / criterion never name an extension option."""
    for rel in OFFICIAL_FILES:
        text = (REPO_ROOT / rel).read_text().lower()
        found = [w for w in EXTENSION_WORDS if w.lower() in text]
        assert not found, f"{rel} mentions {found}"


def _ext_cfg(tokenizer_dir, *opts, decoder=True):
    sel = ["MODEL.META_ARCHITECTURE", "ExtendedPSALM", *(EXT_DECODER if decoder else ())]
    return tiny_cfg(tokenizer_dir, *sel, *opts)


def test_selection_by_name_and_clear_errors(tokenizer_dir):
    """Extensions are selected by name; an option the selected classes do not read is an error."""
    with pytest.raises(ValueError, match=r"REFER_AS_CLASS.*select MODEL.META_ARCHITECTURE 'ExtendedPSALM'"):
        build_psalm_model(tiny_cfg(tokenizer_dir, "MODEL.EXTENSIONS.REFER_AS_CLASS", True), device="meta")
    with pytest.raises(ValueError, match="no MODEL.EXTENSIONS option on is the official model"):
        build_psalm_model(_ext_cfg(tokenizer_dir), device="meta")
    with pytest.raises(ValueError, match=r"HEAD_MASK_SHAPE_GRID.*select 'ExtendedPSALMDecoder'"):
        build_psalm_model(_ext_cfg(tokenizer_dir, "MODEL.EXTENSIONS.HEAD_MASK_SHAPE_GRID", 3, decoder=False), "meta")
    with pytest.raises(ValueError, match="is the official decoder"):
        _build("pytorch", list(EXT_DECODER))
    # MATCH_WITH_SCORES alone changes only the criterion: the official decoder is fine
    m = build_psalm_model(_ext_cfg(tokenizer_dir, "MODEL.EXTENSIONS.MATCH_WITH_SCORES", True, decoder=False), "meta")
    assert type(m) is ExtendedPSALM and type(m.predictor) is PSALMMultiScaleMaskedTransformerDecoder
    assert type(m.criterion) is ScoreMatchingSetCriterion
    assert type(m.criterion.matcher) is ScoreMatchingHungarianMatcher
    # the synthetic main job selects them by name; its official twin selects the official classes
    tok = ["MODEL.PSALM.TOKENIZER", str(tokenizer_dir), "MODEL.PSALM.LLM.VOCAB_SIZE", 387]
    ext = build_psalm_model(get_psalm_cfg(str(REPO_ROOT / "configs/tiny/psalm_synthetic.yaml"), tok), "meta")
    assert type(ext) is ExtendedPSALM and type(ext.predictor) is ExtendedPSALMDecoder
    official_cfg = get_psalm_cfg(str(REPO_ROOT / "configs/tiny/psalm_synthetic_official.yaml"), tok)
    official = build_psalm_model(official_cfg, "meta")
    assert type(official) is PSALM and type(official.predictor) is PSALMMultiScaleMaskedTransformerDecoder
    extra = set(ext.state_dict()) - set(official.state_dict())
    assert extra == {f"predictor.{m}.{p}" for m in ("head_pool_norm", "head_pool_proj", "head_shape_proj")
                     for p in ("weight", "bias")}
    missing = {k.split(".")[0] + "." + k.split(".")[1] if k.startswith("predictor.") else k.split(".")[0]
               for k in set(official.state_dict()) - set(ext.state_dict())}
    assert missing == {"refer_projector", "predictor.refer_head"}  # REFER_AS_CLASS: no unused, no aliased keys


def test_refer_as_class_and_head_mask_pooling(tokenizer_dir):
    """REFER_AS_CLASS scores sentences with the category modules (one set of weights, each under one
    state-dict name, trained by both tasks); HEAD_MASK_POOLING on a backbone map feeds that map to the
    predictor."""
    base = build_psalm_model(tiny_cfg(tokenizer_dir))
    opts = ("MODEL.EXTENSIONS.REFER_AS_CLASS", True, "MODEL.EXTENSIONS.HEAD_MASK_POOLING", "res3")
    torch.manual_seed(0)
    m = build_psalm_model(_ext_cfg(tokenizer_dir, *opts, "MODEL.PSALM.FREEZE_BACKBONE", False)).train()
    assert not hasattr(m, "refer_projector") and not hasattr(m.predictor, "refer_head")
    assert m.sentence_projector() is m.class_projector and m.predictor.sentence_head() is m.predictor.class_head
    # no tensor is stored twice, and the parameters are the official ones minus the refer modules plus pooling
    sd = m.state_dict()
    assert len({v.data_ptr() for v in sd.values()}) == len(sd)
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in base.parameters()) + sum(
        p.numel() for n, p in m.predictor.named_parameters() if n.startswith("head_pool")
    ) - sum(p.numel() for p in base.refer_projector.parameters()) - sum(
        p.numel() for p in base.predictor.refer_head.parameters()
    )
    # a checkpoint round-trips through load_state_dict(strict=True)
    clone = build_psalm_model(_ext_cfg(tokenizer_dir, *opts))
    clone.load_state_dict(m.state_dict(), strict=True)
    # referring and panoptic losses both train the shared head, and the pooled backbone map gets gradients
    for task in ("referring", "panoptic"):
        m.zero_grad()
        sum(m([make_input(task, 1), make_input(task, 2)]).values()).backward()
        assert m.class_projector.weight.grad.abs().sum() > 0
        assert m.predictor.class_head.layers[0].weight.grad.abs().sum() > 0
        assert m.predictor.head_pool_proj.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        out = m([make_input("referring", 3)])[0]
    assert out["instances"].pred_masks.shape == (1, 96, 128) and out["instances"].scores.shape == (1,)


def test_refer_as_class_equals_class_scoring(tokenizer_dir):
    """With REFER_AS_CLASS a sentence is scored exactly as a one-entry category list would be: through
    class_projector and class_head (bitwise, at every stage)."""
    torch.manual_seed(0)
    m = build_psalm_model(_ext_cfg(tokenizer_dir, "MODEL.EXTENSIONS.REFER_AS_CLASS", True)).eval()
    with torch.no_grad():
        fwd = m.forward_segmentation([make_input("referring", 5), make_input("referring", 6)])
        feats = m.encode_images([make_input("referring", 5), make_input("referring", 6)])
        cond = fwd.conditions
        as_classes = PSALMMultiScaleMaskedTransformerDecoder.forward(
            m.predictor, feats["multi_scale_features"], feats["mask_features"], cond.queries,
            class_embeddings=cond.refer,
        )
    for a, b in zip(fwd.outputs["aux_outputs"] + [fwd.outputs], as_classes["aux_outputs"] + [as_classes]):
        assert torch.equal(a["pred_refer_logits"], b["pred_class_logits"])


def test_head_mask_shape_grid_in_the_model(tokenizer_dir):
    """HEAD_MASK_SHAPE_GRID through the whole model: every scoring task (category, sentence, region) trains
    the shape projection, checkpoints round-trip strictly, and inference runs."""
    torch.manual_seed(0)
    opts = ("MODEL.EXTENSIONS.HEAD_MASK_SHAPE_GRID", 5, "MODEL.PSALM.FREEZE_BACKBONE", False)
    m = build_psalm_model(_ext_cfg(tokenizer_dir, *opts)).train()
    assert m.predictor.head_shape_proj.in_features == 5 * 5
    for task in ("panoptic", "referring", "interactive"):
        m.zero_grad()
        sum(m([make_input(task, 1), make_input(task, 2)]).values()).backward()
        assert m.predictor.head_shape_proj.weight.grad.abs().sum() > 0, task
    build_psalm_model(_ext_cfg(tokenizer_dir, *opts)).load_state_dict(m.state_dict(), strict=True)
    m.eval()
    with torch.no_grad():
        out = m([make_input("referring", 3)])[0]
    assert out["instances"].pred_masks.shape == (1, 96, 128)


def test_predictor_runs_the_extended_model(tokenizer_dir):
    """PSALMPredictor builds MODEL.META_ARCHITECTURE (PSALM or a subclass); other architectures are refused."""
    from psalm.predictor import PSALMPredictor

    cfg = _ext_cfg(tokenizer_dir, "MODEL.EXTENSIONS.REFER_AS_CLASS", True, "MODEL.EXTENSIONS.HEAD_MASK_SHAPE_GRID", 3)
    predictor = PSALMPredictor(cfg)
    assert type(predictor.model) is ExtendedPSALM
    out = predictor(torch.randint(0, 256, (40, 60, 3), dtype=torch.uint8).numpy(), "referring", text="the cup")
    assert out["instances"].pred_masks.shape[-2:] == (40, 60)
    with pytest.raises(ValueError, match="'GeneralizedRCNN' is not PSALM or a subclass"):
        build_psalm_model(tiny_cfg(tokenizer_dir, "MODEL.META_ARCHITECTURE", "GeneralizedRCNN"), device="meta")
