"""The PixelLM meta-architecture (``META_ARCH_REGISTRY`` name ``"PixelLM"``).

Data flow (one image may carry several questions = rows; K_i targets per image):

    clip_image [B,3,S,S] --CLIP--> taps [L x (B, G*G, C)]
        tap 0 --bilinear GxG->gxg (fp32)--> mm_projector --> g*g image tokens, spliced at <image>
        each tap --out_mm_projector--> [B, G*G, H] --neck--> f^l [B, D, G, G]
    rows (input_ids with one IMAGE_TOKEN_INDEX) --splice--> LlamaForCausalLM --> hidden [R, T, H]
    hidden at the state preceding each codebook token --text_hidden_fcs--> [K*L*N, D]
        --view(K, L, N, D) + token fusion--> [K, L, D] sparse prompts
        (--prompt_norm over the batch's targets, CODEBOOK.PROMPT_NORM "batch"; not in the release)
    per image: MultiScaleMaskDecoder level 0 (G -> 2G), level 1 (2G -> 4G, modulated by level 0)
        --scale fusion at 4G--> [K, 1, 4G, 4G] --postprocess--> logits [K, H, W] at the original size

Model input: ``list[dict]``, one per image (``pixellm.data.PixelLMDatasetMapper`` makes them):

| key | type |
|---|---|
| ``clip_image`` | float [3, S, S], normalised (SAM mean/std), zero padded bottom/right |
| ``clip_size`` | (h', w') of the resized image inside the padded input |
| ``height``, ``width`` | original size (masks are returned at this size) |
| ``input_ids`` | list of LongTensor [T_r] (one per question/conversation), ``-200`` = <image> |
| ``labels`` | list of LongTensor [T_r] (training; -100 = no loss) |
| ``gt_masks`` | bool [K, H, W], the targets of all rows in text order (training / evaluation) |
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from psalm.modeling.criterion import IGNORE_INDEX, next_token_loss

from .codebook import codebook_positions
from .losses import PixelLMMaskLoss

__all__ = ["PixelLM", "IMAGE_TOKEN_INDEX", "postprocess_masks", "projector"]

logger = logging.getLogger(__name__)
IMAGE_TOKEN_INDEX = -200


def projector(in_dim: int, hidden: int) -> nn.Sequential:
    """``mm_projector`` / ``out_mm_projector``: Linear(C, 2H)-GELU-Linear(2H, H)."""
    return nn.Sequential(nn.Linear(in_dim, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))


def postprocess_masks(masks: torch.Tensor, input_size: Sequence[int], original_size: Sequence[int]) -> torch.Tensor:
    """[K, 1, o, o] low-res logits -> [K, 1, H, W]: bilinear to max(h', w'), crop [:h', :w'],
    bilinear to the original size. Both resizes run in fp32 (as the official code, in every
    precision); the result is cast back to the input dtype."""
    dtype = masks.dtype
    target = max(int(input_size[0]), int(input_size[1]))
    x = F.interpolate(masks.float(), (target, target), mode="bilinear", align_corners=False)
    x = x[..., : int(input_size[0]), : int(input_size[1])]
    x = F.interpolate(x, (int(original_size[0]), int(original_size[1])), mode="bilinear", align_corners=False)
    return x.to(dtype)


def text_hidden_fcs(hidden: int, out_dim: int) -> nn.Sequential:
    """Linear(H, H)-ReLU-Linear(H, D)-Dropout(0)."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim), nn.Dropout(0.0))


