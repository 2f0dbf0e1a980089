"""Spec B6 tests (e) [SEG]-count mismatch, (f) LLM loss scale, (g) distillation; loss values against
psalm's kernels with fixed points."""
import pytest
import torch

from pixelsail_testing import make_input


class FixedPoints:
    """Replace the random point draw by a fixed grid (so that values can be compared)."""

    def __init__(self, n=16):
        g = (torch.arange(n) + 0.5) / n
        self.coords = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(1, -1, 2)

    def __call__(self, logits):
        return self.coords.expand(logits.shape[0], -1, -1)


def _criterion(**kw):
    from pixel_sail.criterion import PixelSAILCriterion

    c = PixelSAILCriterion(num_points=64, **kw)
    c.sample_points = FixedPoints()
    return c


def test_identity_matching_values():
    from psalm.modeling.criterion import dice_loss, sigmoid_ce_loss
    from psalm.modeling.point_sampling import point_sample

    torch.manual_seed(0)
    pred = [torch.randn(2, 8, 8), torch.randn(1, 8, 8)]
    gt = [torch.rand(2, 16, 16) > 0.5, torch.rand(1, 16, 16) > 0.5]
    crit = _criterion()
    bce, dice, stats = crit.mask_losses(pred, gt)
    pts = FixedPoints().coords
    P = torch.cat([point_sample(p[:, None], pts.expand(len(p), -1, -1), align_corners=False)[:, 0] for p in pred])
    T = torch.cat([point_sample(g[:, None].float(), pts.expand(len(g), -1, -1), align_corners=False)[:, 0] for g in gt])
    torch.testing.assert_close(bce, 2.0 * sigmoid_ce_loss(P, T, 3.0))
    torch.testing.assert_close(dice, 0.5 * dice_loss(P, T, 3.0))
    assert stats == {"num_mismatched": 0, "num_pairs": 3}
    # order matters (identity matching in answer order, not Hungarian)
    swapped, _, _ = crit.mask_losses([pred[0].flip(0), pred[1]], gt)
    assert not torch.allclose(swapped, bce)


def test_seg_count_mismatch_zero_weighted_and_counted():
    torch.manual_seed(0)
    good_pred, good_gt = torch.randn(1, 8, 8, requires_grad=True), torch.rand(1, 16, 16) > 0.5
    bad_pred, bad_gt = torch.randn(3, 8, 8, requires_grad=True), torch.rand(2, 16, 16) > 0.5
    crit = _criterion()
    only_good, _, _ = crit.mask_losses([good_pred], [good_gt])
    both, dice, stats = crit.mask_losses([good_pred, bad_pred], [good_gt, bad_gt])
    assert stats["num_mismatched"] == 1 and stats["num_pairs"] == 1 + 2  # truncated to min(3, 2)
    torch.testing.assert_close(both, only_good)  # the mismatched sample weighs nothing
    (both + dice).backward()
    assert bad_pred.grad is None or bad_pred.grad.abs().sum() == 0
    assert good_pred.grad.abs().sum() > 0
    # all samples mismatched (e.g. no [SEG] generated): finite zero losses, no crash
    z, zd, st = crit.mask_losses([torch.zeros(0, 8, 8)], [good_gt])
    assert float(z) == 0.0 and float(zd) == 0.0 and st["num_mismatched"] == 1


def test_llm_loss_scale():
    torch.manual_seed(0)
    logits, labels = torch.randn(1, 5, 11), torch.randint(0, 11, (1, 5))
    from psalm.modeling.criterion import next_token_loss

    lm = next_token_loss(logits, labels)
    crit = _criterion()
    with_masks, stats = crit(logits, labels, [torch.randn(1, 8, 8)], [torch.ones(1, 16, 16, dtype=torch.bool)])
    torch.testing.assert_close(with_masks["loss_lm"], 0.1 * lm)
    assert stats["llm_scale"] == 0.1 and "loss_mask" in with_masks
    without, stats = crit(logits, labels, [None], [None])
    torch.testing.assert_close(without["loss_lm"], lm)
    assert set(without) == {"loss_lm"} and stats["llm_scale"] == 1.0
    paper = _criterion(llm_weight_with_masks=1.0)
    torch.testing.assert_close(paper(logits, labels, [torch.randn(1, 8, 8)], [torch.ones(1, 16, 16)])[0]["loss_lm"], lm)


