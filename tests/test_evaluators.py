"""Evaluators against independent references: hand-computed referring / gRefCOCO / interactive cases,
J and F against esdft-segmetric (DAVIS toolkit functions), PQ against panopticapi's pq_compute and
mask AP (COCO instance sets; ADE20K panoptic thing AP) against pycocotools' COCOeval run directly, and
LVIS mask AP against the lvis package's LVISEval run directly (our numpy-2 shim applied to both)."""
import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from psalm.config import get_psalm_cfg
from psalm.data.datasets import MissingDatasetFileError, register_all_psalm_datasets
from psalm.data.datasets._common import register_lazy
from psalm.data.visual_prompts import encode_rle
from psalm.evaluation import (
    DAVISEvaluator,
    GRESEvaluator,
    InteractiveEvaluator,
    PanopticThingAPEvaluator,
    ReferringEvaluator,
    boundary_f_measure,
    build_evaluator,
    mean_recall_decay,
    region_similarity,
)
from psalm.evaluation import base as eval_base

from .dataset_fixtures import _json, _jpg, load_prepare_script, make_coco, make_davis

H, W = 4, 5


def _mask(*cells):
    m = np.zeros((H, W), dtype=bool)
    for r, c in cells:
        m[r, c] = True
    return m


def _inst(*masks, hw=(H, W)):
    inst = Instances(hw)
    inst.pred_masks = torch.from_numpy(np.stack(masks) if masks else np.zeros((0, *hw), dtype=bool))
    inst.scores = torch.ones(len(masks))
    return inst


def _register(name, dicts, **meta):
    register_lazy(name, lambda: [dict(d) for d in dicts], **meta)


def _ann(mask, **kw):
    return dict(segmentation=encode_rle(mask), bbox=[0, 0, 1, 1], category_id=0, iscrowd=0, **kw)


# ----------------------------------------------------------------------------- referring
def test_referring_hand_computed():
    g1 = _mask((0, 0), (0, 1), (1, 0), (1, 1))
    p1 = _mask((0, 0), (0, 1), (0, 2))  # I = 2, U = 5
    g2 = _mask((3, 3), (3, 4))
    dicts = [
        {"sample_id": "a", "height": H, "width": W, "annotations": [_ann(g1)]},
        {"sample_id": "b", "height": H, "width": W, "annotations": [_ann(g2)]},  # empty prediction: I 0, U 2
        {"sample_id": "c", "height": H, "width": W, "annotations": []},  # empty GT, empty pred: IoU 1
    ]
    _register("test_ref", dicts, evaluator_type="referring", task="referring")
    ev = ReferringEvaluator("test_ref", distributed=False)
    ev.reset()
    ev.process([{"sample_id": "a"}, {"sample_id": "b"}, {"sample_id": "c"}],
               [{"instances": _inst(p1)}, {"instances": _inst()}, {"instances": _inst(np.zeros((H, W), bool))}])
    res = ev.evaluate()["referring"]
    assert res["cIoU"] == pytest.approx(100 * 2 / 7)
    assert res["gIoU"] == pytest.approx(100 * (0.4 + 0 + 1) / 3)
    assert res["Pr@0.5"] == pytest.approx(100 / 3) and res["Pr@0.9"] == pytest.approx(100 / 3)
    with pytest.raises(KeyError, match="must pass 'sample_id' through"):
        ev.process([{"image_id": 1}], [{"instances": _inst()}])
    with pytest.raises(ValueError, match="original image size"):
        ev.process([{"sample_id": "a"}], [{"instances": _inst(np.zeros((3, 3), bool), hw=(3, 3))}])
    with pytest.raises(ValueError, match="binary"):
        ev.process([{"sample_id": "a"}], [{"instances": _inst(np.zeros((H, W), np.float32))}])


