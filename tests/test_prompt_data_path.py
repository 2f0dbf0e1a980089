"""Prompts are built in the data path: the mapper tokenises (loader workers), the model only embeds and
splices; one builder (psalm.data.prompt.prompt_for_input) for the mapper and the model's fallback."""

import numpy as np
import pytest
import torch

from psalm.config import get_psalm_cfg
from psalm.data import prompt as prompt_module
from psalm.data.mapper import PSALMDatasetMapper
from psalm.data.prompt import PromptBuilder, TokenizedPrompt, check_prompt_matches, prompt_for_input
from psalm.modeling.meta_arch import build_psalm_model

S = 128
NAMES = ["person", "car", "tree", "sky", "road", "grass", "wall", "water"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from psalm.data.tokenizer import save_tiny_tokenizer

    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"), num_merges=128)


def _cfg(tokenizer_dir, *opts):
    return get_psalm_cfg(
        "configs/tiny/Base-PSALM-tiny.yaml",
        ["MODEL.PSALM.TOKENIZER", str(tokenizer_dir), "MODEL.DEVICE", "cpu", "INPUT.IMAGE_SIZE", S, *opts],
    )


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (96, 120, 3), dtype=np.uint8)


def _box_rle(h, w, box):
    from psalm.data.visual_prompts import encode_rle

    m = np.zeros((h, w), dtype=bool)
    m[box[1] : box[3], box[0] : box[2]] = True
    return encode_rle(m)


def _dict(task, image_id=7, **extra):
    h, w = 96, 120
    d = {"image": _image(image_id), "height": h, "width": w, "task": task, "image_id": image_id}
    if task in ("referring", "gres"):
        d["sentences"] = ["the person in red", "red figure"]
        d["annotations"] = [{"segmentation": _box_rle(h, w, (10, 10, 40, 50)), "category_id": 0, "id": 1}]
    elif task == "interactive":
        d["annotations"] = [
            {"segmentation": _box_rle(h, w, (10, 10, 40, 50)), "category_id": 0, "id": 1,
             "visual_prompts": {"box": _box_rle(h, w, (8, 8, 42, 52))}},
            {"segmentation": _box_rle(h, w, (60, 20, 100, 70)), "category_id": 0, "id": 2,
             "visual_prompts": {"box": _box_rle(h, w, (58, 18, 102, 72))}},
        ]
    elif task == "instance":
        d["annotations"] = [{"segmentation": _box_rle(h, w, (10, 10, 40, 50)), "category_id": 1, "id": 1}]
    d.update(extra)
    return d


def test_mapper_builds_the_prompt_the_model_would_build(tokenizer_dir):
    """Evaluation: the mapped prompt is exactly what the builder gives for the mapped input (same ids,
    same class order, spans), for every kind of task."""
    cfg = _cfg(tokenizer_dir)
    builder = prompt_module.build_prompt_builder(cfg)
    for task, kw in [("instance", {"class_names": NAMES[:3]}), ("referring", {}), ("interactive", {})]:
        out = PSALMDatasetMapper(cfg, is_train=False, task=task, **kw)(_dict(task))
        p = out["prompt"]
        assert isinstance(p, TokenizedPrompt) and p.task == task
        ref = prompt_for_input(builder, out)
        assert torch.equal(p.input_ids, ref.input_ids) and torch.equal(p.labels, ref.labels)
        if task == "instance":
            assert p.class_order.tolist() == list(range(4)) and p.class_names == tuple(NAMES[:3])
        if task == "interactive":
            assert p.num_regions == out["region_masks"].shape[0] == 2
        check_prompt_matches(p, out)  # belongs to its input


