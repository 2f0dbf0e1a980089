"""Mapper on psalm's synthetic scenes, the metrics of spec B6 (i) and PerBench loaders on files written in the
official formats, and a few training iterations through train_net.py."""
import json
import sys
import types

import numpy as np
import pytest
import torch

from pixelsail_testing import PROJECT


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    import psalm.data.synthetic as syn
    from psalm.data.datasets.synthetic import register_synthetic

    root = str(tmp_path_factory.mktemp("pixelsail_syn"))
    spec = syn.SyntheticSpec(num_train=6, num_val=3, num_test=2) if "num_test" in syn.SyntheticSpec.__dataclass_fields__ \
        else syn.SyntheticSpec(num_train=6, num_val=3)
    syn.prepare_synthetic(root, spec)
    register_synthetic(root, spec)
    return root, spec


def _mapper(cfg, name, task, train):
    from pixel_sail.data import PixelSAILDatasetMapper

    return PixelSAILDatasetMapper(cfg, train, name, task)


def test_mapper_referring_gres(tiny_cfg, synthetic):
    from detectron2.data import DatasetCatalog

    d = DatasetCatalog.get("psalm_synthetic_train_gres")
    no_t = next(x for x in d if x["no_target"])
    out = _mapper(tiny_cfg, "psalm_synthetic_train_gres", "gres", True)(no_t, np.random.default_rng(0))
    assert out["turns"][0][1] == "No target [SEG]." and out["gt_masks"].shape[0] == len(out["turns"])
    assert out["gt_masks"][0].sum() == 0
    refs = DatasetCatalog.get("psalm_synthetic_train_referring")
    ref = refs[0]
    same_image = [r for r in refs if r["image_id"] == ref["image_id"]]
    out = _mapper(tiny_cfg, "psalm_synthetic_train_referring", "referring", True)(ref, np.random.default_rng(0))
    # the sample's expression first, then other expressions of the same image (one dialogue, one [SEG] each)
    assert out["turns"][0] == (f"Please segment {ref['sentences'][0]} in this image.", "It is [SEG].")
    assert len(out["turns"]) == min(len(same_image), 5) > 1
    assert out["gt_masks"].shape == (len(out["turns"]), *out["pixel_values"].shape[-2:])
    others = {f"Please segment {r['sentences'][0]} in this image." for r in same_image}
    assert all(q in others for q, _ in out["turns"])
    one = _mapper(tiny_cfg.clone(), "psalm_synthetic_train_referring", "referring", True)
    one.by_image = None
    assert len(one(ref, np.random.default_rng(0))["turns"]) == 1
    assert out["sample_id"] == ref["sample_id"]
    ev = _mapper(tiny_cfg, "psalm_synthetic_train_referring", "referring", False)(ref)
    assert "turns" not in ev and ev["question"].startswith("Please segment")


def test_mapper_visual_prompts_sorted_and_numbered(tiny_cfg, synthetic):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = "psalm_synthetic_val_interactive_mask"
    d = DatasetCatalog.get(name)[0]
    out = _mapper(tiny_cfg, name, "interactive", False)(d)
    R = len(out["region_ann_indices"])
    assert R == min(len(d["annotations"]), tiny_cfg.MODEL.PIXEL_SAIL.NUM_VISUAL_PROMPTS)
    areas = out["vp_patch_masks"].flatten(1).sum(1)
    assert (areas[:-1] >= areas[1:]).all()  # largest first: smaller prompts overwrite
    assert sorted(out["vp_ids"]) == list(range(R))
    assert out["questions"][0] == "What is the category of the region marked by <Prompt0>?"
    tr = _mapper(tiny_cfg, "psalm_synthetic_train_interactive", "interactive", True)(
        DatasetCatalog.get("psalm_synthetic_train_interactive")[0], np.random.default_rng(1))
    names = MetadataCatalog.get("psalm_synthetic_train_interactive").thing_classes
    assert all(a[:-1] in names for _, a in tr["turns"]) and tr["gt_masks"] is None