def test_gres_n_acc_t_acc_hand_computed():
    g = _mask((0, 0), (0, 1), (1, 1))
    p = _mask((0, 0), (0, 1))  # I 2, U 3
    dicts = [
        {"sample_id": "tp", "height": H, "width": W, "annotations": [], "no_target": True},
        {"sample_id": "fn", "height": H, "width": W, "annotations": [], "no_target": True},
        {"sample_id": "fp", "height": H, "width": W, "annotations": [_ann(g)], "no_target": False},
        {"sample_id": "tn", "height": H, "width": W, "annotations": [_ann(g)], "no_target": False},
    ]
    _register("test_gres", dicts, evaluator_type="gres", task="gres")
    ev = GRESEvaluator("test_gres", distributed=False)
    ev.reset()
    ev.process(
        [{"sample_id": k} for k in ("tp", "fn", "fp", "tn")],
        [
            {"instances": _inst(), "no_target": True},  # no-target predicted: TP (IoU 1)
            {"instances": _inst(_mask((3, 0), (3, 1), (3, 2), (3, 3))), "no_target": False},  # FN: I 0, U 4
            {"instances": _inst(g), "no_target": True},  # flag wins: empty prediction -> FP, I 0, U 3
            {"instances": _inst(p), "no_target": False},  # TN: I 2, U 3
        ],
    )
    res = ev.evaluate()["gres"]
    assert res["N-acc"] == pytest.approx(50.0) and res["T-acc"] == pytest.approx(50.0)
    assert res["cIoU"] == pytest.approx(100 * 2 / (0 + 4 + 3 + 3))
    assert res["gIoU"] == pytest.approx(100 * (1 + 0 + 0 + 2 / 3) / 4)
    assert res["Pr@0.5"] == pytest.approx(50.0)  # over the 2 samples with a target
    assert res["num_no_target"] == 2


def test_gres_top1_mode_says_n_acc_is_zero_by_construction(caplog):
    """GREF_NO_TARGET=top1 never predicts no-target: N-acc is not a measurement, and the results and
    the log say so next to it (build_evaluator passes the mode)."""
    import logging

    from psalm.config import get_psalm_cfg
    from psalm.evaluation import build_evaluator
    from psalm.evaluation.referring import NACC_TOP1_KEY

    g = _mask((0, 0), (0, 1))
    dicts = [
        {"sample_id": "nt", "height": H, "width": W, "annotations": [], "no_target": True},
        {"sample_id": "t", "height": H, "width": W, "annotations": [_ann(g)], "no_target": False},
    ]
    _register("test_gres_top1", dicts, evaluator_type="gres", task="gres")
    outputs = [{"instances": _inst(g), "no_target": False}, {"instances": _inst(g), "no_target": False}]
    results = {}
    for mode in ("top1", "empty"):
        cfg = get_psalm_cfg()
        cfg.TEST.PSALM.GREF_NO_TARGET = mode
        ev = build_evaluator(cfg, "test_gres_top1", distributed=False)
        ev.reset()
        ev.process([{"sample_id": "nt"}, {"sample_id": "t"}], outputs)
        with caplog.at_level(logging.WARNING):
            results[mode] = ev.evaluate()["gres"]
    keys = list(results["top1"])
    assert results["top1"]["N-acc"] == 0.0 and results["top1"][NACC_TOP1_KEY] == 1.0
    assert keys.index(NACC_TOP1_KEY) == keys.index("N-acc") + 1  # next to the metric
    assert results["empty"]["N-acc"] == 0.0 and NACC_TOP1_KEY not in results["empty"]
    assert caplog.text.count("N-acc = 0.00 is 0 by construction") == 1  # the top1 run only
    assert all(isinstance(v, (int, float)) for v in results["top1"].values())  # EvalHook needs numbers


