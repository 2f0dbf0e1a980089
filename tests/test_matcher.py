"""HungarianMatcher: known optimal assignments, class term only with class logits, empty targets."""
import math

import numpy as np
import pytest
import torch

from psalm.modeling.matcher import HungarianMatcher, batch_dice_cost, batch_sigmoid_ce_cost


def _halves(size=8):
    """Two GT masks [2, S, S]: left half, right half."""
    left = torch.zeros(size, size, dtype=torch.bool)
    left[:, : size // 2] = True
    return torch.stack([left, ~left])


def _logit_map(left: float, right: float, size=4):
    m = torch.full((size, size), float(right))
    m[:, : size // 2] = left
    return m


def _pixel_centres(h, w):
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)[None]  # [1, h*w, 2]


def test_known_assignment_mask_only():
    torch.manual_seed(0)
    # q0 predicts the right half, q1 nothing, q2 the left half -> GT0 (left) <- q2, GT1 (right) <- q0
    pred = torch.stack([_logit_map(-10, 10), _logit_map(-10, -10), _logit_map(10, -10)])[None]
    matcher = HungarianMatcher(cost_class=2, cost_mask=5, cost_dice=5, num_points=500)
    (rows, cols), = matcher(pred, [{"masks": _halves(), "labels": torch.tensor([0, 1])}])
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}


def test_class_term_only_with_class_logits():
    torch.manual_seed(0)
    # q0: sharp left-half mask but the wrong class; q1: softer left-half mask with the right class
    pred = torch.stack([_logit_map(10, -10), _logit_map(2, -2)])[None]
    target = [{"masks": _halves()[:1], "labels": torch.tensor([1])}]
    class_logits = torch.tensor([[[10.0, -10.0, 0.0], [-10.0, 10.0, 0.0]]])  # K=2 + background
    matcher = HungarianMatcher(cost_class=2, cost_mask=5, cost_dice=5, num_points=2000)
    (rows, _), = matcher(pred, target)  # masks only: the sharp mask wins
    assert rows.tolist() == [0]
    (rows, _), = matcher(pred, target, pred_class_logits=class_logits)  # class prob decides
    assert rows.tolist() == [1]


def test_cost_matrix_hand_computed():
    """C = 5 BCE + 5 dice - 2 p(class) on fixed points (pixel centres of the 2x2 prediction)."""
    logits = torch.tensor([[[1.0, -2.0], [0.5, 3.0]], [[-1.0, -1.0], [2.0, 0.0]]])  # [Q=2, 2, 2]
    gt_small = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    gt = gt_small.repeat_interleave(2, 0).repeat_interleave(2, 1)[None]  # [1, 4, 4], exact at the points
    class_logits = torch.tensor([[0.3, -0.2, 1.0], [2.0, 0.1, -1.0]])
    matcher = HungarianMatcher(cost_class=2, cost_mask=5, cost_dice=5, num_points=4)
    matcher.sample_points = lambda n, device: _pixel_centres(2, 2)
    cost = matcher.cost_matrix(logits, gt, class_logits, torch.tensor([1]))

    t = gt_small.flatten().double().numpy()
    expected = []
    for q in range(2):
        x = logits[q].flatten().double().numpy()
        p = 1 / (1 + np.exp(-x))
        bce = np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)))
        dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
        prob = np.exp(class_logits[q].double().numpy())
        prob = prob / prob.sum()
        expected.append(5 * bce + 5 * dice - 2 * prob[1])
    np.testing.assert_allclose(cost[:, 0].double().numpy(), expected, rtol=1e-5)


def test_batch_costs_match_elementwise():
    torch.manual_seed(1)
    x, t = torch.randn(3, 50), (torch.rand(4, 50) > 0.5).float()
    bce = batch_sigmoid_ce_cost(x, t)
    dice = batch_dice_cost(x, t)
    for q in range(3):
        for n in range(4):
            ref = torch.nn.functional.binary_cross_entropy_with_logits(x[q], t[n])
            assert math.isclose(bce[q, n].item(), ref.item(), rel_tol=1e-5)
            p = x[q].sigmoid()
            ref_dice = 1 - (2 * (p * t[n]).sum() + 1) / (p.sum() + t[n].sum() + 1)
            assert math.isclose(dice[q, n].item(), ref_dice.item(), rel_tol=1e-5)


def test_empty_targets_and_mixed_batch():
    torch.manual_seed(0)
    pred = torch.randn(2, 5, 4, 4)
    targets = [
        {"masks": torch.zeros(0, 8, 8, dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.long)},
        {"masks": _halves(), "labels": torch.tensor([0, 1])},
    ]
    matcher = HungarianMatcher(num_points=64)
    out = matcher(pred, targets, pred_class_logits=torch.randn(2, 5, 3))
    assert out[0][0].numel() == 0 and out[0][1].numel() == 0 and out[0][0].dtype == torch.int64
    assert len(out[1][0]) == 2 and sorted(out[1][1].tolist()) == [0, 1]
    assert len(set(out[1][0].tolist())) == 2  # one query per target


def test_more_targets_than_queries():
    torch.manual_seed(0)
    masks = torch.rand(5, 8, 8) > 0.5
    (rows, cols), = HungarianMatcher(num_points=64)(torch.randn(1, 3, 4, 4), [{"masks": masks}])
    assert len(rows) == 3 and len(set(cols.tolist())) == 3


def test_bad_inputs_raise():
    matcher = HungarianMatcher(num_points=16)
    with pytest.raises(ValueError, match="target dicts"):
        matcher(torch.randn(2, 3, 4, 4), [{"masks": _halves()}])
    with pytest.raises(ValueError, match="labels must lie"):
        matcher(torch.randn(1, 3, 4, 4), [{"masks": _halves(), "labels": torch.tensor([0, 7])}],
                pred_class_logits=torch.randn(1, 3, 3))
    with pytest.raises(FloatingPointError):
        matcher(torch.full((1, 3, 4, 4), float("nan")), [{"masks": _halves()}])


def test_from_config():
    from psalm.config import get_psalm_cfg

    cfg = get_psalm_cfg()
    m = HungarianMatcher(cfg)
    assert (m.cost_class, m.cost_mask, m.cost_dice, m.num_points) == (2.0, 5.0, 5.0, 12544)


def test_cost_is_fp32_under_bf16_autocast():
    """The matching cost is an fp32 island (as in Mask2Former): under CPU bf16 autocast the cost matrix and
    the assignment equal the fp32 ones exactly, for bf16 model outputs too."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 30, 16, 16, generator=g).to(torch.bfloat16)  # what a bf16-autocast model outputs
    class_logits = torch.randn(2, 30, 6, generator=g).to(torch.bfloat16)
    masks = torch.rand(2, 7, 64, 64, generator=g) > 0.5
    targets = [{"masks": masks[b], "labels": torch.randint(0, 5, (7,), generator=g)} for b in range(2)]
    matcher = HungarianMatcher(cost_class=2, cost_mask=5, cost_dice=5, num_points=1000)
    points = torch.rand(1, 1000, 2, generator=g)
    matcher.sample_points = lambda n, device: points
    want = matcher.cost_matrices(pred, targets, class_logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = matcher.cost_matrices(pred, targets, class_logits)
        got_indices = matcher(pred, targets, pred_class_logits=class_logits)
    for w, c in zip(want, got):
        assert c.dtype == torch.float32
        torch.testing.assert_close(c, w, rtol=0, atol=0)
    for (r0, c0), (r1, c1) in zip(got_indices, [matcher.assign(w) for w in want]):
        assert torch.equal(r0, r1) and torch.equal(c0, c1)
