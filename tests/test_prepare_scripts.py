"""Every datasets/prepare_*.py on tiny fixtures in the real upstream formats, then loaded through the
registered data sets (psalm.data.datasets)."""
import json
import os

import numpy as np
import pytest
import scipy.io
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools import mask as mask_utils

from psalm.data.datasets import register_all_psalm_datasets

from .dataset_fixtures import (
    load_prepare_script,
    make_ade20k_instance_panoptic,
    make_coco,
    make_davis,
    make_grefcoco,
    make_llava,
    make_lvis,
    make_refcoco,
)


@pytest.fixture
def root(tmp_path):
    r = str(tmp_path / "data")
    os.makedirs(r)
    register_all_psalm_datasets(r)
    yield r
    register_all_psalm_datasets()  # back to the default root for other tests


def _run(script, *argv):
    load_prepare_script(script).main(list(argv))


def test_coco_semantic_from_panoptic(root):
    make_coco(root)
    _run("prepare_coco_semantic_from_panoptic", "--root", root, "--splits", "val", "--workers", "1")
    sem = np.asarray(Image.open(os.path.join(root, "coco", "panoptic_semseg_val2017", "000000000001.png")))
    # contiguous ids in coco_panoptic.json order: person 0, car 2, wall-other-merged 131
    assert sem[5, 5] == 0 and sem[10, 20] == 2 and sem[22, 0] == 131
    assert set(np.unique(sem)) == {0, 2, 131}
    dicts = DatasetCatalog.get("coco_2017_val_semantic_psalm")
    assert len(dicts) == 3 and all(d["task"] == "semantic" for d in dicts)
    assert {d["image_id"] for d in dicts} == {1, 2, 3}


def test_refcoco_both_protocols(root):
    make_coco(root)
    make_refcoco(root)
    _run("prepare_refcoco", "--root", root, "--datasets", "refcoco")
    for split in ("train", "val", "testA", "testB"):
        assert os.path.isfile(os.path.join(root, "refer_seg", "refcoco", f"refcoco_unc_{split}.json"))
    per_sent = DatasetCatalog.get("refcoco_unc_testA")
    per_ref = DatasetCatalog.get("refcoco_unc_testA_per_ref")
    assert [d["sentences"] for d in per_sent] == [["woman"], ["lady in the middle"], ["person"]]
    assert len({d["sample_id"] for d in per_sent}) == 3
    assert len(per_ref) == 1 and per_ref[0]["sentences"] == ["woman", "lady in the middle", "person"]
    d = per_ref[0]
    assert d["task"] == "referring" and d["ref_id"] == 2 and d["image_id"] == 2
    assert d["file_name"].endswith(os.path.join("coco", "train2014", "COCO_train2014_000000000002.jpg"))
    assert len(d["annotations"]) == 1 and d["annotations"][0]["category_id"] == 0  # person -> 0
    assert DatasetCatalog.get("refcoco_unc_testB") == []


def test_grefcoco_reads_json_and_marks_no_target(root):
    make_coco(root)
    make_grefcoco(root)
    _run("prepare_grefcoco", "--root", root)
    val = DatasetCatalog.get("grefcoco_val")
    assert len(val) == 3  # 1 + 2 sentences
    nt = [d for d in val if d["no_target"]]
    assert len(nt) == 2 and all(d["annotations"] == [] and d["task"] == "gres" for d in nt)
    multi = [d for d in val if not d["no_target"]][0]
    assert len(multi["annotations"]) == 2
    per_ref = DatasetCatalog.get("grefcoco_val_per_ref")
    assert sorted(len(d["sentences"]) for d in per_ref) == [1, 2]
    assert len(DatasetCatalog.get("grefcoco_testB")) == 1


