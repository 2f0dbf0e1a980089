"""Registration of the psalm data sets: names, metadata, class names, laziness, clear errors, immutability."""
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from psalm.data.class_names import BENCHMARKS, class_names_info, load_class_names
from psalm.data.datasets import MissingDatasetFileError, register_all_psalm_datasets
from psalm.data.datasets._common import register_lazy

from .dataset_fixtures import make_coco

EXPECTED = {
    # name: (task, evaluator_type)
    "coco_2017_train_panoptic_psalm": ("panoptic", "coco_panoptic_seg"),
    "coco_2017_val_panoptic_psalm": ("panoptic", "coco_panoptic_seg"),
    "coco_2017_val_instance_psalm": ("instance", "coco"),
    "coco_2017_val_semantic_psalm": ("semantic", "sem_seg"),
    "refcoco_unc_val": ("referring", "referring"),
    "refcoco_unc_val_per_ref": ("referring", "referring"),
    "refcoco+_unc_testB": ("referring", "referring"),
    "refcocog_umd_test": ("referring", "referring"),
    "refcocog_umd_val_per_ref": ("referring", "referring"),
    "refcoco_mixed_train_per_ref": ("referring", "referring"),
    "grefcoco_val": ("gres", "gres"),
    "grefcoco_testA": ("gres", "gres"),
    "grefcoco_train": ("gres", "gres"),
    "coco_interactive_train": ("interactive", "interactive"),
    "coco_interactive_val_point": ("interactive", "interactive"),
    "coco_interactive_val_scribble": ("interactive", "interactive"),
    "coco_interactive_val_box": ("interactive", "interactive"),
    "coco_interactive_val_mask": ("interactive", "interactive"),
    "ade20k_sem_seg_val_psalm": ("semantic", "sem_seg"),
    "ade20k_instance_val_psalm": ("instance", "coco"),
    "ade20k_panoptic_val_psalm": ("panoptic", "ade20k_panoptic_seg"),
    "cityscapes_fine_instance_seg_val_psalm": ("instance", "coco"),
    "pascal_ctx_59_sem_seg_val_psalm": ("semantic", "sem_seg"),
    "pascal_ctx_459_sem_seg_val_psalm": ("semantic", "sem_seg"),
    "pascal_voc_20_sem_seg_val_psalm": ("semantic", "sem_seg"),
    "davis17_val": ("interactive", "davis"),
    "lvis_v1_train_psalm": ("instance", "lvis"),
    "llava_v1_5_mix665k_psalm": ("instruction", "none"),
    "llava_pretrain_558k_psalm": ("caption", "none"),
}


@pytest.fixture
def root(tmp_path):
    r = str(tmp_path / "data")
    os.makedirs(r)
    register_all_psalm_datasets(r)
    yield r
    register_all_psalm_datasets()


def test_names_tasks_and_evaluator_types(root):
    for name, (task, et) in EXPECTED.items():
        meta = MetadataCatalog.get(name)
        assert (meta.task, meta.evaluator_type) == (task, et), name


