"""Tiny data-set fixtures in the REAL upstream formats (COCO json + PNG, refs pickle, grefs json, DAVIS
tree, LLaVA json, LVIS json, ADE / VOC / Pascal-Context / Cityscapes labels), written under a root.

Used by tests/test_prepare_scripts.py and tests/test_datasets_registration.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import sys

import numpy as np
from PIL import Image

from psalm.data.class_names import load_categories

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS_DIR = os.path.join(REPO, "datasets")


def load_prepare_script(name: str):
    """Import ``datasets/<name>.py`` as a module (the scripts' folder is on sys.path, as when run)."""
    if DATASETS_DIR not in sys.path:
        sys.path.insert(0, DATASETS_DIR)
    if name in sys.modules:  # one module object, so that multiprocessing can pickle its functions
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(DATASETS_DIR, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _jpg(path, h, w, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def rect_poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


# COCO categories used by the fixtures: person (1, thing), car (3, thing), wall-other-merged (199, stuff)
COCO_CATS = [
    {"id": 1, "name": "person", "supercategory": "person", "isthing": 1},
    {"id": 3, "name": "car", "supercategory": "vehicle", "isthing": 1},
    {"id": 199, "name": "wall-other-merged", "supercategory": "wall", "isthing": 0},
]


def make_coco(root: str) -> dict:
    """coco/{val2017,train2014}/*.jpg, annotations/instances_val2017.json, panoptic_val2017.json + PNGs."""
    coco = os.path.join(root, "coco")
    H, W = 24, 32
    images = [{"id": 1, "file_name": "000000000001.jpg", "height": H, "width": W},
              {"id": 2, "file_name": "000000000002.jpg", "height": H, "width": W},
              {"id": 3, "file_name": "000000000003.jpg", "height": H, "width": W}]
    for i, img in enumerate(images):
        _jpg(os.path.join(coco, "val2017", img["file_name"]), H, W, seed=i)
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": rect_poly(2, 2, 12, 14), "bbox": [2, 2, 10, 12],
         "area": 120.0, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 3, "segmentation": rect_poly(16, 4, 30, 20), "bbox": [16, 4, 14, 16],
         "area": 224.0, "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 3, "segmentation": rect_poly(4, 4, 20, 18), "bbox": [4, 4, 16, 14],
         "area": 224.0, "iscrowd": 0},
        {"id": 13, "image_id": 2, "category_id": 1, "segmentation": rect_poly(22, 2, 23, 3), "bbox": [22, 2, 1, 1],
         "area": 1.0, "iscrowd": 0},  # too small for point / box / scribble prompts
    ]
    all_things = [{"id": c["id"], "name": c["name"]} for c in load_categories("coco_instance")]
    _json(os.path.join(coco, "annotations", "instances_val2017.json"),
          {"images": images, "annotations": anns, "categories": all_things})
    # panoptic: image 1 = person + car + wall; image 2 = car + wall; image 3 = wall only
    pan_dir = os.path.join(coco, "panoptic_val2017")
    os.makedirs(pan_dir, exist_ok=True)
    pan_anns = []
    for img in images:
        ids = np.zeros((H, W), dtype=np.uint32)
        segs = [{"id": 1000, "category_id": 199, "iscrowd": 0, "area": 0, "bbox": [0, 0, W, H]}]
        ids[:, :] = 1000
        if img["id"] == 1:
            ids[2:14, 2:12] = 7
            ids[4:20, 16:30] = 300
            segs += [{"id": 7, "category_id": 1, "iscrowd": 0, "area": 120, "bbox": [2, 2, 10, 12]},
                     {"id": 300, "category_id": 3, "iscrowd": 0, "area": 224, "bbox": [16, 4, 14, 16]}]
        elif img["id"] == 2:
            ids[4:18, 4:20] = 70000
            segs += [{"id": 70000, "category_id": 3, "iscrowd": 0, "area": 224, "bbox": [4, 4, 16, 14]}]
        for s in segs:
            s["area"] = int((ids == s["id"]).sum())
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        name = img["file_name"].replace(".jpg", ".png")
        Image.fromarray(rgb).save(os.path.join(pan_dir, name))
        pan_anns.append({"image_id": img["id"], "file_name": name, "segments_info": segs})
    _json(os.path.join(coco, "annotations", "panoptic_val2017.json"),
          {"images": images, "annotations": pan_anns, "categories": COCO_CATS})
    # COCO 2014 images for RefCOCO / gRefCOCO
    for i in (1, 2):
        _jpg(os.path.join(coco, "train2014", f"COCO_train2014_{i:012d}.jpg"), H, W, seed=10 + i)
    return {"images": images, "anns": anns, "H": H, "W": W}


def _refer_instances():
    H, W = 24, 32
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": H, "width": W} for i in (1, 2)]
    anns = [
        {"id": 100, "image_id": 1, "category_id": 1, "segmentation": rect_poly(1, 1, 10, 10), "bbox": [1, 1, 9, 9],
         "area": 81.0, "iscrowd": 0},
        {"id": 101, "image_id": 1, "category_id": 3, "segmentation": rect_poly(12, 2, 30, 20), "bbox": [12, 2, 18, 18],
         "area": 324.0, "iscrowd": 0},
        {"id": 102, "image_id": 2, "category_id": 1, "segmentation": rect_poly(5, 5, 15, 15), "bbox": [5, 5, 10, 10],
         "area": 100.0, "iscrowd": 0},
    ]
    return {"images": images, "annotations": anns, "categories": [c for c in COCO_CATS if c["isthing"]]}


def _sent(i, text):
    return {"tokens": text.split(), "raw": text.capitalize(), "sent_id": i, "sent": text}


def make_refcoco(root: str) -> None:
    """refer_seg/refcoco/{refs(unc).p, instances.json} (pickle of the 'refer' release format)."""
    base = os.path.join(root, "refer_seg", "refcoco")
    os.makedirs(base, exist_ok=True)
    refs = [
        {"ref_id": 0, "ann_id": 100, "image_id": 1, "split": "val", "category_id": 1, "sent_ids": [0, 1],
         "file_name": "COCO_train2014_000000000001_100.jpg",
         "sentences": [_sent(0, "man on the left"), _sent(1, "left guy")]},
        {"ref_id": 1, "ann_id": 101, "image_id": 1, "split": "train", "category_id": 3, "sent_ids": [2],
         "file_name": "COCO_train2014_000000000001_101.jpg", "sentences": [_sent(2, "red car")]},
        {"ref_id": 2, "ann_id": 102, "image_id": 2, "split": "testA", "category_id": 1, "sent_ids": [3, 4, 5],
         "file_name": "COCO_train2014_000000000002_102.jpg",
         "sentences": [_sent(3, "woman"), _sent(4, "lady in the middle"), _sent(5, "person")]},
    ]
    with open(os.path.join(base, "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f)
    _json(os.path.join(base, "instances.json"), _refer_instances())


def make_grefcoco(root: str) -> None:
    """refer_seg/grefcoco/{grefs(unc).json, instances.json}: multi-target, single and no-target refs."""
    base = os.path.join(root, "refer_seg", "grefcoco")
    grefs = [
        {"ref_id": 0, "ann_id": [100, 101], "image_id": 1, "split": "val", "category_id": [1, 3], "sent_ids": [0],
         "sentences": [_sent(0, "everything")], "no_target": False},
        {"ref_id": 1, "ann_id": [-1], "image_id": 1, "split": "val", "category_id": [], "sent_ids": [1, 2],
         "sentences": [_sent(1, "the dog"), _sent(2, "a cat")], "no_target": True},
        {"ref_id": 2, "ann_id": [102], "image_id": 2, "split": "testB", "category_id": [1], "sent_ids": [3],
         "sentences": [_sent(3, "person")], "no_target": False},
    ]
    _json(os.path.join(base, "grefs(unc).json"), grefs)
    _json(os.path.join(base, "instances.json"), _refer_instances())


def make_davis(root: str, n_frames: int = 6) -> dict:
    """DAVIS/{JPEGImages,Annotations}/480p/<video>/*.{jpg,png}, ImageSets/2017/val.txt; 2 videos."""
    base = os.path.join(root, "DAVIS")
    H, W = 20, 30
    labels = {}
    for vi, video in enumerate(("bear", "cows")):
        labels[video] = []
        for t in range(n_frames):
            lab = np.zeros((H, W), dtype=np.uint8)
            lab[2 + t % 3 : 10, 2 + t : 12 + t] = 1
            if vi == 1:
                lab[12:18, 5:25] = 2
                if t == 3:
                    lab[12:18, 5:25] = 0  # object 2 absent in frame 3
            lab[0, 0] = 255  # a void pixel
            labels[video].append(lab)
            _jpg(os.path.join(base, "JPEGImages", "480p", video, f"{t:05d}.jpg"), H, W, seed=t)
            png = Image.fromarray(lab)
            png.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
            os.makedirs(os.path.join(base, "Annotations", "480p", video), exist_ok=True)
            png.save(os.path.join(base, "Annotations", "480p", video, f"{t:05d}.png"))
    os.makedirs(os.path.join(base, "ImageSets", "2017"), exist_ok=True)
    with open(os.path.join(base, "ImageSets", "2017", "val.txt"), "w") as f:
        f.write("bear\ncows\n")
    return labels


def make_llava(root: str) -> None:
    base = os.path.join(root, "llava")
    _jpg(os.path.join(base, "images", "coco", "train2017", "a.jpg"), 8, 10)
    os.makedirs(os.path.join(base, "images", "gqa"), exist_ok=True)
    with open(os.path.join(base, "images", "gqa", "broken.jpg"), "wb") as f:
        f.write(b"not an image")
    samples = [
        {"id": "s1", "image": "coco/train2017/a.jpg",
         "conversations": [{"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."},
                           {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "s2", "image": "coco/train2017/missing.jpg",
         "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "s3", "image": "gqa/broken.jpg",
         "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "s4", "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}]},
    ]
    _json(os.path.join(base, "llava_v1_5_mix665k.json"), samples)


def make_lvis(root: str) -> None:
    base = os.path.join(root, "lvis")
    for split, folder in (("train", "train2017"), ("val", "val2017")):
        _json(os.path.join(base, f"lvis_v1_{split}.json"), {
            "images": [{"id": 5, "height": 24, "width": 32, "coco_url": f"http://images.cocodataset.org/{folder}/000000000005.jpg",
                        "not_exhaustive_category_ids": [], "neg_category_ids": [2]}],
            "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "segmentation": rect_poly(1, 1, 9, 9),
                             "bbox": [1, 1, 8, 8], "area": 64.0}],
            "categories": [{"id": 1, "name": "aerosol_can", "synonyms": ["aerosol_can", "spray_can"], "frequency": "c"}],
        })
    _jpg(os.path.join(root, "coco", "train2017", "000000000005.jpg"), 24, 32)


def make_ade20k_instance_panoptic(root: str) -> dict:
    """ADEChallengeData2016/{images,annotations,annotations_instance}/{training,validation}: 16x20 images.

    Real release formats: ``annotations`` = uint8 ADE-150 label (0 other, k = class k - 1);
    ``annotations_instance`` = RGB, R = instance-challenge class (1..100, the ADE-150 things in order:
    1 = bed, 4 = person), G = instance id. validation: ``ADE_val_00000001`` (wall / floor stuff, a bed,
    two persons, one of them over the floor, a chair painted only in the semantic label, an 'other'
    pixel) and ``ADE_val_00000002`` (sky only); training: ``ADE_train_00000001`` (one person).
    Returns, per stem, the drawn ``objects`` [(ade150 id, mask)] and the expected panoptic ``stuff``
    masks {ade150 id: mask} and ``void`` mask.
    """
    base = os.path.join(root, "ADEChallengeData2016")
    H, W = 16, 20
    WALL, SKY, FLOOR, BED, PERSON, CHAIR = 0, 2, 3, 7, 12, 19  # 0-based ADE-150 ids
    R_OF = {BED: 1, PERSON: 4}  # instance-challenge class ids (devkit / Mask2Former mapping)
    out = {}

    def box(y0, y1, x0, x1):
        m = np.zeros((H, W), dtype=bool)
        m[y0:y1, x0:x1] = True
        return m

    def write(split, stem, sem, objects, seed):
        _jpg(os.path.join(base, "images", split, stem + ".jpg"), H, W, seed=seed)
        os.makedirs(os.path.join(base, "annotations", split), exist_ok=True)
        Image.fromarray(sem).save(os.path.join(base, "annotations", split, stem + ".png"))
        ins = np.zeros((H, W, 3), dtype=np.uint8)
        for k, (cat, m) in enumerate(objects, start=1):
            ins[m, 0] = R_OF[cat]
            ins[m, 1] = k
        ins[..., 2] = 7  # B is unused by the format: any value must be ignored
        os.makedirs(os.path.join(base, "annotations_instance", split), exist_ok=True)
        Image.fromarray(ins).save(os.path.join(base, "annotations_instance", split, stem + ".png"))

    # validation image 1
    sem = np.full((H, W), WALL + 1, dtype=np.uint8)
    sem[12:, :] = FLOOR + 1
    bed, p1, p2, chair = box(2, 8, 2, 8), box(4, 10, 12, 14), box(4, 13, 14, 16), box(0, 2, 18, 20)
    sem[bed] = BED + 1
    sem[box(4, 10, 12, 16)] = PERSON + 1  # p2's rows 10..12 stay wall / floor in the semantic label
    sem[chair] = CHAIR + 1
    sem[15, 0] = 0  # other
    objects = [(BED, bed), (PERSON, p1), (PERSON, p2)]
    write("validation", "ADE_val_00000001", sem, objects, 1)
    things = bed | p1 | p2
    out["ADE_val_00000001"] = {
        "objects": objects,
        "stuff": {WALL: (sem == WALL + 1) & ~things, FLOOR: (sem == FLOOR + 1) & ~things},
        "void": chair | box(15, 16, 0, 1),
    }
    # validation image 2: stuff only, no object
    write("validation", "ADE_val_00000002", np.full((H, W), SKY + 1, dtype=np.uint8), [], 2)
    out["ADE_val_00000002"] = {"objects": [], "stuff": {SKY: np.ones((H, W), bool)}, "void": np.zeros((H, W), bool)}
    # training image
    sem = np.full((H, W), WALL + 1, dtype=np.uint8)
    person = box(3, 9, 3, 9)
    sem[person] = PERSON + 1
    write("training", "ADE_train_00000001", sem, [(PERSON, person)], 3)
    out["ADE_train_00000001"] = {"objects": [(PERSON, person)], "stuff": {WALL: ~person},
                                 "void": np.zeros((H, W), bool)}
    return out