def test_training_class_order_comes_from_the_sample_rng(tokenizer_dir):
    """Training shuffles the class order in the mapper from the sample's own RNG: the same seed gives the
    same order (reproducible across workers and resumes), other seeds other orders; the GT is untouched."""
    cfg = _cfg(tokenizer_dir)
    mapper = PSALMDatasetMapper(cfg, is_train=True, task="instance", class_names=NAMES)
    orders = [mapper(_dict("instance"), rng=np.random.default_rng(s))["prompt"].class_order.tolist() for s in range(6)]
    again = mapper(_dict("instance"), rng=np.random.default_rng(0))["prompt"].class_order.tolist()
    assert again == orders[0]
    assert len({tuple(o) for o in orders}) > 1
    assert all(sorted(o) == list(range(len(NAMES) + 1)) for o in orders)
    # SHUFFLE_CLASSES_TRAIN False: the canonical order
    plain = PSALMDatasetMapper(_cfg(tokenizer_dir, "MODEL.PSALM.SHUFFLE_CLASSES_TRAIN", False), is_train=True,
                               task="instance", class_names=NAMES)
    assert plain(_dict("instance"), rng=np.random.default_rng(1))["prompt"].class_order.tolist() == list(range(9))


def test_too_long_prompt_fails_when_mapped_naming_data_set_and_sample(tokenizer_dir):
    cfg = _cfg(tokenizer_dir, "MODEL.PSALM.MODEL_MAX_LENGTH", 200)
    mapper = PSALMDatasetMapper(cfg, is_train=True, task="referring")
    mapper.dataset_name = "my_refcoco_train"
    ok = mapper(_dict("referring"), rng=np.random.default_rng(0))
    assert "prompt" in ok
    long_text = " ".join(["the small person standing on the left of the red car"] * 12)
    with pytest.raises(ValueError, match=r"my_refcoco_train.*sample 42.*after splicing.*MODEL_MAX_LENGTH"):
        mapper(_dict("referring", image_id=42, sentences=[long_text]), rng=np.random.default_rng(0))
    # also when the prompt alone (before splicing: one placeholder per class) is over the limit
    many = PSALMDatasetMapper(cfg, is_train=True, task="instance", class_names=[f"c{i}" for i in range(120)])
    many.dataset_name = "my_lvis_train"
    with pytest.raises(ValueError, match=r"my_lvis_train.*sample 43.*before splicing.*raise the limit"):
        many(_dict("instance", image_id=43), rng=np.random.default_rng(0))


def test_model_uses_the_mapped_prompt_and_does_not_rebuild_it(tokenizer_dir, monkeypatch):
    """A training step on mapped inputs runs no prompt building in the model (prompt_for_input is never
    called there); its losses equal those of the same inputs whose prompts the model builds itself."""
    from psalm.modeling.meta_arch import psalm as psalm_meta

    cfg = _cfg(tokenizer_dir, "MODEL.PSALM.SHUFFLE_CLASSES_TRAIN", False)
    torch.manual_seed(0)
    model = build_psalm_model(cfg).train()
    batches = {
        "instance": [PSALMDatasetMapper(cfg, is_train=True, task="instance", class_names=NAMES[:3])(
            _dict("instance", image_id=i), rng=np.random.default_rng(i)) for i in range(2)],
        "interactive": [PSALMDatasetMapper(cfg, is_train=True, task="interactive")(
            _dict("interactive", image_id=i), rng=np.random.default_rng(i)) for i in range(2)],
    }
    for task, batch in batches.items():
        stripped = [{k: v for k, v in x.items() if k != "prompt"} for x in batch]
        torch.manual_seed(1)
        built_by_model = model(stripped)
        calls = []
        real = psalm_meta.prompt_for_input
        monkeypatch.setattr(psalm_meta, "prompt_for_input", lambda *a, **k: calls.append(1) or real(*a, **k))
        torch.manual_seed(1)
        mapped = model(batch)
        monkeypatch.setattr(psalm_meta, "prompt_for_input", real)
        assert calls == [], task
        assert set(mapped) == set(built_by_model)
        for k in mapped:
            assert torch.equal(mapped[k], built_by_model[k]), (task, k)


