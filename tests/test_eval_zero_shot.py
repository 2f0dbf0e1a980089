"""tools/eval_zero_shot.py end to end on tiny generated data sets (real file formats) for every task,
with the tiny model (random weights saved and re-loaded through MODEL.WEIGHTS)."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from PIL import Image

from psalm.config import get_psalm_cfg
from psalm.data.class_names import load_categories
from psalm.data.datasets import register_all_psalm_datasets
from psalm.modeling.meta_arch import PSALM, build_psalm_model

from .conftest import REPO_ROOT
from .dataset_fixtures import _jpg, _json, load_prepare_script, make_coco, make_davis, make_grefcoco, rect_poly

TINY = str(REPO_ROOT / "configs" / "tiny" / "Base-PSALM-tiny.yaml")


def _load_tool():
    spec = importlib.util.spec_from_file_location("eval_zero_shot", REPO_ROOT / "tools" / "eval_zero_shot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tool = _load_tool()


# ----------------------------------------------------------------------------- fixture data
ADE_IMAGES = ["ADE_val_00000001", "ADE_val_00000002"]
AH, AW = 24, 32


def make_ade20k(root: str) -> dict:
    """ADEChallengeData2016: images, detectron2 semantic PNGs, Mask2Former-style instance and panoptic
    files (all 150 / 100 categories listed, so that any predicted class is known to the evaluators)."""
    base = os.path.join(root, "ADEChallengeData2016")
    cats = load_categories("ade20k_150")
    ins_cats = load_categories("ade20k_150_instance")
    bed = 7  # thing (ADE-150 id 7, also in the instance label space); wall = 0 (stuff)
    sem_labels, pan_anns, images, ins_anns = {}, [], [], []
    for i, name in enumerate(ADE_IMAGES):
        _jpg(os.path.join(base, "images", "validation", name + ".jpg"), AH, AW, seed=20 + i)
        sem = np.zeros((AH, AW), np.uint8)  # wall everywhere
        sem[4:14 + i, 6:20] = bed
        sem[0, :3] = 255  # ignored
        sem_labels[name] = sem
        os.makedirs(os.path.join(base, "annotations_detectron2", "validation"), exist_ok=True)
        Image.fromarray(sem).save(os.path.join(base, "annotations_detectron2", "validation", name + ".png"))
        # panoptic: segment 1 = wall, segment 2 = bed
        ids = np.where(sem == bed, 2, 1).astype(np.uint32)
        os.makedirs(os.path.join(base, "ade20k_panoptic_val"), exist_ok=True)
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(os.path.join(base, "ade20k_panoptic_val", name + ".png"))
        segs = [{"id": 1, "category_id": 0, "iscrowd": 0, "area": int((ids == 1).sum()), "bbox": [0, 0, AW, AH]},
                {"id": 2, "category_id": bed, "iscrowd": 0, "area": int((ids == 2).sum()), "bbox": [6, 4, 14, 10 + i]}]
        pan_anns.append({"image_id": name, "file_name": name + ".png", "segments_info": segs})
        images.append({"id": name, "file_name": name + ".jpg", "height": AH, "width": AW})
        ins_anns.append({"id": 100 + i, "image_id": i + 1, "category_id": bed, "segmentation": rect_poly(6, 4, 20, 14 + i),
                         "bbox": [6, 4, 14, 10 + i], "area": float(14 * (10 + i)), "iscrowd": 0})
    _json(os.path.join(base, "ade20k_panoptic_val.json"), {
        "images": images, "annotations": pan_anns,
        "categories": [{"id": c["id"], "name": c["raw_name"], "isthing": c["isthing"]} for c in cats]})
    _json(os.path.join(base, "ade20k_instance_val.json"), {
        "images": [{"id": i + 1, "file_name": n + ".jpg", "height": AH, "width": AW} for i, n in enumerate(ADE_IMAGES)],
        "annotations": ins_anns, "categories": [{"id": c["id"], "name": c["raw_name"]} for c in ins_cats]})
    return sem_labels


def make_pascal_ctx59(root: str) -> None:
    """pascal_ctx_d2/{images,annotations_ctx59}/validation (contiguous ids 0..58, 255 ignored)."""
    base = os.path.join(root, "pascal_ctx_d2")
    os.makedirs(os.path.join(base, "annotations_ctx59", "validation"), exist_ok=True)
    for i, name in enumerate(("2008_000001", "2008_000002")):
        _jpg(os.path.join(base, "images", "validation", name + ".jpg"), AH, AW, seed=30 + i)
        lab = np.full((AH, AW), 12, np.uint8)
        lab[3:15, 4:20 + i] = 40 + i
        lab[20:, :5] = 255
        Image.fromarray(lab).save(os.path.join(base, "annotations_ctx59", "validation", name + ".png"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Data root with ADE20K / gRefCOCO / DAVIS fixtures, a tiny tokenizer and a tiny checkpoint."""
    from psalm.data.tokenizer import save_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("zero_shot")
    root = str(tmp / "data")
    os.makedirs(root)
    make_ade20k(root)
    make_pascal_ctx59(root)
    make_coco(root)  # COCO 2014 images for gRefCOCO
    make_grefcoco(root)
    make_davis(root, n_frames=3)
    register_all_psalm_datasets(root)
    load_prepare_script("prepare_grefcoco").main(["--root", root])
    load_prepare_script("prepare_davis").main(["--root", root])

    tok = save_tiny_tokenizer(tmp / "tok", num_merges=128)  # 387 = the tiny config's vocabulary
    opts = ["MODEL.DEVICE", "cpu", "MODEL.PSALM.TOKENIZER", str(tok), "DATALOADER.NUM_WORKERS", "0",
            "TEST.PSALM.DTYPE", "fp32",
            # ADE's 150 synonym lists make a ~2.6k-token prompt
            "MODEL.PSALM.MODEL_MAX_LENGTH", "4096", "MODEL.PSALM.LLM.MAX_POSITION_EMBEDDINGS", "4096"]
    torch.manual_seed(0)
    model = build_psalm_model(get_psalm_cfg(TINY, opts))
    DetectionCheckpointer(model, save_dir=str(tmp)).save("tiny_model")
    yield {"root": root, "tmp": tmp, "opts": opts, "weights": str(tmp / "tiny_model.pth"), "model": model}
    register_all_psalm_datasets()  # back to the default root for other tests


