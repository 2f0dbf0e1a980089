"""The PSALM meta-architecture on the tiny config: every task, batching, determinism, training."""

import pathlib

import pytest
import torch
from detectron2.structures import Instances

from psalm.config import get_psalm_cfg
from psalm.modeling.meta_arch import PSALM, build_psalm_model, parameter_counts

S = 256
SEG_TASKS = ["panoptic", "instance", "semantic", "referring", "gres", "interactive"]
REFERENCE_TSV = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "psalm_official_state_dict.tsv"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from psalm.data.tokenizer import save_tiny_tokenizer

    # 256 bytes + 128 merges + 3 added tokens = 387 = the tiny config's vocabulary
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"), num_merges=128)


def tiny_cfg(tokenizer_dir, *opts):
    return get_psalm_cfg(
        "configs/tiny/Base-PSALM-tiny.yaml",
        ["MODEL.PSALM.TOKENIZER", str(tokenizer_dir), "MODEL.DEVICE", "cpu", "TEST.PSALM.MAX_NEW_TOKENS", 6, *opts],
    )


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    torch.manual_seed(0)
    return build_psalm_model(tiny_cfg(tokenizer_dir, "MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE", 7)).eval()


def make_input(task, seed=0, height=96, width=128, valid=(192, 256), num_gt=2):
    g = torch.Generator().manual_seed(seed)
    pm = torch.ones(S, S, dtype=torch.bool)
    pm[: valid[0], : valid[1]] = False
    d = {
        "image": torch.randint(0, 256, (3, S, S), dtype=torch.uint8, generator=g),
        "padding_mask": pm,
        "height": height,
        "width": width,
        "task": task,
    }
    if task in ("panoptic", "instance", "semantic"):
        d["class_names"], d["is_thing"] = ["person", "car", "tree"], [True, True, False]
    elif task in ("referring", "gres"):
        d["sentences"] = ["the person in red", "red figure"]
    elif task == "interactive":
        rm = torch.zeros(num_gt, S, S, dtype=torch.bool)
        for j in range(num_gt):  # the second region has > 256 pixels: pooling draws random points
            rm[j, 10 + 60 * j : 30 + 80 * j, 10 : 30 + 20 * j] = True
        d["region_masks"] = rm
    else:
        d["conversation"] = [
            {"from": "human", "value": "<image>\nWhat is in the image?"},
            {"from": "gpt", "value": "A red person next to a car."},
        ]
    inst = Instances((S, S))
    masks = torch.zeros(num_gt, S, S, dtype=torch.bool)
    for j in range(num_gt):
        masks[j, 40 * j : 40 * j + 60, 20:120] = True
    inst.gt_masks, inst.gt_classes = masks, torch.arange(num_gt) % 3
    d["instances"] = inst
    return d


def _assert_results_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k, v in a.items():
        w = b[k]
        if k == "panoptic_seg":
            assert torch.equal(v[0], w[0]) and v[1] == w[1]
        elif k == "instances":
            assert v.image_size == w.image_size and len(v) == len(w)
            for f, x in v.get_fields().items():
                y = w.get(f)
                x, y = (x.tensor, y.tensor) if f == "pred_boxes" else (x, y)
                if x.dtype.is_floating_point:
                    torch.testing.assert_close(x, y, atol=atol, rtol=0)
                else:
                    assert torch.equal(x, y), f
        elif torch.is_tensor(v):
            torch.testing.assert_close(v, w, atol=atol, rtol=0)
        else:
            assert v == w, k


# ------------------------------------------------------------------------------------- structure
def test_registered_and_built_by_detectron2(tokenizer_dir):
    from detectron2.modeling import build_model

    m = build_model(tiny_cfg(tokenizer_dir))
    assert isinstance(m, PSALM)
    counts = parameter_counts(m)
    assert set(counts) == {
        "backbone",
        "projector",
        "llm",
        "mask_tokens",
        "mask_token_projector",
        "class_projector",
        "refer_projector",
        "region_projector",
        "pixel_decoder",
        "predictor",
    }
    assert m.mask_tokens.shape == (10, 64) and not m.mask_tokens.any()  # zero init, [Q, H]
    assert m.class_projector.weight.shape == (64, 64)


def test_config_mismatch_is_a_clear_error(tokenizer_dir):
    with pytest.raises(ValueError, match="NUM_MASK_TOKENS"):
        build_psalm_model(tiny_cfg(tokenizer_dir, "MODEL.PSALM.NUM_MASK_TOKENS", 7))


