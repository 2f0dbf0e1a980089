"""A class list longer than the language model's context (LVIS: 1203 names): training samples a class
subset per image, inference runs class chunks merged by score (issue #14). A long tiny vocabulary
with a short context plays LVIS here."""
import numpy as np
import pytest
import torch

from psalm.config import get_psalm_cfg
from psalm.data.class_budget import ClassContextBudget, LazyClassBudget
from psalm.inference.class_chunks import model_class_budget
from psalm.modeling.meta_arch import build_psalm_model

S = 256
CONTEXT = 300  # tiny config: 16 image tokens + 10 mask tokens + ~150 prompt ids leave ~130 for names
NAMES = [f"class number {i} {'x' * (i % 5)}" for i in range(60)]  # ~6 ids each: ~400 ids, > the context


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from psalm.data.tokenizer import save_tiny_tokenizer

    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"), num_merges=128)


def _cfg(tokenizer_dir, *opts):
    return get_psalm_cfg("configs/tiny/Base-PSALM-tiny.yaml", [
        "MODEL.PSALM.TOKENIZER", str(tokenizer_dir), "MODEL.DEVICE", "cpu", "MODEL.PSALM.MODEL_MAX_LENGTH", CONTEXT,
        "MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE", 25, *opts])


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    torch.manual_seed(0)
    return build_psalm_model(_cfg(tokenizer_dir)).eval()


def _input(task, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    pm = torch.ones(S, S, dtype=torch.bool)
    pm[:192, :] = False
    return {"image": torch.randint(0, 256, (3, S, S), dtype=torch.uint8, generator=g), "padding_mask": pm,
            "height": 96, "width": 128, "task": task, "class_names": list(names),
            "is_thing": [i % 3 != 0 for i in range(len(names))]}


def test_budget_is_the_spliced_length(model):
    budget = model_class_budget(model, S)
    for names in (NAMES[:3], NAMES[5:17]):
        fwd = model.forward_segmentation([_input("instance", names)])
        assert budget.spliced_length(names) == fwd.sequence.inputs_embeds.shape[1]
    assert not budget.fits(NAMES) and len(budget.chunks(NAMES)) >= 3
    chunks = budget.chunks(NAMES)
    assert sum(chunks, []) == list(range(len(NAMES))) and all(budget.fits([NAMES[k] for k in c]) for c in chunks)


def test_golden_spliced_length_formula(golden_dir):
    """The official panoptic sample: 151 prompt ids -> 190 spliced (golden README)."""
    from psalm.config import get_psalm_cfg as cfg_of
    from psalm.modeling.llm import load_tokenizer
    from psalm.data.prompt import PromptBuilder

    tok = load_tokenizer(golden_dir / "psalm_e2e" / "tokenizer")
    budget = ClassContextBudget(PromptBuilder(tok), 2048, 16, 10, task="panoptic")
    assert budget.spliced_length(["person", "car", "tree-merged"]) == 190
    assert cfg_of().MODEL.PSALM.MODEL_MAX_LENGTH == 2048


@pytest.mark.parametrize("task", ["instance", "panoptic", "semantic"])
def test_long_class_list_runs_in_chunks(model, task):
    """Before: the prompt builder raised 'more than MODEL.PSALM.MODEL_MAX_LENGTH' (half way through an
    evaluation). Now the full list is answered, in its own class ids."""
    inp = _input(task, NAMES)
    out = model([inp])[0]
    k = len(NAMES)
    if task == "semantic":
        assert out["sem_seg"].shape == (k, 96, 128)
        return
    if task == "panoptic":
        pan, info = out["panoptic_seg"]
        assert pan.shape == (96, 128) and all(0 <= s["category_id"] < k for s in info)
        assert out["sem_seg"].shape == (k, 96, 128)
    inst = out["instances"]
    assert 0 < len(inst) <= 25 and inst.pred_classes.max() < k
    assert float(inst.scores.min()) >= 0 and inst.pred_masks.shape[1:] == (96, 128)
    inp["detections_per_image"] = 40  # per data set (LVIS: 300, from its metadata)
    assert len(model([inp])[0]["instances"]) == 40 if task == "instance" else True


def test_chunks_merge_is_each_chunk_forward(model):
    """Each class's semantic map is the one of a forward with that class's chunk alone; with one chunk
    the merge equals the ordinary post-processing exactly."""
    budget = model_class_budget(model, S)
    chunks = budget.chunks(NAMES)
    merged = model([_input("semantic", NAMES)])[0]["sem_seg"]
    for c in chunks:
        alone = model([_input("semantic", [NAMES[k] for k in c])])[0]["sem_seg"]
        torch.testing.assert_close(merged[c], alone, rtol=1e-5, atol=1e-6)
    names = NAMES[:8]
    inp = _input("panoptic", names)
    fwd = model.forward_segmentation([inp])
    single = model.postprocessor(fwd.outputs, [inp])[0]
    one = model.postprocessor.merge_class_chunks(
        inp, [(fwd.outputs["pred_masks"][0], fwd.outputs["pred_class_logits"][0], list(range(8)))])
    assert torch.equal(single["panoptic_seg"][0], one["panoptic_seg"][0]) and single["panoptic_seg"][1] == one["panoptic_seg"][1]
    torch.testing.assert_close(single["sem_seg"], one["sem_seg"])
    assert torch.equal(single["instances"].pred_classes, one["instances"].pred_classes)
    torch.testing.assert_close(single["instances"].scores, one["instances"].scores)


def test_training_samples_a_class_subset_with_the_positives(tokenizer_dir, tmp_path):
    from PIL import Image

    from psalm.data.mapper import PSALMDatasetMapper
    from psalm.data.visual_prompts import encode_rle

    cfg = _cfg(tokenizer_dir)
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "a.png")
    m = np.zeros((48, 64), bool)
    m[5:20, 5:20] = True
    anns = [{"id": i, "segmentation": encode_rle(m), "category_id": c, "iscrowd": 0} for i, c in enumerate((7, 42, 7))]
    d = {"file_name": str(tmp_path / "a.png"), "height": 48, "width": 64, "task": "instance", "annotations": anns}
    budget = LazyClassBudget(cfg)
    mapper = PSALMDatasetMapper(cfg, is_train=True, class_names=NAMES, is_thing=[True] * 60, class_budget=budget)
    seen = set()
    for seed in range(5):
        out = mapper(d, rng=np.random.default_rng(seed))
        names, ids = out["class_names"], out["class_ids"]
        assert budget.get().fits(names) and len(names) < len(NAMES)
        assert 7 in ids and 42 in ids and ids == sorted(ids) and names == [NAMES[k] for k in ids]
        assert [ids[c] for c in out["instances"].gt_classes.tolist()] == [7, 42, 7]
        seen.update(ids)
    assert len(seen) > len(names)  # the negatives change from image to image
    # a list that fits is left alone
    assert budget.get().fits(NAMES[:3])
    out = PSALMDatasetMapper(cfg, is_train=True, class_names=NAMES[:3], class_budget=budget)(
        {**d, "annotations": [dict(anns[0], category_id=2)]}, rng=np.random.default_rng(0))
    assert out["class_names"] == NAMES[:3] and "class_ids" not in out