def test_interactive_per_region_and_rank_gather(monkeypatch):
    g0, g1 = _mask((0, 0), (0, 1)), _mask((2, 2))
    g2 = _mask((3, 4), (2, 4))
    dicts = [
        {"sample_id": "1", "height": H, "width": W, "annotations": [_ann(g0), _ann(g1)]},
        {"sample_id": "2", "height": H, "width": W, "annotations": [_ann(g2)]},
    ]
    _register("test_inter", dicts, evaluator_type="interactive", task="interactive", prompt_type="box")
    inputs = [{"sample_id": "1", "region_ann_indices": [1, 0]}, {"sample_id": "2"}]
    outputs = [{"instances": _inst(g1, _mask((0, 0)))}, {"instances": _inst(_mask((0, 0)))}]
    ev = InteractiveEvaluator("test_inter", distributed=False)
    ev.reset()
    ev.process(inputs, outputs)
    res = ev.evaluate()["interactive"]
    # regions: (g1 vs g1) 1/1, (g0 vs (0,0)) 1/2, (g2 vs (0,0)) 0/3
    assert res["mIoU_box"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)
    assert res["cIoU_box"] == pytest.approx(100 * 2 / 6) and res["num_regions"] == 3
    with pytest.raises(ValueError, match="2 predicted masks for 1 regions"):
        ev.process([{"sample_id": "2"}], [{"instances": _inst(g2, g2)}])

    # two "ranks", each with half of the samples, gathered on the main process = one evaluator
    r0, r1 = InteractiveEvaluator("test_inter"), InteractiveEvaluator("test_inter")
    r0.reset(), r1.reset()
    r0.process(inputs[:1], outputs[:1])
    r1.process(inputs[1:], outputs[1:])
    monkeypatch.setattr(eval_base.comm, "gather", lambda data, dst=0: [r0._stats, r1._stats])
    assert r0.evaluate()["interactive"] == res
    monkeypatch.setattr(eval_base.comm, "is_main_process", lambda: False)
    assert r1.evaluate() is None


# ----------------------------------------------------------------------------- DAVIS vs segmetric
def _shift(m, dy, dx):
    return np.roll(np.roll(m, dy, axis=0), dx, axis=1)


def test_davis_j_f_against_segmetric(tmp_path):
    from segmetric.metrics import db_eval_boundary, db_eval_iou
    from segmetric.utils import db_statistics

    root = str(tmp_path / "data")
    labels = make_davis(root, n_frames=7)
    register_all_psalm_datasets(root)
    try:
        load_prepare_script("prepare_davis").main(["--root", root])
        frames = DatasetCatalog.get("davis17_val")
        out_dir = str(tmp_path / "out")
        ev = DAVISEvaluator("davis17_val", distributed=False, output_dir=out_dir)
        ev.reset()
        preds = {}
        for f in frames:
            gt = labels[f["video_name"]][f["frame_index"]]
            t = f["frame_index"]
            masks = [_shift(gt == oid, t % 2, (t + oid) % 3 - 1) for oid in f["object_ids"]]
            if f["video_name"] == "cows" and t == 5:
                masks[1][:] = False  # a missed object
            preds[(f["video_name"], t)] = masks
            ev.process([{"sample_id": f["sample_id"]}], [{"instances": _inst(*masks, hw=gt.shape)}])
        res = ev.evaluate()["davis"]

        J, F = {"M": [], "R": [], "D": []}, {"M": [], "R": [], "D": []}
        for video, labs in labels.items():
            oids = [o for o in np.unique(labs[0]) if o not in (0, 255)]
            for k, oid in enumerate(oids):
                js, fs = [], []
                for t in range(1, len(labs) - 1):
                    painted = np.zeros(labs[t].shape, np.uint8)
                    for kk, o in enumerate(oids):
                        painted[preds[(video, t)][kk]] = o
                    gt_o, pr_o, void = labs[t] == oid, painted == oid, labs[t] == 255
                    js.append(db_eval_iou(gt_o, pr_o, void))
                    fs.append(db_eval_boundary(gt_o, pr_o, void))
                    assert region_similarity(pr_o, gt_o, void) == pytest.approx(js[-1], abs=1e-12)
                    assert boundary_f_measure(pr_o, gt_o, void) == pytest.approx(fs[-1], abs=1e-12)
                for acc, vals in ((J, js), (F, fs)):
                    m, r, d = db_statistics(np.array(vals))
                    assert mean_recall_decay(vals) == pytest.approx((m, r, d), abs=1e-12)
                    acc["M"].append(m), acc["R"].append(r), acc["D"].append(d)
        for name, acc in (("J", J), ("F", F)):
            assert res[f"{name}-Mean"] == pytest.approx(100 * np.mean(acc["M"]), abs=1e-9)
            assert res[f"{name}-Recall"] == pytest.approx(100 * np.mean(acc["R"]), abs=1e-9)
            assert res[f"{name}-Decay"] == pytest.approx(100 * np.mean(acc["D"]), abs=1e-9)
        assert res["J&F-Mean"] == pytest.approx((res["J-Mean"] + res["F-Mean"]) / 2)
        assert res["num_objects"] == 3 and 0 < res["J-Mean"] < 100
        png = np.asarray(Image.open(os.path.join(out_dir, "davis_predictions", "cows", "00002.png")))
        assert set(np.unique(png)) <= {0, 1, 2}

        ev2 = DAVISEvaluator("davis17_val", distributed=False)
        ev2.reset()
        ev2.process([{"sample_id": frames[1]["sample_id"]}], [{"instances": _inst(*preds[("bear", 1)], hw=(20, 30))}])
        with pytest.raises(ValueError, match="no prediction for frame"):
            ev2.evaluate()
    finally:
        register_all_psalm_datasets()


