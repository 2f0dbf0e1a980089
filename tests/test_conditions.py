"""Conditions and region pooling (golden parity: psalm_e2e `*.cond.*`, `region_pooling.*`, `region.region.*`)."""

import json

import pytest
import torch
from torch import nn

from psalm.checkpoint.phi_keys import OFFICIAL_LANGUAGE_HEADS, official_language_heads_to_psalm
from psalm.modeling.conditions import (
    RegionPooler,
    category_condition,
    gather_mask_tokens,
    gather_region_tokens,
    sentence_condition,
)
from psalm.modeling.llm import load_tokenizer
from psalm.data.prompt import PromptBuilder
from psalm.modeling.sequence import SequenceAssembler

PROJECTORS = ("mask_token_projector", "class_projector", "refer_projector", "region_projector")


@pytest.fixture(scope="module")
def golden(golden_dir):
    from safetensors.torch import load_file

    d = golden_dir / "psalm_e2e"
    sd = load_file(str(d / "state_dict.safetensors"))
    heads = nn.ModuleDict({name: nn.Linear(64, 64) for name in PROJECTORS})
    conv = official_language_heads_to_psalm(sd)
    assert conv.state_dict["mask_tokens"].shape == (10, 64)
    heads.load_state_dict({k: v for k, v in conv.state_dict.items() if k != "mask_tokens"}, strict=True)
    return {
        "t": load_file(str(d / "tensors.safetensors")),
        "m": json.loads((d / "manifest.json").read_text()),
        "heads": heads.double(),
        "dir": d,
        "sd": sd,
    }


@pytest.mark.golden
def test_golden_conditions(golden):
    t, heads = golden["t"], golden["heads"]
    tol = 1e-6
    with torch.no_grad():
        for name in ("referring", "panoptic", "region"):
            h = t[f"{name}.llm.last_hidden_state"]
            pos = t[f"{name}.spliced.seg_query_mask"][0].nonzero().flatten()[None]
            q = heads["mask_token_projector"](gather_mask_tokens(h, pos))
            assert (q - t[f"{name}.cond.seg_query"]).abs().max() <= tol, name
        h = t["referring.llm.last_hidden_state"]
        s = heads["refer_projector"](
            sentence_condition(h, t["referring.spliced.refer_embedding_indices"].bool(), "mean")
        )
        assert s.shape == (1, 1, 64) and (s - t["referring.cond.SEG_embedding"]).abs().max() <= tol
        h = t["panoptic.llm.last_hidden_state"]
        c = heads["class_projector"](category_condition(h, t["panoptic.spliced.class_name_embedding_indices"]))
        assert c.shape == (1, 4, 64) and (c - t["panoptic.cond.class_name_embedding"]).abs().max() <= tol
        h = t["region.llm.last_hidden_state"]
        pos = [t["region.spliced.region_embedding_masks"][0].nonzero().flatten()]
        r = heads["region_projector"](gather_region_tokens(h, pos)[0])
        assert (r - t["region.cond.region_embedding.0"]).abs().max() <= tol
    assert OFFICIAL_LANGUAGE_HEADS["refer_projector"] == "SEG_token_projector"


