"""The semantic-segmentation member of PixelLM's training mixture (official ``sem_seg``, spec A2.2):
label maps -> multi-target class questions, the shared allocation / templates, errors, and the
mixture loader feeding the tiny model."""
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pixellm_tiny.yaml"
GROUP = " ".join(f"[SEG{i}]" for i in range(6))
CLASSES = ["wall,walls,brick wall", "floor", "Circle", "square", "sky", "tree"]

# the official short templates written out (utils/utils.py), "{c}" = joined phrases
QUESTIONS = ["Can you segment the {c} in this image?", "Please segment the {c} in this image.",
             "What is {c} in this image? Please respond with segmentation mask.",
             "What is {c} in this image? Please output segmentation mask."]
ONE = ["It is {seg}.", "Sure, {seg}.", "Sure, it is {seg}.", "Sure, the segmentation result is {seg}.", "{seg}."]


def _expected_multi_answers(phrases):
    """Every answer the official code can write for >= 2 targets (with {seg} placeholders)."""
    low = [p.lower() for p in phrases]
    listed = ", ".join(low[:-1]) + " and " + low[-1]
    segs = ", ".join(["{seg}"] * (len(phrases) - 1)) + " and {seg}"
    each = []
    for tpl in ["{c} is {seg}", "The segmentation result of {c} is {seg}", "{seg}"]:
        parts = [tpl.replace("{c}", p) for p in phrases]
        each.append(", ".join(parts[:-1]) + " and " + parts[-1] + ".")
    together = [t.replace("{c}", listed).replace("{seg}", segs) for t in [
        "{c} are {seg}, separately.", "{c} are {seg}.", "Sure, {c} are {seg}, separately.", "Sure, {c} are {seg}.",
        "the segmentation result of {c} are {seg}.", "the segmentation result of {c} are {seg}, separately.",
        "Sure, the segmentation result of {c} are {seg}.", "Sure, the segmentation result of {c} are {seg}, separately.",
        "Sure, they are {seg}.", "They are {seg}.", "{seg}."]]
    return set(each), set(together)


@pytest.fixture(scope="module")
def tiny_model(pixellm_tok_dir):
    from pixellm import get_pixellm_cfg
    from pixellm.modeling.meta_arch import PixelLM

    torch.manual_seed(0)
    return PixelLM(get_pixellm_cfg(str(CONFIG), ["MODEL.PIXELLM.TOKENIZER", str(pixellm_tok_dir)])).eval()


def _write(tmp_path, name, label, seed=0):
    """An RGB image and its label map (uint8 [H, W]) under tmp_path; returns the semantic dict."""
    h, w = label.shape
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    Image.fromarray(label.astype(np.uint8)).save(tmp_path / f"{name}_label.png")
    return {"file_name": str(tmp_path / f"{name}.png"), "sem_seg_file_name": str(tmp_path / f"{name}_label.png"),
            "task": "semantic", "image_id": name}


def _four_class_label():
    """[16, 12]: classes 0 (wall), 2 (Circle), 3 (square), 5 (tree) and an ignore (255) band."""
    label = np.full((16, 12), 255, np.uint8)
    label[:4] = 0
    label[4:8, :6] = 2
    label[4:8, 6:] = 3
    label[8:13] = 5
    return label  # rows 13..15: ignore


def _item(d, classes=CLASSES, ignore=255):
    from pixellm.data.datasets import training_items

    return training_items([d], "test_semantic", {"stuff_classes": classes, "ignore_label": ignore, "task": "semantic"})[0]


# ------------------------------------------------------------------ shared allocation and templates
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 10, 15])
def test_allocation_is_the_official_rule(n):
    from pixellm.data.muse import allocate_targets

    seen = set()
    for seed in range(30):
        groups = allocate_targets(n, np.random.default_rng(seed))
        assert groups == allocate_targets(n, np.random.default_rng(seed))  # deterministic given the rng
        flat = [j for g in groups for j in g]
        assert len(groups) == min(3, n) and all(1 <= len(g) <= 3 for g in groups)
        assert len(flat) == len(set(flat)) == min(n, 9) and all(0 <= j < n for j in flat)
        seen.add(tuple(map(tuple, groups)))
        if n == 4:
            assert sorted(len(g) for g in groups) == [1, 1, 2]
        if n >= 9:
            assert [len(g) for g in groups] == [3, 3, 3]
    assert n == 1 or len(seen) > 1  # random allocations
    assert allocate_targets(0, np.random.default_rng(0)) == []


