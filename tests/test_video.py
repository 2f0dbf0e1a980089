"""Video object segmentation by propagation (psalm.inference): the DAVIS protocol's rules on crafted
predictions, the tiny model end to end, and that no ground truth beyond frame 0 is ever read."""
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from PIL import Image
from torch import nn

from psalm.config import get_psalm_cfg
from psalm.data.datasets import register_all_psalm_datasets
from psalm.data.mapper import preprocess_image, resize_pad_masks
from psalm.inference import (
    VideoObjectSegmenter,
    first_frame_label_map,
    greedy_unique_assignment,
    group_videos,
    inference_on_davis,
    max_pairwise_iou,
    objects_from_label_map,
)
from psalm.modeling.meta_arch import build_psalm_model

from .conftest import REPO_ROOT
from .dataset_fixtures import load_prepare_script, make_davis

TINY = str(REPO_ROOT / "configs" / "tiny" / "Base-PSALM-tiny.yaml")
H, W = 20, 30  # frame size; with IMAGE_SIZE 256 the valid region is 171 x 256 (64 x 64 stride-4 grid)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    from psalm.data.tokenizer import save_tiny_tokenizer

    tok = save_tiny_tokenizer(tmp_path_factory.mktemp("tok"), num_merges=128)  # 387 = tiny vocabulary
    return get_psalm_cfg(TINY, ["MODEL.PSALM.TOKENIZER", str(tok), "MODEL.DEVICE", "cpu"])


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_psalm_model(cfg).eval()


def frames(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (H, W, 3), dtype=np.uint8) for _ in range(n)]


def first_label():
    lab = np.zeros((H, W), np.uint8)
    lab[1:9, 1:13] = 3
    lab[11:18, 17:28] = 5
    lab[0, 0] = 255  # void: not an object
    return lab


# ----------------------------------------------------------------------------- pieces
def test_greedy_unique_assignment_on_crafted_scores():
    s = torch.zeros(3, 12)
    s[0, 5], s[0, 7] = 0.9, 0.8
    s[1, 5], s[1, 3], s[1, 7] = 0.95, 0.7, 0.6  # best is object 0's query -> its second best
    s[2, 5], s[2, 3], s[2, 9] = 0.99, 0.9, 0.1  # top-2 both taken -> best free query (9)
    q, picked = greedy_unique_assignment(s, top_k=2)
    assert q.tolist() == [5, 3, 9]
    torch.testing.assert_close(picked, torch.tensor([0.9, 0.7, 0.1]))
    # object order matters: the same scores, objects reversed
    q_rev, _ = greedy_unique_assignment(s.flip(0), top_k=2)
    assert q_rev.tolist() == [5, 3, 7]
    # top-1 rule per object when there is no conflict (the plain interactive inference)
    s2 = torch.rand(4, 20, generator=torch.Generator().manual_seed(0))
    q2, _ = greedy_unique_assignment(s2, top_k=10)
    assert len(set(q2.tolist())) == 4 and q2[0] == s2[0].argmax()
    with pytest.raises(ValueError, match="only 2 queries"):
        greedy_unique_assignment(torch.rand(3, 2))


def test_max_pairwise_iou():
    m = np.zeros((3, 4, 4), bool)
    m[0, :2, :] = True  # 8 px
    m[1, :1, :] = True  # 4 px inside m0 -> IoU 0.5
    m[2, 3, :] = True  # disjoint
    assert max_pairwise_iou(m) == pytest.approx(0.5)
    assert max_pairwise_iou(m[[0, 2]]) == 0.0
    assert max_pairwise_iou(m[:1]) == 0.0
    assert max_pairwise_iou(np.zeros((2, 4, 4), bool)) == 0.0  # empty unions do not count


