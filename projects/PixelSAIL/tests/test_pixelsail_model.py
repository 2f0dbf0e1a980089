"""Spec B6 tests (a) VP injection, (b) attention mask, (c) mRoPE ids, (d) up-sampling strides,
(h) forced "It is [SEG]." generation, (j) batch-2 collate, plus the resize rule and cached generation."""
import pytest
import torch

from pixelsail_testing import make_input


# ----------------------------------------------------------------------------------- resize / patches
def test_official_resize_rule():
    from pixel_sail.patchify import official_resize_hw

    assert official_resize_hw(480, 640, 16, 1024) == (480, 640)  # 30 x 40 = 1200 tokens (spec example)
    assert official_resize_hw(3000, 2000, 16, 1024) == (1024, 688)  # long side capped; short ceil to 16
    assert official_resize_hw(101, 50, 16, 1024) == (112, 64)  # ceil(101/16)*16 = 112; round(112*50/101)=55 -> 64
    h, w = official_resize_hw(777, 333, 16, 1024)
    assert h % 16 == 0 and w % 16 == 0 and h <= 1024


def test_patchify_row_major():
    from pixel_sail.patchify import patchify

    x = torch.arange(3 * 16 * 24, dtype=torch.float).reshape(3, 16, 24)
    p = patchify(x, 8)
    assert p.shape == (2 * 3, 3 * 64)
    assert torch.equal(p[4].reshape(3, 8, 8), x[:, 8:16, 8:16])  # row 1, column 1 -> index 1 * 3 + 1


def test_mask_to_patches_any_pixel():
    from pixel_sail.patchify import mask_to_patches

    m = torch.zeros(1, 16, 16, dtype=torch.bool)
    m[0, 9, 1] = True  # one pixel in patch (1, 0)
    out = mask_to_patches(m, (2, 2))
    assert out.tolist() == [[[False, False], [True, False]]]


# ----------------------------------------------------------------------------------- (a) VP injection
def test_vp_injection_only_prompted_patches_and_overwrite(make_model):
    from pixel_sail.sequence import build_sample, collate
    from pixel_sail.patchify import patchify

    model = make_model()
    inp = make_input(model)
    h, w = inp["grid_hw"]
    big = torch.zeros(2, h, w, dtype=torch.bool)
    big[0, :, :3] = True  # prompt 2 (first, larger): left three columns
    big[1, 1, 1:5] = True  # prompt 0 (later, smaller) overlaps columns 1, 2
    turns = [("What is <Prompt0>?", "A circle.")]
    with_vp = build_sample(model.tokenizer, model.ids, (h, w), turns, big, vp_ids=[2, 0])
    no_vp = build_sample(model.tokenizer, model.ids, (h, w), turns)
    idx = with_vp.vp_index[1:1 + h * w].reshape(h, w)
    assert (idx[1, 1:5] == 0).all()  # later overwrites earlier
    assert (idx[0, :3] == 2).all() and idx[1, 0] == 2
    assert (idx[0, 3:] == -2).all()  # unprompted patch
    assert (with_vp.vp_index[h * w + 1:] == -1).all() and with_vp.vp_index[0] == -1  # text
    patches = patchify(inp["pixel_values"], model.patch_size)
    with torch.no_grad():
        e1 = model.embed(collate([with_vp], model.ids.pad), patches)[0]
        e0 = model.embed(collate([no_vp], model.ids.pad), patches)[0]
        emb = model.llm.get_input_embeddings()
        term = {k: model.vp_embed(emb.weight[model.ids.prompts[k]]) for k in (0, 2)}
    diff = (e1 - e0).abs().sum(-1)
    changed = with_vp.vp_index >= 0
    assert (diff[~changed] == 0).all()
    for pos in torch.nonzero(changed).flatten().tolist():
        k = int(with_vp.vp_index[pos])
        torch.testing.assert_close(e1[pos] - e0[pos], term[k], rtol=1e-5, atol=1e-6)
    table = model.vp_table()
    assert table.shape[0] == model.num_visual_prompts + 2
    assert (table[-1] == 0).all() and (table[-2] == 0).all()


