"""Post-processing: the official crafted case, the golden e2e post-processed results, batching, gres."""

import json

import pytest
import torch
from detectron2.structures import BitMasks

from psalm.modeling.postprocessing import (
    PSALMPostProcessor,
    gres_inference,
    instance_inference,
    interactive_inference,
    interactive_scores,
    mask_scores,
    masks_to_boxes,
    panoptic_inference,
    referring_inference,
    referring_scores,
    resize_mask_logits,
    semantic_inference,
    valid_size_from_padding_mask,
)

IS_THING = [True, True, False]


@pytest.fixture(scope="module")
def golden(golden_dir):
    from safetensors.torch import load_file

    e2e = golden_dir / "psalm_e2e"
    return load_file(str(e2e / "tensors.safetensors")), json.loads((e2e / "manifest.json").read_text())


def _assert_same_instance_set(masks, scores, classes, ref_masks, ref_scores, ref_classes, atol=1e-6):
    """Instance lists compared as sets (official topk(sorted=False) order is arbitrary)."""
    assert masks.shape == ref_masks.shape, (masks.shape, ref_masks.shape)
    unused = list(range(len(ref_scores)))
    for i in range(len(scores)):
        hit = [
            j
            for j in unused
            if torch.equal(masks[i], ref_masks[j].bool())
            and abs(float(scores[i]) - float(ref_scores[j])) <= atol
            and (classes is None or int(classes[i]) == int(ref_classes[j]))
        ]
        assert hit, f"prediction {i} (score {float(scores[i]):.6f}) has no match in the reference"
        unused.remove(hit[0])
    assert not unused


# ------------------------------------------------------------------------------ crafted official case
@pytest.mark.golden
def test_crafted_panoptic_exact(golden):
    t, m = golden
    cls, masks = t["postproc.in.class_name_logits"], t["postproc.in.mask_logits"]
    pan, info = panoptic_inference(cls, masks, IS_THING)
    assert pan.dtype == torch.int32
    assert torch.equal(pan, t["postproc.out.panoptic_seg"])
    assert info == m["postproc_crafted"]["segments_info"]
    torch.testing.assert_close(semantic_inference(cls, masks), t["postproc.out.sem_seg"], atol=1e-6, rtol=0)


@pytest.mark.golden
def test_crafted_instance_referring_region(golden):
    t, _ = golden
    cls, masks = t["postproc.in.class_name_logits"], t["postproc.in.mask_logits"]
    inst = instance_inference(cls, masks, topk=10, is_thing=IS_THING)
    assert inst.pred_masks.dtype == torch.bool and len(inst) == 7
    _assert_same_instance_set(
        inst.pred_masks,
        inst.scores,
        inst.pred_classes,
        t["postproc.out.instance.pred_masks"],
        t["postproc.out.instance.scores"],
        t["postproc.out.instance.pred_classes"],
    )
    # referring: all Q queries (topk(Q) of Q) as a set, then our top-1
    scores = referring_scores(t["postproc.in.SEG_logits"], masks)
    _assert_same_instance_set(
        masks > 0, scores, None, t["postproc.out.referring.pred_masks"], t["postproc.out.referring.scores"], None
    )
    top1 = referring_inference(t["postproc.in.SEG_logits"], masks)
    j = int(t["postproc.out.referring.scores"].argmax())
    assert torch.equal(top1.pred_masks[0], t["postproc.out.referring.pred_masks"][j].bool())
    # region: official scores are [Q, R]
    torch.testing.assert_close(
        interactive_scores(t["postproc.in.region_logits"], masks).T, t["postproc.out.region.scores"], atol=1e-6, rtol=0
    )


# ------------------------------------------------------------------------------ golden e2e post-processing
def _e2e_input(t, task, **extra):
    return {"task": task, "padding_mask": t["image.padding_mask"], "height": 96, "width": 128, **extra}