def test_coco_interactive_seeded_and_frozen(root, tmp_path):
    make_coco(root)
    _run("prepare_coco_interactive", "--root", root, "--split", "val", "--seed", "3")
    path = os.path.join(root, "coco", "coco_interactive_val_psalm.json")
    first = open(path).read()
    _run("prepare_coco_interactive", "--root", root, "--split", "val", "--seed", "3", "--workers", "2")
    assert open(path).read() == first, "same seed must give the same file, whatever --workers"
    other = str(tmp_path / "other.json")
    _run("prepare_coco_interactive", "--root", root, "--split", "val", "--seed", "4", "--output", other)
    assert open(other).read() != first
    doc = json.loads(first)
    assert doc["info"]["seed"] == 3
    tiny = [a for a in doc["annotations"] if a["id"] == 13]
    assert tiny and set(tiny[0]["visual_prompts"]) == {"mask"}  # 1-pixel object: no point / box / scribble
    points = DatasetCatalog.get("coco_interactive_val_point")
    assert sum(len(d["annotations"]) for d in points) == 3
    assert all(set(a["visual_prompts"]) == {"point"} for d in points for a in d["annotations"])
    masks = DatasetCatalog.get("coco_interactive_val_mask")
    assert sum(len(d["annotations"]) for d in masks) == 4
    assert all(d["task"] == "interactive" for d in masks)


def test_coco_interactive_from_official(root, tmp_path):
    make_coco(root)
    m = np.zeros((24, 32), dtype=np.uint8)
    m[3:6, 3:6] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle = {"counts": rle["counts"].decode(), "size": [24, 32]}
    empty = mask_utils.encode(np.asfortranarray(np.zeros_like(m)))
    empty = {"counts": empty["counts"].decode(), "size": [24, 32]}
    official = [{"image": "000000000001.jpg", "new_img_id": 0,
                 "image_info": {"id": 1, "file_name": "000000000001.jpg", "height": 24, "width": 32},
                 "anns": [{"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 12, 2, 12, 14, 2, 14]],
                           "bbox": [2, 2, 10, 12], "iscrowd": 0, "point_visual_prompt_mask": rle,
                           "mask_visual_prompt_mask": rle, "box_visual_prompt_mask": rle,
                           "scribble_visual_prompt_mask": empty}]}]
    src = str(tmp_path / "official.json")
    json.dump(official, open(src, "w"))
    _run("prepare_coco_interactive", "--root", root, "--split", "val", "--from-official", src)
    assert DatasetCatalog.get("coco_interactive_val_scribble") == []
    box = DatasetCatalog.get("coco_interactive_val_box")
    assert len(box) == 1 and box[0]["annotations"][0]["visual_prompts"]["box"]["counts"] == rle["counts"]


def test_davis(root):
    labels = make_davis(root)
    _run("prepare_davis", "--root", root)
    frames = DatasetCatalog.get("davis17_val")
    assert len(frames) == 12
    cows = [f for f in frames if f["video_name"] == "cows"]
    assert [f["frame_index"] for f in cows] == list(range(6))
    assert cows[0]["object_ids"] == [1, 2] and cows[3]["objects_in_frame"] == [1]
    ann = cows[4]["annotations"][1]
    assert ann["object_id"] == 2 and set(ann["visual_prompts"]) == {"mask"}
    m = mask_utils.decode({"counts": ann["segmentation"]["counts"].encode(), "size": ann["segmentation"]["size"]})
    np.testing.assert_array_equal(m.astype(bool), labels["cows"][0] == 2)
    assert os.path.isfile(cows[5]["annotation_file_name"])


def test_lvis_train_and_val_go_to_different_files(root):
    make_lvis(root)
    _run("prepare_lvis", "--root", root)
    tr = json.load(open(os.path.join(root, "lvis", "lvis_v1_train_psalm.json")))
    va = json.load(open(os.path.join(root, "lvis", "lvis_v1_val_psalm.json")))
    assert tr["images"][0]["file_name"] == "train2017/000000000005.jpg"
    assert va["images"][0]["file_name"] == "val2017/000000000005.jpg"
    d = DatasetCatalog.get("lvis_v1_train_psalm")
    assert d[0]["annotations"][0]["category_id"] == 0 and d[0]["annotations"][0]["iscrowd"] == 0