def test_meta_build_needs_no_tokenizer_and_cannot_run():
    cfg = get_psalm_cfg("configs/tiny/Base-PSALM-tiny.yaml")
    m = build_psalm_model(cfg, device="meta")
    assert all(p.is_meta for p in m.parameters()) and m.tokenizer is None
    with pytest.raises(RuntimeError, match="no tokenizer"):
        m.build_prompts([make_input("referring")])


@pytest.mark.slow
def test_full_size_parameter_counts_match_the_official_model():
    """Full-size config on the meta device vs the official state dict (spec section 6 / Appendix A)."""
    if not REFERENCE_TSV.is_file():
        pytest.skip(f"{REFERENCE_TSV} not found")
    from psalm.checkpoint.strict import check_state_dict
    from psalm.checkpoint.official import official_to_psalm
    from psalm.checkpoint.vision_keys import _relative_position_index

    m = build_psalm_model(get_psalm_cfg("configs/coco/psalm_swin_base_phi15.yaml"), device="meta")
    ours = parameter_counts(m)
    official = {}
    for line in REFERENCE_TSV.read_text().splitlines():
        key, shape = line.split("\t")[:2]
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        official[key] = (
            _relative_position_index(12)
            if key.endswith("relative_position_index")
            else torch.empty(shape, device="meta")
        )
    assert len(official) == 935
    conv = official_to_psalm(official, num_attention_heads=32)
    assert check_state_dict(m, conv.state_dict, allow_missing=conv.allowed_missing).ok
    dropped = sum(official[k].numel() for k in conv.dropped)
    total = sum(v.numel() for v in official.values())
    assert sum(ours.values()) == total - dropped
    # the spec's 1,587,057,208 counts parameters only: without the Swin index and BN buffers
    buffers = sum(
        v.numel()
        for k, v in official.items()
        if k.endswith(("relative_position_index", "running_mean", "running_var", "num_batches_tracked"))
    )
    assert total - buffers == 1_587_057_208
    # spec Appendix A (millions; Swin there includes its 24 relative-position buffers, the decoder its 2 dead tables)
    assert abs(ours["llm"] / 1e9 - 1.4145) < 5e-4
    assert abs((ours["backbone"] + 24 * 144 * 144) / 1e6 - 87.4) < 0.05
    assert abs(ours["projector"] / 1e6 - 62.9) < 0.05
    assert abs(ours["pixel_decoder"] / 1e6 - 5.54) < 0.01
    assert abs((ours["predictor"] + 100 * 256 + 101 * 256) / 1e6 - 14.88) < 0.01
    assert sum(
        ours[k] for k in ("mask_token_projector", "class_projector", "refer_projector", "region_projector")
    ) == 4 * (2048 * 256 + 256)
    assert ours["mask_tokens"] == 100 * 2048


# ------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("task", SEG_TASKS)
def test_inference_output_shapes(model, task):
    out = model([make_input(task)])[0]
    H, W = 96, 128
    if task == "panoptic":
        pan, info = out["panoptic_seg"]
        assert pan.shape == (H, W) and pan.dtype == torch.int32 and isinstance(info, list)
        assert out["sem_seg"].shape == (3, H, W)
        assert out["instances"].image_size == (H, W) and bool(out["instances"].pred_classes.lt(2).all())  # things only
    elif task == "semantic":
        assert out["sem_seg"].shape == (3, H, W) and out["sem_seg"].dtype == torch.float32
    elif task == "instance":
        inst = out["instances"]
        assert inst.pred_masks.shape == (7, H, W) and inst.pred_masks.dtype == torch.bool
        assert inst.scores.shape == (7,) and inst.pred_boxes.tensor.shape == (7, 4)
    elif task == "referring":
        assert out["instances"].pred_masks.shape == (1, H, W) and out["instances"].scores.shape == (1,)
    elif task == "gres":
        assert out["instances"].pred_masks.shape == (1, H, W) and out["no_target"] is False  # "top1" default
    else:
        assert out["instances"].pred_masks.shape == (2, H, W) and out["instances"].scores.shape == (2,)


def test_gres_empty_mode_reports_no_target(tokenizer_dir):
    torch.manual_seed(0)
    m = build_psalm_model(
        tiny_cfg(tokenizer_dir, "TEST.PSALM.GREF_NO_TARGET", "empty", "TEST.PSALM.GREF_SCORE_THRESHOLD", 1.0)
    ).eval()
    out = m([make_input("gres")])[0]
    assert out["no_target"] is True and out["instances"].pred_masks.shape == (0, 96, 128)


