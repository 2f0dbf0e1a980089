"""SetCriterion (every label loss + point-sampled mask losses), point sampling, LM loss.

Hand-computed values use a fixed matcher (a stub returning given indices) and fixed points at the
pixel centres of the stride-4 prediction, where bilinear sampling returns the pixel values exactly.
"""
import math

import numpy as np
import pytest
import torch

from psalm.modeling.criterion import IGNORE_INDEX, SetCriterion, next_token_loss
from psalm.modeling.matcher import HungarianMatcher
from psalm.modeling.point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)


class FixedMatcher:
    """Returns the given indices; counts calls (one per prediction stage)."""

    def __init__(self, indices):
        self.indices = [(torch.tensor(s, dtype=torch.long), torch.tensor(t, dtype=torch.long)) for s, t in indices]
        self.calls = []

    def __call__(self, pred_masks, targets, pred_class_logits=None, pred_match_probs=None, sampled_targets=None):
        self.calls.append(pred_class_logits is not None)
        self.probs = pred_match_probs
        return self.indices

    def sample_targets(self, targets, device):
        return None


def _criterion(matcher, cls=SetCriterion, **kw):
    args = dict(class_weight=1.0, mask_weight=1.0, dice_weight=1.0, no_object_weight=0.1, num_points=4,
                oversample_ratio=3.0, importance_sample_ratio=0.75, deep_supervision=True)
    args.update(kw)
    return cls(matcher=matcher, **args)


def _pixel_centres(num, h, w):
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)[None].expand(num, -1, -1)


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def _empty_target(size=4):
    return {"masks": torch.zeros(0, size, size, dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.long)}


# ----------------------------------------------------------------------------- label losses
def test_class_loss_background_weight():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 3)  # Q=3, K=2 + background
    targets = [{"masks": torch.ones(1, 4, 4, dtype=torch.bool), "labels": torch.tensor([1])}]
    crit = _criterion(FixedMatcher([([1], [0])]))
    out = {"pred_masks": torch.randn(1, 3, 2, 2), "pred_class_logits": logits}
    loss = crit(out, targets)["loss_ce"].item()

    lp = torch.log_softmax(logits[0].double(), -1).numpy()
    tgt, w = [2, 1, 2], [0.1, 1.0, 0.1]  # unmatched -> background (index K=2), weight 0.1
    expected = sum(-wi * lp[i, ti] for i, (ti, wi) in enumerate(zip(tgt, w))) / sum(w)
    assert math.isclose(loss, expected, rel_tol=1e-5)


def test_refer_loss_pos_weight_and_no_target():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 1)
    targets = [{"masks": torch.ones(1, 4, 4, dtype=torch.bool), "labels": torch.tensor([0])}, _empty_target()]
    crit = _criterion(FixedMatcher([([2], [0]), ([], [])]))
    loss = crit({"pred_masks": torch.randn(2, 3, 2, 2), "pred_refer_logits": logits}, targets)["loss_ce"].item()

    x = logits.double().flatten().numpy()
    y = np.zeros(6)
    y[2] = 1.0
    pos_weight = (6 - 1) / 1  # (B*Q - M) / M with M = 1
    expected = np.mean(pos_weight * y * _softplus(-x) + (1 - y) * _softplus(x))
    assert math.isclose(loss, expected, rel_tol=1e-5)


