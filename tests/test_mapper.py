"""PSALMDatasetMapper: geometry, padding, GT masks from every source, prompt rasters, no mutation."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T

from psalm.config import get_psalm_cfg
from psalm.data.mapper import PSALMDatasetMapper, preprocess_image, read_label_map, resize_pad_masks, resized_shape
from psalm.data.visual_prompts import encode_rle

S = 64


def _cfg(**opts):
    cfg = get_psalm_cfg()
    cfg.INPUT.IMAGE_SIZE = S
    for k, v in opts.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, last, v)
    return cfg


def _mapper(is_train=True, class_names=("a", "b", "c"), **opts):
    names = list(class_names) if class_names is not None else None
    return PSALMDatasetMapper(_cfg(**opts), is_train=is_train, class_names=names)


def _write_image(path, h, w, seed=0):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)
    return img


# ----------------------------------------------------------------------------- geometry
def test_preprocess_image_geometry_and_padding():
    img = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out, pad, (h, w) = preprocess_image(img, S, 128.0)
    assert (h, w) == (48, 64) == resized_shape(30, 40, S)
    assert out.shape == (3, S, S) and out.dtype == torch.uint8
    assert pad.dtype == torch.bool and pad[:48].logical_not().all() and pad[48:].all()
    assert (out[:, 48:] == 128).all()
    ref = T.ResizeTransform(30, 40, 48, 64, Image.BILINEAR).apply_image(img)  # PIL bilinear
    assert torch.equal(out[:, :48], torch.from_numpy(ref.copy()).permute(2, 0, 1))
    # portrait: the long side is the height; the padding is on the right
    out, pad, (h, w) = preprocess_image(np.zeros((50, 20, 3), np.uint8), S, 0)
    assert (h, w) == (64, 26) and pad[:, 26:].all() and not pad[:, :26].any()
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(np.zeros((4, 4, 3), np.float32), S)
    with pytest.raises(ValueError, match="RGB"):
        preprocess_image(np.zeros((4, 4)), S)


def test_preprocess_image_matches_official_golden(golden_dir):
    from safetensors.torch import load_file

    t = load_file(str(golden_dir / "psalm_e2e" / "tensors.safetensors"))
    out, pad, hw = preprocess_image(t["image.original_u8_hwc"].numpy(), 256, 128.0)
    assert hw == (192, 256)
    assert torch.equal(out, t["image.mapper_u8_chw"])
    assert torch.equal(pad, t["image.padding_mask"])


def test_nearest_resize_matches_pil():
    rng = np.random.default_rng(0)
    for h, w in [(30, 40), (100, 17), (7, 130)]:
        label = rng.integers(0, 200, (h, w)).astype(np.uint8)
        nh, nw = resized_shape(h, w, S)
        ref = T.ResizeTransform(h, w, nh, nw, Image.BILINEAR).apply_segmentation(label)
        ours = resize_pad_masks(label, (nh, nw), S)
        assert torch.equal(ours[:nh, :nw], torch.from_numpy(ref.copy()))
        assert (ours[nh:] == 0).all() and (ours[:, nw:] == 0).all()


# ----------------------------------------------------------------------------- GT sources
def test_panoptic_png_to_masks(tmp_path):
    from panopticapi.utils import id2rgb

    _write_image(tmp_path / "img.png", 16, 32)
    ids = np.zeros((16, 32), dtype=np.int64)
    ids[:, :8] = 5  # class 2
    ids[:8, 8:16] = 7  # crowd: dropped
    ids[8:, 16:] = 9  # class 0
    Image.fromarray(id2rgb(ids)).save(tmp_path / "pan.png")
    d = {"file_name": str(tmp_path / "img.png"), "height": 16, "width": 32, "task": "panoptic",
         "pan_seg_file_name": str(tmp_path / "pan.png"),
         "segments_info": [{"id": 5, "category_id": 2, "iscrowd": 0, "isthing": False},
                           {"id": 7, "category_id": 1, "iscrowd": 1, "isthing": True},
                           {"id": 9, "category_id": 0, "iscrowd": 0, "isthing": True}]}
    out = _mapper()(d)
    inst = out["instances"]
    assert out["class_names"] == ["a", "b", "c"] and out["task"] == "panoptic"
    assert inst.gt_classes.tolist() == [2, 0]
    assert inst.gt_masks.shape == (2, S, S) and inst.gt_masks.dtype == torch.bool
    exp0 = torch.zeros(S, S, dtype=torch.bool)
    exp0[:32, :16] = True  # x2 resize, padded below row 32
    exp1 = torch.zeros(S, S, dtype=torch.bool)
    exp1[16:32, 32:] = True
    assert torch.equal(inst.gt_masks[0], exp0) and torch.equal(inst.gt_masks[1], exp1)
    assert out["padding_mask"][32:].all() and not out["padding_mask"][:32].any()
    assert (out["height"], out["width"]) == (16, 32)


def test_polygon_and_rle_annotations(tmp_path):
    _write_image(tmp_path / "img.png", 32, 16)
    rle_mask = np.zeros((32, 16), dtype=bool)
    rle_mask[4:8, 2:6] = True
    d = {"file_name": str(tmp_path / "img.png"), "height": 32, "width": 16, "task": "instance",
         "annotations": [
             {"segmentation": [[0, 0, 8, 0, 8, 16, 0, 16]], "category_id": 1, "iscrowd": 0},  # x 0..8, y 0..16
             {"segmentation": encode_rle(rle_mask), "category_id": 2, "iscrowd": 0},
             {"segmentation": [[0, 0, 4, 0, 4, 4]], "category_id": 0, "iscrowd": 1},  # crowd: dropped
         ]}
    inst = _mapper()(d)["instances"]
    assert inst.gt_classes.tolist() == [1, 2]
    poly = inst.gt_masks[0]  # x2: x 0..16, y 0..32
    assert poly[:31, :15].all() and not poly[33:].any() and not poly[:, 17:].any()
    exp = torch.zeros(S, S, dtype=torch.bool)
    exp[8:16, 4:12] = True
    assert torch.equal(inst.gt_masks[1], exp)


def test_semantic_png(tmp_path):
    _write_image(tmp_path / "img.png", 16, 32)
    sem = np.full((16, 32), 255, dtype=np.uint8)
    sem[:, :10] = 3
    sem[:, 20:] = 0
    Image.fromarray(sem).save(tmp_path / "sem.png")
    d = {"file_name": str(tmp_path / "img.png"), "height": 16, "width": 32, "task": "semantic",
         "sem_seg_file_name": str(tmp_path / "sem.png")}
    inst = _mapper()(d)["instances"]
    assert inst.gt_classes.tolist() == [0, 3]
    assert inst.gt_masks[0, :32, 40:].all() and inst.gt_masks[0].sum() == 32 * 24
    assert inst.gt_masks[1].sum() == 32 * 20  # ignore (255) and padding belong to no class


def test_read_label_map_modes_and_errors(tmp_path):
    sem = np.array([[0, 3, 255], [7, 7, 1]], dtype=np.uint8)
    Image.fromarray(sem, mode="L").save(tmp_path / "l.png")
    pal = Image.fromarray(sem, mode="P")
    pal.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    pal.save(tmp_path / "p.png")  # palette: the stored indices, not the colours
    rgb = np.stack([sem, np.full_like(sem, 9), np.zeros_like(sem)], axis=-1)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "rgb.png")  # several channels: the first one
    for name in ("l.png", "p.png", "rgb.png"):
        label = read_label_map(tmp_path / name)
        assert label.dtype == np.int64 and label.shape == (2, 3), name
        assert np.array_equal(label, sem.astype(np.int64)), name
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_label_map(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png.*not a readable image"):
        read_label_map(tmp_path / "bad.png")


def test_referring_gres_and_instruction(tmp_path):
    _write_image(tmp_path / "img.png", 8, 8)
    base = {"file_name": str(tmp_path / "img.png"), "height": 8, "width": 8}
    out = _mapper()(dict(base, task="gres", sentences=["nothing here"], annotations=[], no_target=True))
    assert out["sentences"] == ["nothing here"] and out["no_target"] is True
    assert out["instances"].gt_masks.shape == (0, S, S) and "class_names" not in out
    conv = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "hello"}]
    out = _mapper()(dict(base, task="instruction", conversations=conv))
    assert out["conversation"] == conv and "instances" not in out
    with pytest.raises(ValueError, match="sentences"):
        _mapper()(dict(base, task="referring", annotations=[]))
    with pytest.raises(ValueError, match="class names"):
        _mapper(class_names=None)(dict(base, task="instance", annotations=[]))


def test_eval_mode_has_no_gt(tmp_path):
    _write_image(tmp_path / "img.png", 8, 8)
    d = {"file_name": str(tmp_path / "img.png"), "height": 8, "width": 8, "task": "instance", "image_id": 3,
         "annotations": [{"segmentation": [[0, 0, 4, 0, 4, 4]], "category_id": 0, "iscrowd": 0}]}
    d["sample_id"], d["video_name"] = "3/a", "bear"
    out = _mapper(is_train=False)(d)
    assert "instances" not in out and out["image"].shape == (3, S, S)
    assert (out["image_id"], out["sample_id"], out["video_name"]) == (3, "3/a", "bear")  # passed through
    assert "annotations" not in out


# ----------------------------------------------------------------------------- interactive
def _point(h, w, r, c):
    m = np.zeros((h, w), dtype=bool)
    m[r, c] = True
    return encode_rle(m)


def _interactive_dict(tmp_path, h=64, w=64):
    _write_image(tmp_path / "img.png", h, w)
    obj0 = np.zeros((h, w), dtype=bool)
    obj0[10:30, 10:30] = True
    obj1 = np.zeros((h, w), dtype=bool)
    obj1[40:60, 30:50] = True
    scribble = np.zeros((h, w), dtype=bool)
    scribble[50, 32:48] = True
    return {"file_name": str(tmp_path / "img.png"), "height": h, "width": w, "task": "interactive",
            "annotations": [
                {"segmentation": encode_rle(obj0), "category_id": 1,
                 "visual_prompts": {"point": _point(h, w, 20, 20), "box": encode_rle(obj0)}},
                {"segmentation": encode_rle(obj1), "category_id": 2, "visual_prompts": {}},  # no prompt
                {"segmentation": encode_rle(obj1), "category_id": 0,
                 "visual_prompts": {"scribble": encode_rle(scribble)}},
            ]}


def test_interactive_rasters_radius_and_dropping(tmp_path):
    d = _interactive_dict(tmp_path)
    before = copy.deepcopy(d)
    mapper = _mapper(is_train=True, **{"INPUT.INTERACTIVE_PROMPT_TYPES": ["point", "scribble"]})
    out = mapper(d, rng=np.random.default_rng(0))
    assert d == before  # the dataset dict is not mutated
    regions, inst = out["region_masks"], out["instances"]
    assert out["region_ann_indices"] == [0, 2]  # annotation 1 has no prompt: dropped from both
    assert regions.shape == (2, S, S) and regions.dtype == torch.bool and len(inst) == 2
    assert inst.gt_classes.tolist() == [1, 0]
    # point dilated to a radius-10 disk: 317 pixels, all within distance 10 of (20, 20)
    assert regions[0].sum() == 317
    rr, cc = torch.nonzero(regions[0], as_tuple=True)
    assert ((rr - 20) ** 2 + (cc - 20) ** 2 <= 100).all()
    # scribble (a 16-px horizontal line) dilated by a radius-5 disk: rows 45..55, cols 27..52
    rr, cc = torch.nonzero(regions[1], as_tuple=True)
    assert (rr.min(), rr.max(), cc.min(), cc.max()) == (45, 55, 27, 52)
    assert regions[1, 50, 27:53].all() and not regions[1, 44].any()


def test_interactive_type_choice_train_uniform_eval_fixed(tmp_path):
    d = _interactive_dict(tmp_path)
    mapper = _mapper(is_train=True)
    sizes = {int(mapper(d, rng=np.random.default_rng(s))["region_masks"][0].sum()) for s in range(30)}
    assert sizes == {317, 400}  # point disk or the 20x20 box, both drawn
    # same rng seed -> same choice
    a = mapper(d, rng=np.random.default_rng(5))["region_masks"]
    assert torch.equal(a, mapper(d, rng=np.random.default_rng(5))["region_masks"])
    ev = PSALMDatasetMapper(_cfg(), is_train=False, test_prompt_type="box")(d)
    assert ev["region_ann_indices"] == [0] and ev["region_masks"][0].sum() == 400 and "instances" not in ev
    # no prompt type named: an annotation with two types is ambiguous
    with pytest.raises(ValueError, match="prompt types"):
        PSALMDatasetMapper(_cfg(), is_train=False)(d)


@pytest.mark.parametrize("prompt_type", ["point", "scribble", "box", "mask"])
def test_interactive_eval_prompt_type_from_dataset_metadata(tmp_path, prompt_type):
    """Every coco_interactive_val_<type> evaluates its own type with the default config (the data set
    keeps only that type; the mapper used to filter by a config key, which left 3 of the 4 sets
    without a single region: 'need at least one region')."""
    d = _interactive_dict(tmp_path)
    obj = np.zeros((d["height"], d["width"]), dtype=bool)
    obj[10:30, 10:30] = True
    prompt = _point(d["height"], d["width"], 20, 20) if prompt_type == "point" else encode_rle(obj)
    d["annotations"] = [{"segmentation": encode_rle(obj), "category_id": 1, "visual_prompts": {prompt_type: prompt}}]
    import psalm.data.datasets  # noqa: F401  (registers the names)

    name = f"coco_interactive_val_{prompt_type}"
    assert MetadataCatalog.get(name).prompt_type == prompt_type
    out = PSALMDatasetMapper(_cfg(), is_train=False, dataset_name=name)(d)
    assert out["region_ann_indices"] == [0] and out["region_masks"][0].any()


def test_interactive_matches_official_golden(tmp_path, golden_dir):
    """Golden sample: a mask prompt (8x8 box) and a 1-pixel point, x2 resize to S=256."""
    from safetensors.torch import load_file

    t = load_file(str(golden_dir / "psalm_e2e" / "tensors.safetensors"))
    img = t["image.original_u8_hwc"].numpy()
    Image.fromarray(img).save(tmp_path / "img.png")
    box = np.zeros((96, 128), dtype=bool)
    box[44:52, 30:38] = True  # the 8x8 mask prompt at the original size
    d = {"file_name": str(tmp_path / "img.png"), "height": 96, "width": 128, "task": "interactive",
         "annotations": [
             {"segmentation": encode_rle(box), "category_id": 0, "visual_prompts": {"mask": encode_rle(box)}},
             {"segmentation": encode_rle(box), "category_id": 1, "visual_prompts": {"point": _point(96, 128, 70, 90)}},
         ]}
    cfg_opts = {"INPUT.IMAGE_SIZE": 256}
    mapper = PSALMDatasetMapper(_cfg(**cfg_opts), is_train=True)
    out = mapper(d, rng=np.random.default_rng(0))
    assert torch.equal(out["region_masks"], t["region.region.region_masks"])
    assert torch.equal(out["image"], t["image.mapper_u8_chw"])


def test_in_memory_image_array(tmp_path):
    img = _write_image(tmp_path / "img.png", 16, 32)
    by_file = _mapper(is_train=False)({"file_name": str(tmp_path / "img.png"), "task": "referring", "sentences": ["x"]})
    by_array = _mapper(is_train=False)({"image": img, "task": "referring", "sentences": ["x"]})
    assert torch.equal(by_file["image"], by_array["image"]) and (by_array["height"], by_array["width"]) == (16, 32)
    with pytest.raises(ValueError, match="file_name"):
        _mapper()({"task": "referring", "sentences": ["x"]})


def test_mapper_from_metadata():
    from detectron2.data import MetadataCatalog

    MetadataCatalog.get("_psalm_test_mapper_meta").set(prompt_class_names=["x", "y"], ignore_label=7)
    m = PSALMDatasetMapper(_cfg(), is_train=True, dataset_name="_psalm_test_mapper_meta")
    assert m.class_names == ["x", "y"] and m.ignore_label == 7 and m.image_size == S
    with pytest.raises(ValueError, match="unknown visual prompt type"):
        _mapper(**{"INPUT.INTERACTIVE_PROMPT_TYPES": ["dot"]})


# ----------------------------------------------------------------------------- is_thing (category tasks)
def test_is_thing_from_metadata_for_category_tasks(tmp_path):
    """is_thing = the metadata's prompt_is_thing (K bools, class_names order) in every category-task
    input; the panoptic post-processing reads it (stuff segments of one class are merged)."""
    from detectron2.data import MetadataCatalog

    from psalm.modeling.postprocessing import PSALMPostProcessor

    _write_image(tmp_path / "img.png", 16, 32)
    MetadataCatalog.get("_psalm_test_mapper_is_thing").set(
        prompt_class_names=["person", "sky", "car", "road"], prompt_is_thing=[True, False, True, False])
    m = PSALMDatasetMapper(_cfg(), is_train=False, dataset_name="_psalm_test_mapper_is_thing")
    base = {"file_name": str(tmp_path / "img.png"), "height": 16, "width": 32}
    for task in ("panoptic", "semantic", "instance"):
        out = m(dict(base, task=task))
        assert out["is_thing"] == [True, False, True, False] and out["class_names"][1] == "sky", task
        out["is_thing"][0] = False  # each input gets its own list
    assert m(dict(base, task="panoptic"))["is_thing"][0] is True
    assert "is_thing" not in m(dict(base, task="referring", sentences=["x"]))

    # the mapped input goes through panoptic post-processing; segments follow is_thing
    torch.manual_seed(0)
    q, k = 6, 4
    inp = m(dict(base, task="panoptic"))
    logits = torch.full((1, q, k + 1), -10.0)
    for i in range(q):
        logits[0, i, i % k] = 10.0  # query i -> class i % K, confident
    masks = torch.full((1, q, S // 4, S // 4), -10.0)
    for i in range(q):
        masks[0, i, :, i * 2:(i + 1) * 2] = 10.0  # disjoint column bands
    res = PSALMPostProcessor(panoptic_semantic_on=False, panoptic_instance_on=False)(
        {"pred_masks": masks, "pred_class_logits": logits}, [inp])[0]
    seg, infos = res["panoptic_seg"]
    assert infos and all(s["isthing"] == inp["is_thing"][s["category_id"]] for s in infos)
    cats = [s["category_id"] for s in infos]
    assert cats.count(0) == 2 and cats.count(1) == 1  # queries 0, 4 = two persons; 1, 5 = one merged sky
    del inp["is_thing"]
    with pytest.raises(ValueError, match="is_thing.*prompt_is_thing"):
        PSALMPostProcessor()({"pred_masks": masks, "pred_class_logits": logits}, [inp])


def test_is_thing_errors_and_training():
    from detectron2.data import MetadataCatalog

    with pytest.raises(ValueError, match="is_thing has 2 entries for 3 class names"):
        PSALMDatasetMapper(_cfg(), is_train=False, class_names=["a", "b", "c"], is_thing=[True, False])
    with pytest.raises(ValueError, match="booleans"):
        PSALMDatasetMapper(_cfg(), is_train=False, class_names=["a"], is_thing=["yes"])
    with pytest.raises(ValueError, match="without class_names"):
        PSALMDatasetMapper(_cfg(), is_train=False, is_thing=[True])
    MetadataCatalog.get("_psalm_test_mapper_bad_is_thing").set(prompt_class_names=["a", "b"], prompt_is_thing=[True])
    with pytest.raises(ValueError, match="prompt_is_thing must hold one bool per prompt_class_names"):
        PSALMDatasetMapper(_cfg(), is_train=False, dataset_name="_psalm_test_mapper_bad_is_thing")
    # a data set without prompt_is_thing: panoptic evaluation is refused, other tasks map
    img = np.zeros((8, 8, 3), np.uint8)
    m = _mapper(is_train=False)
    with pytest.raises(ValueError, match="panoptic evaluation needs is_thing.*prompt_is_thing"):
        m({"image": img, "task": "panoptic"})
    assert "is_thing" not in m({"image": img, "task": "semantic"})


def test_is_thing_for_registered_sets(tmp_path):
    """The registered panoptic sets give the mapper their K flags (ADE-150: wall stuff, bed thing)."""
    from psalm.data.datasets import register_all_psalm_datasets

    register_all_psalm_datasets(str(tmp_path))
    try:
        img = np.zeros((8, 8, 3), np.uint8)
        ade = PSALMDatasetMapper(_cfg(), is_train=False, dataset_name="ade20k_panoptic_val_psalm")(
            {"image": img, "task": "panoptic"})
        assert len(ade["is_thing"]) == len(ade["class_names"]) == 150 and sum(ade["is_thing"]) == 100
        assert ade["is_thing"][0] is False and ade["is_thing"][7] is True  # wall, bed
        coco = PSALMDatasetMapper(_cfg(), is_train=False, dataset_name="coco_2017_val_panoptic_psalm")(
            {"image": img, "task": "panoptic"})
        assert sum(coco["is_thing"]) == 80 and coco["is_thing"][:80] == [True] * 80
    finally:
        register_all_psalm_datasets()
