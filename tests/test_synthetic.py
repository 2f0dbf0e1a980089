"""The synthetic multi-task data set: determinism, correct ground truth, all tasks present.

Referring ground truth is re-checked INDEPENDENTLY of the generator: object attributes are measured
from the written files (shape from the panoptic PNG's category, colour from the image pixels, size
from the mask's extent, boxes / centres from the mask) and every sentence is parsed with the regular
grammar documented in psalm/data/synthetic_language.py and evaluated on those measurements.
"""
import filecmp
import json
import os
import re

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from psalm.data import synthetic as syn
from psalm.data import synthetic_language as lang
from psalm.data.visual_prompts import decode_rle

SPEC = syn.SyntheticSpec(seed=3, num_train=24, num_val=6, num_test=6)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return syn.prepare_synthetic(str(tmp_path_factory.mktemp("synthetic")), SPEC, tokenizer=False)


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if not f.startswith("."))


def test_same_seed_same_bytes_other_seed_other_bytes(root, tmp_path):
    again = syn.prepare_synthetic(str(tmp_path / "again"), SPEC, tokenizer=False)
    files = _tree(root)
    assert files == _tree(again) and len(files) > 3 * SPEC.num_train
    match, mismatch, errors = filecmp.cmpfiles(root, again, files, shallow=False)
    assert not mismatch and not errors
    other = syn.prepare_synthetic(str(tmp_path / "other"), syn.SyntheticSpec(seed=4, num_train=24, num_val=6),
                                  tokenizer=False)
    _, mismatch, _ = filecmp.cmpfiles(root, other, ["train/images/000000.png", "train/referring.json"], shallow=False)
    assert len(mismatch) == 2


def _image_bytes(root, split):
    d = os.path.join(root, split, "images")
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def test_three_splits_draw_from_disjoint_streams(root):
    """train / val (dev) / test: every image of every split has its own random streams, and no
    image appears in two splits."""
    assert syn.SPLITS == ("train", "val", "test")
    streams = [tuple(syn.rng_entropy(SPEC, split, i, purpose)) for split in syn.SPLITS
               for i in range(SPEC.num_images(split)) for purpose in ("scene", "language", "prompts")]
    assert len(streams) == len(set(streams)) == 3 * (SPEC.num_train + SPEC.num_val + SPEC.num_test)
    assert {s[0] for s in streams if s[1] == 2} == {SPEC.test_seed} != {SPEC.seed}
    images = {split: _image_bytes(root, split) for split in syn.SPLITS}
    assert [len(images[s]) for s in syn.SPLITS] == [SPEC.num_train, SPEC.num_val, SPEC.num_test]
    seen = {}
    for split, files in images.items():
        for name, data in files.items():
            assert data not in seen, f"{split}/{name} is the same image as {seen[data]}"
            seen[data] = f"{split}/{name}"


def test_test_split_depends_on_test_seed_only(root, tmp_path):
    """Choosing another training-data seed (or more train / dev images) never moves the test split;
    another test seed does."""
    moved = syn.prepare_synthetic(str(tmp_path / "s"), syn.SyntheticSpec(seed=4, num_train=3, num_val=2,
                                                                          num_test=SPEC.num_test), tokenizer=False)
    files = [os.path.join("test", f) for f in _tree(os.path.join(root, "test"))]
    match, mismatch, errors = filecmp.cmpfiles(root, moved, files, shallow=False)
    assert len(match) == len(files) > 3 * SPEC.num_test and not mismatch and not errors
    assert _image_bytes(moved, "train")["000000.png"] != _image_bytes(root, "train")["000000.png"]
    other = syn.prepare_synthetic(str(tmp_path / "t"), syn.SyntheticSpec(seed=3, num_train=1, num_val=1, num_test=2,
                                                                         test_seed=SPEC.test_seed + 1), tokenizer=False)
    assert not set(_image_bytes(other, "test").values()) & set(_image_bytes(root, "test").values())


