"""SequenceAssembler: golden splicing (psalm_e2e `*.spliced.*`), batching, official attention mask."""

import pytest
import torch
from torch import nn

from psalm.modeling.llm import load_tokenizer
from psalm.data.prompt import IGNORE_INDEX, PromptBuilder
from psalm.modeling.sequence import SequenceAssembler
from psalm.data.tokenizer import save_tiny_tokenizer

SENTENCES = ["the person in red on the left", "red figure"]
CLASSES = ["person", "car", "tree-merged"]


@pytest.fixture(scope="module")
def golden(golden_dir):
    from safetensors.torch import load_file

    d = golden_dir / "psalm_e2e"
    sd = load_file(str(d / "state_dict.safetensors"))
    embed = nn.Embedding(*sd["model.embed_tokens.weight"].shape).double()
    embed.weight.data.copy_(sd["model.embed_tokens.weight"].double())
    return {
        "t": load_file(str(d / "tensors.safetensors")),
        "builder": PromptBuilder(load_tokenizer(d / "tokenizer")),
        "embed": embed,
        "mask_tokens": sd["seg_query"].double(),
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = load_tokenizer(save_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    torch.manual_seed(0)
    return {"tok": tok, "builder": PromptBuilder(tok), "embed": nn.Embedding(len(tok), 8)}


@pytest.mark.golden
def test_golden_splice(golden):
    t, b = golden["t"], golden["builder"]
    cases = {
        "referring": (b.build("referring", sentences=SENTENCES), None),
        "panoptic": (b.build("panoptic", class_names=CLASSES), None),
        "region": (b.build("interactive", num_regions=2), [t["region.region.pooled_features.0"][:, 0]]),
    }
    asm = SequenceAssembler()
    for name, (prompt, regions) in cases.items():
        out = asm(
            [prompt],
            golden["embed"],
            image_tokens=t["image.projector_tokens"],
            mask_tokens=golden["mask_tokens"],
            region_features=regions,
        )
        ref = t[f"{name}.spliced.inputs_embeds"]
        assert out.inputs_embeds.shape == ref.shape and out.inputs_embeds.dtype == torch.float64
        assert (out.inputs_embeds - ref).abs().max() <= 1e-6, name
        assert torch.equal(out.attention_mask, t[f"{name}.spliced.attention_mask"]), name
        assert torch.equal(out.labels, t[f"{name}.spliced.labels"]), name
        assert torch.equal(out.mask_token_mask, t[f"{name}.spliced.seg_query_mask"]), name
        assert out.mask_token_positions.shape == (1, 10)
        assert out.lengths.tolist() == [ref.shape[1]]
    ref_out = asm([cases["referring"][0]], golden["embed"], t["image.projector_tokens"], golden["mask_tokens"])
    assert torch.equal(ref_out.refer_span_mask.long(), t["referring.spliced.refer_embedding_indices"])
    pan_out = asm([cases["panoptic"][0]], golden["embed"], t["image.projector_tokens"], golden["mask_tokens"])
    assert torch.equal(pan_out.class_span_ids, t["panoptic.spliced.class_name_embedding_indices"])
    reg_out = asm(
        [cases["region"][0]],
        golden["embed"],
        t["image.projector_tokens"],
        golden["mask_tokens"],
        [t["region.region.pooled_features.0"][:, 0]],
    )
    assert torch.equal(reg_out.region_token_mask, t["region.spliced.region_embedding_masks"])
    assert (
        reg_out.region_positions[0].tolist()
        == t["region.spliced.region_embedding_masks"][0].nonzero().flatten().tolist()
    )


def _batch(tiny, n_img=4, q=3):
    b = tiny["builder"]
    prompts = [
        b.build("referring", sentences=["a dog"]),
        b.build("referring", sentences=["the big red car on the left", "x"]),
    ]
    torch.manual_seed(1)
    img = torch.randn(2, n_img, 8, requires_grad=True)
    mask = torch.randn(q, 8, requires_grad=True)
    return prompts, img, mask


def test_batch_of_two_equals_two_singles_right_padding(tiny):
    prompts, img, mask = _batch(tiny)
    asm = SequenceAssembler()
    both = asm(prompts, tiny["embed"], img, mask)
    assert both.inputs_embeds.shape[0] == 2
    for i, p in enumerate(prompts):
        one = asm([p], tiny["embed"], img[i : i + 1], mask)
        n = one.inputs_embeds.shape[1]
        assert both.lengths[i] == n
        assert torch.equal(both.inputs_embeds[i, :n], one.inputs_embeds[0])
        assert torch.equal(both.labels[i, :n], one.labels[0])
        assert torch.equal(both.refer_span_mask[i, :n], one.refer_span_mask[0])
        assert torch.equal(both.mask_token_positions[i], one.mask_token_positions[0])
        assert bool(both.attention_mask[i, :n].all()) and not bool(both.attention_mask[i, n:].any())
        assert bool((both.inputs_embeds[i, n:] == 0).all()) and bool((both.labels[i, n:] == IGNORE_INDEX).all())
    # gradients reach every source
    both.inputs_embeds.sum().backward()
    assert img.grad.abs().sum() > 0 and mask.grad.abs().sum() > 0 and tiny["embed"].weight.grad.abs().sum() > 0


def test_attention_mask_equals_the_official_construction(tiny):
    """Official: pad ids with [PAD], splice, then [True]*(L_b - L_ids) + (ids != pad) + [False]*align."""
    prompts, img, mask = _batch(tiny)
    out = SequenceAssembler()(prompts, tiny["embed"], img, mask)
    pad = tiny["tok"].pad_token_id
    l_ids = max(len(p.input_ids) for p in prompts)
    L = out.inputs_embeds.shape[1]
    for i, p in enumerate(prompts):
        ids = torch.cat([p.input_ids, torch.full((l_ids - len(p.input_ids),), pad)])
        n_pad = l_ids - len(p.input_ids)
        spliced_len = int(out.lengths[i]) + n_pad  # the official splice also embeds its id-level pads
        official = torch.cat(
            [
                torch.ones(spliced_len - l_ids, dtype=torch.bool),
                ids != pad,
                torch.zeros(L - spliced_len, dtype=torch.bool),
            ]
        )
        assert torch.equal(out.attention_mask[i], official)


def test_left_padding_shifts_every_index(tiny):
    prompts, img, mask = _batch(tiny)
    right = SequenceAssembler("right")(prompts, tiny["embed"], img, mask)
    left = SequenceAssembler("left")(prompts, tiny["embed"], img, mask)
    L = right.inputs_embeds.shape[1]
    for i in range(2):
        n = int(right.lengths[i])
        assert torch.equal(left.inputs_embeds[i, L - n :], right.inputs_embeds[i, :n])
        assert torch.equal(left.mask_token_positions[i], right.mask_token_positions[i] + (L - n))
        assert torch.equal(left.refer_span_mask[i, L - n :], right.refer_span_mask[i, :n])


def test_category_and_region_index_tensors(tiny):
    b = tiny["builder"]
    p = b.build(
        "panoptic", class_names=["cat", "dog"], shuffle_classes=True, generator=torch.Generator().manual_seed(0)
    )
    img, mask = torch.randn(1, 4, 8), torch.randn(2, 8)
    out = SequenceAssembler()([p], tiny["embed"], img, mask)
    ids = out.class_span_ids[0]
    for k, span in enumerate(p.class_token_ids, start=1):
        pos = (ids == k).nonzero().flatten()
        assert len(pos) == len(span) and int(pos[-1] - pos[0]) == len(span) - 1  # contiguous
        assert torch.equal(out.inputs_embeds[0, pos], tiny["embed"](span))
    r = b.build("interactive", num_regions=3)
    feats = [torch.randn(3, 8)]
    out = SequenceAssembler()([r], tiny["embed"], img, mask, feats)
    assert torch.equal(out.inputs_embeds[0, out.region_positions[0]], feats[0])
    assert bool((out.labels[0, out.region_positions[0]] == IGNORE_INDEX).all())
    # a language prompt has no mask tokens
    conv = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "hello"}]
    lm = SequenceAssembler()([b.build("instruction", conversation=conv)], tiny["embed"], img)
    assert lm.mask_token_positions is None and bool((lm.labels != IGNORE_INDEX).any())


def test_bad_inputs_raise(tiny):
    b, e = tiny["builder"], tiny["embed"]
    ref = b.build("referring", sentences=["a"])
    asm = SequenceAssembler()
    with pytest.raises(ValueError, match="no image_tokens"):
        asm([ref], e, None, torch.randn(2, 8))
    with pytest.raises(ValueError, match="no mask_tokens"):
        asm([ref], e, torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="region features"):
        asm([b.build("interactive", num_regions=2)], e, torch.randn(1, 4, 8), torch.randn(2, 8), [torch.randn(1, 8)])
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ho"}]
    with pytest.raises(ValueError, match="mixes"):
        asm([ref, b.build("instruction", conversation=conv)], e, torch.randn(2, 4, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match="hidden size"):
        asm([ref], e, torch.randn(1, 4, 7), torch.randn(2, 8))