def test_mapper_vp_negative_and_panoptic_modes(tiny_cfg, synthetic):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    cfg = tiny_cfg.clone()
    cfg.MODEL.PIXEL_SAIL.DATA.VP_NEGATIVE_RATIO = 1.0
    name = "psalm_synthetic_train_interactive"
    d = DatasetCatalog.get(name)[0]
    out = _mapper(cfg, name, "interactive", True)(d, np.random.default_rng(0))
    q, a = out["turns"][-1]
    j = int(q.split("<Prompt")[1].split(">")[0])
    assert a == f"<Prompt{j}> is not in the image." and j not in out["vp_ids"]
    inst_name = "psalm_synthetic_train_instance"
    d = DatasetCatalog.get(inst_name)[0]
    out = _mapper(tiny_cfg, inst_name, "instance", True)(d, np.random.default_rng(0))
    names = MetadataCatalog.get(inst_name).thing_classes
    n_seg = sum(a.count("[SEG]") for _, a in out["turns"])
    assert n_seg == len(out["gt_masks"]) == len(d["annotations"])
    q, a = out["turns"][0]
    assert q.endswith("Segmentation in the instance mode.") and a.startswith(f"{q.split('the ')[1].split(' in')[0]}-1 [SEG]")
    assert all(q.split("the ")[1].split(" in this")[0] in names for q, _ in out["turns"])
    sem_name = "psalm_synthetic_train_semantic"
    d = DatasetCatalog.get(sem_name)[0]
    out = _mapper(tiny_cfg, sem_name, "semantic", True)(d, np.random.default_rng(0))
    assert all(a.endswith(" [SEG].") and q.endswith("semantic mode.") for q, a in out["turns"])
    assert len(out["gt_masks"]) == len(out["turns"]) >= 2  # wall, floor and shapes
    assert out["gt_masks"].sum(0).max() == 1  # semantic masks do not overlap


def test_vp_category_evaluator(tiny_cfg, synthetic):
    from detectron2.data import DatasetCatalog

    from pixel_sail.evaluation import VPCategoryEvaluator

    name = "psalm_synthetic_val_interactive_mask"
    recs = DatasetCatalog.get(name)
    ev = VPCategoryEvaluator(name, distributed=False)
    ev.reset()
    names = ev.metadata.thing_classes
    inputs, outputs = [], []
    for r in recs:
        gt = [names[a["category_id"]] for a in r["annotations"]]
        texts = [f"It is a {g}." for g in gt]
        texts[0] = "I do not know."  # one unparsed answer per sample
        inputs.append({"sample_id": r["sample_id"], "region_ann_indices": list(range(len(gt)))})
        outputs.append({"region_texts": texts})
    ev.process(inputs, outputs)
    res = ev.evaluate()["vp_category"]
    total = sum(len(r["annotations"]) for r in recs)
    assert res["num_regions"] == total and res["unparsed"] == len(recs)
    assert res["accuracy"] == pytest.approx(100.0 * (total - len(recs)) / total)


# ----------------------------------------------------------------------------------- (i) metrics
@pytest.mark.parametrize("text,expected", [("B", "B"), ("(C) a red car", "C"), ("The answer is D.", "D"),
                                           ("Answer: b", "B"), ("A.", "A"), ("A dog is there", None),
                                           ("I cannot tell", None), ("Option (c)", "C")])
def test_mcq_option_parsing(text, expected):
    from pixel_sail.evaluation import parse_option

    assert parse_option(text) == expected


def test_mcq_accuracy_not_substring():
    from pixel_sail.evaluation import mcq_accuracy

    # official: correct if the GT letter is a substring ("A" is in "A dog ..."); ours: parsed option only
    res = mcq_accuracy(["A dog sits on the mat, answer B", "C", "nothing"], ["B", "C", "A"])
    assert res["accuracy"] == pytest.approx(200 / 3) and res["unparsed"] == 1


def test_meteor_argument_order(monkeypatch):
    """nltk's meteor_score(references, hypothesis): the references come first (the official script swaps them)."""
    calls = []
    fake = types.ModuleType("nltk.translate.meteor_score")
    fake.meteor_score = lambda refs, hyp: calls.append((refs, hyp)) or 0.5
    for mod in ("nltk", "nltk.translate"):
        monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
    monkeypatch.setitem(sys.modules, "nltk.translate.meteor_score", fake)
    from pixel_sail.evaluation import corpus_meteor

    assert corpus_meteor([["A red Circle", "a round red shape"]], ["the red circle"]) == pytest.approx(50.0)
    assert calls == [([["a", "red", "circle"], ["a", "round", "red", "shape"]], ["the", "red", "circle"])]


def test_vres_counts_every_gt_and_sample():
    from pixel_sail.evaluation import vres_metrics

    g1 = np.zeros((4, 4), bool)
    g1[:2] = True
    g2 = np.zeros((4, 4), bool)
    g2[2:, :2] = True
    res = vres_metrics([[g1], None], [[g1, g2], [g2]])
    # sample 1: g1 exact (I 8, U 8), g2 missing prediction (I 0, U 4); sample 2 nothing predicted (I 0, U 4)
    assert res["cIoU"] == pytest.approx(100 * 8 / 16) and res["gIoU"] == pytest.approx(100 / 3)
    assert res["num_masks"] == 3 and res["num_samples"] == 2


