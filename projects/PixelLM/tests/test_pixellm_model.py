"""Unit tests of the PixelLM modules on the tiny config (random weights, CPU, seconds)."""
import logging
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pixellm_tiny.yaml"


@pytest.fixture(scope="module")
def tok_dir(pixellm_tok_dir):
    return pixellm_tok_dir


def _cfg(tok_dir, *opts):
    from pixellm import get_pixellm_cfg

    return get_pixellm_cfg(str(CONFIG), ["MODEL.PIXELLM.TOKENIZER", str(tok_dir), *opts])


@pytest.fixture(scope="module")
def model(tok_dir):
    from pixellm.modeling.meta_arch import PixelLM

    torch.manual_seed(0)
    return PixelLM(_cfg(tok_dir)).eval()


def _image_input(model, question="Can you segment the red circle in this image?", answer=None, h=40, w=30, seed=0):
    from pixellm.data.prompt import build_conversation, tokenize_conversation, tokenizer_image_token
    from pixellm.modeling.vision import preprocess_clip_image

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    clip, size = preprocess_clip_image(image, model.vision_tower.image_size)
    q = "<image>\n" + question
    tok = model.tokenizer
    x = {"clip_image": clip, "clip_size": size, "height": h, "width": w}
    if answer is None:
        x["input_ids"] = [tokenizer_image_token(build_conversation(q), tok)]
    else:
        ids, labels = tokenize_conversation(tok, build_conversation(q, answer, eos_token=tok.eos_token))
        x.update(input_ids=[ids], labels=[labels])
    return x


GROUP = " ".join(f"[SEG{i}]" for i in range(6))


# ------------------------------------------------------------------ vision
def test_position_interpolation_compat_off_by_one():
    from pixellm.modeling.vision import interpolate_position_embedding

    g, c = 3, 5
    w = torch.randn(1 + g * g, c)

    def interp(grid):
        x = grid.permute(1, 0).reshape(1, c, g, g)
        return F.interpolate(x, (6, 6), mode="bilinear", align_corners=False)[0].flatten(1).permute(1, 0)

    compat = interpolate_position_embedding(w, 6, compat=True)
    fixed = interpolate_position_embedding(w, 6, compat=False)
    assert compat.shape == fixed.shape == (37, c)
    # official: the LAST row is taken as CLS and appended last; the grid includes HF's CLS row 0
    assert torch.equal(compat[-1], w[-1]) and torch.allclose(compat[:-1], interp(w[:-1]))
    assert torch.equal(fixed[0], w[0]) and torch.allclose(fixed[1:], interp(w[1:]))
    assert not torch.allclose(compat, fixed)


def test_vision_tap_validation(tok_dir):
    from pixellm.modeling.meta_arch import PixelLM

    with pytest.raises(ValueError, match="vision tap"):
        PixelLM(_cfg(tok_dir, "MODEL.PIXELLM.VISION.TAPS", "[-2, -11]"))  # 4-layer CLIP has no [-11]


# ------------------------------------------------------------------ codebook
def test_codebook_positions_preceding_and_at(caplog):
    from pixellm.modeling.codebook import codebook_positions

    cb = [50, 51, 52]
    ids = torch.tensor([1, 7, 50, 51, 52, 9, 50, 51, 52, 2])
    valid = torch.ones_like(ids, dtype=torch.bool)
    pos, k = codebook_positions(ids, valid, cb, "preceding")
    assert pos.tolist() == [1, 2, 3, 5, 6, 7] and int(k) == 2
    pos, k = codebook_positions(ids, valid, cb, "at")
    assert pos.tolist() == [2, 3, 4, 6, 7, 8]
    bad = torch.tensor([1, 7, 50, 51, 52, 9, 50, 51, 2])
    with pytest.raises(ValueError, match="complete groups"):
        codebook_positions(bad, torch.ones_like(bad, dtype=torch.bool), cb, strict=True)
    with caplog.at_level(logging.WARNING):
        pos, k = codebook_positions(bad, torch.ones_like(bad, dtype=torch.bool), cb, strict=False)
    assert len(pos) == 0 and int(k) == 0 and "no masks" in caplog.text
    swapped = torch.tensor([1, 51, 50, 52, 2])
    with pytest.raises(ValueError):
        codebook_positions(swapped, torch.ones_like(swapped, dtype=torch.bool), cb, strict=True)