def test_region_loss_pairs_region_j_with_gt_j():
    torch.manual_seed(0)
    region_logits = [torch.randn(2, 3), torch.randn(1, 3)]  # R = [2, 1], Q = 3
    targets = [
        {"masks": torch.ones(2, 4, 4, dtype=torch.bool), "labels": torch.tensor([0, 0])},
        {"masks": torch.ones(1, 4, 4, dtype=torch.bool), "labels": torch.tensor([0])},
    ]
    # image 0: query 2 <- GT 0, query 0 <- GT 1; image 1: query 1 <- GT 0
    crit = _criterion(FixedMatcher([([2, 0], [0, 1]), ([1], [0])]))
    out = {"pred_masks": torch.randn(2, 3, 2, 2), "pred_region_logits": region_logits}
    loss = crit(out, targets)["loss_ce"].item()

    y0 = np.zeros((2, 3))
    y0[0, 2] = y0[1, 0] = 1
    y1 = np.zeros((1, 3))
    y1[0, 1] = 1
    x = np.concatenate([region_logits[0].double().numpy().ravel(), region_logits[1].double().numpy().ravel()])
    y = np.concatenate([y0.ravel(), y1.ravel()])
    pos_weight = (9 - 3) / 3
    expected = np.mean(pos_weight * y * _softplus(-x) + (1 - y) * _softplus(x))
    assert math.isclose(loss, expected, rel_tol=1e-5)


def test_region_count_must_equal_gt_count():
    crit = _criterion(FixedMatcher([([0], [0])]))
    out = {"pred_masks": torch.randn(1, 3, 2, 2), "pred_region_logits": [torch.randn(2, 3)]}
    with pytest.raises(ValueError, match="region j <-> GT j"):
        crit(out, [{"masks": torch.ones(1, 4, 4, dtype=torch.bool), "labels": torch.tensor([0])}])


# ----------------------------------------------------------------------------- mask losses
def test_mask_losses_hand_computed():
    pred = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]], [[-1.0, -1.0], [2.0, 0.0]]]])  # [B=1, Q=2, 2, 2]
    gt_small = torch.tensor([[[1, 0], [1, 1]], [[0, 0], [0, 1]]], dtype=torch.bool)
    gt = gt_small.repeat_interleave(2, 1).repeat_interleave(2, 2)  # [2, 4, 4]: exact at the points
    targets = [{"masks": gt, "labels": torch.tensor([0, 1])}]
    crit = _criterion(FixedMatcher([([1, 0], [0, 1])]), num_points=4)
    crit.sample_points = lambda src: _pixel_centres(src.shape[0], 2, 2)
    out = {"pred_masks": pred, "pred_refer_logits": torch.zeros(1, 2, 1)}
    losses = crit(out, targets)

    bce, dice = 0.0, 0.0
    for q, n in [(1, 0), (0, 1)]:
        x = pred[0, q].double().flatten().numpy()
        t = gt_small[n].double().flatten().numpy()
        p = 1 / (1 + np.exp(-x))
        bce += np.mean(t * _softplus(-x) + (1 - t) * _softplus(x))
        dice += 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    assert math.isclose(losses["loss_mask"].item(), bce / 2, rel_tol=1e-5)  # divided by M = 2
    assert math.isclose(losses["loss_dice"].item(), dice / 2, rel_tol=1e-5)