@pytest.fixture(autouse=True)
def _restore_loggers(restore_psalm_loggers):
    """The tools configure the 'psalm' / 'detectron2' loggers; undone after each test (tests/conftest.py)."""


def run_tool(env, task, dataset, out, *extra):
    argv = ["--config-file", TINY, "--task", task, "--dataset", dataset, "--output", str(out),
            "--datasets-root", env["root"], *extra, *env["opts"], "MODEL.WEIGHTS", env["weights"]]
    results = tool.cli(argv)
    path = out / f"results_{task}_{dataset}.json"
    doc = json.loads(path.read_text())
    assert doc["task"] == task and doc["dataset"] == dataset and doc["weights"] == env["weights"]
    return results, doc["results"]


def in_range(v, lo=0.0, hi=100.0):
    return v is None or (isinstance(v, float) and math.isnan(v)) or lo - 1e-9 <= v <= hi + 1e-9


# ----------------------------------------------------------------------------- every task end to end
def test_ov_semantic(env, tmp_path):
    results, written = run_tool(env, "ov_semantic", "pascal_ctx_59_sem_seg_val_psalm", tmp_path)
    m = written["sem_seg"]
    for k in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert in_range(m[k]) and m[k] is not None, k
    assert m["mIoU"] == pytest.approx(results["sem_seg"]["mIoU"])
    assert "IoU-aeroplane,aeroplanes,airplanes,airplane" in m
    assert (tmp_path / "inference" / "sem_seg_predictions.json").is_file()