def test_short_question_answer_templates():
    from pixellm.data.muse import short_question_answer

    each, together = _expected_multi_answers(["Wall", "floor", "sky"])
    questions = {q.replace("{c}", "wall, floor and sky") for q in QUESTIONS}
    got_q, got_a = set(), set()
    for seed in range(300):
        q, a = short_question_answer(["Wall", "floor", "sky"], np.random.default_rng(seed))
        assert q in questions and a in each | together and a.count("{seg}") == 3
        got_q.add(q), got_a.add(a)
    assert got_q == questions
    assert "Wall is {seg}, floor is {seg} and sky is {seg}." in got_a
    assert "wall, floor and sky are {seg}, {seg} and {seg}, separately." in got_a
    assert got_a & each and got_a & together  # both answer styles are drawn
    one = {short_question_answer(["the Sky"], np.random.default_rng(s)) for s in range(100)}
    assert {a for _, a in one} == set(ONE)
    assert {q for q, _ in one} == {q.replace("{c}", "the sky") for q in QUESTIONS}
    assert short_question_answer(["a", "b"], np.random.default_rng(5)) == \
        short_question_answer(["a", "b"], np.random.default_rng(5))


def test_referring_conversion_uses_the_same_allocation_and_templates():
    from pixellm.data.muse import allocate_targets, multi_target_from_referring

    refs = [{"file_name": "a.png", "height": 4, "width": 4, "image_id": 1, "sentences": [f"obj {i}"],
             "annotations": [{"segmentation": {"size": [4, 4], "counts": "04"}, "id": i}]} for i in range(5)]
    for seed in range(10):
        out = multi_target_from_referring(refs, np.random.default_rng(seed))[0]
        groups = allocate_targets(5, np.random.default_rng(seed))
        assert [[t["id"] for t in ts] for ts in out["targets"]] == groups
        assert out["question_template"] == "<image>\n{sent}"
        for q, ts, a in zip(out["questions"], out["targets"], out["text_answers"]):
            names = [t["name"] for t in ts]
            listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
            assert q in {t.replace("{c}", listed) for t in QUESTIONS}
            assert a.count("{seg}") == len(ts)


# ------------------------------------------------------------------ semantic conversion
def test_semantic_targets_masks_and_questions(tmp_path):
    from pixellm.data.muse import allocate_targets, multi_target_from_semantic

    label = _four_class_label()
    item = _item(_write(tmp_path, "a", label))
    present = [0, 2, 3, 5]
    phrase = {0: "wall", 2: "Circle", 3: "square", 5: "tree"}
    allocations = set()
    for seed in range(12):
        out = multi_target_from_semantic(item, np.random.default_rng(seed))
        assert (out["height"], out["width"]) == (16, 12) and out["file_name"] == item["file_name"]
        groups = [[present[j] for j in g] for g in allocate_targets(4, np.random.default_rng(seed))]
        assert [[t["category_id"] for t in ts] for ts in out["targets"]] == groups
        assert sorted(c for g in groups for c in g) == present  # every class asked once, 255 never
        allocations.add(tuple(map(tuple, groups)))
        each_q = len(out["questions"]) == len(out["targets"]) == len(out["text_answers"]) == 3
        assert each_q and out["question_template"] == "<image>\n{sent}"
        for q, ts, a in zip(out["questions"], out["targets"], out["text_answers"]):
            names = [phrase[t["category_id"]] for t in ts]
            assert [t["name"] for t in ts] == names
            listed = (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]).lower()
            assert q in {t.replace("{c}", listed) for t in QUESTIONS}
            if len(names) == 1:
                assert a in ONE
            else:
                each, together = _expected_multi_answers(names)
                assert a in each | together
            for t in ts:
                assert t["mask"].dtype == bool and np.array_equal(t["mask"], label == t["category_id"])
        again = multi_target_from_semantic(item, np.random.default_rng(seed))
        assert again["questions"] == out["questions"] and again["text_answers"] == out["text_answers"]
        assert all(np.array_equal(x["mask"], y["mask"]) for tx, ty in zip(out["targets"], again["targets"])
                   for x, y in zip(tx, ty))
    assert len(allocations) > 1


