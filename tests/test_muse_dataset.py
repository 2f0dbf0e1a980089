"""psalm's MUSE loader (psalm.data.datasets.muse): released JSON records -> dataset dicts, registration,
mask decoding, dropped questions and clear errors on malformed records."""
import json
import logging
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from psalm.data.datasets import MissingDatasetFileError, register_all_psalm_datasets
from psalm.data.datasets.muse import (SEG_PLACEHOLDER, check_seg_count, load_muse_json, muse_records_to_dicts,
                                      seg_count_matches)
from psalm.evaluation.masks import annotation_to_mask
from psalm.structures.masks import encode_rle

H, W = 20, 30


def _rect_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _rle_mask():
    m = np.zeros((H, W), dtype=bool)
    m[2:9, 20:28] = True
    m[12:15, 3:5] = True  # two parts: an RLE, not a box
    return m


def _records():
    a = {"id": 11, "category_id": 3, "category_name": "cat", "rephrased_name": "the sleeping cat",
         "segmentation": _rect_polygon(2, 2, 10, 12), "bbox": [2, 2, 8, 10]}
    b = {"id": 12, "category_id": 5, "category_name": "dog",  # no rephrased_name: the category name is used
         "segmentation": _rect_polygon(15, 5, 25, 15) + [[1, 1, 2, 2]], "bbox": [15, 5, 10, 10]}  # + a degenerate one
    c = {"id": 21, "category_id": 7, "category_name": "cup", "rephrased_name": "a red cup",
         "segmentation": encode_rle(_rle_mask()), "bbox": [3, 2, 25, 13]}
    bad_poly = {"id": 22, "category_id": 8, "category_name": "line", "segmentation": [[0, 0, 5, 5]], "bbox": [0, 0, 5, 5]}
    return [
        {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": H, "width": W, "ann_list": [a, b],
         "questions": ["Which animals could play together?", "What is resting?"],
         "answers": [[a, b], [a]],
         "text_answers": ["The cat {seg} and the dog {seg} could play.", "The sleeping cat {seg} is resting."]},
        {"id": 2, "coco_url": "http://images.cocodataset.org/train2017/000000000002.jpg", "height": H, "width": W,
         "ann_list": [c, bad_poly],
         "questions": ["What could hold tea?", "Mismatched question", "No target here", "Degenerate target",
                       "Without a text answer"],
         "answers": [[c], [c], [], [bad_poly], [c]],
         "text_answers": ["A red cup {seg}.", "One {seg} and two {seg}.", "Nothing.", "A line {seg}.", None]},
        # every question dropped: the image gives no dict
        {"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "height": H, "width": W, "ann_list": [a],
         "questions": ["Only a mismatch"], "answers": [[a]], "text_answers": ["{seg} {seg}"]},
    ]


@pytest.fixture
def muse_root(tmp_path):
    root = str(tmp_path / "data")
    os.makedirs(os.path.join(root, "muse"))
    with open(os.path.join(root, "muse", "MUSE_train.json"), "w") as f:  # Pixel-SAIL's file name
        json.dump(_records(), f)
    with open(os.path.join(root, "muse", "muse_val.json"), "w") as f:  # PixelLM's
        json.dump(_records()[:1], f)
    register_all_psalm_datasets(root)
    yield root
    register_all_psalm_datasets()


def test_registered_names_fields_and_masks(muse_root, caplog):
    for split in ("train", "val", "test_less", "test_many"):
        meta = MetadataCatalog.get(f"muse_{split}")
        assert (meta.task, meta.evaluator_type, meta.split) == ("muse", "muse", split)
    with caplog.at_level(logging.WARNING, logger="psalm.data.datasets.muse"):
        dicts = DatasetCatalog.get("muse_train")
    assert [d["image_id"] for d in dicts] == [1, 2]  # image 3 has no usable question
    assert "seg_count_mismatch': 2" in caplog.text and "no_target': 1" in caplog.text
    assert "invalid_segmentation': 1" in caplog.text and "muse_train" in caplog.text
    d1, d2 = dicts
    assert d1["file_name"] == os.path.join(muse_root, "coco", "train2014", "COCO_train2014_000000000001.jpg")
    assert d2["file_name"] == os.path.join(muse_root, "coco", "train2017", "000000000002.jpg")
    assert (d1["height"], d1["width"], d1["sample_id"], d1["task"]) == (H, W, "1", "muse")
    assert d1["questions"] == ["Which animals could play together?", "What is resting?"]
    assert [[t["name"] for t in ts] for ts in d1["targets"]] == [["the sleeping cat", "dog"], ["the sleeping cat"]]
    assert d1["text_answers"][0] == "The cat {seg} and the dog {seg} could play."
    assert d2["questions"] == ["What could hold tea?", "Without a text answer"]
    assert d2["text_answers"] == ["A red cup {seg}.", None]
    dog = d1["targets"][0][1]
    assert dog["segmentation"] == _rect_polygon(15, 5, 25, 15)  # the degenerate polygon is dropped
    assert dog["bbox_mode"] == BoxMode.XYWH_ABS and dog["category_id"] == 5 and dog["id"] == 12
    # masks decode at the image size: polygons inside their boxes, the RLE exactly
    cat = annotation_to_mask(d1["targets"][0][0]["segmentation"], H, W)
    assert cat.shape == (H, W) and cat[7, 6] and not cat[15, 20] and cat[:, 12:].sum() == 0
    dog_m = annotation_to_mask(dog["segmentation"], H, W)
    assert dog_m[10, 20] and not dog_m[7, 6] and not (cat & dog_m).any()
    assert np.array_equal(annotation_to_mask(d2["targets"][0][0]["segmentation"], H, W), _rle_mask())
    # fresh dicts per call (no shared annotation dicts between calls or questions)
    d1["targets"][0][0]["name"] = "changed"
    again = DatasetCatalog.get("muse_train")
    assert again[0]["targets"][0][0]["name"] == "the sleeping cat"
    assert [d["image_id"] for d in DatasetCatalog.get("muse_val")] == [1]