def test_vp_embed_init_std_option(make_model):
    """VP_EMBED_INIT_STD: compat 0.02 (the official module's normal(0, initializer_range), inferred); a larger
    std scales the injected term vp_embed(embed(<Prompt_k>)) proportionally (issue #16: at 0.02 the term
    starts far below the patch embedding of a from-scratch model)."""
    from pixel_sail.patchify import patchify

    base = make_model()
    assert base.vp_embed.weight.std().item() == pytest.approx(0.02, rel=0.1)
    big = make_model("MODEL.PIXEL_SAIL.VP_EMBED_INIT_STD", 0.5)
    assert big.vp_embed.weight.std().item() == pytest.approx(0.5, rel=0.1)
    for name, p in base.state_dict().items():  # nothing else changes (same seed, same draw order)
        if name != "vp_embed.weight":
            assert torch.equal(p, big.state_dict()[name]), name
    with torch.no_grad():
        t0, t1 = base.vp_table()[:-2].norm(dim=-1), big.vp_table()[:-2].norm(dim=-1)
        vis = base.vis_embed(patchify(make_input(base)["pixel_values"], base.patch_size)).norm(dim=-1).mean()
    torch.testing.assert_close(t1 / t0, torch.full_like(t0, 25.0), rtol=1e-4, atol=0)
    assert float(t0.mean()) < 0.1 * float(vis)  # the compat term is drowned by the patch embedding at init


# ----------------------------------------------------------------------------------- (b) attention mask
def test_attention_mask_block_and_causal(make_model):
    from pixel_sail.sequence import build_sample, collate

    model = make_model()
    s = build_sample(model.tokenizer, model.ids, (2, 3), [("Segment it.", "It is [SEG].")])
    m = collate([s], model.ids.pad).attention_mask[0, 0]
    L = len(s.input_ids)
    vb = list(range(0, 2 * 3 + 2))  # <vision> .. </vision>
    for i in range(L):
        for j in range(L):
            expected = j <= i or (i in vb and j in vb)
            assert bool(m[i, j]) == expected, (i, j)
    causal = collate([s], model.ids.pad, vision_bidirectional=False).attention_mask[0, 0]
    assert torch.equal(causal, torch.ones(L, L, dtype=torch.bool).tril())


@pytest.mark.parametrize("bidirectional", [True, False])
def test_later_patch_changes_earlier_patch_output(make_model, bidirectional):
    """The mask reaches the attention: with the vision block bidirectional, changing the LAST patch changes
    the FIRST patch's hidden state; with causal vision attention it cannot."""
    from pixel_sail.patchify import patchify
    from pixel_sail.sequence import build_sample, collate

    model = make_model("MODEL.PIXEL_SAIL.VISION_BIDIRECTIONAL", bidirectional)
    inp = make_input(model)
    s = build_sample(model.tokenizer, model.ids, inp["grid_hw"], [("Segment it.", "It is [SEG].")])
    batch = collate([s], model.ids.pad, vision_bidirectional=bidirectional)
    patches = patchify(inp["pixel_values"], model.patch_size)
    other = patches.clone()
    other[-1] += 3.0
    with torch.no_grad():
        h1 = model.run_llm(batch, model.embed(batch, patches)).last_hidden_state[0]
        h2 = model.run_llm(batch, model.embed(batch, other)).last_hidden_state[0]
    first, last = 1, s.num_patches
    assert (h1[last] - h2[last]).abs().max() > 1e-3  # the changed patch itself
    earlier = (h1[first:last] - h2[first:last]).abs().max()
    if bidirectional:
        assert earlier > 1e-4
    else:
        assert earlier == 0
    assert (h1[0] - h2[0]).abs().max() > 1e-4 if bidirectional else (h1[0] - h2[0]).abs().max() == 0


def test_text_after_image_is_causal(make_model):
    from pixel_sail.patchify import patchify
    from pixel_sail.sequence import build_sample, collate

    model = make_model()
    inp = make_input(model)
    a = build_sample(model.tokenizer, model.ids, inp["grid_hw"], [("Segment the circle.", "It is [SEG].")])
    b = build_sample(model.tokenizer, model.ids, inp["grid_hw"], [("Segment the square.", "It is [SEG].")])
    patches = patchify(inp["pixel_values"], model.patch_size)
    with torch.no_grad():
        ha = model.run_llm(collate([a], 0), model.embed(collate([a], 0), patches)).last_hidden_state[0]
        hb = model.run_llm(collate([b], 0), model.embed(collate([b], 0), patches)).last_hidden_state[0]
    n = a.num_patches + 2
    torch.testing.assert_close(ha[:n], hb[:n])  # the vision block does not see the question