def test_instruction_generates_text(model, monkeypatch):
    generated = []
    generate = model.llm.generate

    def spy(**kwargs):
        assert "input_ids" not in kwargs and kwargs["inputs_embeds"].shape[0] == 1
        generated.append(generate(**kwargs))
        return generated[-1]

    monkeypatch.setattr(model.llm, "generate", spy)
    out = model([make_input("instruction")])[0]
    assert set(out) == {"text"} and isinstance(out["text"], str)
    assert 1 <= generated[0].shape[1] <= 6  # TEST.PSALM.MAX_NEW_TOKENS; only the new tokens are returned
    assert out["text"] == model.tokenizer.decode(generated[0][0], skip_special_tokens=True).strip()


@pytest.mark.parametrize("task", SEG_TASKS + ["instruction"])
def test_batch_of_two_equals_two_single_calls(model, task):
    a = make_input(task, seed=1)
    b = make_input(task, seed=2, height=200, width=100, valid=(256, 128))
    if task == "instruction":
        b["conversation"] = [{"from": "human", "value": "<image>\nDescribe the image in detail, please."}]
    both = model([a, b])
    for x, y in zip(both, [model([a])[0], model([b])[0]]):
        _assert_results_close(x, y)


def test_inference_is_deterministic(model):
    inputs = [make_input("interactive", seed=3), make_input("interactive", seed=4)]
    first, second = model(inputs), model(inputs)
    for x, y in zip(first, second):
        _assert_results_close(x, y, atol=0)


def test_mixed_task_batch_equals_separate_calls(model):
    inputs = [
        make_input("referring", 1),
        make_input("panoptic", 2),
        make_input("referring", 3),
        make_input("instruction", 4),
    ]
    mixed = model(inputs)
    assert set(mixed[3]) == {"text"} and "panoptic_seg" in mixed[1]
    _assert_results_close(mixed[1], model([inputs[1]])[0])
    for got, want in zip([mixed[0], mixed[2]], model([inputs[0], inputs[2]])):
        _assert_results_close(got, want, atol=0)


def test_shared_image_features(model):
    """encode_images once, then several prompts on the same image (the predictor's path)."""
    a = make_input("referring", 5)
    feats = model.encode_images([a])
    assert feats["image_tokens"].shape == (1, 16, 64) and len(feats["multi_scale_features"]) == 3
    _assert_results_close(model([a], image_features=feats)[0], model([a])[0], atol=0)


# -------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("task", SEG_TASKS + ["instruction"])
def test_training_losses_and_gradients(tokenizer_dir, task):
    torch.manual_seed(0)
    m = build_psalm_model(tiny_cfg(tokenizer_dir)).train()
    assert not m.backbone.training  # frozen backbone stays in eval mode (BACKBONE_EVAL_MODE)
    losses = m([make_input(task, 1), make_input(task, 2)])
    if task == "instruction":
        assert set(losses) == {"loss_lm"}
    else:
        assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_dice_2"} <= set(losses)
        assert len(losses) == 3 * 4  # final + DEC_LAYERS - 1 auxiliary stages
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is None for p in m.backbone.parameters())
    assert m.projector.fc.weight.grad is not None and m.llm.model.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    if task != "instruction":
        assert m.mask_tokens.grad.abs().sum() > 0 and m.predictor.query_embed.weight.grad is not None
        used = {
            "panoptic": "class_projector",
            "instance": "class_projector",
            "semantic": "class_projector",
            "referring": "refer_projector",
            "gres": "refer_projector",
            "interactive": "region_projector",
        }[task]
        assert getattr(m, used).weight.grad.abs().sum() > 0
        assert m.llm.lm_head.weight.grad is None  # no lm_head on segmentation forwards


def test_backbone_train_mode_compat(tokenizer_dir):
    m = build_psalm_model(tiny_cfg(tokenizer_dir, "MODEL.PSALM.BACKBONE_EVAL_MODE", False)).train()
    assert m.backbone.training  # official: DropPath stays active on the frozen backbone
    assert not any(p.requires_grad for p in m.backbone.parameters())


def test_training_batch_must_hold_one_task(tokenizer_dir):
    m = build_psalm_model(tiny_cfg(tokenizer_dir)).train()
    with pytest.raises(ValueError, match="one task"):
        m([make_input("referring"), make_input("panoptic")])
    bad = make_input("referring")
    del bad["instances"]
    with pytest.raises(ValueError, match="instances"):
        m([bad])