def test_llava_filter_and_image_token(root):
    make_llava(root)
    _run("prepare_llava", "--root", root, "--kind", "instruction")
    doc = json.load(open(os.path.join(root, "llava", "llava_v1_5_mix665k_psalm.json")))
    assert [s["id"] for s in doc["samples"]] == ["s1"]
    assert doc["info"]["counts"] == {"kept": 1, "missing": 1, "unreadable": 1, "no image": 1}
    conv = doc["samples"][0]["conversations"]
    assert conv[0]["value"] == "<image>\nWhat is this?" and conv[2]["value"] == "Sure?"
    d = DatasetCatalog.get("llava_v1_5_mix665k_psalm")
    assert d[0]["task"] == "instruction" and (d[0]["height"], d[0]["width"]) == (8, 10)


def test_ade20k_and_voc20_labels(root):
    ade = os.path.join(root, "ADEChallengeData2016")
    for split in ("training", "validation"):
        os.makedirs(os.path.join(ade, "annotations", split))
        os.makedirs(os.path.join(ade, "images", split))
        Image.fromarray(np.array([[0, 1], [150, 7]], dtype=np.uint8)).save(
            os.path.join(ade, "annotations", split, "ADE_x_1.png"))
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(os.path.join(ade, "images", split, "ADE_x_1.jpg"))
    _run("prepare_ade20k_sem_seg", "--root", root)
    out = np.asarray(Image.open(os.path.join(ade, "annotations_detectron2", "validation", "ADE_x_1.png")))
    np.testing.assert_array_equal(out, [[255, 0], [149, 6]])
    assert DatasetCatalog.get("ade20k_sem_seg_val_psalm")[0]["image_id"] == "ADE_x_1"

    voc = os.path.join(root, "VOCdevkit", "VOC2012")
    os.makedirs(os.path.join(voc, "ImageSets", "Segmentation"))
    os.makedirs(os.path.join(voc, "SegmentationClass"))
    os.makedirs(os.path.join(voc, "JPEGImages"))
    open(os.path.join(voc, "ImageSets", "Segmentation", "val.txt"), "w").write("2007_000001\n")
    lab = Image.fromarray(np.array([[0, 1], [20, 255]], dtype=np.uint8))
    lab.putpalette([v for i in range(256) for v in (i, i, i)])
    lab.save(os.path.join(voc, "SegmentationClass", "2007_000001.png"))
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(os.path.join(voc, "JPEGImages", "2007_000001.jpg"))
    _run("prepare_pascal_voc20", "--root", root)
    out = np.asarray(Image.open(os.path.join(root, "pascal_voc_d2", "annotations_pascal20", "validation",
                                             "2007_000001.png")))
    np.testing.assert_array_equal(out, [[255, 0], [19, 255]])
    assert len(DatasetCatalog.get("pascal_voc_20_sem_seg_val_psalm")) == 1


def test_pascal_context_459_and_59(root):
    voc = os.path.join(root, "VOCdevkit", "VOC2010")
    os.makedirs(os.path.join(voc, "trainval"))
    os.makedirs(os.path.join(voc, "ImageSets", "Main"))
    os.makedirs(os.path.join(voc, "JPEGImages"))
    open(os.path.join(voc, "ImageSets", "Main", "val.txt"), "w").write("2008_000002\n")
    # 459 labels (1-based): 2 aeroplane (PC-59 id 0), 397 table (PC-59 'diningtable', id 49), 1 accordion (not in 59)
    scipy.io.savemat(os.path.join(voc, "trainval", "2008_000002.mat"),
                     {"LabelMap": np.array([[0, 2], [397, 1]], dtype=np.uint16)})
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(os.path.join(voc, "JPEGImages", "2008_000002.jpg"))
    _run("prepare_pascal_context", "--root", root)
    base = os.path.join(root, "pascal_ctx_d2")
    l459 = np.asarray(Image.open(os.path.join(base, "annotations_ctx459", "validation", "2008_000002.tif")))
    np.testing.assert_array_equal(l459, [[65535, 1], [396, 0]])
    l59 = np.asarray(Image.open(os.path.join(base, "annotations_ctx59", "validation", "2008_000002.png")))
    np.testing.assert_array_equal(l59, [[255, 0], [49, 255]])
    assert len(DatasetCatalog.get("pascal_ctx_459_sem_seg_val_psalm")) == 1
    assert len(DatasetCatalog.get("pascal_ctx_59_sem_seg_val_psalm")) == 1