@pytest.mark.golden
def test_e2e_resize_and_referring(golden):
    t, _ = golden
    masks = resize_mask_logits(
        t["referring.out.final.pred_masks"][0].double(),
        (256, 256),
        valid_size_from_padding_mask(t["image.padding_mask"]),
        (96, 128),
    )
    scores = referring_scores(t["referring.out.final.pred_SEG_logits"][0], masks)
    _assert_same_instance_set(
        masks > 0, scores, None, t["referring.post.instances.pred_masks"], t["referring.post.instances.scores"], None
    )
    out = PSALMPostProcessor()(
        {
            "pred_masks": t["referring.out.final.pred_masks"].double(),
            "pred_refer_logits": t["referring.out.final.pred_SEG_logits"],
        },
        [_e2e_input(t, "referring")],
    )[0]["instances"]
    assert out.pred_masks.shape == (1, 96, 128)
    # answer.top1_query indexes the official (topk-permuted) instance list, not the query id
    j = int(t["referring.answer.top1_query"][0])
    assert torch.equal(out.pred_masks[0], t["referring.post.instances.pred_masks"][j])
    assert abs(float(out.scores[0]) - float(t["referring.post.instances.scores"][j])) <= 1e-6
    assert torch.equal(out.pred_masks[0], masks[int(out.pred_query_ids[0])] > 0)


@pytest.mark.golden
def test_e2e_panoptic(golden):
    t, m = golden
    out = PSALMPostProcessor(detections_per_image=10)(
        {
            "pred_masks": t["panoptic.out.final.pred_masks"].double(),
            "pred_class_logits": t["panoptic.out.final.pred_class_name_logits"],
        },
        [_e2e_input(t, "panoptic", is_thing=IS_THING)],
    )[0]
    pan, info = out["panoptic_seg"]
    assert torch.equal(pan, t["panoptic.post.panoptic_seg"])
    assert info == m["tasks"]["panoptic"]["segments_info"]
    # an fp32 island of the official run (golden README, "Official fp32 islands" item 7): two fp32
    # sums of Q terms in another order differ by a few ulp of the map's scale (~1e-7 relative, README)
    ref = t["panoptic.post.sem_seg"]
    torch.testing.assert_close(out["sem_seg"], ref, atol=1e-6 * max(1.0, float(ref.abs().max())), rtol=0)
    inst = out["instances"]
    _assert_same_instance_set(
        inst.pred_masks,
        inst.scores,
        inst.pred_classes,
        t["panoptic.post.instances.pred_masks"],
        t["panoptic.post.instances.scores"],
        t["panoptic.post.instances.pred_classes"],
    )


@pytest.mark.golden
def test_e2e_interactive(golden):
    t, _ = golden
    logits = t["region.out.final.pred_region_logits.0"]
    out = PSALMPostProcessor()(
        {"pred_masks": t["region.out.final.pred_masks"].double(), "pred_region_logits": [logits]},
        [_e2e_input(t, "interactive")],
    )[0]["instances"]
    assert out.pred_query_ids.tolist() == t["region.answer.top1_query"].tolist()
    ref_masks, ref_scores = t["region.post.instances.pred_masks"], t["region.post.instances.scores"]  # [Q, ...], [Q, R]
    for r, q in enumerate(t["region.answer.top1_query"].tolist()):
        assert torch.equal(out.pred_masks[r], ref_masks[q])
        assert abs(float(out.scores[r]) - float(ref_scores[q, r])) <= 1e-6
    masks = resize_mask_logits(t["region.out.final.pred_masks"][0].double(), (256, 256), (192, 256), (96, 128))
    torch.testing.assert_close(interactive_scores(logits, masks).T, ref_scores, atol=1e-6, rtol=0)
    assert torch.equal(masks > 0, ref_masks)