def test_token_fusion_modes():
    from pixellm.modeling.codebook import TokenFusion

    h = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    compat = TokenFusion(2, 3, "compat")(h)
    assert torch.allclose(compat, h.sum(2) * float(np.float32(1 / 6)))  # half the mean (official)
    assert torch.allclose(TokenFusion(2, 3, "mean")(h), h.mean(2))
    learned = TokenFusion(2, 3, "learned")
    assert isinstance(learned.weight, torch.nn.Parameter) and "weight" in learned.state_dict()
    assert "weight" not in TokenFusion(2, 3, "compat").state_dict()


def test_codebook_ids_from_tokenizer(model):
    tok = model.tokenizer
    assert model.codebook_ids == [tok.convert_tokens_to_ids(f"[SEG{i}]") for i in range(6)]
    assert len(set(model.codebook_ids)) == 6


# ------------------------------------------------------------------ forward / masks
def test_targets_in_order_and_shapes(model):
    two = _image_input(model, "Can you segment a and b?", f"a is {GROUP} and b is {GROUP}.", h=40, w=30)
    one = _image_input(model, "Can you segment a?", f"a is {GROUP}.", h=20, w=50, seed=1)
    none = _image_input(model, "What is this?", "A wall.", h=30, w=30, seed=2)
    with torch.no_grad():
        out = model.forward_teacher_forced([two, one, none])
    g = model.vision_tower.grid
    assert [m.shape for m in out["pred_masks"]] == [(2, 40, 30), (1, 20, 50), (0, 30, 30)]
    assert out["levels"][0][0].shape == (2, 1, 2 * g, 2 * g) and out["levels"][0][1].shape == (2, 1, 4 * g, 4 * g)
    assert out["low_res"][0].shape == (2, 1, model.out_size, model.out_size)
    assert out["targets_per_row"] == [2, 1, 0]
    # each target is decoded independently: target 1 alone gives the same mask
    fused = out["fused"][0]
    alone = model.decode_masks(out["image"]["decoder_features"][0], fused[1:2])
    assert torch.allclose(alone["low_res"][0], out["low_res"][0][1], atol=1e-5)


def test_incomplete_group_gives_no_masks(model, caplog):
    x = _image_input(model, "Segment a.", "a is [SEG0] [SEG1] [SEG2] [SEG3].")
    x["answers_given"] = True
    with caplog.at_level(logging.WARNING):
        out = model.inference([x])
    assert out[0]["pred_masks"].shape[0] == 0 and "no masks" in caplog.text
    model.train()
    try:
        x["gt_masks"] = torch.zeros(1, 40, 30, dtype=torch.bool)
        with pytest.raises(ValueError, match="complete groups"):
            model.losses([x])
    finally:
        model.eval()


def test_gradients_reach_codebook_decoder_not_clip(tok_dir):
    from pixellm.modeling.meta_arch import PixelLM

    torch.manual_seed(1)
    m = PixelLM(_cfg(tok_dir)).train()
    x = _image_input(m, "Can you segment a and b?", f"a is {GROUP} and b is {GROUP}.")
    x["gt_masks"] = torch.rand(2, 40, 30) > 0.5
    losses = m.losses([x])
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    sum(losses.values()).backward()
    named = dict(m.named_parameters())
    emb = next(p for n, p in named.items() if n.endswith("embed_tokens.weight"))
    assert emb.grad is not None and emb.grad[m.codebook_ids].abs().sum() > 0
    for prefix in ("text_hidden_fcs.", "mask_decoder.transformer.1.", "mm_projector.", "out_mm_projector."):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items() if n.startswith(prefix)), prefix
    assert all(p.grad is None for n, p in named.items() if n.startswith("vision_tower."))
    assert any(p.grad is not None for n, p in named.items() if "lora_" in n)