def test_a_prompt_that_does_not_belong_to_its_input_is_refused(tokenizer_dir):
    cfg = _cfg(tokenizer_dir)
    torch.manual_seed(0)
    model = build_psalm_model(cfg).eval()
    x = PSALMDatasetMapper(cfg, is_train=False, task="instance", class_names=NAMES[:3])(_dict("instance"))
    y = dict(x, class_names=NAMES[:2], is_thing=[True, True])  # the names changed after mapping
    with pytest.raises(ValueError, match="class names differ.*Drop 'prompt'"):
        model([y])
    r = PSALMDatasetMapper(cfg, is_train=False, task="referring")(_dict("referring"))
    with pytest.raises(ValueError, match="sentences differ"):
        model([dict(r, sentences=["another sentence"])])
    with pytest.raises(ValueError, match="'referring' prompt.*task is 'gres'"):
        model([dict(r, task="gres")])
    with pytest.raises(TypeError, match="TokenizedPrompt"):
        model([dict(r, prompt="the person")])
    # dropping the prompt is the documented way: the model builds it with the same function
    out = model([{k: v for k, v in y.items() if k != "prompt"}])
    assert len(out) == 1 and "instances" in out[0]


def test_evaluation_outputs_are_the_same_with_mapped_or_model_built_prompts(tokenizer_dir):
    cfg = _cfg(tokenizer_dir)
    torch.manual_seed(0)
    model = build_psalm_model(cfg).eval()
    x = PSALMDatasetMapper(cfg, is_train=False, task="referring")(_dict("referring"))
    a = model([x])[0]
    b = model([{k: v for k, v in x.items() if k != "prompt"}])[0]
    assert set(a) == set(b)
    for k in a:
        va, vb = a[k], b[k]
        if torch.is_tensor(va):
            assert torch.equal(va, vb), k


def test_class_lists_over_the_context_are_left_to_the_class_chunks(tokenizer_dir):
    """Evaluation with more names than the context holds: no prompt from the mapper (the model predicts
    in class chunks, each with its own prompt); a list that fits gets its prompt."""
    cfg = _cfg(tokenizer_dir, "MODEL.PSALM.MODEL_MAX_LENGTH", 220)
    many = [f"class number {i}" for i in range(40)]
    over = PSALMDatasetMapper(cfg, is_train=False, task="instance", class_names=many)(_dict("instance"))
    assert "prompt" not in over
    fits = PSALMDatasetMapper(cfg, is_train=False, task="instance", class_names=NAMES[:3])(_dict("instance"))
    assert "prompt" in fits


def test_no_tokenizer_no_prompts_and_an_explicit_request_fails_clearly():
    cfg = get_psalm_cfg("configs/tiny/Base-PSALM-tiny.yaml", ["INPUT.IMAGE_SIZE", S])
    out = PSALMDatasetMapper(cfg, is_train=False, task="referring")(_dict("referring"))
    assert "prompt" not in out
    with pytest.raises(ValueError, match="MODEL.PSALM.TOKENIZER"):
        PSALMDatasetMapper(cfg, is_train=False, task="referring", build_prompts=True)


def test_builder_is_shared_per_tokenizer_and_class_order_is_validated(tokenizer_dir):
    cfg = _cfg(tokenizer_dir)
    b1, b2 = prompt_module.build_prompt_builder(cfg), prompt_module.build_prompt_builder(cfg.clone())
    assert b1 is b2 and isinstance(b1, PromptBuilder)
    with pytest.raises(ValueError, match="permutation of range"):
        b1.build("instance", class_names=["a", "b"], class_order=[0, 0, 1])
    p = b1.build("instance", class_names=["a", "b"], class_order=[2, 0, 1])
    assert p.class_order.tolist() == [2, 0, 1]
    n_img, q = 4, 5
    spliced = b1.spliced_length(p, n_img, q)
    assert spliced == len(p.input_ids) - 3 - 2 + n_img + q + sum(len(t) for t in p.class_token_ids)


def test_mapped_prompts_cross_worker_boundaries(tokenizer_dir):
    """Loader workers send mapped samples (and the mapper itself) through pickle: the prompt survives intact."""
    import pickle

    cfg = _cfg(tokenizer_dir)
    mapper = PSALMDatasetMapper(cfg, is_train=True, task="instance", class_names=NAMES)
    clone = pickle.loads(pickle.dumps(mapper))
    a = mapper(_dict("instance"), rng=np.random.default_rng(3))["prompt"]
    b = pickle.loads(pickle.dumps(clone(_dict("instance"), rng=np.random.default_rng(3))))["prompt"]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.class_order, b.class_order)
    assert all(torch.equal(x, y) for x, y in zip(a.class_token_ids, b.class_token_ids))