def test_cityscapes(root):
    gt = os.path.join(root, "cityscapes", "gtFine", "val", "lindau")
    img = os.path.join(root, "cityscapes", "leftImg8bit", "val", "lindau")
    os.makedirs(gt)
    os.makedirs(img)
    inst = np.full((8, 10), 7, dtype=np.int32)  # road
    inst[1:4, 1:4] = 24000  # person #0
    inst[5:7, 5:9] = 26001  # car #1
    inst[0, 9] = 26  # car group (crowd)
    stem = "lindau_000000_000019"
    Image.fromarray(inst.astype(np.uint16)).save(os.path.join(gt, f"{stem}_gtFine_instanceIds.png"))  # 16-bit PNG
    label = np.where(inst >= 1000, inst // 1000, inst).astype(np.uint8)
    Image.fromarray(label).save(os.path.join(gt, f"{stem}_gtFine_labelIds.png"))
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(os.path.join(img, f"{stem}_leftImg8bit.png"))
    _run("prepare_cityscapes", "--root", root)
    train_ids = np.asarray(Image.open(os.path.join(gt, f"{stem}_gtFine_labelTrainIds.png")))
    assert train_ids[0, 0] == 0 and train_ids[2, 2] == 11 and train_ids[6, 6] == 13
    d = DatasetCatalog.get("cityscapes_fine_instance_seg_val_psalm")[0]
    got = sorted((a["category_id"], a["iscrowd"]) for a in d["annotations"])
    assert got == [(0, 0), (2, 0), (2, 1)]  # person, car, car group; contiguous over the 8 things
    assert len(DatasetCatalog.get("cityscapes_fine_sem_seg_val_psalm")) == 1


def _decode(rle):
    return mask_utils.decode({"counts": rle["counts"].encode(), "size": rle["size"]}).astype(bool)


def test_ade20k_instance_from_annotations_instance(root):
    drawn = make_ade20k_instance_panoptic(root)
    ade = os.path.join(root, "ADEChallengeData2016")
    _run("prepare_ade20k_instance", "--root", root, "--workers", "1")
    first = open(os.path.join(ade, "ade20k_instance_val.json")).read()
    _run("prepare_ade20k_instance", "--root", root, "--splits", "val", "--workers", "2")
    assert open(os.path.join(ade, "ade20k_instance_val.json")).read() == first, "output must not depend on --workers"
    doc = json.loads(first)
    cats = {c["id"]: c for c in doc["categories"]}
    assert len(cats) == 100 and cats[7]["name"].startswith("bed") and cats[12]["name"].startswith("person")

    meta = MetadataCatalog.get("ade20k_instance_val_psalm")
    dicts = {d["image_id"]: d for d in DatasetCatalog.get("ade20k_instance_val_psalm")}
    assert set(dicts) == {"ADE_val_00000001", "ADE_val_00000002"}
    assert dicts["ADE_val_00000002"]["annotations"] == []  # images without objects are kept
    d = dicts["ADE_val_00000001"]
    assert (d["height"], d["width"]) == (16, 20) and d["task"] == "instance"
    assert d["file_name"].endswith(os.path.join("images", "validation", "ADE_val_00000001.jpg"))
    objs = drawn["ADE_val_00000001"]["objects"]
    assert len(d["annotations"]) == len(objs) == 3
    for ann, (cat, mask) in zip(d["annotations"], objs):
        assert meta.thing_dataset_id_to_contiguous_id[cat] == ann["category_id"]
        np.testing.assert_array_equal(_decode(ann["segmentation"]), mask)
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
    # R = 1 is bed, R = 4 is person (contiguous 0 and 3 of the 100 things)
    assert [a["category_id"] for a in d["annotations"]] == [0, 3, 3]
    assert meta.thing_classes[3].startswith("person")
    train = DatasetCatalog.get("ade20k_instance_train_psalm")
    assert len(train) == 1 and [a["category_id"] for a in train[0]["annotations"]] == [3]


def test_ade20k_panoptic_from_semantic_and_instances(root):
    drawn = make_ade20k_instance_panoptic(root)
    ade = os.path.join(root, "ADEChallengeData2016")
    _run("prepare_ade20k_panoptic", "--root", root, "--workers", "1")
    doc = json.load(open(os.path.join(ade, "ade20k_panoptic_val.json")))
    assert len(doc["categories"]) == 150 and sum(c["isthing"] for c in doc["categories"]) == 100

    dicts = DatasetCatalog.get("ade20k_panoptic_val_psalm") + DatasetCatalog.get("ade20k_panoptic_train_psalm")
    assert {d["image_id"] for d in dicts} == set(drawn)
    for d in dicts:
        exp = drawn[d["image_id"]]
        assert d["task"] == "panoptic" and os.path.basename(d["file_name"]) == d["image_id"] + ".jpg"
        assert d["sem_seg_file_name"].endswith(os.path.join("annotations_detectron2", os.path.basename(
            os.path.dirname(d["file_name"])), d["image_id"] + ".png"))
        rgb = np.asarray(Image.open(d["pan_seg_file_name"]).convert("RGB"), dtype=np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        segs = d["segments_info"]
        assert len({s["id"] for s in segs}) == len(segs) and all(s["id"] != 0 for s in segs)
        got_things = [(s["category_id"], ids == s["id"]) for s in segs if s["isthing"]]
        got_stuff = {s["category_id"]: ids == s["id"] for s in segs if not s["isthing"]}
        # ADE-150 contiguous ids are the dataset ids; things keep the instance PNG's object order
        assert [c for c, _ in got_things] == [c for c, _ in exp["objects"]]
        for (_, got), (_, want) in zip(got_things, exp["objects"]):
            np.testing.assert_array_equal(got, want)
        assert set(got_stuff) == set(exp["stuff"])
        for cat, want in exp["stuff"].items():
            np.testing.assert_array_equal(got_stuff[cat], want)
        np.testing.assert_array_equal(ids == 0, exp["void"])
        for s in segs:
            assert s["area"] == (ids == s["id"]).sum() and s["iscrowd"] == 0
    val1 = next(d for d in dicts if d["image_id"] == "ADE_val_00000001")
    assert sorted(s["category_id"] for s in val1["segments_info"]) == [0, 3, 7, 12, 12]


def test_ade20k_instance_png_errors(root):
    make_ade20k_instance_panoptic(root)
    png = os.path.join(root, "ADEChallengeData2016", "annotations_instance", "validation", "ADE_val_00000002.png")
    bad = np.zeros((16, 20, 3), np.uint8)
    bad[0, 0] = (101, 1, 0)  # class 101 does not exist in the 100-class instance label space
    Image.fromarray(bad).save(png)
    with pytest.raises(ValueError, match="instance 1 has class id"):
        _run("prepare_ade20k_instance", "--root", root, "--splits", "val", "--workers", "1")
    os.remove(png)
    with pytest.raises(FileNotFoundError, match="annotations_instance"):
        _run("prepare_ade20k_panoptic", "--root", root, "--splits", "val", "--workers", "1")
