"""build_llm: meta-device construction, golden hidden states (psalm_e2e `*.llm.last_hidden_state`)."""

import pytest
import torch

from psalm.checkpoint import load_strict
from psalm.checkpoint.phi_keys import official_llm_to_psalm
from psalm.config import get_psalm_cfg
from psalm.modeling.llm import build_llm, causal_lm_loss, load_tokenizer
from psalm.data.prompt import PromptBuilder
from psalm.modeling.sequence import SequenceAssembler
from psalm.data.tokenizer import save_tiny_tokenizer

TASKS = ("referring", "panoptic", "region")


def tiny_cfg(attn="sdpa", vocab=387, **overrides):
    """The golden bundle's Phi config (hidden 64, 2 layers, 4 heads, head_dim 16, rotary 8)."""
    cfg = get_psalm_cfg()
    llm = cfg.MODEL.PSALM.LLM
    llm.VOCAB_SIZE, llm.HIDDEN_SIZE, llm.INTERMEDIATE_SIZE = vocab, 64, 256
    llm.NUM_HIDDEN_LAYERS, llm.NUM_ATTENTION_HEADS, llm.ATTN_IMPLEMENTATION = 2, 4, attn
    for k, v in overrides.items():
        llm[k] = v
    return cfg


@pytest.fixture(scope="module")
def golden(golden_dir):
    from safetensors.torch import load_file

    d = golden_dir / "psalm_e2e"
    return load_file(str(d / "tensors.safetensors")), load_file(str(d / "state_dict.safetensors"))


def golden_llm(sd, attn):
    llm = build_llm(tiny_cfg(attn), init_weights=False)
    report = load_strict(llm, official_llm_to_psalm(sd, 4, dst_prefix="").state_dict, what="golden Phi")
    assert report.ok
    return llm.double().eval()


@pytest.mark.golden
@pytest.mark.parametrize("attn,tol", [("eager", 1e-12), ("sdpa", 1e-6)])
def test_golden_hidden_states(golden, attn, tol):
    t, sd = golden
    llm = golden_llm(sd, attn)
    assert llm.config._attn_implementation == attn
    for name in TASKS:
        with torch.no_grad():
            h = llm.model(
                inputs_embeds=t[f"{name}.spliced.inputs_embeds"],
                attention_mask=t[f"{name}.spliced.attention_mask"],
                use_cache=False,
            ).last_hidden_state
        ref = t[f"{name}.llm.last_hidden_state"]
        assert h.shape == ref.shape
        assert (h - ref).abs().max() <= tol, name


def test_build_from_config_structure():
    llm = build_llm(tiny_cfg())
    assert llm.lm_head.bias is None
    assert llm.config.tie_word_embeddings is False and llm.lm_head.weight is not llm.model.embed_tokens.weight
    assert llm.model.embed_tokens.padding_idx is None
    assert llm.get_input_embeddings().weight.shape == (387, 64)
    assert not any(t.is_meta for t in (*llm.parameters(), *llm.buffers()))
    rot = llm.model.rotary_emb.inv_freq
    assert torch.allclose(rot, 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8))  # rotary on 8 of 16 dims
    w = llm.model.layers[0].mlp.fc1.weight
    assert 0.015 < w.std() < 0.025 and llm.model.layers[0].mlp.fc1.bias.abs().max() == 0  # HF Phi init
    assert torch.equal(llm.model.final_layernorm.weight, torch.ones(64))


def test_gradient_checkpointing_and_freeze():
    llm = build_llm(tiny_cfg(GRADIENT_CHECKPOINTING=True)).train()
    assert llm.model.gradient_checkpointing
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, requires_grad=True, generator=g)
    # a random projection, not .sum(): the final LayerNorm's outputs sum to zero over the features
    # (unit weight, zero bias), so the gradient of their sum is zero up to rounding noise
    w = torch.randn(2, 5, 64, generator=g)
    (llm.model(inputs_embeds=x, use_cache=False).last_hidden_state * w).sum().backward()
    assert x.grad.abs().sum() > 0 and llm.model.layers[1].mlp.fc2.weight.grad is not None
    frozen = build_llm(tiny_cfg(FREEZE=True))
    assert not any(p.requires_grad for p in frozen.parameters())


def test_vocab_must_fit_the_tokenizer(tmp_path):
    tok = load_tokenizer(save_tiny_tokenizer(tmp_path))
    with pytest.raises(ValueError, match="VOCAB_SIZE"):
        build_llm(tiny_cfg(vocab=len(tok) - 1), tokenizer=tok)
    llm = build_llm(tiny_cfg(vocab=len(tok)), tokenizer=tok)
    assert llm.generation_config.eos_token_id == tok.eos_token_id
    with pytest.raises(ValueError, match="ATTN_IMPLEMENTATION"):
        build_llm(tiny_cfg(attn="flash"))


def test_batch_of_two_equals_two_singles_through_the_llm(tmp_path):
    """Right padding: the real positions of a B=2 batch equal the B=1 runs (sdpa, fp64)."""
    tok = load_tokenizer(save_tiny_tokenizer(tmp_path))
    torch.manual_seed(0)
    llm = build_llm(tiny_cfg(vocab=len(tok)), tokenizer=tok).double().eval()
    b = PromptBuilder(tok)
    prompts = [
        b.build("referring", sentences=["a dog"]),
        b.build("referring", sentences=["the large red car", "x y z"]),
    ]
    img, mask = torch.randn(2, 4, 64, dtype=torch.float64), torch.randn(3, 64, dtype=torch.float64)
    asm, emb = SequenceAssembler(), llm.get_input_embeddings()
    with torch.no_grad():
        both = asm(prompts, emb, img, mask)
        h2 = llm.model(
            inputs_embeds=both.inputs_embeds, attention_mask=both.attention_mask, use_cache=False
        ).last_hidden_state
        for i, p in enumerate(prompts):
            one = asm([p], emb, img[i : i + 1], mask)
            h1 = llm.model(
                inputs_embeds=one.inputs_embeds, attention_mask=one.attention_mask, use_cache=False
            ).last_hidden_state
            n = h1.shape[1]
            assert (h2[i, :n] - h1[0]).abs().max() < 1e-10