def test_semantic_at_most_three_questions_of_three(tmp_path):
    from pixellm.data.muse import multi_target_from_semantic

    label = np.repeat(np.repeat(np.arange(12, dtype=np.uint8).reshape(4, 3), 4, 0), 4, 1)  # 12 classes, [16, 12]
    label[0, 0] = 255
    item = _item(_write(tmp_path, "b", label), classes=[f"class {i}" for i in range(12)])
    for seed in range(30):
        out = multi_target_from_semantic(item, np.random.default_rng(seed))
        ids = [t["category_id"] for ts in out["targets"] for t in ts]
        assert [len(ts) for ts in out["targets"]] == [3, 3, 3]
        assert len(set(ids)) == 9 and set(ids) <= set(range(12))
        for ts in out["targets"]:
            for t in ts:
                assert np.array_equal(t["mask"], label == t["category_id"]) and not t["mask"][0, 0]


def test_semantic_errors(tmp_path):
    from pixellm.data.datasets import training_items
    from pixellm.data.muse import multi_target_from_semantic

    d = _write(tmp_path, "c", _four_class_label())
    with pytest.raises(ValueError, match="no 'stuff_classes'"):
        training_items([d], "sem_x", {"task": "semantic", "ignore_label": 255})
    no_file = {k: v for k, v in d.items() if k != "sem_seg_file_name"}
    with pytest.raises(ValueError, match="1 dicts have no 'sem_seg_file_name'.*dict 1"):
        training_items([d, no_file], "sem_x", {"task": "semantic", "stuff_classes": CLASSES})
    with pytest.raises(ValueError, match="has no 'sem_seg_file_name'"):
        multi_target_from_semantic(dict(no_file, stuff_classes=CLASSES), np.random.default_rng(0))
    with pytest.raises(ValueError, match="has no 'stuff_classes'"):
        multi_target_from_semantic(d, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"label values \[5\] are neither class indices \(0..3\)"):
        multi_target_from_semantic(dict(d, stuff_classes=CLASSES[:4]), np.random.default_rng(0))
    with pytest.raises(ValueError, match="semantic"):  # an unknown kind names the accepted ones
        training_items([{"file_name": "x.png"}], "unknown_x", {})
    # the kind comes from the dicts' task or from the metadata's
    items = training_items([{k: v for k, v in d.items() if k != "task"}], "sem_y",
                           {"task": "semantic", "stuff_classes": CLASSES})
    assert items[0]["task"] == "semantic" and items[0]["stuff_classes"] == tuple(CLASSES)
    assert items[0]["ignore_label"] == 255


def test_all_ignore_label_map_gives_no_sample_and_the_loader_redraws(tmp_path, tiny_model):
    from pixellm.data.datasets import PixelLMTrainLoader, training_items
    from pixellm.data.mapper import PixelLMDatasetMapper
    from pixellm.data.muse import multi_target_from_semantic

    empty = _write(tmp_path, "empty", np.full((16, 12), 255, np.uint8))
    good = _write(tmp_path, "good", _four_class_label())
    items = training_items([empty, good], "sem_z", {"task": "semantic", "stuff_classes": CLASSES, "ignore_label": 255})
    assert multi_target_from_semantic(items[0], np.random.default_rng(0)) is None
    mapper = PixelLMDatasetMapper(tiny_model.tokenizer, 56)
    assert mapper(items[0], np.random.default_rng(0)) is None
    batch = next(iter(PixelLMTrainLoader([items], [1.0], mapper, ims_per_batch=4, seed=1)))
    assert len(batch) == 4 and {x["file_name"] for x in batch} == {good["file_name"]}


