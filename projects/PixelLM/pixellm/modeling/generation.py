"""Batched generation with a KV cache (greedy or sampled), then masks for the generated answers.

The official ``evaluate()`` generates without a cache (every step re-runs CLIP + LLM on the whole
sequence) and one question at a time. Here: the prompts of a batch are spliced, left-padded and
decoded together with transformers' ``DynamicCache``; positions are ``arange`` over each spliced
prompt (as the official forward: the padded image tokens are masked as keys but keep their
positions). The codebook hidden states are then gathered by ONE teacher-forced pass over each
prompt + answer, and an answer whose codebook tokens do not form complete groups gives no masks
(a logged warning), as the official code.
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch

__all__ = ["generate", "generate_ids"]

logger = logging.getLogger(__name__)


def _sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_ids(model, seq: Mapping, lengths: Sequence[int], max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, generator=None) -> tuple[list[torch.Tensor], list]:
    """Decode from spliced prompts.

    Args:
        seq: ``splice`` output of the prompts (right padded; row r has ``lengths[r]`` positions).

    Returns:
        (new token ids per row, without the padding after EOS; step logits per row [n_r, V]).
    """
    from transformers import DynamicCache

    lm = model.causal_lm()
    emb, mask = seq["inputs_embeds"], seq["attention_mask"]
    r, t = mask.shape
    # left-align: move each row's padding to the front
    e2, m2, p2 = torch.zeros_like(emb), torch.zeros_like(mask), torch.zeros(r, t, dtype=torch.long, device=emb.device)
    for i, n in enumerate(lengths):
        e2[i, t - n :], m2[i, t - n :] = emb[i, :n], mask[i, :n]
        p2[i, t - n :] = torch.arange(n, device=emb.device)
    cache = DynamicCache()
    out = lm.model(inputs_embeds=e2, attention_mask=m2.long(), position_ids=p2, past_key_values=cache, use_cache=True)
    last_pos = p2[:, -1]
    attn = m2.long()
    done = torch.zeros(r, dtype=torch.bool, device=emb.device)
    new, steps = [], []
    for _ in range(max_new_tokens):
        logits = lm.lm_head(out.last_hidden_state[:, -1])
        steps.append(logits)
        tok = _sample(logits, do_sample, temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, model.pad_token_id), tok)
        new.append(tok)
        done |= tok == model.eos_token_id
        if bool(done.all()):
            break
        last_pos = last_pos + 1
        attn = torch.cat([attn, attn.new_ones(r, 1)], dim=1)
        out = lm.model(inputs_embeds=lm.get_input_embeddings()(tok)[:, None], attention_mask=attn,
                       position_ids=last_pos[:, None], past_key_values=cache, use_cache=True)
    ids = torch.stack(new, 1) if new else torch.zeros(r, 0, dtype=torch.long, device=emb.device)
    logits = torch.stack(steps, 1) if steps else None
    rows, row_logits = [], []
    for i in range(r):
        row = ids[i]
        eos = (row == model.eos_token_id).nonzero()
        n = int(eos[0]) + 1 if len(eos) else len(row)
        rows.append(row[:n])
        row_logits.append(logits[i, :n] if logits is not None else None)
    return rows, row_logits


@torch.no_grad()
def generate(model, batched_inputs: Sequence[Mapping], max_new_tokens: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, generator=None) -> list[dict]:
    """Answers and masks for prompts (``input_ids`` end after ``ASSISTANT:``), batched.

    Returns one dict per image with ``answers``: a list (one per question) of dicts ``output_ids``
    (prompt + answer, the official ``sequences``), ``answer_ids``, ``text`` (when the model has a
    tokenizer), ``pred_masks`` [K, H, W] bool, ``mask_logits`` [K, H, W], ``mask_scores`` [K],
    ``step_logits`` [n, V]; ``seq`` / ``hidden`` of the teacher-forced pass are in ``_debug``.
    """
    max_new_tokens = int(max_new_tokens or model.max_new_tokens)
    imgs = torch.stack([x["clip_image"] for x in batched_inputs]).to(model.device)
    image = model.encode_images(imgs, [x["clip_size"] for x in batched_inputs])
    rows, row_image, _ = model._rows(batched_inputs)
    prompt_seq = model.splice(rows, row_image, image, mask_pad_ids=False)
    g2 = image["llm_tokens"].shape[1]
    lengths = [len(r) - 1 + g2 for r in rows]
    new, step_logits = generate_ids(model, prompt_seq, lengths, max_new_tokens, do_sample, temperature, top_p, generator)
    full = [torch.cat([r.to(n.device), n]) for r, n in zip(rows, new)]
    seq = model.splice(full, row_image, image, mask_pad_ids=False)
    hidden, _ = model.run_llm(seq)
    fused, positions = model.codebook_embeddings(hidden, seq, strict=False)
    masks = model._masks_per_image(batched_inputs, image, fused, row_image)
    results = [{"answers": []} for _ in batched_inputs]
    offsets = [0] * len(batched_inputs)
    for j, img in enumerate(row_image):
        k = fused[j].shape[0]
        logits = masks["pred_masks"][img][offsets[img] : offsets[img] + k]
        offsets[img] += k
        ans = {"output_ids": full[j], "answer_ids": new[j], "pred_masks": logits > 0, "mask_logits": logits,
               "mask_scores": model.mask_scores(logits), "step_logits": step_logits[j],
               "_debug": {"hidden": hidden[j], "ids": seq["ids"][j], "positions": positions[j], "fused": fused[j]}}
        if model.tokenizer is not None:
            ans["text"] = model.tokenizer.decode(new[j], skip_special_tokens=False)
        results[img]["answers"].append(ans)
    return results