def test_weights_and_aux_stages_rematched():
    torch.manual_seed(0)
    targets = [{"masks": torch.rand(2, 8, 8) > 0.5, "labels": torch.tensor([0, 1])}]

    def stage():
        return {"pred_masks": torch.randn(1, 4, 2, 2), "pred_class_logits": torch.randn(1, 4, 3)}

    out = stage()
    out["aux_outputs"] = [stage(), stage()]
    matcher = FixedMatcher([([0, 3], [1, 0])])
    crit = _criterion(matcher, class_weight=2.0, mask_weight=5.0, dice_weight=7.0)
    crit.sample_points = lambda src: _pixel_centres(src.shape[0], 2, 2)
    weighted = crit(out, targets)
    assert set(weighted) == {f"loss_{k}{s}" for k in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert matcher.calls == [True, True, True]  # re-matched per stage, with the class term

    unit = _criterion(matcher)
    unit.sample_points = crit.sample_points
    raw = unit(out, targets)
    for name, w in (("loss_ce", 2.0), ("loss_mask", 5.0), ("loss_dice", 7.0)):
        for s in ("", "_0", "_1"):
            assert math.isclose(weighted[name + s].item(), w * raw[name + s].item(), rel_tol=1e-6)
    assert not math.isclose(raw["loss_ce"].item(), raw["loss_ce_0"].item())  # aux uses its own outputs

    no_aux = _criterion(matcher, deep_supervision=False)(out, targets)
    assert set(no_aux) == {"loss_ce", "loss_mask", "loss_dice"}


def test_matcher_receives_class_logits_only_for_category():
    matcher = FixedMatcher([([0], [0])])
    crit = _criterion(matcher)
    targets = [{"masks": torch.ones(1, 4, 4, dtype=torch.bool), "labels": torch.tensor([0])}]
    crit({"pred_masks": torch.randn(1, 2, 2, 2), "pred_refer_logits": torch.randn(1, 2, 1)}, targets)
    crit({"pred_masks": torch.randn(1, 2, 2, 2), "pred_class_logits": torch.randn(1, 2, 3)}, targets)
    assert matcher.calls == [False, True]
    assert matcher.probs is None  # the official criterion: mask cost only for referring


def test_exactly_one_label_head():
    crit = _criterion(FixedMatcher([([], [])]))
    out = {"pred_masks": torch.randn(1, 2, 2, 2), "pred_refer_logits": torch.randn(1, 2, 1),
           "pred_class_logits": torch.randn(1, 2, 3)}
    with pytest.raises(ValueError, match="exactly one"):
        crit(out, [_empty_target()])
    with pytest.raises(ValueError, match="exactly one"):
        crit({"pred_masks": torch.randn(1, 2, 2, 2), "pred_class_logits": None}, [_empty_target()])


# ----------------------------------------------------------------------------- empty targets
@pytest.mark.parametrize("head", ["pred_class_logits", "pred_refer_logits", "pred_region_logits"])
def test_empty_targets_finite_with_real_matcher(head):
    torch.manual_seed(0)
    b, q = 2, 5
    pred_masks = torch.randn(b, q, 4, 4, requires_grad=True)
    if head == "pred_class_logits":
        scores = torch.randn(b, q, 4, requires_grad=True)
    elif head == "pred_refer_logits":
        scores = torch.randn(b, q, 1, requires_grad=True)
    else:
        scores = [torch.randn(0, q, requires_grad=True) for _ in range(b)]
    out = {"pred_masks": pred_masks, head: scores, "aux_outputs": [{"pred_masks": pred_masks, head: scores}]}
    crit = SetCriterion(matcher=HungarianMatcher(num_points=16), num_points=16)
    losses = crit(out, [_empty_target(16), _empty_target(16)])
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    if head != "pred_region_logits":
        assert losses["loss_ce"].item() > 0  # all-negative classification still trains
    total.backward()
    assert torch.isfinite(pred_masks.grad).all()


def test_end_to_end_random_category_batch():
    torch.manual_seed(0)
    pred_masks = torch.randn(2, 6, 8, 8, requires_grad=True)
    logits = torch.randn(2, 6, 4, requires_grad=True)
    targets = [
        {"masks": torch.rand(3, 32, 32) > 0.5, "labels": torch.tensor([0, 2, 1])},
        {"masks": torch.rand(1, 32, 32) > 0.5, "labels": torch.tensor([2])},
    ]
    crit = SetCriterion(matcher=HungarianMatcher(num_points=64), num_points=64)
    losses = crit({"pred_masks": pred_masks, "pred_class_logits": logits}, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert pred_masks.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="background"):
        bad = [dict(t, labels=torch.full_like(t["labels"], 3)) for t in targets]  # 3 == background index
        crit({"pred_masks": pred_masks, "pred_class_logits": logits}, bad)


def test_from_config():
    from psalm.config import get_psalm_cfg

    crit = SetCriterion(get_psalm_cfg())
    assert crit.weight_dict == {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    assert (crit.num_points, crit.oversample_ratio, crit.importance_sample_ratio) == (12544, 3.0, 0.75)
    assert crit.no_object_weight == 0.1 and crit.matcher.num_points == 12544


# ----------------------------------------------------------------------------- point sampling
def test_point_sample_at_pixel_centres_is_exact():
    maps = torch.randn(2, 3, 4, 5)
    vals = point_sample(maps, _pixel_centres(2, 4, 5), align_corners=False)  # [2, 3, 20]
    torch.testing.assert_close(vals, maps.flatten(2))


def test_importance_sampling_prefers_uncertain_points():
    logits = torch.full((2, 1, 8, 8), 20.0)
    logits[:, :, :, :4] = 0.0  # left half uncertain (logit 0)
    gen = torch.Generator().manual_seed(0)
    pts = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 100, 3.0, 0.75, generator=gen)
    assert pts.shape == (2, 100, 2)
    assert (pts[:, :75, 0] < 0.5).all()  # the 75 importance points are in the uncertain half
    assert (pts[:, 75:, 0] >= 0.5).any()  # the 25 random ones are not restricted
    gen2 = torch.Generator().manual_seed(0)
    again = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 100, 3.0, 0.75, generator=gen2)
    torch.testing.assert_close(pts, again)
    assert torch.equal(calculate_uncertainty(torch.tensor([[[-2.0, 3.0]]])), torch.tensor([[[-2.0, -3.0]]]))