# ------------------------------------------------------------------------------ batching and behaviour
def _random_batch(b, q=6, k=3, s=64, r=(2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_masks": torch.randn(b, q, s // 4, s // 4, generator=g) * 4,
        "pred_class_logits": torch.randn(b, q, k + 1, generator=g) * 3,
        "pred_refer_logits": torch.randn(b, q, 1, generator=g) * 3,
        "pred_region_logits": [torch.randn(r[i], q, generator=g) for i in range(b)],
    }
    inputs = []
    for i in range(b):
        pm = torch.zeros(s, s, dtype=torch.bool)
        pm[s - 8 * (i + 1) :] = True  # different valid heights per image
        inputs.append({"padding_mask": pm, "height": 20 + 5 * i, "width": 33, "is_thing": IS_THING})
    return outputs, inputs


def _slice(outputs, i):
    return {k: (v[i : i + 1] if torch.is_tensor(v) else v[i : i + 1]) for k, v in outputs.items()}


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic", "referring", "gres", "interactive"])
def test_batch_of_two_equals_two_single_calls(task):
    outputs, inputs = _random_batch(2)
    for d in inputs:
        d["task"] = task
    post = PSALMPostProcessor(
        object_mask_threshold=0.3, overlap_threshold=0.5, detections_per_image=10, gres_score_threshold=0.4
    )
    batched = post(outputs, inputs)
    for i in range(2):
        single = post(_slice(outputs, i), inputs[i : i + 1])[0]
        assert batched[i].keys() == single.keys()
        for key, v in single.items():
            w = batched[i][key]
            if key == "panoptic_seg":
                assert torch.equal(v[0], w[0]) and v[1] == w[1]
            elif key == "instances":
                assert v.image_size == (inputs[i]["height"], inputs[i]["width"])
                for f, x in v.get_fields().items():
                    y = w.get(f)
                    x, y = (x.tensor, y.tensor) if f == "pred_boxes" else (x, y)
                    assert torch.equal(x, y), f
            elif torch.is_tensor(v):
                assert torch.equal(v, w)
            else:
                assert v == w
    assert batched[1]["instances" if task != "semantic" else "sem_seg"] is not None


def test_output_shapes_and_types():
    outputs, inputs = _random_batch(1, r=(3,))
    post = PSALMPostProcessor(detections_per_image=5)
    for task, check in {
        "semantic": lambda o: o["sem_seg"].shape == (3, 20, 33) and o["sem_seg"].dtype == torch.float32,
        "instance": lambda o: o["instances"].pred_masks.shape == (5, 20, 33) and o["instances"].pred_classes.max() < 3,
        "referring": lambda o: o["instances"].pred_masks.shape == (1, 20, 33) and o["instances"].scores.shape == (1,),
        "interactive": lambda o: o["instances"].pred_masks.shape == (3, 20, 33) and o["instances"].scores.shape == (3,),
        "panoptic": lambda o: o["panoptic_seg"][0].shape == (20, 33) and o["panoptic_seg"][0].dtype == torch.int32,
    }.items():
        inputs[0]["task"] = task
        assert check(post(outputs, inputs)[0]), task
    # bf16 logits are post-processed in fp32
    inputs[0]["task"] = "semantic"
    bf = {k: (v.bfloat16() if torch.is_tensor(v) else v) for k, v in outputs.items()}
    assert post(bf, inputs)[0]["sem_seg"].dtype == torch.float32


def test_instance_scores_and_boxes():
    q, k = 4, 2
    cls = torch.full((q, k + 1), -10.0)
    cls[0, 1] = 10.0  # query 0 -> class 1 with prob ~1
    masks = torch.full((q, 8, 10), -5.0)
    masks[0, 2:5, 3:7] = 5.0
    inst = instance_inference(cls, masks, topk=1)
    assert inst.pred_classes.tolist() == [1] and inst.pred_query_ids.tolist() == [0]
    assert abs(float(inst.scores[0]) - torch.sigmoid(torch.tensor(5.0)).item()) < 1e-4
    assert inst.pred_boxes.tensor.tolist() == [[3.0, 2.0, 7.0, 5.0]]
    rnd = torch.rand(5, 9, 11) > 0.8
    rnd[1] = False
    assert torch.equal(masks_to_boxes(rnd).tensor, BitMasks(rnd).get_bounding_boxes().tensor)
    assert float(mask_scores(torch.full((1, 3, 3), -1.0))[0]) == 0.0


def test_gres_union_top1_and_empty():
    masks = torch.full((3, 6, 6), -4.0)
    masks[0, :2] = 4.0
    masks[1, 4:] = 4.0
    masks[2, 2:4] = 4.0
    refer = torch.tensor([[5.0], [5.0], [-5.0]])
    inst, no_target = gres_inference(refer, masks, 0.6, "empty")
    assert not no_target and inst.pred_masks.shape == (1, 6, 6)
    assert torch.equal(inst.pred_masks[0], (masks[0] > 0) | (masks[1] > 0))
    low = torch.tensor([[-5.0], [-3.0], [-4.0]])
    inst, no_target = gres_inference(low, masks, 0.6, "top1")
    assert not no_target and torch.equal(inst.pred_masks[0], masks[1] > 0)
    inst, no_target = gres_inference(low, masks, 0.6, "empty")
    assert no_target and inst.pred_masks.shape == (0, 6, 6) and len(inst) == 0
    with pytest.raises(ValueError, match="no-target mode"):
        gres_inference(low, masks, 0.6, "none")
    pm = torch.zeros(24, 24, dtype=torch.bool)
    out = PSALMPostProcessor(gres_no_target="empty")(
        {"pred_masks": masks[None], "pred_refer_logits": low[None]},
        [{"task": "gres", "padding_mask": pm, "height": 24, "width": 24}],
    )[0]
    assert out["no_target"] is True and out["instances"].pred_masks.shape == (0, 24, 24)


def test_interactive_regions_may_share_a_query():
    masks = torch.randn(4, 5, 5)
    logits = torch.tensor([[9.0, 0, 0, 0], [9.0, 0, 0, 0]])
    inst = interactive_inference(logits, masks)
    assert inst.pred_query_ids.tolist() == [0, 0]
    assert len(interactive_inference(torch.zeros(0, 4), masks)) == 0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="no valid pixel"):
        valid_size_from_padding_mask(torch.ones(8, 8, dtype=torch.bool))
    pm = torch.zeros(8, 8, dtype=torch.bool)
    pm[:2] = True
    with pytest.raises(ValueError, match="right/bottom"):
        valid_size_from_padding_mask(pm)
    outputs, inputs = _random_batch(1)
    inputs[0]["task"] = "panoptic"
    del inputs[0]["is_thing"]
    with pytest.raises(ValueError, match="is_thing"):
        PSALMPostProcessor()(outputs, inputs)
    inputs[0]["task"] = "referring"
    outputs["pred_refer_logits"] = None
    with pytest.raises(ValueError, match="pred_refer_logits"):
        PSALMPostProcessor()(outputs, inputs)
    with pytest.raises(ValueError, match="GREF_NO_TARGET"):
        PSALMPostProcessor(gres_no_target="bogus")