# ----------------------------------------------------------------------------- PQ / AP via detectron2
@pytest.fixture
def coco_root(tmp_path):
    root = str(tmp_path / "data")
    fx = make_coco(root)
    register_all_psalm_datasets(root)
    yield root, fx
    register_all_psalm_datasets()


def _cfg(**flags):
    cfg = get_psalm_cfg()
    for k, v in flags.items():
        setattr(cfg.MODEL.MASK_FORMER.TEST, k, v)
    return cfg


def test_pq_matches_panopticapi(coco_root, tmp_path):
    from panopticapi.evaluation import pq_compute

    root, fx = coco_root
    name = "coco_2017_val_panoptic_psalm"
    meta = MetadataCatalog.get(name)
    ev = build_evaluator(_cfg(INSTANCE_ON=False, SEMANTIC_ON=False), name, output_dir=str(tmp_path / "pq"))
    ev.reset()
    # predictions: image 1 person slightly off + car; image 2 car as person (wrong class); image 3 wall
    cont = {v: k for k, v in {**meta.thing_dataset_id_to_contiguous_id, **meta.stuff_dataset_id_to_contiguous_id}.items()}
    pred_dir = str(tmp_path / "ref_pred")
    os.makedirs(pred_dir)
    ref_anns = []
    for img in fx["images"]:
        seg = np.full((fx["H"], fx["W"]), 1, dtype=np.int32)
        infos = [{"id": 1, "category_id": 131, "isthing": False}]
        if img["id"] == 1:
            seg[3:14, 2:12] = 2
            seg[4:20, 16:30] = 3
            infos += [{"id": 2, "category_id": 0, "isthing": True}, {"id": 3, "category_id": 2, "isthing": True}]
        elif img["id"] == 2:
            seg[4:18, 4:20] = 2
            infos += [{"id": 2, "category_id": 0, "isthing": True}]
        inp = {"image_id": img["id"], "file_name": os.path.join(root, "coco", "val2017", img["file_name"])}
        ev.process([inp], [{"panoptic_seg": (torch.from_numpy(seg), [dict(i) for i in infos])}])
        # independent reference: our own prediction PNG + JSON in dataset ids
        png = img["file_name"].replace(".jpg", ".png")
        rgb = np.stack([seg % 256, seg // 256 % 256, seg // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(os.path.join(pred_dir, png))
        ref_anns.append({"image_id": img["id"], "file_name": png,
                         "segments_info": [{"id": i["id"], "category_id": cont[i["category_id"]]} for i in infos]})
    gt_json = os.path.join(root, "coco", "annotations", "panoptic_val2017.json")
    pred_json = str(tmp_path / "ref_pred.json")
    gt = json.load(open(gt_json))
    json.dump({"annotations": ref_anns, "images": gt["images"], "categories": gt["categories"]}, open(pred_json, "w"))
    ref = pq_compute(gt_json, pred_json, gt_folder=os.path.join(root, "coco", "panoptic_val2017"), pred_folder=pred_dir)
    res = ev.evaluate()["panoptic_seg"]
    for key in ("pq", "sq", "rq"):
        assert res[key.upper()] == pytest.approx(100 * ref["All"][key], abs=1e-9)
        assert res[key.upper() + "_th"] == pytest.approx(100 * ref["Things"][key], abs=1e-9)
    assert 0 < res["PQ"] < 100


def test_mask_ap_matches_cocoeval(coco_root, tmp_path):
    root, fx = coco_root
    name = "coco_2017_val_instance_psalm"
    ev = build_evaluator(None, name, output_dir=str(tmp_path / "ap"), distributed=False)
    ev.reset()
    meta = MetadataCatalog.get(name)
    to_dataset = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    rng = np.random.default_rng(0)
    results = []
    gt_masks = {a["id"]: a for a in fx["anns"]}
    coco_gt = COCO(meta.json_file)
    for img in fx["images"]:
        masks, scores, classes = [], [], []
        for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=img["id"])):
            m = coco_gt.annToMask(a).astype(bool)
            masks.append(np.roll(m, int(rng.integers(0, 3)), axis=1))
            scores.append(float(rng.uniform(0.3, 1.0)))
            classes.append(meta.thing_dataset_id_to_contiguous_id[a["category_id"]])
        masks.append(np.zeros((fx["H"], fx["W"]), bool))
        masks[-1][0:5, 0:5] = True  # a false positive
        scores.append(0.9)
        classes.append(1)  # bicycle
        inst = Instances((fx["H"], fx["W"]))
        inst.pred_masks = torch.from_numpy(np.stack(masks))
        inst.scores = torch.tensor(scores)
        inst.pred_classes = torch.tensor(classes)
        inst.pred_boxes = Boxes(torch.zeros(len(masks), 4))
        ev.process([{"image_id": img["id"], "file_name": img["file_name"]}], [{"instances": inst}])
        for m, s, c in zip(masks, scores, classes):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": img["id"], "category_id": to_dataset[c], "segmentation": rle, "score": s})
    res = ev.evaluate()["segm"]
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="segm")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    assert res["AP"] == pytest.approx(100 * coco_eval.stats[0], abs=1e-9)
    assert res["AP50"] == pytest.approx(100 * coco_eval.stats[1], abs=1e-9)
    assert 0 < res["AP"] < 100 and len(gt_masks) == 4