def test_vision_train_option_trains_clip_and_keeps_it_in_train_mode(tok_dir):
    """MODEL.PIXELLM.VISION.TRAIN (a from-scratch vision tower): CLIP joins the trainable set, gets a
    gradient and follows train() (dropout); off (official), it stays frozen and in eval mode."""
    from pixellm.modeling.meta_arch import PixelLM

    torch.manual_seed(1)
    frozen = PixelLM(_cfg(tok_dir)).train()
    assert not frozen.vision_tower.training
    assert not any(n.startswith("vision_tower.") for n in frozen.trainable_names)
    torch.manual_seed(1)
    m = PixelLM(_cfg(tok_dir, "MODEL.PIXELLM.VISION.TRAIN", "True")).train()
    assert m.vision_tower.training
    clip_names = [n for n in m.trainable_names if n.startswith("vision_tower.")]
    assert clip_names and set(frozen.trainable_names) < set(m.trainable_names)
    x = _image_input(m, "Can you segment a?", f"a is {GROUP}.")
    x["gt_masks"] = torch.rand(1, 40, 30) > 0.5
    sum(m.losses([x]).values()).backward()
    named = dict(m.named_parameters())
    assert named["vision_tower.clip.embeddings.patch_embedding.weight"].grad.abs().sum() > 0
    assert any(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in clip_names if ".encoder.layers.0." in n)
    m.eval()
    assert not m.vision_tower.training


def test_paper_setting_learnable_fusion_and_trl(tok_dir):
    from pixellm.modeling.meta_arch import PixelLM

    m = PixelLM(_cfg(tok_dir, "MODEL.PIXELLM.SETTING", "paper")).train()
    assert m.token_fusion.weight.requires_grad and m.scale_fusion.weight.requires_grad
    x = _image_input(m, "Can you segment a and b?", f"a is {GROUP} and b is {GROUP}.")
    x["gt_masks"] = torch.rand(2, 40, 30) > 0.5
    losses = m.losses([x])
    assert "loss_trl" in losses
    sum(losses.values()).backward()
    assert m.token_fusion.weight.grad is not None and m.scale_fusion.weight.grad is not None


def test_prompt_norm_and_prompt_mask_options(tok_dir):
    """CODEBOOK.PROMPT_NORM "batch" and LOSS.PROMPT_MASK_WEIGHT (options for models trained from
    scratch, off in the release): the norm standardises the fused prompts over the batch's targets and
    trains; the auxiliary mask is each prompt dotted with its level's neck features and adds its own
    weighted BCE / Dice terms that reach the LLM."""
    from pixellm.modeling.codebook import PromptBatchNorm
    from pixellm.modeling.meta_arch import PixelLM, postprocess_masks

    with pytest.raises(ValueError, match="PROMPT_NORM"):
        PixelLM(_cfg(tok_dir, "MODEL.PIXELLM.CODEBOOK.PROMPT_NORM", "layer"))
    with pytest.raises(ValueError, match="PROMPT_MASK_WEIGHT"):
        PixelLM(_cfg(tok_dir, "MODEL.PIXELLM.LOSS.PROMPT_MASK_WEIGHT", "-1"))
    torch.manual_seed(1)
    m = PixelLM(_cfg(tok_dir, "MODEL.PIXELLM.CODEBOOK.PROMPT_NORM", "batch",
                     "MODEL.PIXELLM.LOSS.PROMPT_MASK_WEIGHT", "0.5")).train()
    assert isinstance(m.prompt_norm, PromptBatchNorm)
    assert any(n.startswith("prompt_norm.") for n in m.trainable_names)
    x = _image_input(m, "Can you segment a, b and c?", f"a is {GROUP}, b is {GROUP} and c is {GROUP}.")
    x["gt_masks"] = torch.rand(3, 40, 30) > 0.5
    seen = []
    hook = m.prompt_norm.register_forward_hook(lambda mod, inp, res: seen.append(inp[0].detach()))
    out = m.forward_teacher_forced([x])
    hook.remove()
    fused = out["fused"][0]  # [K, L, D], standardised over the 3 targets (batch statistics, training)
    flat, before = fused.flatten(1), seen[0]
    assert before.shape == flat.shape == (3, 2 * m.mask_decoder.dim)
    assert torch.allclose(flat.mean(0), torch.zeros_like(flat[0]), atol=1e-5)
    v = before.var(0, unbiased=False)
    assert torch.allclose(flat.var(0, unbiased=False), v / (v + m.prompt_norm.eps), atol=1e-3)
    aux = m.prompt_masks([x], out)[0]
    feats = out["image"]["decoder_features"][0]
    want = torch.einsum("kld,ldhw->khw", fused, feats)[:, None] / 2
    want = postprocess_masks(want, x["clip_size"], (40, 30))[:, 0]
    assert aux.shape == (3, 40, 30) and torch.allclose(aux, want, atol=1e-5)
    losses = m.losses([x])
    assert {"loss_mask_prompt", "loss_dice_prompt"} <= set(losses)
    plain = m.mask_loss([aux], [x["gt_masks"]], [[3]])
    assert torch.allclose(losses["loss_mask_prompt"], 0.5 * plain["loss_mask"])
    (losses["loss_mask_prompt"] + losses["loss_dice_prompt"]).backward()
    named = dict(m.named_parameters())
    assert named["prompt_norm.weight"].grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items() if ".layers.0." in n and "llm" in n)
    # one target in a training batch: the running statistics (batch statistics of one sample are undefined)
    y = _image_input(m, "Can you segment a?", f"a is {GROUP}.")
    one = m.forward_teacher_forced([y])["fused"][0]
    assert one.shape[0] == 1 and torch.isfinite(one).all()
    m.eval()  # evaluation: running statistics, so a target's prompt does not depend on its batch
    with torch.no_grad():
        alone = m.forward_teacher_forced([x])["fused"][0]
        together = m.forward_teacher_forced([x, y])["fused"][0]
    assert torch.allclose(alone, together, atol=1e-5)