def test_missing_file_names_the_download(muse_root):
    with pytest.raises(MissingDatasetFileError) as e:
        DatasetCatalog.get("muse_test_less")
    msg = str(e.value)
    assert os.path.join(muse_root, "muse", "muse_test_less.json") in msg and "MUSE_<split>.json" in msg


def _bad(records, match):
    with pytest.raises(ValueError, match=match):
        muse_records_to_dicts(records, "/images", source="muse_x.json")


def test_malformed_records_are_clear_errors():
    recs = _records()
    del recs[1]["answers"]
    _bad(recs, r"muse_x.json: record 1 has no 'answers'")
    recs = _records()
    recs[0]["answers"] = recs[0]["answers"][:1]
    _bad(recs, r"record 0: 2 questions but 1 answers")
    recs = _records()
    recs[0]["text_answers"] = recs[0]["text_answers"][:1]
    _bad(recs, r"record 0: 2 questions but 1 text_answers")
    recs = _records()
    recs[0]["answers"][1][0] = {k: v for k, v in recs[0]["answers"][1][0].items() if k != "segmentation"}
    _bad(recs, r"record 0, question 1, target 0: target has no 'segmentation'")
    recs = _records()
    recs[1]["answers"][0][0]["segmentation"] = encode_rle(np.zeros((H + 1, W), bool))
    _bad(recs, r"record 1, question 0, target 0: RLE size \[21, 30\] differs from the image size \[20, 30\]")
    recs = _records()
    recs[1]["answers"][0][0]["segmentation"] = "polygon"
    _bad(recs, r"segmentation must be polygons \(list\) or RLE \(dict\)")
    recs = _records()
    del recs[2]["file_name"]
    _bad(recs, r"needs 'file_name' or 'coco_url'")
    _bad({"questions": []}, r"a MUSE file is a JSON list")
    recs = _records()
    recs[0]["answers"][0][0] = dict(recs[0]["answers"][0][0], rephrased_name="", category_name="")
    _bad(recs, r"no rephrased_name / name / category_name")


def test_load_muse_json_counts_and_image_roots(tmp_path):
    path = tmp_path / "muse_val.json"
    path.write_text(json.dumps(_records()))
    dicts = load_muse_json(path, tmp_path / "images")  # PixelLM's layout: coco_url images under the same root
    assert dicts[1]["file_name"] == str(tmp_path / "images" / "train2017" / "000000000002.jpg")
    assert sum(len(d["questions"]) for d in dicts) == 4
    assert sum(len(t) for d in dicts for t in d["targets"]) == 5
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_muse_json(tmp_path / "broken.json", tmp_path)


def test_seg_count_helpers():
    assert SEG_PLACEHOLDER == "{seg}"
    assert seg_count_matches(None, 0) and seg_count_matches(None, 3)  # no text answer: nothing to check
    assert seg_count_matches("a {seg} and b {seg}.", 2)
    assert not seg_count_matches("a {seg}.", 2) and not seg_count_matches("a {seg} {seg}.", 1)
    assert not seg_count_matches("It is [SEG].", 1)  # only the released placeholder counts
    check_seg_count("a {seg}.", 1)
    check_seg_count(None, 2)
    with pytest.raises(ValueError, match=r"has 1 \{seg\} for 2 targets: 'a \{seg\}\.'"):
        check_seg_count("a {seg}.", 2)