# ----------------------------------------------------------------------------------- (c) mRoPE
def test_mrope_position_ids():
    from pixel_sail.sequence import position_ids_3d

    pos = position_ids_3d(12, 1, (2, 3))
    assert pos[:, 0].tolist() == [0, 0, 0]  # <vision>
    expected_patches = [(1, 1 + r, 1 + c) for r in range(2) for c in range(3)]
    assert [tuple(pos[:, 1 + i].tolist()) for i in range(6)] == expected_patches
    nxt = 1 + 3  # max id of the block (1 + 2) + 1
    assert [tuple(pos[:, 7 + i].tolist()) for i in range(5)] == [(nxt + i,) * 3 for i in range(5)]


def test_mrope_rotary_matches_definition(make_model):
    """Text-only (i, i, i) ids give exactly Qwen2's RoPE; 3-D ids take frequency sections
    [0, d/4, d/4] from (t, h, w)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    model = make_model()
    rot = model.llm.model.rotary_emb
    d = model.llm.config.hidden_size // model.llm.config.num_attention_heads
    assert rot.mrope_section == [0, d // 4, d // 4]
    x = torch.zeros(1, 5, 4)
    ids = torch.arange(5)[None]
    cos_m, sin_m = rot(x, ids[None].expand(3, -1, -1))
    cos_q, sin_q = Qwen2RotaryEmbedding(model.llm.config)(x, ids)
    torch.testing.assert_close(cos_m, cos_q)
    torch.testing.assert_close(sin_m, sin_q)
    pos = torch.tensor([[[7]], [[2]], [[5]]])  # (t, h, w)
    cos, _ = rot(x[:, :1], pos)
    inv = rot.inv_freq
    half = torch.cat([(2 * inv[:d // 4]).cos(), (5 * inv[d // 4:]).cos()])
    torch.testing.assert_close(cos[0, 0], torch.cat([half, half]))


# ----------------------------------------------------------------------------------- (d) up-sampling
@pytest.mark.parametrize("p,stride,blocks", [(8, 2, 2), (16, 2, 3), (32, 2, 4), (16, 4, 2), (8, 4, 1), (32, 4, 3)])
def test_upsampling_output_stride(p, stride, blocks):
    from pixel_sail.heads import PixelSAILMaskHead

    head = PixelSAILMaskHead(hidden_size=32, patch_size=p, output_stride=stride, seg_hidden_dim=8)
    assert len(head.upsample_blocks) == blocks
    h, w = 3, 5
    f = head.image_features(torch.randn(h, w, 32))
    assert f.shape == (8, h * p // stride, w * p // stride)
    masks = head([torch.randn(h, w, 32)], [torch.randn(2, 32)])[0]
    assert masks.shape == (2, h * p // stride, w * p // stride)


def test_pre_projector_only_above_1024():
    from pixel_sail.heads import PixelSAILMaskHead

    small = PixelSAILMaskHead(hidden_size=896, patch_size=16, seg_hidden_dim=512)
    large = PixelSAILMaskHead(hidden_size=2048, patch_size=16, seg_hidden_dim=512)
    assert small.image_feature_pre_projector is None and small.in_dim == 896
    assert large.image_feature_pre_projector[2].out_features == 1024 and large.in_dim == 1024
    assert large.seg_token_projector[0].in_features == 2048 and large.seg_token_projector[2].out_features == 512
    with pytest.raises(ValueError, match="power of 2"):
        PixelSAILMaskHead(hidden_size=32, patch_size=16, output_stride=3)


def test_mask_logits_are_einsum_of_projected_states(make_model):
    model = make_model()
    v, s = torch.randn(2, 3, 64), torch.randn(2, 64)
    with torch.no_grad():
        out = model.mask_head([v], [s])[0]
        ref = torch.einsum("qc,chw->qhw", model.mask_head.seg_token_projector(s), model.mask_head.image_features(v))
    torch.testing.assert_close(out, ref)


# ----------------------------------------------------------------------------------- (j) collate
def test_collate_batch2_patch_indices_contiguous(make_model):
    from pixel_sail.sequence import build_sample, collate

    model = make_model()
    a = build_sample(model.tokenizer, model.ids, (2, 3), [("Segment it.", "It is [SEG].")])
    b = build_sample(model.tokenizer, model.ids, (3, 2), [("Segment the big one please.", "It is [SEG].")])
    for side in ("right", "left"):
        batch = collate([a, b], model.ids.pad, padding_side=side)
        for i, n0 in ((0, 0), (1, 6)):
            idx = batch.patch_index[i][batch.patch_index[i] >= 0]
            assert idx.tolist() == list(range(n0, n0 + 6))  # sample 2 starts at 6, not 7 (B7.7)
            pos = torch.nonzero(batch.patch_index[i] >= 0).flatten()
            assert (pos.diff() == 1).all()
            assert (batch.input_ids[i, pos] == model.ids.vision_patch).all()


def test_batched_forward_equals_single(make_model):
    """Padding and the patch offsets do not change a sample's outputs."""
    model = make_model()
    x1 = make_input(model, 32, 48, seed=1, turns=[("Segment the circle.", "It is [SEG].")])
    x2 = make_input(model, 40, 24, seed=2, turns=[("Segment it.", "Sure, [SEG] and [SEG].")])
    with torch.no_grad():
        both = model.forward_features([x1, x2])
        one = model.forward_features([x2])
    torch.testing.assert_close(both["pred_masks"][1], one["pred_masks"][0], rtol=1e-4, atol=1e-5)
    assert both["pred_masks"][1].shape[0] == 2