def test_mapper_semantic_answers_and_masks_in_answer_order(tmp_path, tiny_model):
    from pixellm.data.mapper import PixelLMDatasetMapper
    from pixellm.data.muse import multi_target_from_semantic
    from pixellm.data.prompt import build_conversation, tokenize_conversation

    label = _four_class_label()
    item = _item(_write(tmp_path, "d", label))
    tok = tiny_model.tokenizer
    mapper = PixelLMDatasetMapper(tok, 56)
    for seed in range(4):
        x = mapper(item, np.random.default_rng(seed))
        ref = multi_target_from_semantic(item, np.random.default_rng(seed))
        assert x["questions"] == ref["questions"] and len(x["input_ids"]) == len(ref["questions"])
        for q, a, ids, labels in zip(ref["questions"], ref["text_answers"], x["input_ids"], x["labels"]):
            conv = build_conversation("<image>\n" + q, a.replace("{seg}", GROUP), eos_token=tok.eos_token)
            assert "USER: <im_start><image><im_end>\n" + q + " ASSISTANT: " in conv
            ref_ids, ref_labels = tokenize_conversation(tok, conv)
            assert torch.equal(ids, ref_ids) and torch.equal(labels, ref_labels)
        order = [t["category_id"] for ts in ref["targets"] for t in ts]
        assert x["target_names"] == [[t["name"] for t in ts] for ts in ref["targets"]]
        assert x["gt_masks"].shape == (len(order), 16, 12)
        expected = torch.from_numpy(np.stack([label == c for c in order]))
        assert torch.equal(x["gt_masks"], expected)
        groups = sum(int((i == tiny_model.codebook_ids[0]).sum()) for i in x["input_ids"])
        assert groups == len(order) == 4


def test_mixture_with_semantic_member_trains_the_tiny_model(tmp_path, pixellm_tok_dir, tiny_model):
    from pixellm import get_pixellm_cfg
    from pixellm.engine import PixelLMTrainer

    root = tmp_path / "data"
    cfg = get_pixellm_cfg(str(CONFIG), [
        "MODEL.PIXELLM.TOKENIZER", str(pixellm_tok_dir), "DATASETS.SYNTHETIC.ROOT", str(root),
        "DATASETS.SYNTHETIC.NUM_TRAIN", "4", "DATASETS.SYNTHETIC.NUM_VAL", "1", "DATASETS.SYNTHETIC.NUM_TEST", "1",
        "DATASETS.TRAIN", '("psalm_synthetic_train_semantic", "pixellm_synthetic_muse_train")',
        "DATASETS.TEST", '("pixellm_synthetic_muse_val",)', "DATASETS.TRAIN_RATIOS", "[2.0, 4.0]",
        "SOLVER.IMS_PER_BATCH", "2"])
    loader = PixelLMTrainer.build_train_loader(cfg)
    from detectron2.data import MetadataCatalog

    classes = MetadataCatalog.get("psalm_synthetic_train_semantic").stuff_classes
    assert classes == ["circle", "square", "triangle", "diamond", "wall", "floor"]
    it = iter(loader)
    semantic = None
    tiny_model.train()
    try:
        for _ in range(12):
            batch = next(it)
            for x in batch:
                groups = sum(int((i == tiny_model.codebook_ids[0]).sum()) for i in x["input_ids"])
                assert groups == x["gt_masks"].shape[0] >= 1
            # psalm's synthetic images lie under <root>/train/images, the MUSE ones under <root>/pixellm_muse
            sem = [x for x in batch if x["file_name"].startswith(str(root / "train" / "images"))]
            if sem:
                semantic = sem[0]
                losses = tiny_model.losses(batch)
                break
    finally:
        tiny_model.eval()
    assert semantic is not None, "no semantic sample in 12 batches (ratio 2:4)"
    names = {n for ns in semantic["target_names"] for n in ns}
    assert names and names <= set(classes)
    label = np.asarray(Image.open(semantic["file_name"].replace("/images/", "/semantic/")))
    flat = [classes.index(n) for ns in semantic["target_names"] for n in ns]
    assert torch.equal(semantic["gt_masks"], torch.from_numpy(np.stack([label == c for c in flat])))
    assert set(losses) >= {"loss_ce", "loss_mask", "loss_dice"}
    assert all(torch.isfinite(v.detach()) for v in losses.values()) and float(losses["loss_mask"].detach()) > 0