def test_model_training_losses_and_mismatch_counter(make_model):
    model = make_model().train()
    h, w = 32, 48
    ok = make_input(model, h, w, turns=[("Segment the circle.", "It is [SEG].")], gt_masks=torch.ones(1, h, w))
    bad = make_input(model, h, w, seed=1, turns=[("Segment all.", "[SEG] and [SEG].")], gt_masks=torch.ones(1, h, w))
    chat = make_input(model, h, w, seed=2, turns=[("What is <Prompt0>?", "A circle.")], gt_masks=None,
                      vp_patch_masks=torch.ones(1, h // 8, w // 8, dtype=torch.bool))
    losses = model([ok, bad, chat])
    assert set(losses) == {"loss_lm", "loss_mask", "loss_dice"}
    assert model.num_seg_mismatch == 1
    sum(losses.values()).backward()
    assert model.vis_embed.weight.grad.abs().sum() > 0 and model.vp_embed.weight.grad.abs().sum() > 0
    assert model.mask_head.seg_token_projector[0].weight.grad.abs().sum() > 0
    only_chat = model([chat])
    assert set(only_chat) == {"loss_lm"}


# ----------------------------------------------------------------------------------- (g) distillation
def test_distill_bilinear_alignment_and_shapes():
    from pixel_sail.distill import distill_mse

    s = torch.randn(8, 4, 6)
    t = torch.randn(8, 16, 24)
    ref = torch.nn.functional.interpolate(t[None], size=(4, 6), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(distill_mse([s], [t]), torch.nn.functional.mse_loss(s, ref))
    torch.testing.assert_close(distill_mse([ref], [t]), torch.tensor(0.0))
    with pytest.raises(ValueError, match="channels"):
        distill_mse([torch.randn(4, 2, 2)], [t])


def test_distillation_in_training_teachers_excluded(make_model, tmp_path):
    """Tiny teachers (random conv stacks, spec B6) produce M2F-like [8, H/4, W/4] and SAM2-like
    [8, h, w] maps; the losses appear with weight 0.5; no teacher tensor is in the state dict."""
    from pixel_sail.distill import Distiller, precompute_teacher_features

    model = make_model().train()
    m2f = torch.nn.Conv2d(3, 8, 4, stride=4).requires_grad_(False)
    sam = torch.nn.Conv2d(3, 8, 8, stride=8).requires_grad_(False)
    model.distiller = Distiller(seg_hidden_dim=16, hidden_size=64, m2f_teacher=lambda i: m2f(i["pixel_values"][None])[0],
                                sam2_teacher=lambda i: sam(i["pixel_values"][None])[0], m2f_channels=8,
                                sam2_channels=8, use_m2f=True, use_sam2=True)
    inp = make_input(model, turns=[("Segment it.", "It is [SEG].")], gt_masks=torch.ones(1, 32, 48), sample_id="a/1")
    losses = model([inp])
    assert {"loss_distill_m2f", "loss_distill_sam2"} <= set(losses)
    sum(losses.values()).backward()
    assert model.distiller.sam2_distill_linear.weight.grad.abs().sum() > 0
    keys = list(model.state_dict())
    assert not any("teacher" in k for k in keys)
    saved = {id(v) for v in model.state_dict(keep_vars=True).values()}
    assert {id(p) for p in model.parameters()} <= saved  # the adapters are saved ...
    assert not any(id(p) in saved for p in list(m2f.parameters()) + list(sam.parameters()))  # ... the teachers not
    # precomputed teacher features give the same loss as the on-the-fly teacher
    n = precompute_teacher_features(model.distiller.teachers["m2f"], [inp], str(tmp_path / "m2f"))
    assert n == 1 and (tmp_path / "m2f" / "a_1.pt").is_file()
    from pixel_sail.distill import build_teacher

    pre = build_teacher(f"precomputed:{tmp_path / 'm2f'}")
    torch.testing.assert_close(pre(inp), model.distiller.teachers["m2f"](inp))
    with pytest.raises(ValueError, match="unknown teacher"):
        build_teacher("timm:foo")


def test_gradient_checkpointing_same_gradients_and_bf16(make_model):
    """GRADIENT_CHECKPOINTING recomputes the same function (same losses and gradients); a bf16 autocast
    forward gives finite losses close to fp32."""
    inp = make_input(make_model(), turns=[("Segment the circle.", "It is [SEG].")], gt_masks=torch.ones(1, 32, 48))
    results = []
    for ckpt in (False, True):
        model = make_model("MODEL.PIXEL_SAIL.LLM.GRADIENT_CHECKPOINTING", ckpt).train()
        model.criterion.sample_points = FixedPoints()
        losses = model([inp])
        sum(losses.values()).backward()
        results.append((float(sum(losses.values()).detach()), model.vis_embed.weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)
    model = make_model().train()
    model.criterion.sample_points = FixedPoints()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = model([inp])
    assert all(torch.isfinite(v) for v in bf.values())
    assert float(sum(bf.values()).detach()) == pytest.approx(results[0][0], rel=0.1)