def test_full_size_phi15_builds_on_meta_instantly():
    """The default config is Phi-1.5 + PSALM vocabulary: 1.4145 B parameters (spec appendix A), no memory."""
    llm = build_llm(get_psalm_cfg(), device="meta")
    n = sum(p.numel() for p in llm.parameters())
    V, H, Im, L = 50297, 2048, 8192, 24
    assert n == 2 * V * H + L * (4 * (H * H + H) + 2 * H * Im + Im + H + 2 * H) + 2 * H == 1_414_520_832
    assert all(p.is_meta for p in llm.parameters()) and llm.lm_head.bias is None


@pytest.mark.slow
def test_full_size_phi15_random_init():
    llm = build_llm(get_psalm_cfg())  # about 20 s on one CPU core, 5.7 GB
    assert not any(p.is_meta for p in llm.parameters())
    assert 0.015 < float(llm.model.layers[-1].mlp.fc2.weight[:64].std()) < 0.025


def test_left_padded_batch_generates_like_single_samples(tmp_path):
    tok = load_tokenizer(save_tiny_tokenizer(tmp_path))
    torch.manual_seed(0)
    llm = build_llm(tiny_cfg(vocab=len(tok)), tokenizer=tok).eval()
    b = PromptBuilder(tok)
    convs = [
        [{"from": "human", "value": "<image>\nWhat?"}],
        [{"from": "human", "value": "<image>\nDescribe the image in detail please."}],
    ]
    prompts = [b.build("instruction", conversation=c, add_generation_prompt=True) for c in convs]
    img = torch.randn(2, 4, 64)
    asm, emb = SequenceAssembler("left"), llm.get_input_embeddings()
    kwargs = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        both = asm(prompts, emb, img)
        out2 = llm.generate(inputs_embeds=both.inputs_embeds, attention_mask=both.attention_mask.long(), **kwargs)
        for i, p in enumerate(prompts):
            one = asm([p], emb, img[i : i + 1])
            out1 = llm.generate(inputs_embeds=one.inputs_embeds, attention_mask=one.attention_mask.long(), **kwargs)
            assert torch.equal(out2[i], out1[0])


# ----------------------------------------------------------------------------------------- loss
def _full_logits_lm_loss(llm, embeds, mask, labels):
    """The reference: lm_head at every position ([B, L, V] fp32 logits), shifted cross-entropy."""
    logits = llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(flat, target, ignore_index=-100, reduction="sum") / (target != -100).sum()


def _lm_batch(seed=0, vocab=387):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(2, 12, 64, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False  # right padding
    labels = torch.randint(0, vocab, (2, 12), generator=g)
    labels[0, :7] = -100  # image tokens / prompt
    labels[1, :4] = -100
    labels[1, 9:] = -100  # padding
    return embeds, mask, labels


def test_causal_lm_loss_equals_the_full_logits_loss_and_its_gradients():
    torch.manual_seed(0)
    llm = build_llm(tiny_cfg()).double().train()
    embeds, mask, labels = _lm_batch()
    rows = []
    hook = llm.lm_head.register_forward_hook(lambda mod, inp, out: rows.append(tuple(inp[0].shape)))
    x = embeds.clone().requires_grad_()
    hidden = llm.model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
    loss = causal_lm_loss(llm, hidden, labels)
    loss.backward()
    hook.remove()
    assert rows == [(int((labels[:, 1:] != -100).sum()), 64)]  # lm_head ran on the 9 target positions only
    grads = {n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, _ in llm.named_parameters()} - {"model.embed_tokens.weight"}
    llm.zero_grad(set_to_none=True)
    x_ref = embeds.clone().requires_grad_()
    ref = _full_logits_lm_loss(llm, x_ref, mask, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-14)
    for n, g in grads.items():
        torch.testing.assert_close(g, dict(llm.named_parameters())[n].grad, rtol=1e-10, atol=1e-14, msg=n)


def test_causal_lm_loss_in_fp32_matches_closely():
    torch.manual_seed(1)
    llm = build_llm(tiny_cfg()).train()
    embeds, mask, labels = _lm_batch(1)
    embeds = embeds.float()
    hidden = llm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    torch.testing.assert_close(causal_lm_loss(llm, hidden, labels), _full_logits_lm_loss(llm, embeds, mask, labels),
                               rtol=1e-6, atol=1e-6)


def test_causal_lm_loss_without_targets_is_zero_and_attached():
    llm = build_llm(tiny_cfg()).train()
    hidden = torch.randn(1, 5, 64, requires_grad=True)
    loss = causal_lm_loss(llm, hidden, torch.full((1, 5), -100))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert llm.lm_head.weight.grad is not None and llm.lm_head.weight.grad.abs().max() == 0
    with pytest.raises(ValueError, match="labels"):
        causal_lm_loss(llm, hidden, torch.full((1, 4), -100))
