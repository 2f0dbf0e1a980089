"""Pixel-SAIL's ``muse`` task: a MUSE JSON in the released format -> psalm's loader -> the Pixel-SAIL mapper
(one turn per question, inline [SEG]s, GT masks in answer order, mismatched questions dropped) -> psalm's train
loader with DATASETS.TRAIN_TASKS "muse" -> finite losses of the tiny model."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pixelsail_testing import make_input  # noqa: F401  (also puts the project on sys.path)

H, W = 32, 48  # multiples of the tiny patch (8) under MAX_IMAGE_SIDE: the mapper keeps the size


def _box(y0, y1, x0, x1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _records():
    from psalm.structures.masks import encode_rle

    # RLE targets, so that the expected masks are exact; disjoint, so that the order is visible
    a = {"id": 1, "category_id": 1, "category_name": "cat", "rephrased_name": "the cat on the left",
         "segmentation": encode_rle(_box(4, 20, 2, 14)), "bbox": [2, 4, 12, 16]}
    b = {"id": 2, "category_id": 2, "category_name": "dog",
         "segmentation": encode_rle(_box(10, 30, 30, 46)), "bbox": [30, 10, 16, 20]}
    c = {"id": 3, "category_id": 3, "category_name": "bowl", "rephrased_name": "the blue bowl",
         "segmentation": [[20, 22, 28, 22, 28, 30, 20, 30]], "bbox": [20, 22, 8, 8]}  # a polygon
    return [
        {"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "height": H, "width": W, "ann_list": [a, b, c],
         "questions": ["Which pets could share the food?", "Where is the food?"],
         "answers": [[b, a, c], [c]],  # answer order, not ann_list order
         "text_answers": ["The dog {seg} and the cat {seg} could share the bowl {seg}.", "In the bowl {seg}."]},
        {"id": 8, "coco_url": "http://images.cocodataset.org/val2017/000000000008.jpg", "height": H, "width": W,
         "ann_list": [a, b],
         "questions": ["Which one is a cat?", "A question whose answer has too many segs", "Name both."],
         "answers": [[a], [a], [a, b]],
         "text_answers": ["It is the cat {seg}.", "{seg} and {seg}.", None]},
        {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": H, "width": W, "ann_list": [b],
         "questions": ["Only a mismatch"], "answers": [[b]], "text_answers": ["{seg}, {seg}"]},
    ]


@pytest.fixture(scope="module")
def muse_root(tmp_path_factory):
    from psalm.data.datasets import register_all_psalm_datasets

    root = str(tmp_path_factory.mktemp("pixelsail_muse"))
    rng = np.random.default_rng(0)
    for rel in ("coco/train2014/COCO_train2014_000000000007.jpg", "coco/val2017/000000000008.jpg",
                "coco/train2014/COCO_train2014_000000000009.jpg"):
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(os.path.join(root, rel))
    os.makedirs(os.path.join(root, "muse"))
    with open(os.path.join(root, "muse", "MUSE_train.json"), "w") as f:
        json.dump(_records(), f)
    register_all_psalm_datasets(root)
    yield root
    register_all_psalm_datasets()


def _mapper(cfg, train=True):
    from pixel_sail.data import PixelSAILDatasetMapper

    return PixelSAILDatasetMapper(cfg, train, "muse_train", "muse")


def _seg_count(turns):
    return sum(a.count("[SEG]") for _, a in turns)


def test_mapper_turns_segs_and_mask_order(tiny_cfg, muse_root):
    from detectron2.data import DatasetCatalog

    from psalm.evaluation.masks import annotation_to_mask

    dicts = DatasetCatalog.get("muse_train")
    assert [d["image_id"] for d in dicts] == [7, 8]  # image 9: its only question is dropped by the loader
    mapper = _mapper(tiny_cfg)
    out = mapper(dicts[0], np.random.default_rng(0))
    assert out["task"] == "muse" and out["pixel_values"].shape[-2:] == (H, W)
    assert out["turns"] == [
        ("Which pets could share the food?", "The dog [SEG] and the cat [SEG] could share the bowl [SEG]."),
        ("Where is the food?", "In the bowl [SEG]."),
    ]
    gt = out["gt_masks"]
    assert gt.shape == (4, H, W) and _seg_count(out["turns"]) == 4
    bowl = annotation_to_mask([[20, 22, 28, 22, 28, 30, 20, 30]], H, W)
    expected = [_box(10, 30, 30, 46), _box(4, 20, 2, 14), bowl, bowl]  # dog, cat, bowl; bowl
    for k, m in enumerate(expected):
        assert torch.equal(gt[k].bool(), torch.from_numpy(m)), k
    assert 0 < bowl.sum() < 100
    assert "targets" not in out and "text_answers" not in out and "questions" not in out

    out2 = mapper(dicts[1], np.random.default_rng(0))  # loader dropped the mismatched question already
    assert out2["turns"] == [("Which one is a cat?", "It is the cat [SEG]."),
                             ("Name both.", "the cat on the left is [SEG] and dog is [SEG].")]
    assert out2["gt_masks"].shape == (3, H, W) and _seg_count(out2["turns"]) == 3
    assert torch.equal(out2["gt_masks"][2].bool(), torch.from_numpy(_box(10, 30, 30, 46)))
    assert mapper.num_muse_dropped == 0


def test_mapper_drops_mismatched_questions_and_rejects_empty_dicts(tiny_cfg, muse_root, caplog):
    """Dicts from elsewhere (not filtered by psalm's loader): a mismatched question is dropped and counted;
    a dict left without a question is a clear error (psalm's train loader cannot skip a sample)."""
    import copy
    import logging

    from detectron2.data import DatasetCatalog

    d = copy.deepcopy(DatasetCatalog.get("muse_train")[0])
    d["text_answers"][0] = "Only one {seg}."  # 3 targets
    mapper = _mapper(tiny_cfg)
    with caplog.at_level(logging.INFO, logger="pixel_sail.data"):
        out = mapper(d, np.random.default_rng(0))
    assert out["turns"] == [("Where is the food?", "In the bowl [SEG].")] and out["gt_masks"].shape == (1, H, W)
    assert mapper.num_muse_dropped == 1 and "dropped 1 of 2 question(s)" in caplog.text
    d["text_answers"][1] = "{seg} {seg}"
    with pytest.raises(ValueError, match="no MUSE question left.*cannot skip a sample"):
        mapper(d, np.random.default_rng(0))
    assert mapper.num_muse_dropped == 3
    with pytest.raises(ValueError, match="MUSE data is for training"):
        _mapper(tiny_cfg, train=False)(DatasetCatalog.get("muse_train")[0])


def test_train_loader_accepts_muse_and_tiny_model_losses(tiny_cfg, muse_root, make_model):
    from pixel_sail.data import check_pixel_sail_task
    from pixel_sail.engine import PixelSAILTrainer

    cfg = tiny_cfg.clone()
    cfg.merge_from_list(["DATASETS.TRAIN", ("muse_train",), "DATASETS.TRAIN_TASKS", ["muse"], "SOLVER.IMS_PER_BATCH", 2,
                         "SEED", 0])
    batch = next(iter(PixelSAILTrainer.build_train_loader(cfg)))
    assert len(batch) == 2 and {x["task"] for x in batch} == {"muse"}
    for x in batch:
        assert x["gt_masks"].shape[0] == _seg_count(x["turns"]) > 0
    cfg.merge_from_list(["DATASETS.TRAIN_TASKS", []])  # the task from the data set's metadata
    assert next(iter(PixelSAILTrainer.build_train_loader(cfg)))[0]["task"] == "muse"
    with pytest.raises(ValueError, match="unsupported task 'panoptic'.*muse"):
        check_pixel_sail_task("panoptic")

    model = make_model().train()
    losses = model(batch)
    assert {"loss_lm", "loss_mask", "loss_dice"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0
    assert model.num_seg_mismatch == 0  # every [SEG] of the answers has its GT mask
    sum(losses.values()).backward()
    assert model.mask_head.seg_token_projector[0].weight.grad.abs().sum() > 0