def test_dev_split_extends_with_num_val(root, tmp_path):
    """Image i of the dev split depends on (seed, i) only: the 200-image dev set of the main job starts
    with the 40 validation images of the earlier main jobs (docs/TRAINING.md)."""
    small = syn.prepare_synthetic(str(tmp_path / "v"), syn.SyntheticSpec(seed=3, num_train=1, num_val=2, num_test=1),
                                  tokenizer=False)
    full = _image_bytes(root, "val")
    assert _image_bytes(small, "val") == {k: full[k] for k in ("000000.png", "000001.png")}


def test_main_job_reports_on_a_test_split_no_choice_saw():
    """The main-job configs evaluate the test split only. Its streams differ from every stream an
    earlier comparison drew from: seeds 0 / 1 with split codes 0 (train) / 1 (val: the 40 validation
    images, the 200-image set, the 100 seed-1 threshold images)."""
    from psalm.config import get_psalm_cfg
    from psalm.data.datasets.synthetic import synthetic_spec_from_cfg

    for name in ("psalm_synthetic", "psalm_synthetic_official"):
        cfg = get_psalm_cfg()
        cfg.merge_from_file(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny", f"{name}.yaml"))
        assert cfg.DATASETS.TEST and all(t.startswith("psalm_synthetic_test_") for t in cfg.DATASETS.TEST)
        assert all(t.startswith("psalm_synthetic_train_") for t in cfg.DATASETS.TRAIN)
        spec = synthetic_spec_from_cfg(cfg)
        assert spec.num_test >= 200 and spec.num_val >= 200
        past = {(seed, code) for seed in (0, 1) for code in (0, 1)}
        test = {tuple(syn.rng_entropy(spec, "test", i, "scene"))[:2] for i in range(spec.num_test)}
        assert test == {(spec.test_seed, 2)} and not test & past


def test_official_config_is_the_main_job_without_extensions():
    """configs/tiny/psalm_synthetic_official.yaml differs from the main job only where it sets a key
    back to its default (the official model) and in OUTPUT_DIR: same data, splits, schedule and seeds."""
    from psalm.config import get_psalm_cfg

    def flat(node, prefix=""):
        out = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    cfgs = {}
    for name in ("psalm_synthetic", "psalm_synthetic_official"):
        cfg = get_psalm_cfg()
        cfg.merge_from_file(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny", f"{name}.yaml"))
        cfgs[name] = flat(cfg)
    default, ext, official = flat(get_psalm_cfg()), cfgs["psalm_synthetic"], cfgs["psalm_synthetic_official"]
    differ = {k for k in ext if ext[k] != official[k]} - {"OUTPUT_DIR"}
    assert differ, "the official config must switch the extensions off"
    assert all(official[k] == default[k] for k in differ), {k: (official[k], default[k]) for k in differ}
    assert not any(k.startswith(("DATASETS.", "SOLVER.", "INPUT.")) or k == "SEED" for k in differ), differ


def test_spec_refuses_empty_splits_and_unknown_split_names():
    with pytest.raises(ValueError, match="num_test 0"):
        syn.SyntheticSpec(num_test=0)
    with pytest.raises(ValueError, match="unknown synthetic split 'dev'"):
        SPEC.num_images("dev")


def test_prepare_is_idempotent_and_refuses_another_specs_root(root, tmp_path):
    stamp = os.path.getmtime(os.path.join(root, "train", "panoptic.json"))
    syn.prepare_synthetic(root, SPEC, tokenizer=False)
    assert os.path.getmtime(os.path.join(root, "train", "panoptic.json")) == stamp
    d = str(tmp_path / "r")
    small = syn.SyntheticSpec(num_train=2, num_val=1, num_test=1)
    syn.prepare_synthetic(d, small, tokenizer=False)
    before = _tree(d)
    # another job's spec on the same root: an error naming what differs, the data left as it is
    with pytest.raises(ValueError, match=r"another spec \(num_train: 2 there, 3 wanted\).*DATASETS.SYNTHETIC.ROOT"):
        syn.prepare_synthetic(d, syn.SyntheticSpec(num_train=3, num_val=1, num_test=1), tokenizer=False)
    assert _tree(d) == before
    # an unfinished root (no manifest: it is written last) is generated again
    os.remove(os.path.join(d, "manifest.json"))
    syn.prepare_synthetic(d, syn.SyntheticSpec(num_train=3, num_val=1, num_test=1), tokenizer=False)
    assert len(os.listdir(os.path.join(d, "train", "images"))) == 3


# ----------------------------------------------------------------------------- independent measurement
def _rgb2id(path):
    a = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return a[..., 0] + 256 * a[..., 1] + 256 * 256 * a[..., 2]


def _measured_objects(root, split, image_id):
    """{annotation id: measured attributes} of one image, from the files alone."""
    pan = json.load(open(os.path.join(root, split, "panoptic.json")))
    inst = json.load(open(os.path.join(root, split, "instances.json")))
    ann = next(a for a in pan["annotations"] if a["image_id"] == image_id)
    ids = _rgb2id(os.path.join(root, split, "panoptic", ann["file_name"]))
    image = np.asarray(Image.open(os.path.join(root, split, "images", ann["file_name"])).convert("RGB")).astype(float)
    names = {c["id"]: c["name"] for c in pan["categories"]}
    palette = {name: np.array(rgb, dtype=float) for name, rgb in lang.COLORS.items()}
    out = {}
    for a in inst["annotations"]:
        if a["image_id"] != image_id:
            continue
        mask = decode_rle(a["segmentation"])
        seg = next(s for s in ann["segments_info"] if (ids == s["id"]).sum() == mask.sum() and (ids[mask] == s["id"]).all())
        yy, xx = np.nonzero(mask)
        mean = image[mask].mean(0)
        extent = max(xx.max() - xx.min(), yy.max() - yy.min()) + 1
        out[a["id"]] = {
            "shape": names[seg["category_id"]],
            "color": min(palette, key=lambda c: np.abs(palette[c] - mean).sum()),
            # between the largest small object (2 * small_radius[1]) and the smallest large one
            "size": "small" if extent < (SPEC.small_radius[1] + SPEC.large_radius[0]) * SPEC.image_size else "large",
            "bbox": (xx.min(), yy.min(), xx.max(), yy.max()),
            "center": (xx.mean(), yy.mean()),
        }
    return out


_NP = r"(?:(small|large) )?(?:(red|green|blue|yellow|purple) )?(circle|square|triangle|diamond|object)"
_SENTENCE = re.compile(
    rf"^(?:the {_NP}(?: (on the left|on the right|at the top|at the bottom)| (left of|right of|above|below) "
    rf"the {_NP})?|all {_NP}s)$"
)


def _matches(obj, size, color, noun):
    return (size is None or obj["size"] == size) and (color is None or obj["color"] == color) and (
        noun == "object" or obj["shape"] == noun)


def _denotation(sentence, objs):
    """Ids the sentence denotes under the documented semantics (None = ambiguous)."""
    m = _SENTENCE.match(sentence)
    assert m, f"sentence outside the grammar: {sentence!r}"
    s1, c1, n1, direction, relation, s2, c2, n2, sa, ca, na = m.groups()
    if sentence.startswith("all "):
        return {k for k, o in objs.items() if _matches(o, sa, ca, na)}
    cands = {k for k, o in objs.items() if _matches(o, s1, c1, n1)}
    if direction:
        axis, sign = {"on the left": (0, 1), "on the right": (0, -1), "at the top": (1, 1), "at the bottom": (1, -1)}[direction]
        order = sorted(cands, key=lambda k: sign * objs[k]["center"][axis])
        if len(order) >= 2 and abs(objs[order[0]]["center"][axis] - objs[order[1]]["center"][axis]) < \
                lang.SUPERLATIVE_GAP * SPEC.image_size:
            return None
        cands = set(order[:1])
    if relation:
        landmarks = [k for k, o in objs.items() if _matches(o, s2, c2, n2)]
        if len(landmarks) != 1:
            return None
        lx0, ly0, lx1, ly1 = objs[landmarks[0]]["bbox"]
        side = {"left of": lambda b: b[2] < lx0, "right of": lambda b: b[0] > lx1,
                "above": lambda b: b[3] < ly0, "below": lambda b: b[1] > ly1}[relation]
        cands = {k for k in cands if k != landmarks[0] and side(objs[k]["bbox"])}
    return cands


@pytest.mark.parametrize("kind", ["referring", "gres"])
def test_every_expression_denotes_exactly_its_targets(root, kind):
    refs = json.load(open(os.path.join(root, "train", f"{kind}.json")))["refs"]
    assert len(refs) >= SPEC.num_train
    cache = {}
    for ref in refs:
        objs = cache.setdefault(ref["image_id"], _measured_objects(root, "train", ref["image_id"]))
        for sent in ref["sentences"]:
            got = _denotation(sent["sent"], objs)
            assert got == set(ref["ann_ids"]), f"{sent['sent']!r} in image {ref['image_id']}"
        if kind == "referring":
            assert len(ref["ann_ids"]) == 1


def test_expressions_need_colour_shape_and_position(root):
    refs = json.load(open(os.path.join(root, "train", "referring.json")))["refs"]
    sents = [s["sent"] for r in refs for s in r["sentences"]]
    assert any(re.search(r"(red|green|blue|yellow|purple) \w+ (on the|at the|left of|right of|above|below)", s)
               for s in sents)
    assert any(re.match(r"the (small|large) (red|green|blue|yellow|purple) \w+ (left of|right of|above|below) ", s)
               for s in sents)
    for kind in ("on the left", "at the top", "left of", "above"):
        assert any(kind in s for s in sents)


def test_referring_kinds_are_balanced(root):
    """Plain descriptions ("the circle") must not be crowded out by relations and superlatives:
    relations end with the landmark's noun, and a model that rarely sees a plain description learns
    "the trailing noun is NOT the target" and picks the wrong object for "the circle"."""
    refs = json.load(open(os.path.join(root, "train", "referring.json")))["refs"]
    kinds = [e["kind"] for r in refs for e in r["expressions"]]
    share = {k: kinds.count(k) / len(kinds) for k in ("simple", "superlative", "relation")}
    assert all(v >= 0.15 for v in share.values()), share
    # the second ("rich") sentence: a full plain description ("the large blue circle") is one kind
    # among three, not one expression among dozens of relations (it was 0-4% before the kind draw)
    second = [r["expressions"][1]["kind"] for r in refs if len(r["expressions"]) > 1]
    assert second.count("simple") / len(second) >= 0.12, second


def test_gres_has_no_target_and_multi_target_samples(root):
    from psalm.data.datasets.synthetic import register_synthetic

    register_synthetic(root, SPEC)
    dicts = DatasetCatalog.get("psalm_synthetic_train_gres")
    no_target = [d for d in dicts if d["no_target"]]
    multi = [d for d in dicts if len(d["annotations"]) >= 2]
    assert no_target and multi and len(no_target) < len(dicts)
    assert all(d["annotations"] == [] and d["sentences"] for d in no_target)


def test_interactive_has_all_four_prompt_kinds(root):
    data = json.load(open(os.path.join(root, "val", "interactive.json")))
    kinds = set()
    for a in data["annotations"]:
        mask = decode_rle(a["segmentation"])
        prompts = a["visual_prompts"]
        kinds |= set(prompts)
        assert decode_rle(prompts["point"])[mask].any()  # the click lies on the object
        assert decode_rle(prompts["box"])[mask].mean() > 0.8  # the box covers the object
    assert kinds == {"point", "scribble", "box", "mask"}


def test_registered_datasets_load_and_map(root):
    """Every registered name loads; one sample per task goes through the real mapper."""
    from psalm.config import get_psalm_cfg
    from psalm.data.datasets.synthetic import register_synthetic
    from psalm.data.mapper import PSALMDatasetMapper

    names = register_synthetic(root, SPEC)
    cfg = get_psalm_cfg()
    cfg.INPUT.IMAGE_SIZE = 128
    rng = np.random.default_rng(0)
    for name in names:
        dicts = DatasetCatalog.get(name)
        meta = MetadataCatalog.get(name)
        assert dicts and all(d["task"] == meta.task for d in dicts)
        if name.endswith("_caption"):
            assert dicts[0]["conversations"][1]["from"] == "gpt"
            continue
        out = PSALMDatasetMapper(cfg, is_train=True, dataset_name=name)(dicts[0], rng=rng)
        assert out["image"].shape == (3, 128, 128)
        if meta.task == "panoptic":
            # 4 shapes + wall + floor; every pixel is covered by exactly one segment
            assert meta.prompt_class_names == list(syn.CLASS_NAMES)
            masks = out["instances"].gt_masks
            assert (masks.sum(0) == 1).all()
        if meta.task == "interactive":
            assert out["region_masks"].shape[0] == len(out["instances"])
    for split in syn.SPLITS:
        pan = MetadataCatalog.get(f"psalm_synthetic_{split}_panoptic")
        assert os.path.isfile(pan.panoptic_json) and os.path.isdir(pan.panoptic_root)
        assert pan.panoptic_root == os.path.join(root, split, "panoptic")
    for split in ("val", "test"):  # the evaluation splits have one interactive set per prompt type
        assert {f"psalm_synthetic_{split}_interactive_{t}" for t in ("point", "scribble", "box", "mask")} <= set(names)
    assert len(DatasetCatalog.get("psalm_synthetic_test_panoptic")) == SPEC.num_test


def test_object_sizes_follow_the_spec_and_bad_sizes_are_refused():
    """Radii come from ``small_radius`` / ``large_radius`` (config: DATASETS.SYNTHETIC.*_RADIUS)."""
    from psalm.config import get_psalm_cfg
    from psalm.data.datasets.synthetic import synthetic_spec_from_cfg

    spec = syn.SyntheticSpec(seed=5, small_radius=(0.05, 0.06), large_radius=(0.2, 0.22))
    for i in range(6):
        _, objects, _ = syn.generate_scene(spec, "train", i)
        for o in objects:
            extent = max(o["bbox"][2] - o["bbox"][0], o["bbox"][3] - o["bbox"][1]) + 1
            lo, hi = spec.small_radius if o["size"] == "small" else spec.large_radius
            # a shape of half-extent r spans 2r pixels (+1 for the rasterised centre, +-1 rounding)
            assert 2 * lo * spec.image_size - 2 <= extent <= 2 * hi * spec.image_size + 2, (o["size"], extent)
    with pytest.raises(ValueError, match="overlaps"):
        syn.SyntheticSpec(small_radius=(0.08, 0.16), large_radius=(0.15, 0.19))
    with pytest.raises(ValueError, match="large_radius"):
        syn.SyntheticSpec(large_radius=(0.2, 0.4))
    cfg = get_psalm_cfg()
    cfg.DATASETS.SYNTHETIC.SMALL_RADIUS = [0.05, 0.06]
    spec = synthetic_spec_from_cfg(cfg)
    assert spec.small_radius == (0.05, 0.06) and spec.large_radius == tuple(cfg.DATASETS.SYNTHETIC.LARGE_RADIUS)
    # the spec is part of the manifest: a root of other sizes is refused
    assert spec.to_json()["small_radius"] == [0.05, 0.06]