# ------------------------------------------------------------------ losses
def test_target_refinement_loss():
    from pixellm.modeling.losses import PixelLMMaskLoss, overlap_weights

    logits = torch.full((3, 4, 4), -5.0)
    logits[0, :2] = 5.0
    logits[1, 1:3] = 5.0  # row 1 claimed by masks 0 and 1 (same question)
    logits[2, 1] = 5.0  # mask 2 is another question's: no overlap with 0 / 1
    gt = torch.zeros(3, 4, 4)
    w = overlap_weights(logits, [2, 1])
    assert w[0].sum() == 4 and w[1].sum() == 4 and w[2].sum() == 0
    assert overlap_weights(logits, [3])[2].sum() == 4  # one question: row 1 is claimed three times
    with pytest.raises(ValueError):
        overlap_weights(logits, [2, 2])
    plain = PixelLMMaskLoss(trl=False)([logits], [gt], [[2, 1]])
    trl = PixelLMMaskLoss(trl=True, trl_alpha=3.0)([logits], [gt], [[2, 1]])
    assert torch.allclose(plain["loss_mask"], trl["loss_mask"]) and "loss_trl" not in plain
    bce = F.binary_cross_entropy_with_logits(logits, gt, reduction="none")
    weighted = 2.0 * ((1 + 2.0 * w.float()) * bce).flatten(1).mean(1).mean()  # alpha 3 on overlaps
    assert torch.allclose(trl["loss_mask"] + trl["loss_trl"], weighted)
    apart = PixelLMMaskLoss(trl=True)([logits[:1]], [gt[:1]], [[1]])
    assert apart["loss_trl"] == 0


def test_point_sampled_losses_close_to_dense():
    from pixellm.modeling.losses import PixelLMMaskLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 32, 32)
    gt = torch.rand(2, 32, 32) > 0.5
    dense = PixelLMMaskLoss(num_points=0)([logits], [gt], [[2]])
    points = PixelLMMaskLoss(num_points=4096, importance_sample_ratio=0.0)([logits], [gt], [[2]])
    assert abs(dense["loss_mask"] - points["loss_mask"]) < 0.15


# ------------------------------------------------------------------ prompts / data
def test_prompt_labels(model):
    from pixellm.data.prompt import IMAGE_TOKEN_INDEX, build_conversation, tokenize_conversation

    tok = model.tokenizer
    conv = build_conversation("<image>\nWhat is a?", f"It is {GROUP}.", eos_token=tok.eos_token)
    assert conv.startswith("A chat between") and "USER: <im_start><image><im_end>\nWhat is a? ASSISTANT: It is [SEG0]" in conv
    ids, labels = tokenize_conversation(tok, conv)
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == 1
    sup = ids[labels != -100].tolist()
    assert sup[-1] == tok.eos_token_id and sup.count(model.codebook_ids[0]) == 1
    assert tok.decode(sup).strip().startswith("It is")