def _assert_results_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key, v in a.items():
        w = b[key]
        if key == "panoptic_seg":
            assert torch.equal(v[0], w[0]) and v[1] == w[1]
        elif key == "instances":
            for f, x in v.get_fields().items():
                y = w.get(f)
                x, y = (x.tensor, y.tensor) if f == "pred_boxes" else (x, y)
                assert x.dtype == y.dtype and torch.equal(x, y), f
        elif torch.is_tensor(v):
            assert v.dtype == w.dtype == torch.float32 and torch.equal(v, w), key
        else:
            assert v == w


@pytest.mark.parametrize(
    "task,before",
    [(t, False) for t in ("panoptic", "instance", "semantic", "referring", "gres", "interactive")]
    + [("semantic", True)],  # SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE only changes the semantic task
)
def test_bf16_autocast_post_processes_exactly_as_fp32(task, before):
    """Post-processing is an fp32 island: a model run under bf16 autocast (predictor, eval_zero_shot)
    gets bit-identical results to an fp32 run (autocast would run the semantic einsum in bf16)."""
    outputs, inputs = _random_batch(2, q=20, k=12, s=96, seed=3)
    is_thing = [bool(i % 2) for i in range(12)]
    for d in inputs:
        d.update(task=task, is_thing=is_thing)
    post = PSALMPostProcessor(
        object_mask_threshold=0.2, overlap_threshold=0.5, detections_per_image=15, gres_score_threshold=0.3,
        semantic_postprocess_before_inference=before,
    )
    ref = post(outputs, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = post(outputs, inputs)
    for a, b in zip(ref, got):
        _assert_results_equal(a, b)


def test_bf16_autocast_functions_stay_fp32():
    g = torch.Generator().manual_seed(0)
    cls, masks = torch.randn(30, 11, generator=g) * 3, torch.randn(30, 40, 50, generator=g) * 4
    ref_sem, ref_scores = semantic_inference(cls, masks), referring_scores(cls[:, :1], masks)
    ref_resized = resize_mask_logits(masks, (64, 64), (50, 60), (33, 47))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sem, scores = semantic_inference(cls, masks), referring_scores(cls[:, :1], masks)
        resized = resize_mask_logits(masks, (64, 64), (50, 60), (33, 47))
        assert torch.is_autocast_enabled("cpu")  # the island restores the caller's autocast state
    assert sem.dtype == torch.float32 and torch.equal(sem, ref_sem)
    assert torch.equal(scores, ref_scores) and torch.equal(resized, ref_resized)