@pytest.mark.golden
def test_refer_pooling_last_is_the_trailing_seg(golden):
    t = golden["t"]
    h = t["referring.llm.last_hidden_state"]
    span = t["referring.spliced.refer_embedding_indices"].bool()
    last = span[0].nonzero().flatten()[-1]
    assert int(t["referring.spliced.inputs_embeds"].shape[1]) > int(last)
    # the span's last token is [SEG]: its embedding is row 386 of embed_tokens
    assert torch.equal(
        t["referring.spliced.inputs_embeds"][0, last], golden["sd"]["model.embed_tokens.weight"][386].double()
    )
    out = sentence_condition(h, span, "last")
    assert out.shape == (1, 1, 64) and torch.equal(out[0, 0], h[0, last])
    assert not torch.allclose(out, sentence_condition(h, span, "mean"))
    # batched, different span ends
    h2 = torch.randn(2, 7, 3)
    m2 = torch.tensor([[0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(sentence_condition(h2, m2, "last")[:, 0], torch.stack([h2[0, 2], h2[1, 5]]))
    with pytest.raises(ValueError, match="REFER_POOLING"):
        sentence_condition(h2, m2, "first")
    with pytest.raises(ValueError, match="no refer span"):
        sentence_condition(h2, torch.zeros_like(m2), "mean")


@pytest.mark.golden
def test_shuffle_then_restore_gives_the_canonical_order(golden):
    """Pool the spliced embeddings of a shuffled and an unshuffled prompt: after restoring, equal."""
    t = golden["t"]
    tok = load_tokenizer(golden["dir"] / "tokenizer")
    b = PromptBuilder(tok)
    emb = nn.Embedding(387, 64).double()
    emb.weight.data.copy_(golden["sd"]["model.embed_tokens.weight"].double())
    names = ["person", "car", "tree-merged", "sky", "road"]
    plain = b.build("panoptic", class_names=names)
    shuf = [
        b.build("panoptic", class_names=names, shuffle_classes=True, generator=torch.Generator().manual_seed(s))
        for s in (1, 2)
    ]
    assert all(p.class_order.tolist() != list(range(6)) for p in shuf)
    asm = SequenceAssembler()
    img, mq = t["image.projector_tokens"], golden["sd"]["seg_query"].double()
    ref = category_condition(asm([plain], emb, img, mq).inputs_embeds, asm([plain], emb, img, mq).class_span_ids)
    out = asm(shuf, emb, img.expand(2, -1, -1), mq)
    prompt_order = category_condition(out.inputs_embeds, out.class_span_ids)
    restored = category_condition(out.inputs_embeds, out.class_span_ids, torch.stack([p.restore_index for p in shuf]))
    assert not torch.allclose(prompt_order[0], ref[0])
    assert torch.allclose(restored, ref.expand(2, -1, -1), atol=1e-12, rtol=0)


def test_category_condition_errors():
    h = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="no class span"):
        category_condition(h, torch.zeros(2, 6, dtype=torch.long))
    ids = torch.tensor([[1, 1, 2, 0, 0, 0], [1, 2, 3, 0, 0, 0]])
    with pytest.raises(ValueError, match="same number of classes"):
        category_condition(h, ids)


def _boxes(m):
    masks = torch.zeros(3, 256, 256, dtype=torch.bool)
    for i, (r0, r1, c0, c1) in enumerate(m["region_pooling_boxes_r0r1c0c1"]):
        masks[i, r0:r1, c0:c1] = True
    return masks


@pytest.mark.golden
def test_golden_region_pooling_with_recorded_points(golden):
    t, m = golden["t"], golden["m"]
    masks = _boxes(m)
    assert masks.flatten(1).sum(1).tolist() == [100, 256, 900]  # the <, ==, > paths
    pool = RegionPooler("sample_points", 256).eval()
    pts = [torch.stack([t[f"region_pooling.sampled_points.{i}"] for i in range(3)])]
    out = pool(t["region_pooling.feature_map"], [masks], points=pts)[0]
    assert out.dtype == torch.float64 and (out - t["region_pooling.output"][:, 0]).abs().max() <= 1e-12
    pts = [torch.stack([t[f"region.region.sampled_points.{i}"] for i in range(2)])]
    rm = t["region.region.region_masks"]
    out = pool(t["image.projector_tokens"], [rm], points=pts)[0]
    ref = t["region.region.pooled_features.0"][:, 0]
    assert (out - ref).abs().max() <= 1e-12
    # region 0 has exactly 256 pixels: no randomness, any sampler gives the official feature
    sampled = pool(t["image.projector_tokens"], [rm])[0]
    assert (sampled[0] - ref[0]).abs().max() <= 1e-12
    assert (RegionPooler("mask_average")(t["image.projector_tokens"], [rm])[0][0] - ref[0]).abs().max() < 1e-6


@pytest.mark.golden
def test_region_pooling_determinism_and_training_randomness(golden):
    t, masks = golden["t"], _boxes(golden["m"])
    fmap = t["region_pooling.feature_map"]
    pool = RegionPooler("sample_points", 256, seed=5).eval()
    a = pool(fmap, [masks])[0]
    assert torch.equal(a, pool(fmap, [masks])[0])
    # independent of the batch composition
    both = pool(torch.cat([fmap, fmap.flip(1)]), [masks, masks[1:]])
    assert torch.equal(both[0], a) and both[1].shape == (2, 64)
    assert not torch.equal(RegionPooler("sample_points", 256, seed=6).eval()(fmap, [masks])[0][2], a[2])
    pool.train()
    torch.manual_seed(0)
    x = pool(fmap, [masks])[0]
    torch.manual_seed(0)
    assert torch.equal(x, pool(fmap, [masks])[0])
    torch.manual_seed(1)
    y = pool(fmap, [masks])[0]
    assert torch.equal(x[1], y[1]) and not torch.equal(x[2], y[2])  # only the random (>256 px) path changes


def test_mask_average_is_the_exact_mean_of_the_upsampled_map():
    torch.manual_seed(0)
    fmap = torch.randn(1, 16, 5, dtype=torch.float64)  # 4x4 map, 5 channels
    masks = torch.rand(2, 48, 40) > 0.7
    out = RegionPooler("mask_average")(fmap, [masks])[0]
    # brute force: interpolate the map at every pixel (official coordinates) and average under the mask
    grid_map = fmap.reshape(4, 4, 5).permute(2, 0, 1)[None]
    rows, cols = torch.meshgrid(
        torch.arange(48.0, dtype=torch.float64) / 48, torch.arange(40.0, dtype=torch.float64) / 40, indexing="ij"
    )
    grid = torch.stack([cols, rows], -1).double()[None] * 2 - 1
    up = nn.functional.grid_sample(grid_map, grid, mode="bilinear", align_corners=True)[0]  # [5, 48, 40]
    ref = torch.stack([up[:, m].mean(1) for m in masks])
    assert (out - ref).abs().max() < 1e-12
    # with exactly num_points pixels, sample_points (all pixels, no randomness) agrees
    exact = torch.zeros(1, 48, 40, dtype=torch.bool)
    exact[0, 3:11, 5:13] = True  # 64 pixels
    sp = RegionPooler("sample_points", 64).eval()(fmap, [exact])[0]
    ma = RegionPooler("mask_average", 64)(fmap, [exact])[0]
    assert (sp - ma).abs().max() < 1e-6


def test_region_pooler_errors():
    pool = RegionPooler()
    with pytest.raises(ValueError, match="no pixels"):
        pool(torch.randn(1, 16, 4), [torch.zeros(1, 32, 32, dtype=torch.bool)])
    with pytest.raises(ValueError, match="square"):
        pool(torch.randn(1, 12, 4), [torch.ones(1, 32, 32, dtype=torch.bool)])
    with pytest.raises(ValueError, match="REGION_POOLING"):
        RegionPooler("max")
    # a sample without visual prompts gets an empty [0, H] result
    out = pool.eval()(
        torch.randn(2, 16, 4), [torch.zeros(0, 32, 32, dtype=torch.bool), torch.ones(1, 32, 32, dtype=torch.bool)]
    )
    assert out[0].shape == (0, 4) and out[1].shape == (1, 4)
    assert RegionPooler()(torch.randn(1, 16, 4), [torch.zeros(0, 32, 32, dtype=torch.bool)])[0].shape == (0, 4)


def test_eval_points_follow_the_seeded_recipe_and_errors_name_the_empty_region():
    """Eval mode: region j's points are those of a fresh ``torch.Generator().manual_seed(seed + j)``
    (randperm when more pixels than points, all + randint repeats when fewer) over its pixels in
    row-major order; the pooler reuses one generator, with the same draws."""
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(3, 40, 36, generator=g) > 0.6  # ~576 px each
    masks[1] = False
    masks[1, 2:6, 3:7] = True  # 16 px < P
    P, seed = 64, 11
    pool = RegionPooler("sample_points", P, seed=seed).eval()
    got = pool._sample(masks, [int(m.sum()) for m in masks])
    for j, m in enumerate(masks):
        rc = m.nonzero().double() / torch.tensor([40.0, 36.0], dtype=torch.float64)
        gen, n = torch.Generator().manual_seed(seed + j), rc.shape[0]
        idx = (torch.randperm(n, generator=gen)[:P] if n > P
               else torch.cat([torch.arange(n), torch.randint(0, n, (P - n,), generator=gen)]))
        assert torch.equal(got[j], rc[idx]), j
    fmap = torch.randn(1, 16, 4).repeat(2, 1, 1)
    out = pool(fmap, [masks, masks[:1]])
    assert out[0].shape == (3, 4) and torch.equal(out[1], out[0][:1])  # per sample, region 0 seeds alike
    bad = masks.clone()
    bad[2] = False
    with pytest.raises(ValueError, match=r"region mask\(s\) \[2\] of sample 1"):
        pool(fmap, [masks, bad])
