"""Real-data properties the synthetic fixtures never had (issue #14): degenerate COCO polygons,
instance images without annotations."""
import json
import logging
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from psalm.config import get_psalm_cfg
from psalm.data.datasets.coco import load_coco_instances_json
from psalm.data.datasets.refcoco import load_referring_json
from psalm.data.mapper import PSALMDatasetMapper
from psalm.data.samplers import build_psalm_train_loader
from psalm.evaluation.masks import annotation_to_mask

H, W = 24, 32
GOOD = [2, 2, 12, 2, 12, 14, 2, 14]


def _coco_tree(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    images = []
    for i in (1, 2, 3):
        Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)).save(root / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "height": H, "width": W})
    anns = [
        # a valid polygon plus a 4-value one (pycocotools would read it as a box) and a 2-value one
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [GOOD, [20, 3, 30, 20], [5, 5]],
         "bbox": [2, 2, 10, 12], "area": 120.0, "iscrowd": 0},
        # only degenerate polygons (odd length, 2 points): dropped
        {"id": 11, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 5, 9], [20, 3, 30, 20]],
         "bbox": [1, 1, 8, 4], "area": 0.0, "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 3, "segmentation": [[20, 3, 30, 20]], "bbox": [20, 3, 10, 17],
         "area": 0.0, "iscrowd": 0},
    ]  # image 3: no annotation at all; image 2: only a degenerate one
    js = tmp_path / "instances.json"
    js.write_text(json.dumps({"images": images, "annotations": anns,
                              "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]}))
    return str(js), str(root)


def test_degenerate_polygons_are_filtered_with_a_count(tmp_path, caplog):
    js, root = _coco_tree(tmp_path)
    with caplog.at_level(logging.WARNING):
        dicts = load_coco_instances_json(js, root, {1: 0, 3: 1}, "_psalm_test_degenerate", "-")
    assert "filtered out 2 annotation(s) without a valid segmentation" in caplog.text
    assert len(dicts) == 3  # every image kept (evaluation)
    assert [a["id"] for a in dicts[0]["annotations"]] == [10]
    assert dicts[0]["annotations"][0]["segmentation"] == [GOOD]
    assert dicts[1]["annotations"] == [] and dicts[2]["annotations"] == []
    # the mapper rasterises only the valid polygon (the 4-value one used to become a box)
    cfg = get_psalm_cfg()
    cfg.INPUT.IMAGE_SIZE = 32
    out = PSALMDatasetMapper(cfg, is_train=True, class_names=["person", "car"], task="instance")(dicts[0])
    m = out["instances"].gt_masks
    assert m.shape[0] == 1 and not m[0, 16:, 24:].any() and m[0, 4:10, 4:10].all()


def test_evaluator_masks_ignore_degenerate_polygons():
    for rasterizer in ("coco", "official"):
        only_bad = annotation_to_mask([[20, 3, 30, 20], [5, 5]], H, W, rasterizer)
        assert not only_bad.any(), rasterizer  # pycocotools: a 10x17 "box"
        mixed = annotation_to_mask([GOOD, [20, 3, 30, 20]], H, W, rasterizer)
        assert mixed.sum() == annotation_to_mask([GOOD], H, W, rasterizer).sum() > 0


def test_mapper_refuses_an_annotation_without_a_valid_polygon(tmp_path):
    js, root = _coco_tree(tmp_path)
    d = {"file_name": os.path.join(root, "1.jpg"), "height": H, "width": W, "task": "instance",
         "annotations": [{"id": 5, "segmentation": [[1, 2, 3, 4]], "category_id": 0, "iscrowd": 0}]}
    with pytest.raises(ValueError, match="no valid polygon"):
        PSALMDatasetMapper(get_psalm_cfg(), is_train=True, class_names=["a"])(d)


def test_referring_ref_whose_objects_are_all_degenerate_is_left_out(tmp_path, caplog):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "a.jpg")
    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": H, "width": W}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [GOOD], "bbox": [2, 2, 10, 12]},
                            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 4, 4]],
                             "bbox": [1, 1, 3, 3]}],
            "refs": [{"ref_id": 0, "image_id": 1, "ann_ids": [1], "sentences": [{"sent_id": 0, "sent": "a"}]},
                     {"ref_id": 1, "image_id": 1, "ann_ids": [2], "sentences": [{"sent_id": 1, "sent": "b"}]},
                     {"ref_id": 2, "image_id": 1, "ann_ids": [], "sentences": [{"sent_id": 2, "sent": "c"}]}]}
    js = tmp_path / "ref.json"
    js.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        dicts = load_referring_json(str(js), str(root), "_psalm_test_ref_degenerate", "per_sentence", "gres", "-")
    # ref 1 is not turned into a "no target" sample; ref 2 (a real no-target) stays
    assert [(d["ref_id"], d["no_target"]) for d in dicts] == [(0, False), (2, True)]
    assert "1 ref(s) left out" in caplog.text


def test_instance_training_drops_images_without_annotations(tmp_path):
    js, root = _coco_tree(tmp_path)
    name = "_psalm_test_instance_empty"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_coco_instances_json(js, root, {1: 0, 3: 1}, name, "-"))
    MetadataCatalog.get(name).set(task="instance", prompt_class_names=["person", "car"])
    cfg = get_psalm_cfg()
    cfg.INPUT.IMAGE_SIZE = 32
    cfg.DATASETS.TRAIN = (name,)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = 0
    loader = build_psalm_train_loader(cfg)
    it = iter(loader)
    for _ in range(3):
        for s in next(it):
            assert s["image_id"] == 1 and len(s["instances"]) == 1
    assert len(DatasetCatalog.get(name)) == 3  # evaluation still sees every image
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False  # detectron2's switch
    loader = build_psalm_train_loader(cfg)
    seen = {s["image_id"] for _, b in zip(range(10), iter(loader)) for s in b}
    assert seen == {1, 2, 3}


def test_coco_evaluators_survive_degenerate_gt_polygons(tmp_path):
    """detectron2's COCOEvaluator (mask AP of instance and panoptic runs) on a json with degenerate
    polygons: pycocotools failed on the 4-value one; the ValidPolygon variant ignores them."""
    import torch
    from detectron2.structures import Instances

    from psalm.evaluation.coco_json import ValidPolygonCOCOEvaluator

    js, root = _coco_tree(tmp_path)
    name = "_psalm_test_coco_eval_degenerate"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_coco_instances_json(js, root, {1: 0, 3: 1}, name, "-"))
    MetadataCatalog.get(name).set(json_file=js, thing_classes=["person", "car"],
                                  thing_dataset_id_to_contiguous_id={1: 0, 3: 1}, evaluator_type="coco")
    ev = ValidPolygonCOCOEvaluator(name, tasks=("segm",), distributed=False, output_dir=str(tmp_path / "out"),
                                   use_fast_impl=False)
    ev.reset()
    gt = annotation_to_mask([GOOD], H, W)
    inst = Instances((H, W))
    inst.pred_masks = torch.from_numpy(gt)[None]
    inst.scores = torch.tensor([0.9])
    inst.pred_classes = torch.tensor([0])
    from psalm.modeling.postprocessing import masks_to_boxes

    inst.pred_boxes = masks_to_boxes(inst.pred_masks)
    ev.process([{"image_id": 1, "file_name": "1.jpg"}], [{"instances": inst}])
    res = ev.evaluate()["segm"]
    assert res["AP"] == pytest.approx(100.0)  # the one valid person, found exactly