# ----------------------------------------------------------------------------------- generation
def test_cached_generation_matches_full_forward(make_model):
    """The cached greedy loop gives the same [SEG] states and tokens as one full forward of the answer."""
    from pixel_sail.sequence import build_sample, collate

    model = make_model("MODEL.PIXEL_SAIL.TEST.MAX_NEW_TOKENS", 6)
    inp = make_input(model)
    g = model.generate([inp, make_input(model, 24, 40, seed=3)], ["Segment it.", "What is this?"],
                       ["It is [SEG].", ""])
    ids = g[0]["token_ids"]
    assert len(ids) >= 5
    text = model.tokenizer.decode(ids, skip_special_tokens=False)
    s = build_sample(model.tokenizer, model.ids, inp["grid_hw"], [("Segment it.", None)])
    full = torch.cat([s.input_ids, torch.tensor(ids)])
    s.input_ids, s.labels = full, torch.full_like(full, -100)
    s.vp_index = torch.cat([s.vp_index, torch.full((len(ids),), -1)])
    batch = collate([s], model.ids.pad)
    from pixel_sail.patchify import patchify

    with torch.no_grad():
        hidden = model.run_llm(batch, model.embed(batch, patchify(inp["pixel_values"], 8))).last_hidden_state[0]
        logits = model.llm.lm_head(hidden)
    n0 = len(full) - len(ids)
    seg_pos = [n0 + i for i, t in enumerate(ids) if t == model.ids.seg]
    torch.testing.assert_close(g[0]["seg_states"], hidden[seg_pos], rtol=1e-4, atol=1e-5)
    # every generated token after the forced prefix is the argmax of the full forward
    n_forced = len(model.tokenizer.encode("It is [SEG].", add_special_tokens=False))
    for i in range(n_forced, len(ids)):
        assert int(logits[n0 + i - 1].argmax()) == ids[i], (i, text)


def test_forced_seg_retry_yields_one_mask(make_model):
    """(h): a model that never emits [SEG] is retried with "It is [SEG]." and gives exactly one mask."""
    model = make_model("MODEL.PIXEL_SAIL.TEST.FORCE_SEG", "always")
    eos = model.ids.eos

    def favour_eos(module, args, out):
        out = out.clone()
        out[..., eos] = out.abs().max() * 10 + 10
        return out

    model.llm.lm_head.register_forward_hook(favour_eos)
    inp = make_input(model, 30, 45, question="Please segment the circle in this image.")
    out = model([inp])[0]
    assert out["forced_seg"] is True and out["text"].startswith("It is [SEG]")
    assert out["instances"].pred_masks.shape == (1, 30, 45)
    never = make_model("MODEL.PIXEL_SAIL.TEST.FORCE_SEG", "never")
    never.llm.lm_head.register_forward_hook(favour_eos)
    out = never([inp])[0]
    assert out["forced_seg"] is False and out["instances"].pred_masks.shape == (0, 30, 45)
    # "protocol": forced only for V-T RES, as the official evaluation
    proto = make_model()
    proto.llm.lm_head.register_forward_hook(favour_eos)
    assert proto([inp])[0]["instances"].pred_masks.shape[0] == 0
    assert proto([dict(inp, task="vt_res")])[0]["instances"].pred_masks.shape[0] == 1