# ----------------------------------------------------------------------------- dispatch / errors
def test_build_evaluator_dispatch_and_missing_files(tmp_path):
    register_all_psalm_datasets(str(tmp_path / "nothing"))
    try:
        assert isinstance(build_evaluator(None, "refcoco_unc_val"), ReferringEvaluator)
        assert isinstance(build_evaluator(None, "grefcoco_val"), GRESEvaluator)
        assert isinstance(build_evaluator(None, "coco_interactive_val_point"), InteractiveEvaluator)
        assert isinstance(build_evaluator(None, "davis17_val"), DAVISEvaluator)
        with pytest.raises(ValueError, match="no evaluator"):
            build_evaluator(None, "llava_v1_5_mix665k_psalm")
        with pytest.raises(ValueError, match="evaluator_type"):
            build_evaluator(None, "no_such_dataset_xyz")
        ev = build_evaluator(None, "refcoco_unc_val")
        with pytest.raises(MissingDatasetFileError, match="prepare_refcoco.py"):
            ev.process([{"sample_id": "0/0"}], [{"instances": _inst()}])
    finally:
        register_all_psalm_datasets()


# ----------------------------------------------------------------------------- ADE20K panoptic thing AP
ADE_STEMS = ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
AH, AW = 24, 32
BED, CABINET, PERSON = 7, 10, 12  # ADE-150 things; their ids in the 150-class space are not 0..T-1


def _rle(m):
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _box(y0, y1, x0, x1):
    m = np.zeros((AH, AW), bool)
    m[y0:y1, x0:x1] = True
    return m


