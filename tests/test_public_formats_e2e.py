"""Issue #14 "done when": a tiny tree in the public on-disk formats (COCO panoptic + instances JSON and
PNGs, refer-API refs(unc).p + instances.json, grefs(unc).json, DAVIS palette PNGs), the prepare
scripts, a few training iterations through tools/train_net.py and, with the default settings, the
evaluation of every registered validation set of those families: COCO panoptic, all four
COCO-Interactive prompt types, RefCOCO in both protocols, gRefCOCO, and DAVIS through
tools/eval_zero_shot.py. The tree also has what real files have and the synthetic data never had:
degenerate polygons and images without annotations."""
import importlib.util
import json
import math
import os
import shutil

import pytest

from .conftest import REPO_ROOT
from .dataset_fixtures import load_prepare_script, make_coco, make_davis, make_grefcoco, make_refcoco

pytestmark = pytest.mark.slow

TINY = str(REPO_ROOT / "configs" / "tiny" / "Base-PSALM-tiny.yaml")
VAL_SETS = {
    "coco_2017_val_panoptic_psalm": "panoptic",
    "coco_2017_val_instance_psalm": "instance",
    "coco_2017_val_semantic_psalm": "semantic",
    "coco_interactive_val_point": "interactive",
    "coco_interactive_val_scribble": "interactive",
    "coco_interactive_val_box": "interactive",
    "coco_interactive_val_mask": "interactive",
    "refcoco_unc_val": "referring",
    "refcoco_unc_val_per_ref": "referring",
    "grefcoco_val": "gres",
    "grefcoco_val_per_ref": "gres",
}


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _public_tree(root):
    """The fixture tree, plus a COCO train split = val with real-data defects added."""
    make_coco(root)
    make_refcoco(root)
    make_grefcoco(root)
    make_davis(root, n_frames=3)
    coco = os.path.join(root, "coco")
    shutil.copytree(os.path.join(coco, "val2017"), os.path.join(coco, "train2017"))
    shutil.copytree(os.path.join(coco, "panoptic_val2017"), os.path.join(coco, "panoptic_train2017"))
    shutil.copyfile(os.path.join(coco, "annotations", "panoptic_val2017.json"),
                    os.path.join(coco, "annotations", "panoptic_train2017.json"))
    inst = json.load(open(os.path.join(coco, "annotations", "instances_val2017.json")))
    inst["annotations"] += [
        # degenerate polygons, as real COCO files have (a 4-value "polygon", a 2-point one)
        {"id": 90, "image_id": 1, "category_id": 1, "segmentation": [[3, 3, 9, 9]], "bbox": [3, 3, 6, 6],
         "area": 0.0, "iscrowd": 0},
        {"id": 91, "image_id": 2, "category_id": 3, "segmentation": [[4, 4, 20, 18, 7], [1, 2, 3, 4, 5, 6]],
         "bbox": [4, 4, 16, 14], "area": 0.0, "iscrowd": 0},
    ]  # image 3 has no annotation at all
    for split in ("train", "val"):
        with open(os.path.join(coco, "annotations", f"instances_{split}2017.json"), "w") as f:
            json.dump(inst, f)


@pytest.fixture(autouse=True)
def _restore_loggers(restore_psalm_loggers):
    """The tools configure the 'psalm' / 'detectron2' loggers; undone after each test (tests/conftest.py)."""


def _finite_metrics(res):
    vals = [v for v in res.values() if isinstance(v, (int, float))]
    return vals and all(not math.isinf(v) for v in vals)


def test_public_formats_prepare_train_evaluate_everything(tmp_path, monkeypatch):
    from psalm.data.datasets import register_all_psalm_datasets
    from psalm.data.tokenizer import save_tiny_tokenizer

    root = str(tmp_path / "data")
    os.makedirs(root)
    _public_tree(root)
    monkeypatch.setenv("DETECTRON2_DATASETS", root)
    register_all_psalm_datasets(root)
    try:
        prep = lambda name, *a: load_prepare_script(name).main(["--root", root, *a])  # noqa: E731
        prep("prepare_coco_semantic_from_panoptic", "--splits", "train", "val", "--workers", "1")
        prep("prepare_coco_interactive", "--split", "train")
        prep("prepare_coco_interactive", "--split", "val")
        prep("prepare_refcoco", "--datasets", "refcoco")
        prep("prepare_grefcoco")
        prep("prepare_davis")

        tok = save_tiny_tokenizer(tmp_path / "tok", num_merges=128)
        out = tmp_path / "run"
        train_sets = ("coco_2017_train_panoptic_psalm", "refcoco_unc_train_per_ref", "coco_interactive_train")
        opts = [
            "MODEL.DEVICE", "cpu", "MODEL.PSALM.TOKENIZER", str(tok), "MODEL.PSALM.INIT.FROM_SCRATCH", "True",
            "DATASETS.TRAIN", str(train_sets), "DATASETS.TRAIN_TASKS", str(["panoptic", "referring", "interactive"]),
            "DATASETS.TRAIN_RATIOS", "[1.0, 1.0, 1.0]",
            "DATASETS.TEST", str(tuple(VAL_SETS)), "DATASETS.TEST_TASKS", str(list(VAL_SETS.values())),
            "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "1000",
            "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out), "SEED", "0",
        ]
        train_net = _tool("train_net")
        results = train_net.main(train_net.default_argument_parser().parse_args(["--config-file", TINY, *opts]))
        assert set(results) == set(VAL_SETS), sorted(results)
        assert set(results["coco_2017_val_panoptic_psalm"]) >= {"panoptic_seg"}
        for name in ("coco_interactive_val_point", "coco_interactive_val_scribble", "coco_interactive_val_box",
                     "coco_interactive_val_mask"):
            m = results[name]["interactive"]
            assert m["num_regions"] > 0 if "num_regions" in m else True
            assert _finite_metrics(m), (name, m)
        assert results["refcoco_unc_val"]["referring"]["num_samples"] == 2  # per sentence
        assert results["refcoco_unc_val_per_ref"]["referring"]["num_samples"] == 1
        g = results["grefcoco_val"]["gres"]
        assert g["N-acc_by_construction"] == 1.0  # the default GREF_NO_TARGET is the official top1

        ezs = _tool("eval_zero_shot")
        weights = str(out / "model_final.pth")
        davis = ezs.cli(["--config-file", TINY, "--task", "davis", "--dataset", "davis17_val", "--output",
                         str(tmp_path / "davis"), "--datasets-root", root, "MODEL.DEVICE", "cpu",
                         "MODEL.PSALM.TOKENIZER", str(tok), "DATALOADER.NUM_WORKERS", "0", "MODEL.WEIGHTS", weights])
        assert _finite_metrics(davis["davis"]), davis
    finally:
        register_all_psalm_datasets()