def test_objects_from_label_map_validation():
    ids, masks = objects_from_label_map(first_label())
    assert ids == [3, 5] and masks.shape == (2, H, W) and not masks[:, 0, 0].any()
    ids, masks = objects_from_label_map(first_label(), object_ids=[5, 3])
    assert ids == [5, 3] and masks[0].sum() == (first_label() == 5).sum()
    with pytest.raises(ValueError, match="no object"):
        objects_from_label_map(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\[7\] have no pixel"):
        objects_from_label_map(first_label(), object_ids=[3, 7])
    with pytest.raises(ValueError, match="label map"):
        objects_from_label_map(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="integer"):
        objects_from_label_map(np.zeros((4, 4), np.float32))


# ----------------------------------------------------------------------------- crafted predictor
def rect(r0, r1, c0, c1):
    """Logits on the 64 x 64 stride-4 grid: +10 inside the rectangle, -10 elsewhere."""
    m = torch.full((64, 64), -10.0)
    m[r0:r1, c0:c1] = 10.0
    return m


A, B = rect(0, 20, 0, 30), rect(22, 40, 34, 60)  # two disjoint objects in the valid region
EMPTY = torch.full((64, 64), -10.0)


class ScriptedPredictor(nn.Module):
    """Stands in for the mask decoder: frame k's call returns the k-th scripted (masks, region logits)."""

    def __init__(self, script):
        super().__init__()
        self.script, self.calls = script, 0

    def forward(self, multi_scale, mask_features, queries, refer, classes, regions):
        masks, logits = self.script[self.calls]
        self.calls += 1
        assert logits.shape[0] == regions[0].shape[0]  # one row per region actually prompted
        return {"pred_masks": masks[None], "pred_region_logits": [logits], "pred_class_logits": None,
                "pred_refer_logits": None}


def queries(*maps, q=10):
    return torch.stack(list(maps) + [EMPTY] * (q - len(maps)))


def logits(prefs, q=10):
    """Region logits [R, Q]: object r prefers the queries in prefs[r], most preferred first."""
    out = torch.full((len(prefs), q), -5.0)
    for r, pref in enumerate(prefs):
        for rank, qi in enumerate(pref):
            out[r, qi] = 5.0 - rank
    return out


@pytest.fixture
def scripted(model, monkeypatch):
    """Install a scripted predictor and record what the propagation feeds the model."""
    record = {"encoded": [], "pooled": []}
    orig_encode, orig_pool = model.encode_images, model.pool_regions

    def encode_images(inputs, with_pixel_decoder=True):
        out = orig_encode(inputs, with_pixel_decoder=with_pixel_decoder)
        record["encoded"].append(out["image_tokens"])
        return out

    def pool_regions(image_tokens, inputs):
        record["pooled"].append((image_tokens, inputs[0]["region_masks"].clone()))
        return orig_pool(image_tokens, inputs)

    monkeypatch.setattr(model, "encode_images", encode_images)
    monkeypatch.setattr(model, "pool_regions", pool_regions)

    real_predictor = model.predictor

    def install(script):
        # (not monkeypatch: its undo cannot restore an nn.Module child)
        model.predictor = ScriptedPredictor(script)
        return record

    yield install
    model.predictor = real_predictor


def test_memory_update_rule_and_prompt_source(cfg, model, scripted):
    script = [
        (queries(A, A), logits([[0], [1]])),  # frame 1: the two masks coincide (IoU 1 > 0.4): memory kept
        (queries(A, B), logits([[0], [1]])),  # frame 2: disjoint: memory -> frame 2
        (queries(A), logits([[0], [0]])),  # frame 3: object 2 gets an empty query: memory kept
        (queries(B, A), logits([[1], [0]])),  # frame 4: fine again
    ]
    record = scripted(script)
    seg = VideoObjectSegmenter(cfg, model)
    out = list(seg.propagate(frames(5), first_label()))
    assert [r.frame_index for r in out] == [0, 1, 2, 3, 4]
    assert [r.memory_updated for r in out] == [True, False, True, False, True]
    assert [r.prompt_frame for r in out] == [-1, 0, 0, 2, 2]
    # the region tokens are pooled from the MEMORY frame's encoding (frame 0 encodes once, then one per frame)
    enc = record["encoded"]  # frames 0, 1, 2, 3, 4
    assert len(enc) == 5 and len(record["pooled"]) == 4
    for (tokens, _), memory_frame in zip(record["pooled"], [0, 0, 2, 2]):
        assert tokens is enc[memory_frame]
    # ... under the memory masks: frame 0's GT, then frame 2's predictions, resized like the mapper
    _, _, new_hw = preprocess_image(frames(1)[0], 256)
    _, first_masks = objects_from_label_map(first_label())
    assert torch.equal(record["pooled"][0][1], resize_pad_masks(first_masks, new_hw, 256))
    assert torch.equal(record["pooled"][2][1], resize_pad_masks(out[2].masks, new_hw, 256))
    # greedy unique assignment: in frame 3 object 5 wanted object 3's query 0 and got another (empty) one
    assert out[3].query_ids[0] == 0 and out[3].query_ids[1] not in (-1, 0) and not out[3].masks[1].any()
    # painting: later objects win; frame 1 both objects predicted the same mask -> all object 5
    assert set(np.unique(out[1].label_map)) == {0, 5}
    assert out[2].masks[0].any() and out[2].masks[1].any() and not (out[2].masks[0] & out[2].masks[1]).any()
    np.testing.assert_array_equal(out[2].label_map[out[2].masks[0]], 3)
    np.testing.assert_array_equal(out[4].label_map[out[4].masks[1]], 5)
    # frame 0 is the given mask (void dropped), scores in [0, 1]
    np.testing.assert_array_equal(out[0].label_map, np.where(first_label() == 255, 0, first_label()))
    assert all(((r.scores >= 0) & (r.scores <= 1)).all() for r in out)


def test_official_gt_reset_is_explicit_and_resets_from_frame0(cfg, model, scripted):
    seg = VideoObjectSegmenter(cfg, model)
    with pytest.raises(ValueError, match="official_gt_reset"):
        next(seg.propagate(frames(2), first_label(), objects_per_frame=[[3, 5], [3, 5]]))
    compat = VideoObjectSegmenter(cfg, model, official_gt_reset=True)
    with pytest.raises(ValueError, match="objects_per_frame"):
        next(compat.propagate(frames(2), first_label()))

    record = scripted([
        (queries(A, B), logits([[0], [1]])),  # frame 1: both present, memory -> frame 1
        (queries(B), logits([[0]])),  # frame 2: GT has only object 5: reset to frame-0 GT of object 5
        (queries(A), logits([[0]])),  # frame 3: count 1 == memory count 1: memory (frame 2, object 5)
    ])
    out = list(compat.propagate(frames(5), first_label(), objects_per_frame=[[3, 5], [3, 5], [5], [3], []]))
    enc = record["encoded"]
    assert record["pooled"][1][0] is enc[0] and record["pooled"][1][1].shape[0] == 1
    assert record["pooled"][2][0] is enc[2]
    assert out[2].query_ids[0] == -1 and not out[2].masks[0].any() and out[2].masks[1].any()
    assert set(np.unique(out[2].label_map)) == {0, 5}
    # frame 4: no object in the GT: nothing predicted, the model is not run
    assert len(record["pooled"]) == 3 and not out[4].label_map.any() and not out[4].memory_updated


# ----------------------------------------------------------------------------- tiny model end to end
def test_tiny_model_every_frame_and_bad_inputs(cfg, model, tmp_path):
    seg = VideoObjectSegmenter(cfg, model)
    paths = []
    for i, f in enumerate(frames(3, seed=1)):
        p = tmp_path / f"{i:05d}.png"
        Image.fromarray(f).save(p)
        paths.append(str(p))
    label_maps = seg(paths, first_label())
    assert len(label_maps) == 3
    assert all(m.shape == (H, W) and m.dtype == np.uint8 for m in label_maps)
    assert all(set(np.unique(m)) <= {0, 3, 5} for m in label_maps)
    np.testing.assert_array_equal(label_maps[0], np.where(first_label() == 255, 0, first_label()))
    again = seg(frames(3, seed=1), first_label())  # arrays == the same frames read from PNG: deterministic
    for a, b in zip(label_maps, again):
        np.testing.assert_array_equal(a, b)

    with pytest.raises(ValueError, match="frame 1 is 10x30"):
        list(seg.propagate([frames(1)[0], np.zeros((10, W, 3), np.uint8)], first_label()))
    with pytest.raises(ValueError, match="TOP_K"):
        VideoObjectSegmenter(cfg, model, top_k=0)
    model.train()
    try:
        with pytest.raises(ValueError, match="model.eval"):
            seg(frames(2), first_label())
    finally:
        model.eval()
    with pytest.raises(TypeError, match="PSALM"):
        VideoObjectSegmenter(cfg, nn.Linear(2, 2))


# ----------------------------------------------------------------------------- data set driver
GT_FIELDS = ("annotations", "objects_in_frame", "annotation_file_name", "object_ids")


class LaterFrameGTGuard(dict):
    """A dataset dict whose ground-truth fields raise on access (frames after the first)."""

    forbidden = GT_FIELDS

    def __getitem__(self, key):
        if key in self.forbidden:
            raise AssertionError(f"propagation read ground-truth field {key!r} of frame {dict.get(self, 'frame_index')}")
        return super().__getitem__(key)

    def get(self, key, default=None):
        return self[key] if key in self else default


class FirstFrameGuard(LaterFrameGTGuard):
    forbidden = ("objects_in_frame", "annotation_file_name")  # frame 0's own annotations are the input


class Recorder(DatasetEvaluator):
    def reset(self):
        self.seen = {}

    def process(self, inputs, outputs):
        for i, o in zip(inputs, outputs):
            self.seen[i["sample_id"]] = o["instances"].pred_masks.numpy()

    def evaluate(self):
        return {"n": len(self.seen)}


@pytest.fixture
def davis_dicts(tmp_path):
    root = str(tmp_path / "data")
    labels = make_davis(root, n_frames=3)
    register_all_psalm_datasets(root)
    try:
        load_prepare_script("prepare_davis").main(["--root", root])
        dicts = DatasetCatalog.get("davis17_val")
    finally:
        register_all_psalm_datasets()
    yield dicts, labels


def test_dataset_propagation_never_reads_later_ground_truth(cfg, model, davis_dicts):
    dicts, labels = davis_dicts
    # later-frame annotation PNGs are gone, and their GT fields raise
    for d in dicts:
        if d["frame_index"] > 0:
            os.remove(d["annotation_file_name"])
    guarded = [FirstFrameGuard(d) if d["frame_index"] == 0 else LaterFrameGTGuard(d) for d in dicts]
    rec = Recorder()
    res = inference_on_davis(VideoObjectSegmenter(cfg, model), guarded, rec)
    assert res == {"n": 6}  # 2 videos x 3 frames: every frame, frame 0 included
    for video in ("bear", "cows"):
        first = rec.seen[f"{video}/00000"]
        ids = [1] if video == "bear" else [1, 2]
        assert first.shape == (len(ids), 20, 30) and first.dtype == bool
        for m, o in zip(first, ids):
            np.testing.assert_array_equal(m, labels[video][0] == o)
        later = rec.seen[f"{video}/00002"]
        assert later.shape == (len(ids), 20, 30)
        assert not (later.sum(0) > 1).any()  # painted: each pixel belongs to at most one object

    # the guard can fail: the compat protocol reads objects_in_frame of later frames
    compat = VideoObjectSegmenter(cfg, model, official_gt_reset=True)
    with pytest.raises(AssertionError, match="objects_in_frame"):
        inference_on_davis(compat, guarded, Recorder())


def test_group_videos_and_first_frame(davis_dicts):
    dicts, labels = davis_dicts
    shuffled = dicts[::-1]
    videos = group_videos(shuffled)
    assert [v for v, _ in videos] == ["cows", "bear"]
    assert [d["frame_index"] for d in videos[0][1]] == [0, 1, 2]
    lab, ids = first_frame_label_map(videos[0][1][0])
    assert ids == [1, 2]
    np.testing.assert_array_equal(lab, np.where(labels["cows"][0] == 255, 0, labels["cows"][0]))
    with pytest.raises(ValueError, match="without gaps"):
        group_videos([d for d in dicts if d["frame_index"] != 1])