def _rle(mask):
    from psalm.data.visual_prompts import encode_rle

    r = encode_rle(mask)
    return {"size": r["size"], "counts": r["counts"].decode() if isinstance(r["counts"], bytes) else r["counts"]}


def test_perbench_loaders_official_formats(tmp_path):
    from pixel_sail.evaluation import load_perbench_caption, load_perbench_mcq, load_perbench_vres

    m = np.zeros((6, 8), bool)
    m[1:3, 2:5] = True
    n = ~m
    (tmp_path / "cap.json").write_text(json.dumps([{"image_name": "sa_1.jpg", "object_annotations": [
        {"segmentation": _rle(m), "caption": "A small box."}]}]))
    (tmp_path / "mcq.json").write_text(json.dumps([{"image_name": "sa_1.jpg", "mcqs": [
        {"object": _rle(m), "question": "What colour? (A) red (B) blue. ", "answer": "B"}]}]))
    (tmp_path / "vres.json").write_text(json.dumps([{"image_name": "sa_2.jpg", "question": "What holds <obj1>?",
                                                     "answer": "The <obj2>.", "segmentations": {"<obj1>": _rle(m), "<obj2>": _rle(n)}}]))
    cap = load_perbench_caption(str(tmp_path / "cap.json"))
    assert cap[0]["caption"] == "A small box." and np.array_equal(cap[0]["prompt_mask"], m)
    assert "<Prompt0>" in cap[0]["question"]
    mcq = load_perbench_mcq(str(tmp_path / "mcq.json"))
    assert mcq[0]["question"].endswith("(B) blue. Select a correct choice.") and mcq[0]["answer"] == "B"
    v = load_perbench_vres(str(tmp_path / "vres.json"))[0]
    assert v["question"] == "What holds <Prompt0>?"
    assert np.array_equal(v["prompt_masks"][0], m) and np.array_equal(v["gt_masks"][0], n)
    (tmp_path / "bad.json").write_text(json.dumps([{"image_name": "x"}]))
    with pytest.raises(ValueError, match="lacks"):
        load_perbench_mcq(str(tmp_path / "bad.json"))


# ----------------------------------------------------------------------------------- training
def test_train_net_few_iterations(tmp_path, synthetic, tiny_tokenizer_dir):
    """train_net.py: a few iterations on the synthetic referring / gres / visual-prompt tasks, a
    checkpoint, then evaluation through psalm's referring evaluator and the VP-category evaluator."""
    import importlib.util

    root, spec = synthetic
    spec_mod = importlib.util.spec_from_file_location("pixel_sail_train_net", PROJECT / "train_net.py")
    train_net = importlib.util.module_from_spec(spec_mod)
    spec_mod.loader.exec_module(train_net)
    opts = ["DATASETS.SYNTHETIC.ROOT", root, "DATASETS.SYNTHETIC.NUM_TRAIN", spec.num_train,
            "DATASETS.SYNTHETIC.NUM_VAL", spec.num_val, "MODEL.PIXEL_SAIL.TOKENIZER", tiny_tokenizer_dir,
            "SOLVER.MAX_ITER", 3, "SOLVER.IMS_PER_BATCH", 2, "SOLVER.WARMUP_ITERS", 0, "OUTPUT_DIR", str(tmp_path),
            "MODEL.PIXEL_SAIL.LLM.HIDDEN_SIZE", 64, "MODEL.PIXEL_SAIL.LLM.NUM_HIDDEN_LAYERS", 2,
            "MODEL.PIXEL_SAIL.TEST.MAX_NEW_TOKENS", 4, "MODEL.PIXEL_SAIL.LOSS.NUM_POINTS", 64]
    if hasattr(spec, "num_test"):
        opts += ["DATASETS.SYNTHETIC.NUM_TEST", spec.num_test]
    args = types.SimpleNamespace(config_file=str(PROJECT / "configs" / "tiny" / "pixelsail_synthetic.yaml"),
                                 opts=opts, eval_only=False, resume=False, num_gpus=1, num_machines=1, machine_rank=0)
    results = train_net.main(args)
    assert (tmp_path / "model_final.pth").is_file()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    train = [m for m in metrics if "total_loss" in m]
    assert train[-1]["iteration"] == 2 and np.isfinite(train[-1]["total_loss"])
    assert set(results) == {"psalm_synthetic_val_referring", "psalm_synthetic_val_interactive_mask"}
    assert "cIoU" in results["psalm_synthetic_val_referring"]["referring"]
    assert results["psalm_synthetic_val_interactive_mask"]["vp_category"]["num_regions"] > 0
    ckpt = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert "vis_embed.weight" in ckpt["model"] and not any("teacher" in k for k in ckpt["model"])
