"""``META_ARCH_REGISTRY`` "PixelSAIL": one transformer, no vision encoder, no segmentation expert.

Data flow (spec B1):

1. ``pixel_sail.sequence.build_sample`` / ``collate``: token ids, 4-D mask, (t, h, w) positions, prompt
   indices, patch rows;
2. input embeddings ``embed_tokens(ids)``; at ``<vpatch>`` positions ``+ vis_embed(patch)``
   (bias-free Linear 3 p^2 -> D) ``+ vp_embed(embed_tokens(<Prompt_k>))`` where prompt k covers the
   patch (bias-free Linear D -> D; -1 / -2 map to zero rows);
3. ``Qwen2ForCausalLM.model`` with mRoPE (``pixel_sail.llm``) -> last hidden states [B, L, D];
4. vision states at the ``<vpatch>`` positions -> [h, w, D]; ``[SEG]`` states AT the ``[SEG]`` positions
   (no shift); ``PixelSAILMaskHead`` -> mask logits [n, H'/s, W'/s] (einsum);
5. training: ``PixelSAILCriterion`` (+ optional ``Distiller``); inference: greedy generation with the
   image prefix cached (``generate``), masks = sigmoid(bilinear to the original size) > 0.5.

Model inputs: one dict per sample from ``pixel_sail.data.PixelSAILDatasetMapper`` (or the predictor):
``pixel_values`` float [3, H', W'] (normalised, official resize), ``grid_hw`` (h, w), ``height``/``width``
(original size), ``task``; training ``turns`` [(question, answer)] and ``gt_masks`` [N, H', W'] (or None);
inference ``questions`` (list of str, one generation each; default one), optional ``vp_patch_masks``
bool [R, h, w] with ``vp_ids``.

Outputs (inference, one dict per input): ``texts`` (list, one per question), ``text`` (the first), and for
mask tasks ``instances`` (``pred_masks`` bool [n, H, W] in original coordinates, ``scores``): referring
and ``vt_res`` the first mask (psalm's referring evaluator protocol), ``gres`` the union (plus
``no_target``), ``interactive`` (visual-prompt category classification) ``region_texts``.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Instances
from torch import nn

from .criterion import PixelSAILCriterion
from .distill import Distiller
from .heads import PixelSAILMaskHead
from .llm import additive_mask, build_qwen2_mrope
from .patchify import patchify
from .sequence import IGNORE_INDEX, PixelSAILBatch, build_sample, collate, generation_prefix
from .tokens import TokenIds, load_pixel_sail_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["PixelSAIL", "MASK_TASKS", "FORCED_SEG_TASKS"]

MASK_TASKS = ("referring", "gres", "vt_res")
FORCED_SEG_TASKS = ("vt_res",)  # where the official evaluation forces "It is [SEG]." (spec B3)


@META_ARCH_REGISTRY.register()
class PixelSAIL(nn.Module):
    @configurable
    def __init__(self, *, tokenizer, llm, mask_head: PixelSAILMaskHead, criterion: PixelSAILCriterion,
                 patch_size: int, num_visual_prompts: int, vision_bidirectional: bool = True,
                 mask_threshold: float = 0.5, max_new_tokens: int = 512, force_seg: str = "protocol",
                 forced_prefix: str = "It is [SEG].", distiller: Optional[Distiller] = None,
                 max_length: int = 8192, vp_embed_init_std: float = 0.02):
        super().__init__()
        if force_seg not in ("protocol", "always", "never"):
            raise ValueError(f"MODEL.PIXEL_SAIL.TEST.FORCE_SEG must be protocol / always / never, got {force_seg!r}")
        self.tokenizer = tokenizer
        self.ids = TokenIds.from_tokenizer(tokenizer, num_visual_prompts)
        self.llm = llm
        D = llm.config.hidden_size
        self.patch_size = int(patch_size)
        self.vis_embed = nn.Linear(3 * patch_size * patch_size, D, bias=False)
        self.vp_embed = nn.Linear(D, D, bias=False)
        nn.init.normal_(self.vis_embed.weight, std=0.02)
        nn.init.normal_(self.vp_embed.weight, std=float(vp_embed_init_std))
        self.mask_head = mask_head
        self.criterion = criterion
        self.distiller = distiller
        self.num_visual_prompts = int(num_visual_prompts)
        self.vision_bidirectional = bool(vision_bidirectional)
        self.mask_threshold = float(mask_threshold)
        self.max_new_tokens = int(max_new_tokens)
        self.force_seg = force_seg
        self.forced_prefix = forced_prefix
        self.max_length = int(max_length)
        self.num_seg_mismatch = 0  # training samples whose [SEG] count differed from their masks
        self._stop_ids = {self.ids.eos, self.ids.im_end}

    @classmethod
    def from_config(cls, cfg, tokenizer=None):
        ps = cfg.MODEL.PIXEL_SAIL
        if tokenizer is None:
            tokenizer = load_pixel_sail_tokenizer(ps.TOKENIZER or ps.LLM.NAME_OR_PATH, ps.NUM_VISUAL_PROMPTS)
        llm = build_qwen2_mrope(cfg, len(tokenizer))
        D = llm.config.hidden_size
        return dict(tokenizer=tokenizer, llm=llm, mask_head=PixelSAILMaskHead(cfg, hidden_size=D),
                    criterion=PixelSAILCriterion(cfg), patch_size=ps.PATCH_SIZE,
                    num_visual_prompts=ps.NUM_VISUAL_PROMPTS, vision_bidirectional=ps.VISION_BIDIRECTIONAL,
                    mask_threshold=ps.TEST.MASK_THRESHOLD, max_new_tokens=ps.TEST.MAX_NEW_TOKENS,
                    force_seg=ps.TEST.FORCE_SEG, forced_prefix=ps.TEST.FORCED_PREFIX,
                    distiller=Distiller.from_cfg(cfg, D), vp_embed_init_std=ps.VP_EMBED_INIT_STD)

    @property
    def device(self) -> torch.device:
        return self.vis_embed.weight.device

    # ------------------------------------------------------------------ embeddings and the transformer
    def vp_table(self) -> torch.Tensor:
        """[K + 2, D]: ``vp_embed(embed_tokens(<Prompt_k>))`` for k < K, then two zero rows that the
        indices -2 (unprompted patch) and -1 (text) select."""
        emb = self.llm.get_input_embeddings()
        ids = torch.tensor(self.ids.prompts, device=self.device)
        rows = torch.cat([emb(ids), emb.weight.new_zeros(2, emb.weight.shape[1])])
        return self.vp_embed(rows)  # bias-free: the zero rows stay zero

    def embed(self, batch: PixelSAILBatch, patches: torch.Tensor) -> torch.Tensor:
        """[B, L, D] input embeddings. ``patches`` [N, 3 p^2]: all samples' patches, concatenated."""
        emb = self.llm.get_input_embeddings()(batch.input_ids)
        is_patch = batch.patch_index >= 0
        if int(is_patch.sum()) != patches.shape[0]:
            raise ValueError(f"{int(is_patch.sum())} <vpatch> positions for {patches.shape[0]} patches")
        vis = self.vis_embed(patches.to(emb.dtype))[batch.patch_index[is_patch]]
        emb = emb.index_put(torch.nonzero(is_patch, as_tuple=True), emb[is_patch] + vis.to(emb.dtype))
        return emb + self.vp_table().to(emb.dtype)[batch.vp_index]

    def run_llm(self, batch: PixelSAILBatch, inputs_embeds: torch.Tensor, use_cache: bool = False):
        mask = additive_mask(batch.attention_mask, inputs_embeds.dtype)
        kw = {}
        if use_cache:
            from transformers import DynamicCache

            kw = dict(past_key_values=DynamicCache(config=self.llm.config), use_cache=True)
        return self.llm.model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=batch.position_ids, **kw)

    def _patches(self, inputs) -> torch.Tensor:
        return torch.cat([patchify(inp["pixel_values"].to(self.device), self.patch_size) for inp in inputs])

    @staticmethod
    def vision_states(hidden: torch.Tensor, batch: PixelSAILBatch) -> List[torch.Tensor]:
        out = []
        for b, (h, w) in enumerate(batch.grid_hw):
            vs = int(batch.vision_start[b])
            out.append(hidden[b, vs:vs + h * w].reshape(h, w, -1))
        return out

    def forward_features(self, inputs: Sequence[dict]) -> Dict:
        """Teacher-forced forward of the training turns: batch, hidden [B, L, D], logits, vision / [SEG]
        states (per sample), mask logits (per sample [n_seg, H'/s, W'/s] or None)."""
        samples = [build_sample(self.tokenizer, self.ids, tuple(inp["grid_hw"]), inp["turns"], inp.get("vp_patch_masks"),
                                inp.get("vp_ids"), self.max_length) for inp in inputs]
        batch = collate(samples, self.ids.pad, "right", self.vision_bidirectional).to(self.device)
        emb = self.embed(batch, self._patches(inputs))
        hidden = self.run_llm(batch, emb).last_hidden_state
        vision = self.vision_states(hidden, batch)
        is_seg = (batch.input_ids == self.ids.seg) & (batch.labels != IGNORE_INDEX)
        seg = [hidden[b][is_seg[b]] for b in range(len(inputs))]
        masks: List[Optional[torch.Tensor]] = [None] * len(inputs)
        f_mask: List[Optional[torch.Tensor]] = [None] * len(inputs)
        for b in range(len(inputs)):
            if len(seg[b]) or inputs[b].get("gt_masks") is not None or self.distiller is not None:
                f_mask[b] = self.mask_head.image_features(vision[b])
                masks[b] = torch.einsum("qc,chw->qhw", self.mask_head.seg_token_projector(seg[b]), f_mask[b])
        return dict(batch=batch, hidden=hidden, vision_states=vision, seg_states=seg, pred_masks=masks, f_mask=f_mask)

    # ------------------------------------------------------------------ training
    def forward(self, batched_inputs: List[dict]):
        if not self.training:
            return self.inference(batched_inputs)
        feats = self.forward_features(batched_inputs)
        logits = self.llm.lm_head(feats["hidden"])
        gt = [None if inp.get("gt_masks") is None else inp["gt_masks"].to(self.device) for inp in batched_inputs]
        losses, stats = self.criterion(logits, feats["batch"].labels, feats["pred_masks"], gt)
        if self.distiller is not None:
            losses.update(self.distiller(batched_inputs, feats["f_mask"], feats["vision_states"]))
        self.num_seg_mismatch += stats["num_mismatched"]
        if stats["num_mismatched"]:
            logger.debug("%d sample(s) with a [SEG] / mask count mismatch (zero-weighted)", stats["num_mismatched"])
        try:
            from detectron2.utils.events import get_event_storage

            get_event_storage().put_scalar("pixel_sail/seg_count_mismatch", float(stats["num_mismatched"]),
                                           smoothing_hint=False)
        except AssertionError:  # no EventStorage outside a trainer
            pass
        return losses

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, inputs: Sequence[dict], questions: Sequence[str], answer_prefixes: Sequence[str],
                 max_new_tokens: Optional[int] = None) -> List[Dict]:
        """Greedy generation, batched, with the image prefix computed once and cached.

        ``inputs[i]`` provides the image (and prompts) of generation i. Returns per generation
        ``text`` (answer prefix + generated text, special tokens other than [SEG] removed),
        ``token_ids`` (answer tokens), ``seg_states`` [n, D], ``vision_states`` [h, w, D].
        """
        max_new = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        samples = [generation_prefix(self.tokenizer, self.ids, tuple(inp["grid_hw"]), q, ap, inp.get("vp_patch_masks"),
                                     inp.get("vp_ids")) for inp, q, ap in zip(inputs, questions, answer_prefixes)]
        batch = collate(samples, self.ids.pad, "left", self.vision_bidirectional).to(self.device)
        emb = self.embed(batch, self._patches(inputs))
        out = self.run_llm(batch, emb, use_cache=True)
        hidden, cache = out.last_hidden_state, out.past_key_values
        B, L = batch.input_ids.shape
        vision = self.vision_states(hidden, batch)
        answer_ids, answer_hidden = [], []
        for b, ap in enumerate(answer_prefixes):
            n = len(self.tokenizer.encode(ap, add_special_tokens=False)) if ap else 0
            answer_ids.append(batch.input_ids[b, L - n:].tolist())
            answer_hidden.append([hidden[b, L - n + i] for i in range(n)])
        logits = self.llm.lm_head(hidden[:, -1])
        key_valid = batch.valid.clone()
        next_pos = batch.position_ids[0, :, -1] + 1  # [B]
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        embed_tokens = self.llm.get_input_embeddings()
        for _ in range(max_new):
            tok = logits.argmax(-1)
            tok = torch.where(finished, torch.full_like(tok, self.ids.pad), tok)
            key_valid = torch.cat([key_valid, ~finished[:, None]], dim=1)
            step = self.llm.model(inputs_embeds=embed_tokens(tok)[:, None],
                                  attention_mask=additive_mask(key_valid[:, None, None, :], emb.dtype),
                                  position_ids=next_pos[None, :, None].expand(3, -1, -1), past_key_values=cache,
                                  use_cache=True)
            cache = step.past_key_values
            h = step.last_hidden_state[:, 0]
            for b in range(B):
                if not finished[b]:
                    answer_ids[b].append(int(tok[b]))
                    answer_hidden[b].append(h[b])
            finished = finished | torch.tensor([int(t) in self._stop_ids for t in tok], device=self.device)
            logits = self.llm.lm_head(h)
            next_pos = next_pos + 1
            if bool(finished.all()):
                break
        results = []
        for b in range(B):
            ids = answer_ids[b]
            seg_rows = [answer_hidden[b][i] for i, t in enumerate(ids) if t == self.ids.seg]
            D = hidden.shape[-1]
            text_ids = [t for t in ids if t not in self._stop_ids and t != self.ids.pad]
            results.append(dict(text=self.tokenizer.decode(text_ids, skip_special_tokens=False).strip(),
                                token_ids=ids, vision_states=vision[b],
                                seg_states=torch.stack(seg_rows) if seg_rows else hidden.new_zeros(0, D)))
        return results

    def _needs_forced(self, task: str) -> bool:
        if self.force_seg == "never" or task not in MASK_TASKS:
            return False
        return self.force_seg == "always" or task in FORCED_SEG_TASKS

    def generate_with_retry(self, inputs: Sequence[dict], questions: Sequence[str], tasks: Sequence[str]) -> List[Dict]:
        """:meth:`generate`; generations of mask tasks that produced no [SEG] are redone with the forced
        answer prefix where ``FORCE_SEG`` asks for it (batched)."""
        res = self.generate(inputs, questions, [""] * len(inputs))
        redo = [i for i, r in enumerate(res) if len(r["seg_states"]) == 0 and self._needs_forced(tasks[i])]
        if redo:
            again = self.generate([inputs[i] for i in redo], [questions[i] for i in redo],
                                  [self.forced_prefix] * len(redo))
            for i, r in zip(redo, again):
                r["forced"] = True
                res[i] = r
        return res

    # ------------------------------------------------------------------ inference
    def masks_from_states(self, vision_states: torch.Tensor, seg_states: torch.Tensor, height: int, width: int):
        """[h, w, D], [n, D] -> (bool masks [n, H, W], scores [n]) at the original size."""
        if len(seg_states) == 0:
            return torch.zeros(0, height, width, dtype=torch.bool), torch.zeros(0)
        logits = self.mask_head([vision_states], [seg_states])[0].float()
        logits = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        prob = logits.sigmoid()
        masks = prob > self.mask_threshold
        scores = (prob * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)
        return masks.cpu(), scores.cpu()

    def inference(self, batched_inputs: List[dict]) -> List[dict]:
        jobs, owners = [], []  # one generation per question
        for i, inp in enumerate(batched_inputs):
            if "questions" not in inp and "question" not in inp:
                raise KeyError(f"model input {inp.get('sample_id')} (task {inp.get('task')}) has no question(s); keys {sorted(inp)}")
            qs = inp["questions"] if "questions" in inp else [inp["question"]]
            for q in qs:
                jobs.append((inp, q, inp.get("task", "referring")))
                owners.append(i)
        res = self.generate_with_retry([j[0] for j in jobs], [j[1] for j in jobs], [j[2] for j in jobs]) if jobs else []
        outputs: List[dict] = [dict(texts=[], _gen=[]) for _ in batched_inputs]
        for r, i in zip(res, owners):
            outputs[i]["texts"].append(r["text"])
            outputs[i]["_gen"].append(r)
        for inp, out in zip(batched_inputs, outputs):
            gens = out.pop("_gen")
            out["text"] = out["texts"][0] if out["texts"] else ""
            task = inp.get("task", "referring")
            H, W = int(inp["height"]), int(inp["width"])
            if task in MASK_TASKS:
                g = gens[0]
                masks, scores = self.masks_from_states(g["vision_states"], g["seg_states"], H, W)
                if task == "gres":
                    union = masks.any(0, keepdim=True) if len(masks) else torch.zeros(1, H, W, dtype=torch.bool)
                    out["no_target"] = not bool(union.any())
                    masks, scores = union, scores[:1] if len(scores) else torch.zeros(1)
                else:
                    masks, scores = masks[:1], scores[:1]
                inst = Instances((H, W))
                inst.pred_masks, inst.scores = masks, scores
                out["instances"] = inst
                out["forced_seg"] = bool(g.get("forced", False))
            elif task == "interactive":
                out["region_texts"] = list(out["texts"])
        return outputs