@pytest.mark.slow  # ~3 min on the shared CPUs: the 1203 names make many 2048-id chunks
def test_lvis_vocabulary_runs_in_training_and_inference(tokenizer_dir, tmp_path):
    """The registered LVIS label space (1203 names) with the default 2048-id context: inference in class
    chunks (300 detections per image from the metadata), training with a subset of the names."""
    from PIL import Image

    from psalm.data.datasets.lvis import lvis_metadata
    from psalm.data.mapper import PSALMDatasetMapper
    from psalm.data.visual_prompts import encode_rle

    meta = lvis_metadata()
    names = meta["prompt_class_names"]
    assert len(names) == 1203 and meta["detections_per_image"] == 300
    cfg = _cfg(tokenizer_dir, "MODEL.PSALM.MODEL_MAX_LENGTH", 2048)
    torch.manual_seed(0)
    model = build_psalm_model(cfg).eval()
    budget = model_class_budget(model, S)
    assert budget.spliced_length(names) > 2048 and len(budget.chunks(names)) > 1
    inp = dict(_input("instance", names), detections_per_image=300)
    inst = model([inp])[0]["instances"]
    assert len(inst) == 300 and int(inst.pred_classes.max()) < 1203
    assert float(inst.scores.min()) >= 0 and inst.pred_masks.shape[1:] == (96, 128)

    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "a.png")
    m = np.zeros((48, 64), bool)
    m[5:20, 5:20] = True
    d = {"file_name": str(tmp_path / "a.png"), "height": 48, "width": 64, "task": "instance",
         "annotations": [{"id": 0, "segmentation": encode_rle(m), "category_id": 1000, "iscrowd": 0}]}
    out = PSALMDatasetMapper(cfg, is_train=True, class_names=names, class_budget=LazyClassBudget(cfg))(
        d, rng=np.random.default_rng(0))
    assert 1000 in out["class_ids"] and budget.fits(out["class_names"]) and 10 < len(out["class_names"]) < 1203
    losses = model.train()([out])
    model.eval()
    assert all(torch.isfinite(v) for v in losses.values())