def test_ov_instance(env, tmp_path):
    _, written = run_tool(env, "ov_instance", "ade20k_instance_val_psalm", tmp_path)
    m = written["segm"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(m)
    assert all(in_range(m[k]) for k in ("AP", "AP50", "AP75"))
    assert (tmp_path / "inference" / "coco_instances_results.json").is_file()


def test_ov_panoptic(env, tmp_path):
    # ADE20K: PQ only (thing AP and mIoU of the panoptic run: test_ade20k_panoptic_thing_ap)
    _, written = run_tool(env, "ov_panoptic", "ade20k_panoptic_val_psalm", tmp_path / "ade",
                          "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "False", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False")
    assert {"PQ", "SQ", "RQ", "PQ_th", "PQ_st"} <= set(written["panoptic_seg"])
    assert all(in_range(v) for v in written["panoptic_seg"].values())
    assert set(written) == {"panoptic_seg"}
    # COCO panoptic: PQ + thing AP (its semantic PNGs are absent, so mIoU is skipped with a warning)
    _, written = run_tool(env, "ov_panoptic", "coco_2017_val_panoptic_psalm", tmp_path / "coco")
    assert set(written) == {"panoptic_seg", "segm"}
    assert in_range(written["panoptic_seg"]["PQ"]) and in_range(written["segm"]["AP"])


# ADE20K panoptic thing AP: ADE's things are interleaved with stuff in the 150-class space, so
# detectron2's COCOEvaluator cannot take them directly; PanopticThingAPEvaluator evaluates them on a
# view with thing ids 0..99. The fixture's instance json numbers its images 1, 2 (the panoptic set
# uses the file stems): images are matched by file name. mIoU of the panoptic run: every predicted
# class (things too) must be in the semantic metadata.
def test_ade20k_panoptic_thing_ap(env, tmp_path):
    _, written = run_tool(env, "ov_panoptic", "ade20k_panoptic_val_psalm", tmp_path)
    assert set(written) == {"panoptic_seg", "segm", "sem_seg"}
    assert in_range(written["segm"]["AP"]) and in_range(written["sem_seg"]["mIoU"])
    assert (tmp_path / "inference" / "coco_instances_results.json").is_file()


def test_grefcoco(env, tmp_path):
    _, written = run_tool(env, "grefcoco", "grefcoco_val", tmp_path)
    m = written["gres"]
    assert {"cIoU", "gIoU", "N-acc", "T-acc"} <= set(m)
    assert m["num_samples"] == 3 and m["num_no_target"] == 2  # val: 1 sentence with targets + 2 no-target
    assert all(in_range(m[k]) for k in ("cIoU", "gIoU", "N-acc", "T-acc"))


def test_davis(env, tmp_path):
    _, written = run_tool(env, "davis", "davis17_val", tmp_path)
    m = written["davis"]
    for k in ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"):
        assert in_range(m[k], -100, 100), k
    assert m["num_videos"] == 2 and m["num_objects"] == 3
    # every frame written as a DAVIS PNG, frame 0 = the first-frame mask
    pred_dir = tmp_path / "inference" / "davis_predictions"
    for video in ("bear", "cows"):
        assert sorted(os.listdir(pred_dir / video)) == ["00000.png", "00001.png", "00002.png"]
        gt0 = np.asarray(Image.open(os.path.join(env["root"], "DAVIS", "Annotations", "480p", video, "00000.png")))
        np.testing.assert_array_equal(np.asarray(Image.open(pred_dir / video / "00000.png")), np.where(gt0 == 255, 0, gt0))


# ----------------------------------------------------------------------------- known answer
def gt_semantic_inference(num_classes):
    """A stand-in for PSALM.inference that returns the ground truth as one-hot sem_seg [K, H, W]."""

    def inference(self, batched_inputs, image_features=None):
        outs = []
        for x in batched_inputs:
            assert x["task"] == "semantic" and len(x["class_names"]) == num_classes
            sem = torch.from_numpy(np.asarray(Image.open(x["sem_seg_file_name"])).astype(np.int64))
            onehot = torch.zeros(num_classes, *sem.shape)
            rows, cols = (sem != 255).nonzero(as_tuple=True)
            onehot[sem[rows, cols], rows, cols] = 1.0
            outs.append({"sem_seg": onehot})
        return outs

    return inference


def test_ov_semantic_gt_predictor_scores_100(env, tmp_path, monkeypatch):
    """A model that returns the ground truth gets mIoU = pACC = 100 through the whole tool."""
    monkeypatch.setattr(PSALM, "inference", gt_semantic_inference(len(load_categories("pascal_ctx_59"))))
    _, written = run_tool(env, "ov_semantic", "pascal_ctx_59_sem_seg_val_psalm", tmp_path)
    assert written["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert written["sem_seg"]["pACC"] == pytest.approx(100.0)


# ADE20K semantic: a predicted THING class (here: bed) must be known to SemSegEvaluator, which reads
# every label from `stuff_dataset_id_to_contiguous_id` (Mask2Former maps every class there).
def test_ade20k_semantic_evaluation_gt_predictor(env, tmp_path, monkeypatch):
    monkeypatch.setattr(PSALM, "inference", gt_semantic_inference(len(load_categories("ade20k_150"))))
    _, written = run_tool(env, "ov_semantic", "ade20k_sem_seg_val_psalm", tmp_path)
    assert written["sem_seg"]["mIoU"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- weights and errors
def test_model_weights_are_loaded_and_incomplete_checkpoints_refused(env, tmp_path):
    cfg = get_psalm_cfg(TINY, env["opts"] + ["MODEL.WEIGHTS", env["weights"], "OUTPUT_DIR", str(tmp_path)])
    torch.manual_seed(123)  # a different random init: equality below comes from the checkpoint
    loaded = tool.build_model(cfg)
    assert not loaded.training
    ref = env["model"].state_dict()
    for k in ("mask_tokens", "predictor.class_head.weight", "projector.fc.weight"):
        if k in ref:
            assert torch.equal(loaded.state_dict()[k], ref[k]), k
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())

    sd = {k: v for k, v in ref.items() if not k.startswith("region_projector.")}
    torch.save({"model": sd}, tmp_path / "partial.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="region_projector.*--allow-missing-keys"):
        tool.build_model(cfg)
    model = tool.build_model(cfg, allow_missing_keys=True)
    assert torch.equal(model.state_dict()["mask_tokens"], ref["mask_tokens"])


def test_dataset_task_mismatch_is_a_clear_error(env):
    assert tool.check_dataset_task("davis", "davis17_val") == "interactive"
    assert tool.check_dataset_task("ov_panoptic", "ade20k_panoptic_val_psalm") == "panoptic"
    with pytest.raises(ValueError, match="evaluator_type 'gres': use --task grefcoco"):
        tool.check_dataset_task("ov_semantic", "grefcoco_val")
    with pytest.raises(ValueError, match="evaluator_type 'sem_seg': use --task ov_semantic"):
        tool.check_dataset_task("davis", "ade20k_sem_seg_val_psalm")
    with pytest.raises(ValueError, match="not registered"):
        tool.check_dataset_task("davis", "davis_2016_val")
    with pytest.raises(SystemExit):  # argparse: --task must be one of the five
        tool.build_parser().parse_args(["--config-file", TINY, "--task", "semantic", "--dataset", "x"])


def test_cli_rejects_mismatch_before_building_the_model(env, tmp_path, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("the model must not be built for a bad data set / task pair")

    monkeypatch.setattr(tool, "build_model", no_build)
    with pytest.raises(ValueError, match="use --task ov_instance"):
        tool.cli(["--config-file", TINY, "--task", "ov_semantic", "--dataset", "ade20k_instance_val_psalm",
                  "--output", str(tmp_path), "--datasets-root", env["root"], *env["opts"]])


# ----------------------------------------------------------------------------- distributed
@pytest.mark.slow
@pytest.mark.parametrize("task,dataset,key", [("davis", "davis17_val", "davis"), ("grefcoco", "grefcoco_val", "gres")])
def test_two_processes_match_one(env, tmp_path, task, dataset, key):
    """--num-gpus 2 (gloo CPU processes): videos / samples are split over ranks and gathered."""
    import subprocess
    import sys

    argv = ["--config-file", TINY, "--task", task, "--dataset", dataset, "--datasets-root", env["root"]]
    opts = [*env["opts"], "MODEL.WEIGHTS", env["weights"]]
    env_vars = dict(os.environ, OMP_NUM_THREADS="1")
    script = str(REPO_ROOT / "tools" / "eval_zero_shot.py")
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        subprocess.run([sys.executable, script, *argv, "--output", str(out), "--num-gpus", str(n), *opts],
                       check=True, cwd=str(REPO_ROOT), env=env_vars, timeout=300)
    one = json.loads((tmp_path / "n1" / f"results_{task}_{dataset}.json").read_text())["results"][key]
    two = json.loads((tmp_path / "n2" / f"results_{task}_{dataset}.json").read_text())["results"][key]
    assert one == pytest.approx(two, nan_ok=True)


# ----------------------------------------------------------------------------- one evaluation path
def _train_net():
    spec = importlib.util.spec_from_file_location("train_net", REPO_ROOT / "tools" / "train_net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record_inference(monkeypatch):
    """Wrap PSALM.inference: record (batch size, autocast dtype or None) of every call."""
    calls = []
    original = PSALM.inference

    def inference(self, batched_inputs, image_features=None):
        on = torch.is_autocast_enabled("cpu")
        calls.append((len(batched_inputs), torch.get_autocast_dtype("cpu") if on else None))
        return original(self, batched_inputs, image_features=image_features)

    monkeypatch.setattr(PSALM, "inference", inference)
    return calls


def test_train_net_and_eval_zero_shot_give_identical_metrics(env, tmp_path, monkeypatch):
    """The same checkpoint through tools/train_net.py --eval-only and tools/eval_zero_shot.py: the same
    precision (TEST.PSALM.DTYPE, here bf16 autocast), the same batches (TEST.PSALM.IMS_PER_BATCH) and
    identical metrics."""
    calls = _record_inference(monkeypatch)
    common = ["TEST.PSALM.DTYPE", "bf16", "TEST.PSALM.IMS_PER_BATCH", "2"]
    argv = ["--config-file", TINY, "--task", "grefcoco", "--dataset", "grefcoco_val", "--output",
            str(tmp_path / "zs"), "--datasets-root", env["root"], *env["opts"], *common, "MODEL.WEIGHTS", env["weights"]]
    zero_shot = tool.cli(argv)
    zs_calls, calls[:] = list(calls), []

    train_net = _train_net()
    args = train_net.default_argument_parser().parse_args(
        ["--eval-only", "--config-file", TINY, *env["opts"], *common, "MODEL.WEIGHTS", env["weights"],
         "DATASETS.TEST", '("grefcoco_val",)', "DATASETS.TEST_TASKS", '["gres"]', "OUTPUT_DIR", str(tmp_path / "tn")])
    trained = train_net.main(args)
    assert zs_calls and calls == zs_calls
    assert {dtype for _, dtype in calls} == {torch.bfloat16}
    assert max(n for n, _ in calls) == 2
    assert trained["gres"] == zero_shot["gres"]
    assert json.loads((tmp_path / "tn" / "results.json").read_text())["gres"] == pytest.approx(
        json.loads((tmp_path / "zs" / "results_grefcoco_grefcoco_val.json").read_text())["results"]["gres"],
        nan_ok=True)


def test_batched_evaluation_matches_batch_one(env, tmp_path):
    one = tool.cli(["--config-file", TINY, "--task", "grefcoco", "--dataset", "grefcoco_val", "--output",
                    str(tmp_path / "b1"), "--datasets-root", env["root"], *env["opts"], "TEST.PSALM.IMS_PER_BATCH",
                    "1", "MODEL.WEIGHTS", env["weights"]])
    three = tool.cli(["--config-file", TINY, "--task", "grefcoco", "--dataset", "grefcoco_val", "--output",
                      str(tmp_path / "b3"), "--datasets-root", env["root"], *env["opts"], "TEST.PSALM.IMS_PER_BATCH",
                      "3", "MODEL.WEIGHTS", env["weights"]])
    assert three["gres"] == pytest.approx(one["gres"], rel=1e-4, abs=1e-3, nan_ok=True)


def test_empty_weights_are_refused_by_both_tools(env, tmp_path):
    cfg = get_psalm_cfg(TINY, env["opts"] + ["MODEL.WEIGHTS", "", "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty.*--allow-missing-keys"):
        tool.build_model(cfg)
    assert not tool.build_model(cfg, allow_missing_keys=True).training
    train_net = _train_net()
    args = train_net.default_argument_parser().parse_args(
        ["--eval-only", "--config-file", TINY, *env["opts"], "DATASETS.TEST", '("grefcoco_val",)',
         "DATASETS.TEST_TASKS", '["gres"]', "OUTPUT_DIR", str(tmp_path / "tn")])
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty.*--allow-missing-keys"):
        train_net.main(args)