def test_mapper_drops_over_long_questions(model, tmp_path):
    from PIL import Image

    from pixellm.data.mapper import PixelLMDatasetMapper
    from psalm.data.visual_prompts import encode_rle

    img = np.zeros((20, 24, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    mask = np.zeros((20, 24), bool)
    mask[2:8, 3:9] = True
    t = {"name": "the box", "segmentation": encode_rle(mask)}
    d = {"file_name": str(tmp_path / "a.png"), "height": 20, "width": 24, "questions": ["Find the box.", "x " * 400],
         "targets": [[t], [t, t]], "text_answers": [None, None]}
    m = PixelLMDatasetMapper(model.tokenizer, 56, max_length=200)
    out = m(d, np.random.default_rng(0))
    assert len(out["input_ids"]) == 1 and out["gt_masks"].shape == (1, 20, 24) and m.num_dropped == 1
    assert torch.equal(out["gt_masks"][0], torch.from_numpy(mask))
    assert int(sum((i == c).sum() for i in out["input_ids"] for c in [model.codebook_ids[0]])) == 1


def test_synthetic_muse_and_loader(tmp_path, model):
    from psalm.data.synthetic import SyntheticSpec

    from pixellm.data.datasets import PixelLMTrainLoader
    from pixellm.data.mapper import PixelLMDatasetMapper
    from pixellm.data.muse import load_muse_json, prepare_synthetic_muse

    spec = SyntheticSpec(num_train=3, num_val=1, num_test=1)
    path = prepare_synthetic_muse(tmp_path, "train", spec)
    dicts = load_muse_json(path, tmp_path)
    assert dicts and all(len(q) == len(t) for d in dicts for q, t in [(d["questions"], d["targets"])])
    assert max(len(t) for d in dicts for t in d["targets"]) >= 2  # multi-target questions
    assert prepare_synthetic_muse(tmp_path, "train", spec) == path  # same parameters: reused
    with pytest.raises(ValueError, match="other parameters"):
        prepare_synthetic_muse(tmp_path, "train", SyntheticSpec(num_train=4, num_val=1, num_test=1))
    with pytest.raises(ValueError, match="other parameters"):  # the answer style is part of the files
        prepare_synthetic_muse(tmp_path, "train", spec, answer_style="phrase")
    with pytest.raises(ValueError, match="answer_style must be one of"):
        prepare_synthetic_muse(tmp_path / "x", "train", spec, answer_style="after")
    import json

    for style, glue in (("is", " is {seg}"), ("phrase", " {seg}")):
        recs = json.loads(pathlib.Path(prepare_synthetic_muse(tmp_path / style, "train", spec, answer_style=style)).read_text())
        for r in recs:
            for ans, ta in zip(r["answers"], r["text_answers"]):
                assert all(a["rephrased_name"] + glue in ta for a in ans) and ta.count("{seg}") == len(ans)
    loader = PixelLMTrainLoader([dicts], [1.0], PixelLMDatasetMapper(model.tokenizer, 56), ims_per_batch=2, seed=3)
    b1 = next(iter(loader))
    loader2 = PixelLMTrainLoader([dicts], [1.0], PixelLMDatasetMapper(model.tokenizer, 56), ims_per_batch=2, seed=3)
    b2 = next(iter(loader2))
    assert [x["file_name"] for x in b1] == [x["file_name"] for x in b2]
    for x in b1:
        groups = sum(int((i == model.codebook_ids[0]).sum()) for i in x["input_ids"])
        assert groups == x["gt_masks"].shape[0]
    assert loader.state_dict() == {"step": 1}


# ------------------------------------------------------------------ generation
def test_generation_batched_equals_single_and_cache_equals_recompute(model):
    from pixellm.modeling.generation import generate

    a = _image_input(model, "Can you segment a?", h=40, w=30, seed=0)
    b = _image_input(model, "Can you segment the small blue square on the left?", h=25, w=56, seed=1)
    both = generate(model, [a, b], max_new_tokens=5)
    single = [generate(model, [x], max_new_tokens=5)[0] for x in (a, b)]
    for r, s in zip(both, single):
        ra, sa = r["answers"][0], s["answers"][0]
        assert torch.equal(ra["output_ids"], sa["output_ids"])
        assert torch.allclose(ra["step_logits"], sa["step_logits"], atol=1e-4)
    # KV-cache step logits == a full recompute of prompt + answer
    ans = single[1]["answers"][0]
    with torch.no_grad():
        image = model.encode_images(b["clip_image"][None], [b["clip_size"]])
        seq = model.splice([ans["output_ids"]], [0], image, mask_pad_ids=False)
        _, logits = model.run_llm(seq)
    n = len(ans["answer_ids"])
    assert torch.allclose(logits[0, -n - 1 : -1], ans["step_logits"], atol=1e-4)


def test_sampled_generation_is_reproducible(model):
    from pixellm.modeling.generation import generate

    a = _image_input(model, "Can you segment a?")
    r1 = generate(model, [a], max_new_tokens=6, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(5))
    r2 = generate(model, [a], max_new_tokens=6, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(r1[0]["answers"][0]["output_ids"], r2[0]["answers"][0]["output_ids"])


# ------------------------------------------------------------------ MUSE evaluation
def test_muse_evaluator_matching_and_padding():
    from pixellm.evaluation import MuseEvaluator

    gt = torch.zeros(3, 16, 16, dtype=torch.bool)
    gt[0, :4], gt[1, 6:10], gt[2, 12:] = True, True, True
    perm = [2, 0, 1]
    logits = torch.where(gt[perm], 8.0, -8.0)
    ev = MuseEvaluator("x")
    ev.process([{"gt_masks": gt, "target_names": [["a", "b", "c"]]}], [{"answers": [{"mask_logits": logits}]}])
    assert ev.evaluate()["muse"]["gIoU"] == pytest.approx(100.0)
    ev.reset()  # one prediction missing: 2 matched + 1 GT against an empty prediction
    ev.process([{"gt_masks": gt, "target_names": [["a", "b", "c"]]}], [{"answers": [{"mask_logits": logits[:2]}]}])
    r = ev.evaluate()["muse"]
    assert r["gIoU"] == pytest.approx(200.0 / 3) and r["cIoU"] == pytest.approx(100.0 * 128 / 192)
    ev.reset()  # an extra prediction: it pairs with an empty GT (IoU 0)
    extra = torch.cat([logits, torch.where(gt[:1], 8.0, -8.0)])
    ev.process([{"gt_masks": gt, "target_names": [["a", "b", "c"]]}], [{"answers": [{"mask_logits": extra}]}])
    assert ev.evaluate()["muse"]["gIoU"] == pytest.approx(75.0)


# ------------------------------------------------------------------ predictor
def test_answer_segments_inline():
    from pixellm.predictor import answer_segments

    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    text, segs = answer_segments(f"the red circle is {GROUP} and the blue square is {GROUP}.", masks,
                                 torch.tensor([0.9, 0.8]), GROUP)
    assert text == "the red circle is <mask:0> and the blue square is <mask:1>."
    assert [s["phrase"] for s in segs] == ["the red circle", "the blue square"]
    text, segs = answer_segments(f"the red circle is {GROUP}", masks[:0], None, GROUP)
    assert segs == []


def test_predictor_batched_and_drawn(model, tok_dir):
    from pixellm.predictor import PixelLMPredictor, draw_answer

    pred = PixelLMPredictor(_cfg(tok_dir), model=model)
    imgs = [np.full((30, 40, 3), 120, np.uint8), np.full((20, 20, 3), 30, np.uint8)]
    outs = pred.predict_batch(imgs, ["What is the red circle?", "Segment the square."], max_new_tokens=4)
    assert len(outs) == 2 and all(isinstance(o["text"], str) for o in outs)
    assert draw_answer(imgs[0], outs[0]).shape == (30, 40, 3)
    # forced: a drawn segment with its phrase
    o = {"segments": [{"phrase": "the box", "mask": np.eye(30, 40, dtype=bool), "score": 1.0}]}
    assert draw_answer(imgs[0], o).shape == (30, 40, 3)


# ------------------------------------------------------------------ referring through psalm's evaluator
@pytest.mark.parametrize("protocol", ["teacher_forced", "generate", "multi", "gres"])
def test_referring_evaluation_through_psalm(model, tok_dir, tmp_path_factory, protocol):
    from pixellm.evaluation import evaluate_pixellm

    root = tmp_path_factory.mktemp("syn")
    cfg = _cfg(tok_dir, "DATASETS.SYNTHETIC.ROOT", str(root), "DATASETS.SYNTHETIC.NUM_TRAIN", "2",
               "DATASETS.SYNTHETIC.NUM_VAL", "2", "DATASETS.SYNTHETIC.NUM_TEST", "1",
               "DATASETS.TEST", f'("psalm_synthetic_val_{"gres" if protocol == "gres" else "referring"}",)', "MODEL.PIXELLM.EVAL.REFER_PROTOCOL", "teacher_forced" if protocol in ("multi", "gres") else protocol,
               "MODEL.PIXELLM.EVAL.MULTI_REFER", str(protocol == "multi"),
               "MODEL.PIXELLM.MAX_NEW_TOKENS", "3")
    name = "gres" if protocol == "gres" else "referring"
    res = evaluate_pixellm(cfg, model, limit=2)[f"psalm_synthetic_val_{name}"][name]
    assert {"cIoU", "gIoU", "num_samples"} <= set(res) and res["num_samples"] == 2
    if protocol == "gres":
        assert "N-acc" in res


def test_psalm_muse_sets_evaluate_with_the_muse_protocol(model, tok_dir, tmp_path):
    """psalm's own ``muse_<split>`` (the released files in psalm's layout) goes through the MUSE
    evaluator, not the referring branch."""
    import json
    import os

    from detectron2.data import DatasetCatalog

    from pixellm.data.muse import prepare_synthetic_muse
    from pixellm.evaluation import evaluate_pixellm
    from psalm.data.datasets.muse import register_muse
    from psalm.data.synthetic import SyntheticSpec

    gen = tmp_path / "gen"
    src = prepare_synthetic_muse(gen, "val", SyntheticSpec(num_train=1, num_val=2, num_test=1))
    os.makedirs(tmp_path / "data" / "muse")
    os.makedirs(tmp_path / "data" / "coco" / "train2014")
    os.symlink(gen / "val", tmp_path / "data" / "coco" / "train2014" / "val")
    (tmp_path / "data" / "muse" / "muse_val.json").write_text(pathlib.Path(src).read_text())
    register_muse(str(tmp_path / "data"))
    try:
        n_gt = sum(len(a) for r in json.loads(pathlib.Path(src).read_text()) for a in r["answers"])
        res = evaluate_pixellm(_cfg(tok_dir, "MODEL.PIXELLM.MAX_NEW_TOKENS", "3"), model, ["muse_val"])
        r = res["muse_val"]["muse"]
        assert r["without_gpt_scoring"] == 1.0 and r["num_gt"] == n_gt and 0.0 <= r["gIoU"] <= 100.0
        assert len(DatasetCatalog.get("muse_val")) == 2
    finally:
        register_muse()  # back to the default root


def test_unknown_evaluator_type_is_an_error_before_any_model_run(model, tok_dir):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from pixellm.evaluation import evaluate_pixellm

    name = "pixellm_test_panoptic_only"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: pytest.fail("loaded before the type check"))
        MetadataCatalog.get(name).set(evaluator_type="coco_panoptic_seg")
    with pytest.raises(ValueError, match="cannot evaluate 'pixellm_test_panoptic_only'.*coco_panoptic_seg"):
        evaluate_pixellm(_cfg(tok_dir), model, ["psalm_synthetic_val_referring", name])


def test_multi_referring_conversations_official_grouping():
    from pixellm.evaluation import multi_referring_conversations

    sents = [f"s{i}" for i in range(17)]
    convs = multi_referring_conversations(sents, "G")
    assert [len(idx) for _, _, idx in convs] == [6, 5, 4, 2]
    q, a, idx = convs[3]
    assert "What is s15 and s16 in this image? Please output segmentation mask." in q and a == "G and G."
    assert multi_referring_conversations(["x"], "G")[0][1] == "G"
    assert multi_referring_conversations(sents[:3], "G")[0][1] == "G, G and G."


def test_multi_target_conversion_from_referring():
    from pixellm.data.muse import multi_target_from_referring

    refs = [{"file_name": "a.png", "height": 4, "width": 4, "image_id": 1, "sentences": [f"obj {i}"],
             "annotations": [{"segmentation": {"size": [4, 4], "counts": "04"}, "id": i}]} for i in range(7)]
    out = multi_target_from_referring(refs, np.random.default_rng(0))
    assert len(out) == 1 and 1 <= len(out[0]["questions"]) <= 3
    assert all(1 <= len(t) <= 3 for t in out[0]["targets"])
    names = [t["name"] for ts in out[0]["targets"] for t in ts]
    assert len(set(names)) == len(names)  # a target is asked once
    for q, ts in zip(out[0]["questions"], out[0]["targets"]):
        assert all(t["name"] in q for t in ts)


def test_gradient_checkpointing_with_lora(tok_dir):
    from pixellm.modeling.meta_arch import PixelLM

    torch.manual_seed(2)
    m = PixelLM(_cfg(tok_dir, "MODEL.PIXELLM.LLM.GRADIENT_CHECKPOINTING", "True")).train()
    assert m.causal_lm().is_gradient_checkpointing
    x = _image_input(m, "Can you segment a?", f"a is {GROUP}.")
    x["gt_masks"] = torch.rand(1, 40, 30) > 0.5
    sum(m.losses([x]).values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "lora_B" in n)


def test_mapper_vqa_and_referring_items(model, tmp_path):
    from PIL import Image

    from pixellm.data.mapper import PixelLMDatasetMapper
    from psalm.data.visual_prompts import encode_rle

    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "a.png")
    m = PixelLMDatasetMapper(model.tokenizer, 56)
    vqa = {"file_name": str(tmp_path / "a.png"), "height": 20, "width": 24,
           "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A wall."},
                             {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."}]}
    x = m(vqa)
    ids, labels = x["input_ids"][0], x["labels"][0]
    sup = model.tokenizer.decode(ids[labels != -100])
    assert "A wall." in sup and "Grey." in sup and "What is it" not in sup and "Colour" not in sup
    assert x["gt_masks"].shape == (0, 20, 24)
    mask = np.zeros((20, 24), bool)
    mask[1:5, 1:5] = True
    refs = [{"file_name": str(tmp_path / "a.png"), "height": 20, "width": 24, "sentences": [f"thing {i}"],
             "annotations": [{"segmentation": encode_rle(mask)}]} for i in range(3)]
    y = m(refs, np.random.default_rng(1))
    groups = sum(int((i == model.codebook_ids[0]).sum()) for i in y["input_ids"])
    assert groups == y["gt_masks"].shape[0] >= 1


def test_bf16_inference(tok_dir):
    from pixellm.modeling.generation import generate
    from pixellm.modeling.meta_arch import PixelLM

    torch.manual_seed(3)
    m = PixelLM(_cfg(tok_dir)).eval()
    x = _image_input(m, "Can you segment a?", f"a is {GROUP}.")
    with torch.no_grad():
        ref = m.forward_teacher_forced([x])["pred_masks"][0]
        m = m.to(torch.bfloat16)
        out = m.forward_teacher_forced([x])["pred_masks"][0]
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.float() - ref).abs().max() < 0.25 * ref.abs().max() + 0.1
    assert len(generate(m, [dict(x, input_ids=[x["input_ids"][0][:-8]])], max_new_tokens=2)[0]["answers"]) == 1


def test_official_dice_is_psalm_dice_with_official_smoothing():
    """The official dice (scale 1000, eps 1e-6) written out equals psalm's dice_loss with smooth 1e-3."""
    import torch

    from pixellm.modeling.losses import official_dice_loss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 500, generator=g, dtype=torch.float64)
    t = (torch.rand(3, 500, generator=g, dtype=torch.float64) > 0.7).to(torch.float64)
    t[2] = 0  # an empty target: where the smoothing decides the value
    p = x.sigmoid()
    want = (1 - (2 * (p / 1000 * t).sum(-1) + 1e-6) / ((p / 1000).sum(-1) + (t / 1000).sum(-1) + 1e-6)).sum() / 3
    torch.testing.assert_close(official_dice_loss(x, t, 3.0), want, rtol=1e-12, atol=1e-12)