def make_ade_panoptic(root, image_ids="stem"):
    """ADEChallengeData2016 panoptic (json + PNGs) and instance json in Mask2Former's formats (category
    ids: 0-based ADE-150; image ids: the file stem, or ``image_ids="int"`` 1..N as other tools write).
    Returns {stem: [(ade_id, mask), ...]} of the thing instances."""
    from psalm.data.class_names import load_categories

    base = os.path.join(root, "ADEChallengeData2016")
    things = {
        ADE_STEMS[0]: [(BED, _box(4, 14, 6, 20)), (PERSON, _box(15, 23, 22, 30))],
        ADE_STEMS[1]: [(CABINET, _box(2, 10, 2, 12)), (BED, _box(12, 22, 10, 28)), (PERSON, _box(1, 8, 20, 26))],
        ADE_STEMS[2]: [],  # wall only
    }
    os.makedirs(os.path.join(base, "ade20k_panoptic_val"), exist_ok=True)
    pan_anns, ins_anns, images = [], [], []
    for i, stem in enumerate(ADE_STEMS):
        _jpg(os.path.join(base, "images", "validation", stem + ".jpg"), AH, AW, seed=40 + i)
        ids = np.ones((AH, AW), np.uint32)  # segment 1 = wall (ADE id 0, stuff)
        segs = [{"id": 1, "category_id": 0, "iscrowd": 0}]
        for j, (cat, m) in enumerate(things[stem]):
            ids[m] = j + 2
            segs.append({"id": j + 2, "category_id": cat, "iscrowd": 0})
            ins_anns.append({"id": len(ins_anns) + 1, "image_id": stem if image_ids == "stem" else i + 1,
                             "category_id": cat, "segmentation": _rle(m), "area": int(m.sum()),
                             "bbox": [0, 0, 1, 1], "iscrowd": 0})
        for s in segs:
            s["area"] = int((ids == s["id"]).sum())
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(os.path.join(base, "ade20k_panoptic_val", stem + ".png"))
        pan_anns.append({"image_id": stem, "file_name": stem + ".png", "segments_info": segs})
        images.append({"id": stem if image_ids == "stem" else i + 1, "file_name": stem + ".jpg",
                       "height": AH, "width": AW})
    cats = load_categories("ade20k_150")
    _json(os.path.join(base, "ade20k_panoptic_val.json"), {
        "images": [dict(im, id=s) for im, s in zip(images, ADE_STEMS)], "annotations": pan_anns,
        "categories": [{"id": c["id"], "name": c["raw_name"], "isthing": c["isthing"]} for c in cats]})
    _json(os.path.join(base, "ade20k_instance_val.json"), {
        "images": images, "annotations": ins_anns,
        "categories": [{"id": c["id"], "name": c["raw_name"]} for c in load_categories("ade20k_150_instance")]})
    return things


@pytest.fixture
def fresh_root(tmp_path):
    root = str(tmp_path / "data")
    os.makedirs(root)
    yield root
    register_all_psalm_datasets()


@pytest.mark.parametrize("image_ids", ["stem", "int"])
def test_ade20k_panoptic_thing_ap_matches_cocoeval(fresh_root, tmp_path, image_ids):
    things = make_ade_panoptic(fresh_root, image_ids)
    register_all_psalm_datasets(fresh_root)
    name = "ade20k_panoptic_val_psalm"
    meta = MetadataCatalog.get(name)
    assert meta.thing_dataset_id_to_contiguous_id[BED] == 7  # things are not 0..99 in the 150-class space
    ev = build_evaluator(_cfg(PANOPTIC_ON=False, SEMANTIC_ON=False), name, output_dir=str(tmp_path / "ap"),
                         distributed=False)
    assert isinstance(ev, PanopticThingAPEvaluator)
    ev.reset()
    rng = np.random.default_rng(1)
    coco_gt = COCO(meta.json_file)
    json_id = {os.path.splitext(im["file_name"])[0]: im["id"] for im in coco_gt.dataset["images"]}
    to_dataset = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    results = []
    for d in DatasetCatalog.get(name):  # the panoptic dicts (image_id = file stem)
        stem = d["image_id"]
        masks, classes = [], []
        for cat, m in things[stem]:
            masks.append(np.roll(m, int(rng.integers(0, 3)), axis=int(rng.integers(0, 2))))
            classes.append(meta.thing_dataset_id_to_contiguous_id[cat])
        masks.append(_box(0, 6, 0, 6))  # a false positive (cabinet)
        classes.append(CABINET)
        masks.append(things[ADE_STEMS[0]][0][1])  # a bed-shaped "person"
        classes.append(PERSON)
        scores = rng.uniform(0.2, 1.0, len(masks)).tolist()
        inst = Instances((AH, AW))
        inst.pred_masks = torch.from_numpy(np.stack(masks))
        inst.scores = torch.tensor(scores)
        inst.pred_classes = torch.tensor(classes)
        inst.pred_boxes = Boxes(torch.zeros(len(masks), 4))
        ev.process([d], [{"instances": inst}])
        assert inst.pred_classes.tolist() == classes  # the model output is not modified
        for m, s, c in zip(masks, scores, classes):
            results.append({"image_id": json_id[stem], "category_id": to_dataset[c], "segmentation": _rle(m),
                            "score": s})
    res = ev.evaluate()["segm"]
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="segm")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    assert res["AP"] == pytest.approx(100 * coco_eval.stats[0], abs=1e-9)
    assert res["AP50"] == pytest.approx(100 * coco_eval.stats[1], abs=1e-9)
    assert res["AP75"] == pytest.approx(100 * coco_eval.stats[2], abs=1e-9)
    assert 0 < res["AP"] < 100
    # per-category results carry the right names (view ranks follow the json's sorted category ids)
    bed_name = meta.thing_classes[sorted(meta.thing_dataset_id_to_contiguous_id.values()).index(7)]
    k = coco_eval.params.catIds.index(BED)
    prec = coco_eval.eval["precision"][:, :, k, 0, -1]
    assert res[f"AP-{bed_name}"] == pytest.approx(100 * prec[prec > -1].mean(), abs=1e-9)