def test_prompt_class_names_per_benchmark(root):
    def names(ds):
        return MetadataCatalog.get(ds).prompt_class_names

    coco = names("coco_2017_val_panoptic_psalm")
    assert len(coco) == 133 and "wall-other-merged" in coco and "tree-merged" in coco
    assert MetadataCatalog.get("coco_2017_val_panoptic_psalm").prompt_is_thing.count(True) == 80
    assert names("coco_2017_val_instance_psalm")[:2] == ["person", "bicycle"]
    assert len(names("coco_2017_val_instance_psalm")) == 80
    ade = names("ade20k_sem_seg_val_psalm")
    assert len(ade) == 150 and ade[0] == "wall,walls,brick wall,stone wall,interior wall"
    assert len(names("ade20k_instance_val_psalm")) == 100
    pc59 = names("pascal_ctx_59_sem_seg_val_psalm")
    assert len(pc59) == 59 and pc59[0] == "aeroplane,aeroplanes,airplanes,airplane"
    pc459 = names("pascal_ctx_459_sem_seg_val_psalm")
    assert len(pc459) == 459 and not any("," in n for n in pc459) and pc459[1] == "aeroplane"
    voc = names("pascal_voc_20_sem_seg_val_psalm")
    assert len(voc) == 20 and not any(n.startswith("background") for n in voc)
    assert names("cityscapes_fine_instance_seg_val_psalm") == [
        "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    assert len(names("lvis_v1_val_psalm")) == 1203


def test_class_names_files_document_their_source():
    for bench in BENCHMARKS:
        info = class_names_info(bench)
        assert info["source"] and info["prompt_rule"] and info["verified"], bench
        assert len(load_class_names(bench)) > 0
    with pytest.raises(KeyError, match="unknown class-name benchmark"):
        load_class_names("ade847")


def test_registration_is_lazy_and_missing_files_are_named(root):
    # nothing exists under root, yet every name is registered
    with pytest.raises(MissingDatasetFileError) as e:
        DatasetCatalog.get("refcoco_unc_val_per_ref")
    msg = str(e.value)
    assert os.path.join(root, "refer_seg", "refcoco", "refcoco_unc_val.json") in msg
    assert "python datasets/prepare_refcoco.py" in msg and "datasets/README.md" in msg
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(MissingDatasetFileError, match="prepare_davis.py"):
        DatasetCatalog.get("davis17_val")
    with pytest.raises(MissingDatasetFileError, match="panoptic_semseg_val2017.*prepare_coco_semantic_from_panoptic"):
        DatasetCatalog.get("coco_2017_val_semantic_psalm")


def test_dicts_are_fresh_per_call_and_loaders_convert_ids(root):
    make_coco(root)
    a = DatasetCatalog.get("coco_2017_val_instance_psalm")
    assert [len(d["annotations"]) for d in a] == [2, 2, 0]  # images without annotations are kept
    assert a[0]["annotations"][1]["category_id"] == 2  # COCO id 3 (car) -> contiguous 2
    a[0]["annotations"][0]["category_id"] = 99
    a[0]["file_name"] = "corrupted"
    b = DatasetCatalog.get("coco_2017_val_instance_psalm")
    assert b[0]["annotations"][0]["category_id"] == 0 and b[0]["file_name"].endswith("000000000001.jpg")

    pan = DatasetCatalog.get("coco_2017_val_panoptic_psalm")
    segs = {s["id"]: (s["category_id"], s["isthing"]) for s in pan[0]["segments_info"]}
    assert segs == {1000: (131, False), 7: (0, True), 300: (2, True)}
    assert pan[0]["sem_seg_file_name"].endswith(os.path.join("panoptic_semseg_val2017", "000000000001.png"))
    assert (pan[0]["height"], pan[0]["width"]) == (24, 32) and pan[0]["task"] == "panoptic"


def test_reregistration_and_name_collisions(tmp_path):
    names = register_all_psalm_datasets(str(tmp_path / "a"))
    assert "grefcoco_val" in names
    register_all_psalm_datasets(str(tmp_path / "b"))
    assert MetadataCatalog.get("grefcoco_val").json_file.startswith(str(tmp_path / "b"))
    register_all_psalm_datasets()
    with pytest.raises(ValueError, match="already registered by another library"):
        register_lazy("coco_2017_val_panoptic", lambda: [], task="panoptic")  # a detectron2 builtin name


def test_semantic_metadata_maps_every_class(root):
    """Every set evaluated by SemSegEvaluator (semantic sets and panoptic runs) maps EVERY class in
    stuff_dataset_id_to_contiguous_id (Mask2Former convention), so that a predicted thing class can be
    written to sem_seg_predictions.json; the thing map keeps the things only, into the same K ids."""
    from psalm.data.datasets import registered_psalm_names

    checked = []
    for name in registered_psalm_names():
        meta = MetadataCatalog.get(name)
        if meta.evaluator_type not in ("sem_seg", "coco_panoptic_seg", "ade20k_panoptic_seg"):
            continue
        k = len(meta.prompt_class_names)
        stuff = meta.stuff_dataset_id_to_contiguous_id
        # SemSegEvaluator looks every predicted label 0..K-1 up in the inverse of this map
        assert len(meta.stuff_classes) == k and sorted(stuff.values()) == list(range(k)), name
        is_thing = meta.prompt_is_thing
        assert len(is_thing) == k, name
        things = meta.get("thing_dataset_id_to_contiguous_id", {})
        for dataset_id, cont in things.items():
            assert stuff[dataset_id] == cont and is_thing[cont], (name, dataset_id)
        if things or "thing_classes" in meta.as_dict():
            assert sorted(things.values()) == [i for i in range(k) if is_thing[i]], name
            assert meta.thing_classes == [n for n, t in zip(meta.prompt_class_names, is_thing) if t], name
        checked.append(name)
    for name in ("ade20k_sem_seg_val_psalm", "ade20k_panoptic_val_psalm", "coco_2017_val_panoptic_psalm",
                 "coco_2017_val_semantic_psalm", "cityscapes_fine_sem_seg_val_psalm",
                 "pascal_ctx_59_sem_seg_val_psalm", "pascal_voc_20_sem_seg_val_psalm", "psalm_synthetic_val_panoptic"):
        assert name in checked, name
    ade = MetadataCatalog.get("ade20k_panoptic_val_psalm")
    assert ade.stuff_dataset_id_to_contiguous_id[7] == ade.thing_dataset_id_to_contiguous_id[7] == 7  # bed
    assert len(ade.thing_dataset_id_to_contiguous_id) == 100 and ade.stuff_dataset_id_to_contiguous_id[0] == 0
    coco = MetadataCatalog.get("coco_2017_val_panoptic_psalm")
    assert sorted(coco.thing_dataset_id_to_contiguous_id.values()) == list(range(80))
    assert len(coco.stuff_dataset_id_to_contiguous_id) == 133


def test_panoptic_loader_keeps_isthing_with_the_full_stuff_map(root):
    """The stuff map now holds the things too: panoptic segments must still get isthing from the thing map."""
    make_coco(root)
    pan = DatasetCatalog.get("coco_2017_val_panoptic_psalm")
    isthing = {s["category_id"]: s["isthing"] for d in pan for s in d["segments_info"]}
    assert isthing == {131: False, 0: True, 2: True}


def _config_files():
    import glob

    return sorted(glob.glob("configs/**/*.yaml", recursive=True))  # projects register their own sets


@pytest.mark.parametrize("path", _config_files())
def test_every_config_names_registered_data_sets_of_its_tasks(path):
    """A data set name in a shipped config that nothing registers (the paper config had
    'llava_v1_5_mix665k') fails only when the 56k-iteration job starts."""
    import yaml

    raw = yaml.safe_load(open(path)) or {}
    ds = raw.get("DATASETS", {})
    import ast

    names = {k: ds.get(k, ()) for k in ("TRAIN", "TEST")}
    names = {k: ast.literal_eval(v) if isinstance(v, str) else v for k, v in names.items()}  # yacs tuples
    for split, tasks_key in (("TRAIN", "TRAIN_TASKS"), ("TEST", "TEST_TASKS")):
        for i, name in enumerate(names[split]):
            if name.startswith("psalm_synthetic_"):
                continue  # registered when the config's synthetic data is generated
            assert name in DatasetCatalog.list(), f"{path}: DATASETS.{split} names {name!r}, which is not registered"
            if ds.get(tasks_key):
                task = ds[tasks_key][i]
                meta_task = MetadataCatalog.get(name).task
                assert task == meta_task or (task, meta_task) == ("davis", "interactive"), (path, name, task)


def test_paper_config_referring_protocols():
    """The paper config trains RefCOCO as the official code (sentences of an object merged) and
    reports the standard per-sentence protocol."""
    from psalm.config import get_psalm_cfg

    cfg = get_psalm_cfg("configs/coco/psalm_swin_base_phi15.yaml")
    referring_train = [n for n in cfg.DATASETS.TRAIN if MetadataCatalog.get(n).task == "referring"]
    referring_test = [n for n in cfg.DATASETS.TEST if MetadataCatalog.get(n).task == "referring"]
    assert referring_train and all(MetadataCatalog.get(n).protocol == "per_ref" for n in referring_train)
    assert referring_test and all(MetadataCatalog.get(n).protocol == "per_sentence" for n in referring_test)
    # the protocol is the data set's: no config key pretends to choose it
    assert "REFERRING_PROTOCOL" not in cfg.TEST.PSALM and "INTERACTIVE_PROMPT_TYPE" not in cfg.TEST.PSALM


def test_interactive_val_sets_carry_their_prompt_type():
    for pt in ("point", "scribble", "box", "mask"):
        assert MetadataCatalog.get(f"coco_interactive_val_{pt}").prompt_type == pt
    assert MetadataCatalog.get("davis17_val").prompt_type == "mask"  # the first-frame mask