@META_ARCH_REGISTRY.register()
class PixelLM(nn.Module):
    """PixelLM (CVPR 2024): CLIP + LLaMA + codebook + multi-scale SAM-style pixel decoder."""

    @configurable
    def __init__(self, *, vision_tower, llm, mm_projector, out_mm_projector, image_feature_neck,
                 text_hidden_fcs, prompt_encoder, mask_decoder, token_fusion, scale_fusion,
                 codebook_ids: Sequence[int], mask_loss: PixelLMMaskLoss, ce_weight: float = 1.0,
                 hidden_tap: str = "preceding", out_size: int = 0, pad_token_id: int = 0,
                 eos_token_id: int = 2, tokenizer=None, prompt_builder=None, max_new_tokens: int = 512,
                 train_neck_and_prompt_encoder: bool = False, train_llm: bool = False,
                 train_vision: bool = False, prompt_norm: nn.Module | None = None,
                 prompt_mask_weight: float = 0.0):
        super().__init__()
        self.vision_tower = vision_tower
        self.llm = llm
        self.mm_projector = mm_projector
        self.out_mm_projector = out_mm_projector
        self.image_feature_neck = image_feature_neck
        self.text_hidden_fcs = text_hidden_fcs
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.token_fusion = token_fusion
        self.scale_fusion = scale_fusion
        # optional (not in the release): a norm on the fused prompts, see CODEBOOK.PROMPT_NORM
        self.prompt_norm = prompt_norm
        if prompt_mask_weight < 0:
            raise ValueError(f"LOSS.PROMPT_MASK_WEIGHT must be >= 0, got {prompt_mask_weight}")
        self.prompt_mask_weight = float(prompt_mask_weight)
        self.codebook_ids = [int(i) for i in codebook_ids]
        self.num_scales = mask_decoder.num_levels
        self.tokens_per_scale = len(self.codebook_ids) // self.num_scales
        if self.num_scales * self.tokens_per_scale != len(self.codebook_ids):
            raise ValueError(f"{len(self.codebook_ids)} codebook ids do not split into {self.num_scales} scales")
        if len(vision_tower.taps) != self.num_scales:
            raise ValueError(f"{len(vision_tower.taps)} vision taps for {self.num_scales} decoder scales")
        self.mask_loss = mask_loss
        self.ce_weight = float(ce_weight)
        self.hidden_tap = hidden_tap
        self.out_size = int(out_size) or 4 * vision_tower.grid
        self.pad_token_id = int(pad_token_id)
        self.eos_token_id = int(eos_token_id)
        self.tokenizer = tokenizer
        self.prompt_builder = prompt_builder
        self.max_new_tokens = int(max_new_tokens)
        from .build import apply_trainable_set

        self.train_vision = bool(train_vision)
        self.trainable_names = apply_trainable_set(self, train_neck_and_prompt_encoder, train_llm, self.train_vision)

    @classmethod
    def from_config(cls, cfg, tokenizer=None):
        from .build import pixellm_components

        kwargs = pixellm_components(cfg, tokenizer=tokenizer)
        kwargs["train_neck_and_prompt_encoder"] = cfg.MODEL.PIXELLM.TRAIN_NECK_AND_PROMPT_ENCODER
        kwargs["train_llm"] = cfg.MODEL.PIXELLM.LLM.TRAIN_FULL
        kwargs["train_vision"] = cfg.MODEL.PIXELLM.VISION.TRAIN
        return kwargs

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return self.mask_decoder.iou_token.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mask_decoder.iou_token.weight.dtype

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_vision:
            self.vision_tower.eval()  # frozen CLIP (no dropout)
        return self

    def causal_lm(self):
        """The transformers ``LlamaForCausalLM`` (unwrapped from peft when LoRA is on)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    # ------------------------------------------------------------------ image side
    def encode_images(self, clip_images: torch.Tensor, clip_sizes: Sequence[Sequence[int]]) -> dict:
        """
        Returns dict: ``llm_tokens`` [B, g*g, H], ``llm_mask`` [B, g*g] bool, ``decoder_features``
        [B, L, D, G, G] (neck outputs), ``clip`` (the vision tower dict), ``out_mm`` [B, L, G*G, H].
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_vision):
            vis = self.vision_tower(clip_images.to(self.dtype), clip_sizes)
        taps = vis["taps"]
        b, n, c = taps[0].shape
        grid = self.vision_tower.grid
        g = self.vision_tower.llm_grid
        t0 = taps[0].permute(0, 2, 1).reshape(b, c, grid, grid)
        t0 = F.interpolate(t0.float(), size=(g, g), mode="bilinear", align_corners=False).to(taps[0].dtype)
        llm_tokens = self.mm_projector(t0.flatten(2).permute(0, 2, 1))
        out_mm = torch.stack([self.out_mm_projector(t) for t in taps], dim=1)  # [B, L, G*G, H]
        hdim = out_mm.shape[-1]
        maps = out_mm.permute(0, 1, 3, 2).reshape(b * self.num_scales, hdim, grid, grid)
        feats = self.image_feature_neck(maps)
        feats = feats.view(b, self.num_scales, *feats.shape[1:])
        return {"llm_tokens": llm_tokens, "llm_mask": vis["llm_mask"], "decoder_features": feats,
                "clip": vis, "out_mm": out_mm}

    # ------------------------------------------------------------------ sequence
    def splice(self, rows: Sequence[torch.Tensor], row_image: Sequence[int], image: Mapping,
               labels: Sequence[torch.Tensor] | None = None, mask_pad_ids: bool = True) -> dict:
        """Right-pad the rows with ``pad_token_id``, then replace the single ``<image>`` of each row by
        its image's g*g tokens. Text attention mask: ``ids != pad`` (the official collate; ``pad`` is
        ``unk``) with ``mask_pad_ids``, else every position of the row (generated answers).

        Returns dict: ``inputs_embeds`` [R, T', H], ``attention_mask`` [R, T'] bool, ``ids``
        [R, T'] (image positions = IMAGE_TOKEN_INDEX), ``labels`` [R, T'] | None.
        """
        emb = self.causal_lm().get_input_embeddings()
        t = max(len(r) for r in rows)
        dev = self.device
        out_e, out_m, out_i, out_l = [], [], [], []
        for j, r in enumerate(rows):
            r = r.to(dev)
            pad = t - len(r)
            ids = torch.cat([r, r.new_full((pad,), self.pad_token_id)])
            mask = torch.arange(t, device=dev) < len(r)
            if mask_pad_ids:
                mask &= ids != self.pad_token_id
            lab = None
            if labels is not None:
                lab = torch.cat([labels[j].to(dev), r.new_full((pad,), IGNORE_INDEX)])
            where = (ids == IMAGE_TOKEN_INDEX).nonzero()[:, 0]
            if len(where) != 1:
                raise ValueError(f"row {j} has {len(where)} <image> tokens; PixelLM needs exactly one per row")
            p = int(where[0])
            img = int(row_image[j])
            tok = image["llm_tokens"][img]
            safe = ids.clamp(min=0)
            out_e.append(torch.cat([emb(safe[:p]), tok, emb(safe[p + 1 :])]))
            out_m.append(torch.cat([mask[:p], image["llm_mask"][img], mask[p + 1 :]]))
            out_i.append(torch.cat([ids[:p], ids.new_full((tok.shape[0],), IMAGE_TOKEN_INDEX), ids[p + 1 :]]))
            if lab is not None:
                out_l.append(torch.cat([lab[:p], lab.new_full((tok.shape[0],), IGNORE_INDEX), lab[p + 1 :]]))
        return {"inputs_embeds": torch.stack(out_e), "attention_mask": torch.stack(out_m),
                "ids": torch.stack(out_i), "labels": torch.stack(out_l) if out_l else None}

    def run_llm(self, seq: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (last hidden state after the final norm [R, T, H], logits [R, T, V])."""
        lm = self.causal_lm()
        out = lm.model(inputs_embeds=seq["inputs_embeds"], attention_mask=seq["attention_mask"].long(),
                       use_cache=False)
        hidden = out.last_hidden_state
        return hidden, lm.lm_head(hidden)

    # ------------------------------------------------------------------ codebook -> masks
    def codebook_embeddings(self, hidden: torch.Tensor, seq: Mapping, strict: bool = True) -> tuple[list, list]:
        """Per row: fused sparse prompts [K_r, L, D] and the gathered positions [K_r*L*N].

        The states of every row go through ``text_hidden_fcs`` (and ``prompt_norm``, when set) together,
        so a batch norm sees every target of the batch."""
        positions, counts, states = [], [], []
        for r in range(hidden.shape[0]):
            pos, k = codebook_positions(seq["ids"][r], seq["attention_mask"][r], self.codebook_ids,
                                        self.hidden_tap, strict=strict)
            positions.append(pos), counts.append(int(k)), states.append(hidden[r, pos])
        h = self.text_hidden_fcs(torch.cat(states))
        k_all = sum(counts)
        h = self.token_fusion(h.view(k_all, self.num_scales, self.tokens_per_scale, h.shape[-1]))  # [K, L, D]
        if self.prompt_norm is not None and k_all:
            h = self.prompt_norm(h.flatten(1)).view_as(h)
        return list(h.split(counts)), positions

    def decode_masks(self, features: torch.Tensor, sparse: torch.Tensor) -> dict:
        """
        Args:
            features: [L, D, G, G] one image's neck outputs. sparse: [K, L, D].

        Returns:
            dict ``levels`` (list of [K, 1, h_l, w_l]), ``low_res`` [K, 1, o, o] (scale-fused).
        """
        k = sparse.shape[0]
        dense = self.prompt_encoder.dense_embeddings(k)
        pe = self.prompt_encoder.get_dense_pe()
        low = torch.zeros(k, 1, self.out_size, self.out_size, dtype=features.dtype, device=features.device)
        levels, prev = [], None
        w = self.scale_fusion.weight
        for level in range(self.num_scales):
            m, _ = self.mask_decoder.forward_level(features[level : level + 1], pe, sparse[:, level : level + 1],
                                                   dense, level, previous_masks=prev)
            levels.append(m)
            low = low + w[level].to(m.dtype) * F.interpolate(
                m.float(), (self.out_size, self.out_size), mode="bilinear", align_corners=False).to(m.dtype)
            prev = m
        return {"levels": levels, "low_res": low}

    # ------------------------------------------------------------------ forward
    def _rows(self, batched_inputs):
        rows, row_image, labels = [], [], []
        for i, x in enumerate(batched_inputs):
            ids = x["input_ids"]
            ids = [ids] if torch.is_tensor(ids) and ids.dim() == 1 else list(ids)
            rows += [torch.as_tensor(r, dtype=torch.long) for r in ids]
            row_image += [i] * len(ids)
            if "labels" in x:
                lab = x["labels"]
                lab = [lab] if torch.is_tensor(lab) and lab.dim() == 1 else list(lab)
                labels += [torch.as_tensor(r, dtype=torch.long) for r in lab]
        return rows, row_image, (labels if len(labels) == len(rows) else None)

    def forward_teacher_forced(self, batched_inputs: Sequence[Mapping], strict: bool = True) -> dict:
        """One pass on given answers (training, and the official teacher-forced evaluation).

        Returns dict with ``pred_masks`` (list per image of [K_i, H, W] logits), ``low_res``,
        ``levels``, ``targets_per_row`` (list of ints), ``seq``, ``hidden``, ``logits``, ``image``,
        ``fused`` (per row), ``positions`` (per row), ``row_image`` (the image index of each row).
        """
        imgs = torch.stack([x["clip_image"] for x in batched_inputs]).to(self.device)
        image = self.encode_images(imgs, [x["clip_size"] for x in batched_inputs])
        rows, row_image, labels = self._rows(batched_inputs)
        seq = self.splice(rows, row_image, image, labels)
        hidden, logits = self.run_llm(seq)
        fused, positions = self.codebook_embeddings(hidden, seq, strict=strict)
        out = {"seq": seq, "hidden": hidden, "logits": logits, "image": image, "fused": fused,
               "positions": positions, "targets_per_row": [f.shape[0] for f in fused], "row_image": row_image}
        out.update(self._masks_per_image(batched_inputs, image, fused, row_image))
        return out

    @staticmethod
    def mask_scores(logits: torch.Tensor) -> torch.Tensor:
        """[K, H, W] -> [K]: mean sigmoid over the positive pixels (official ``mask_score``)."""
        pos = (logits > 0).flatten(1)
        return (logits.sigmoid().flatten(1) * pos).sum(1) / (pos.sum(1) + 1e-6)

    @staticmethod
    def image_prompts(fused: Sequence[torch.Tensor], row_image: Sequence[int], i: int) -> torch.Tensor | None:
        """The prompts of image ``i``: its rows' [K_r, L, D] concatenated in row order -> [K_i, L, D]
        (None when the image has no row)."""
        parts = [f for f, img in zip(fused, row_image) if img == i]
        return torch.cat(parts) if parts else None

    def _masks_per_image(self, batched_inputs, image, fused, row_image) -> dict:
        pred, lows, levels = [], [], []
        for i, x in enumerate(batched_inputs):
            sparse = self.image_prompts(fused, row_image, i)
            if sparse is None or sparse.shape[0] == 0:
                h, w = int(x["height"]), int(x["width"])
                z = image["decoder_features"].new_zeros(0, h, w)
                pred.append(z), lows.append(None), levels.append(None)
                continue
            dec = self.decode_masks(image["decoder_features"][i], sparse)
            m = postprocess_masks(dec["low_res"], x["clip_size"], (int(x["height"]), int(x["width"])))
            pred.append(m[:, 0]), lows.append(dec["low_res"]), levels.append(dec["levels"])
        return {"pred_masks": pred, "low_res": lows, "levels": levels}

    def losses(self, batched_inputs: Sequence[Mapping]) -> dict:
        """``loss_ce`` (x CE_WEIGHT), ``loss_mask`` (BCE x 2), ``loss_dice`` (x 0.5) [, ``loss_trl``]."""
        out = self.forward_teacher_forced(batched_inputs, strict=True)
        seq = out["seq"]
        if seq["labels"] is None:
            raise ValueError("training inputs need 'labels' for every row")
        losses = {"loss_ce": self.ce_weight * next_token_loss(out["logits"], seq["labels"])}
        preds, gts, groups = [], [], []
        r = 0
        for i, x in enumerate(batched_inputs):
            gt = x["gt_masks"].to(self.device)
            pred = out["pred_masks"][i]
            if gt.shape[0] != pred.shape[0]:
                raise ValueError(
                    f"image {i}: {pred.shape[0]} codebook groups in the answers but {gt.shape[0]} GT masks "
                    "(masks are matched to groups by order)")
            n_rows = len(x["input_ids"]) if not torch.is_tensor(x["input_ids"]) or x["input_ids"].dim() > 1 else 1
            groups.append(out["targets_per_row"][r : r + n_rows])
            r += n_rows
            preds.append(pred), gts.append(gt)
        losses.update(self.mask_loss(preds, gts, groups))
        if self.prompt_mask_weight > 0:
            aux = self.mask_loss(self.prompt_masks(batched_inputs, out), gts, groups)
            losses.update({f"{k}_prompt": self.prompt_mask_weight * v for k, v in aux.items()})
        return losses

    def prompt_masks(self, batched_inputs: Sequence[Mapping], out: Mapping) -> list[torch.Tensor]:
        """The auxiliary masks of ``LOSS.PROMPT_MASK_WEIGHT`` (not in the release): each target's fused
        prompt dotted with the neck features of its level, averaged over the levels, at the original size.

        Returns: per image [K_i, H, W] logits (same order as ``pred_masks``).
        """
        masks = []
        for i, x in enumerate(batched_inputs):
            sparse = self.image_prompts(out["fused"], out["row_image"], i)  # [K, L, D]
            feats = out["image"]["decoder_features"][i]  # [L, D, G, G]
            if sparse is None or sparse.shape[0] == 0:
                masks.append(feats.new_zeros(0, int(x["height"]), int(x["width"])))
                continue
            logits = torch.einsum("kld,ldhw->khw", sparse, feats)[:, None] / self.num_scales
            m = postprocess_masks(logits, x["clip_size"], (int(x["height"]), int(x["width"])))
            masks.append(m[:, 0])
        return masks

    def forward(self, batched_inputs: Sequence[Mapping]):
        if self.training:
            return self.losses(batched_inputs)
        return self.inference(batched_inputs)

    @torch.no_grad()
    def inference(self, batched_inputs: Sequence[Mapping]) -> list[dict]:
        """Teacher-forced when the inputs carry answers (``answers_given`` True), else generated."""
        if all(x.get("answers_given", False) for x in batched_inputs):
            out = self.forward_teacher_forced(batched_inputs, strict=False)
            return [{"pred_masks": m > 0, "mask_logits": m} for m in out["pred_masks"]]
        from .generation import generate

        return generate(self, batched_inputs)