def test_ade20k_panoptic_thing_ap_errors(fresh_root, tmp_path, caplog):
    import logging

    name = "ade20k_panoptic_val_psalm"
    register_all_psalm_datasets(fresh_root)  # nothing on disk: the instance json is missing
    msg = "ade20k_instance_val.json.*prepare_ade20k_instance.py.*INSTANCE_ON False"
    with pytest.raises(MissingDatasetFileError, match=msg):
        build_evaluator(_cfg(SEMANTIC_ON=False), name, output_dir=str(tmp_path / "a"))
    with caplog.at_level(logging.WARNING, logger="psalm.evaluation.build"):
        ev = build_evaluator(_cfg(INSTANCE_ON=False, SEMANTIC_ON=False), name, output_dir=str(tmp_path / "b"))
    assert not isinstance(ev, PanopticThingAPEvaluator) and "INSTANCE_ON is False" in caplog.text

    things = make_ade_panoptic(fresh_root)
    register_all_psalm_datasets(fresh_root)
    ev = PanopticThingAPEvaluator(name, distributed=False, output_dir=str(tmp_path / "c"))
    ev.reset()
    d = DatasetCatalog.get(name)[0]
    inst = Instances((AH, AW))
    inst.pred_masks = torch.from_numpy(np.stack([things[ADE_STEMS[0]][0][1]] * 2))
    inst.scores = torch.tensor([0.9, 0.8])
    inst.pred_boxes = Boxes(torch.zeros(2, 4))
    inst.pred_classes = torch.tensor([BED, 0])  # 0 = wall, a stuff class
    with pytest.raises(ValueError, match=r"class\(es\) \[0\].*not thing classes"):
        ev.process([d], [{"instances": inst}])
    inst.pred_classes = torch.tensor([BED, BED])
    with pytest.raises(ValueError, match="not in its instance json"):
        ev.process([{"file_name": "elsewhere/unknown.jpg", "image_id": "unknown"}], [{"instances": inst}])
    # an instance json whose categories are not the panoptic thing classes is refused
    path = MetadataCatalog.get(name).json_file
    gt = json.load(open(path))
    gt["categories"] = gt["categories"][:50]
    json.dump(gt, open(path, "w"))
    with pytest.raises(ValueError, match="has 50 categories, but the panoptic set has 100 thing classes"):
        PanopticThingAPEvaluator(name, distributed=False)