# ----------------------------------------------------------------------------- LM loss
def test_next_token_loss_shift_and_ignore():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 1]])
    lp = torch.log_softmax(logits.double(), -1)
    # position t predicts labels[t + 1]: (t=0 -> 3), (t=2 -> 1)
    expected = -(lp[0, 0, 3] + lp[0, 2, 1]).item() / 2
    assert math.isclose(next_token_loss(logits, labels).item(), expected, rel_tol=1e-5)
    all_ignored = torch.full((1, 4), IGNORE_INDEX)
    zero = next_token_loss(logits.requires_grad_(), all_ignored)
    assert zero.item() == 0.0 and zero.requires_grad


def test_targets_sampled_once_per_batch_same_losses():
    """The matcher's points and the GT values there are drawn once per batch (not once per stage); with the
    same points the losses are bitwise those of matching every stage on its own draw."""
    g = torch.Generator().manual_seed(0)
    B, Q, K = 2, 6, 3
    targets = [
        {"masks": torch.rand(n, 32, 32, generator=g) > 0.6, "labels": torch.randint(0, K, (n,), generator=g)}
        for n in (3, 2)
    ]

    def stage():
        return {"pred_masks": torch.randn(B, Q, 8, 8, generator=g), "pred_class_logits": torch.randn(B, Q, K + 1, generator=g)}

    outputs = {**stage(), "aux_outputs": [stage(), stage()]}
    matcher = HungarianMatcher(cost_class=2, cost_mask=5, cost_dice=5, num_points=50)
    fixed = torch.rand(1, 50, 2, generator=g)
    draws = []
    matcher.sample_points = lambda n, device: draws.append(1) or fixed
    crit = _criterion(matcher, num_points=20)
    loss_points = torch.rand(1, 20, 2, generator=g)
    crit.sample_points = lambda src: loss_points.expand(src.shape[0], -1, -1)
    got = crit(outputs, targets)
    assert len(draws) == B  # once per image of the batch, shared by the 3 stages
    num_masks = crit.num_masks(targets, torch.device("cpu"))
    for suffix, out in (("", outputs), ("_0", outputs["aux_outputs"][0]), ("_1", outputs["aux_outputs"][1])):
        want = crit._stage_losses(out, targets, "pred_class_logits", num_masks)  # its own draw per stage
        for name, value in want.items():
            assert torch.equal(got[name + suffix], value * crit.weight_dict[name]), name + suffix
    assert len(draws) == B + 3 * B