# ----------------------------------------------------------------------------- LVIS mask AP
def _lvis_fixture(root):
    """lvis/lvis_v1_val.json (LVIS v1 format: frequencies, neg / not-exhaustive ids) -> prepare_lvis.
    Images 5, 6 (24x32); categories aerosol_can 1 (c), air_conditioner 2 (f), applesauce 13 (r)."""
    rect = lambda x0, y0, x1, y1: {"segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],  # noqa: E731
                                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0))}
    images = [{"id": 5, "height": AH, "width": AW, "coco_url": "http://images.cocodataset.org/val2017/000000000005.jpg",
               "neg_category_ids": [13], "not_exhaustive_category_ids": []},
              {"id": 6, "height": AH, "width": AW, "coco_url": "http://images.cocodataset.org/val2017/000000000006.jpg",
               "neg_category_ids": [2], "not_exhaustive_category_ids": [1]}]
    anns = [dict(id=1, image_id=5, category_id=1, **rect(1, 1, 9, 9)),
            dict(id=2, image_id=5, category_id=2, **rect(12, 2, 30, 20)),
            dict(id=3, image_id=6, category_id=1, **rect(4, 4, 20, 18)),
            dict(id=4, image_id=6, category_id=13, **rect(22, 2, 30, 10))]
    cats = [{"id": 1, "name": "aerosol_can", "synonyms": ["aerosol_can"], "frequency": "c"},
            {"id": 2, "name": "air_conditioner", "synonyms": ["air_conditioner"], "frequency": "f"},
            {"id": 13, "name": "applesauce", "synonyms": ["applesauce"], "frequency": "r"}]
    _json(os.path.join(root, "lvis", "lvis_v1_val.json"), {"images": images, "annotations": anns, "categories": cats})
    for img in images:
        _jpg(os.path.join(root, "coco", "val2017", f"{img['id']:012d}.jpg"), AH, AW, seed=img["id"])
    load_prepare_script("prepare_lvis").main(["--root", root, "--splits", "val", "--log-level", "WARNING"])


def _lvis_box(x0, y0, x1, y1, dx=0):
    m = np.zeros((AH, AW), bool)
    m[y0:y1, x0 + dx : x1 + dx] = True
    return m


def test_lvis_mask_ap_matches_lvis_eval(fresh_root, tmp_path):
    from lvis import LVIS, LVISEval, LVISResults

    _lvis_fixture(fresh_root)
    register_all_psalm_datasets(fresh_root)
    name = "lvis_v1_val_psalm"
    meta = MetadataCatalog.get(name)
    ev = build_evaluator(None, name, output_dir=str(tmp_path / "lvis"), distributed=False)
    ev.reset()
    # (dataset category id, mask, score): hits, a shifted hit, FPs on negative categories (count),
    # an FP on a not-exhaustive category (ignored) and one on a category the image does not list (ignored)
    preds = {
        5: [(1, _lvis_box(1, 1, 9, 9, dx=1), 0.9), (2, _lvis_box(12, 2, 30, 20), 0.8),
            (13, _lvis_box(0, 10, 8, 20), 0.7), (3, _lvis_box(2, 2, 6, 6), 0.95)],
        6: [(1, _lvis_box(4, 4, 20, 18), 0.6), (1, _lvis_box(22, 12, 30, 20), 0.85), (2, _lvis_box(0, 0, 6, 6), 0.95),
            (13, _lvis_box(22, 2, 30, 10, dx=2), 0.4), (13, _lvis_box(10, 19, 16, 24), 0.45)],
    }
    ref_results = []
    for image_id, items in preds.items():
        inst = Instances((AH, AW))
        inst.pred_masks = torch.from_numpy(np.stack([m for _, m, _ in items]))
        inst.scores = torch.tensor([s for _, _, s in items])
        inst.pred_classes = torch.tensor([meta.thing_dataset_id_to_contiguous_id[c] for c, _, _ in items])
        inst.pred_boxes = Boxes(torch.zeros(len(items), 4))
        ev.process([{"image_id": image_id, "file_name": f"{image_id:012d}.jpg"}], [{"instances": inst}])
        ref_results += [{"image_id": image_id, "category_id": c, "segmentation": _rle(m), "score": s}
                        for c, m, s in items]
    res = ev.evaluate()["segm"]
    gt = LVIS(meta.json_file)
    ref = LVISEval(gt, LVISResults(gt, ref_results, max_dets=300), "segm")
    ref.run()
    ref = ref.get_results()
    for key in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
        assert res[key] == pytest.approx(100 * ref[key], abs=1e-9), key
    assert 0 < res["AP"] < 100 and res["APf"] < 100 and res["AP50"] > res["AP75"]
    # the shim is local to lvis.eval: numpy keeps its alias-free namespace
    import lvis.eval

    assert lvis.eval.np.float is float and lvis.eval.np.cumsum is np.cumsum and not hasattr(np, "float")
