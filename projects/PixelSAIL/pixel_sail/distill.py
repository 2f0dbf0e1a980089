"""Dense-feature distillation (training only; spec B1.2 item 8, B2.1).

* Mask2Former: ``Linear(C_seg -> 256)`` on F_mask [C, H/s, W/s] against the teacher's
  ``pixel_decoder_last_hidden_state`` (256 ch, stride 4), bilinearly resized to the F_mask grid;
* SAM2: ``Linear(D -> 256)`` on the raw vision hidden states [h, w, D] against the SAM2 image
  embedding, bilinearly resized to the vision-token grid.

Loss per image: MSE (mean over grid x channels), averaged over images, times the weight (0.5 each).
Teachers are frozen and held OUTSIDE the module tree (``Distiller.teachers`` is a plain dict), so they
are never in ``state_dict``, never in the optimizer and never converted; the adapters are ordinary
parameters (the official code also drops them from its saved ``state_dict``; our checkpoints keep them so
that a resumed run continues exactly, and :func:`pixel_sail.converter` ignores them on export).

Teacher sources (``MODEL.PIXEL_SAIL.DISTILL.{M2F,SAM2}_TEACHER``):
``hf_mask2former:<dir>`` / ``hf_sam2:<dir>`` (local transformers checkpoints, run on the fly) or
``precomputed:<dir>`` (``<dir>/<sample key>.pt`` float tensors [C, h, w], written once by
:func:`precompute_teacher_features`). A batch input may also carry ``distill_targets`` = {"m2f": ...,
"sam2": ...} directly (tests, custom pipelines).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["Distiller", "distill_mse", "build_teacher", "precompute_teacher_features", "teacher_key"]


def distill_mse(student: List[torch.Tensor], target: List[torch.Tensor]) -> torch.Tensor:
    """Mean over images of MSE(student [C, h, w], target [C, h', w'] resized bilinearly to (h, w))."""
    losses = []
    for s, t in zip(student, target):
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"distillation channels differ: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        t = t.to(s.device, s.dtype)
        if t.shape[-2:] != s.shape[-2:]:
            t = F.interpolate(t[None], size=s.shape[-2:], mode="bilinear", align_corners=False)[0]
        losses.append(F.mse_loss(s, t))
    return torch.stack(losses).mean()


def teacher_key(inp: dict) -> str:
    key = str(inp.get("sample_id", inp.get("image_id", os.path.basename(inp.get("file_name", "")))))
    return key.replace("/", "_")


class _Precomputed:
    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"precomputed teacher feature directory {directory} does not exist")
        self.directory = directory

    def __call__(self, inp: dict) -> torch.Tensor:
        path = os.path.join(self.directory, teacher_key(inp) + ".pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no precomputed teacher features for {teacher_key(inp)!r} at {path}")
        return torch.load(path, map_location="cpu")


class _HFTeacher:
    """A frozen local transformers model; ``__call__(inp)`` -> [256, h, w] for inp['image_uint8']."""

    def __init__(self, kind: str, directory: str):
        from transformers import AutoImageProcessor

        if not os.path.isdir(directory):
            raise FileNotFoundError(f"teacher directory {directory} does not exist (nothing is downloaded)")
        if kind == "hf_mask2former":
            from transformers import Mask2FormerForUniversalSegmentation as cls
        else:
            from transformers import Sam2Model as cls
        self.kind = kind
        self.model = cls.from_pretrained(directory, local_files_only=True).eval().requires_grad_(False)
        self.processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)

    @torch.no_grad()
    def __call__(self, inp: dict) -> torch.Tensor:
        img = inp["image_uint8"].permute(1, 2, 0).numpy()
        px = self.processor(images=img, return_tensors="pt")["pixel_values"]
        if self.kind == "hf_mask2former":
            return self.model(pixel_values=px).pixel_decoder_last_hidden_state[0]
        return self.model.get_image_embeddings(pixel_values=px)[0]


def build_teacher(spec: str) -> Optional[Callable[[dict], torch.Tensor]]:
    if not spec:
        return None
    kind, _, path = spec.partition(":")
    if kind == "precomputed":
        return _Precomputed(path)
    if kind in ("hf_mask2former", "hf_sam2"):
        return _HFTeacher(kind, path)
    raise ValueError(f"unknown teacher {spec!r}: use hf_mask2former:<dir>, hf_sam2:<dir> or precomputed:<dir>")


@torch.no_grad()
def precompute_teacher_features(teacher: Callable[[dict], torch.Tensor], inputs, directory: str) -> int:
    """Run ``teacher`` once per mapped input and write ``<directory>/<key>.pt``. Returns the count."""
    os.makedirs(directory, exist_ok=True)
    n = 0
    for inp in inputs:
        torch.save(teacher(inp).float().cpu(), os.path.join(directory, teacher_key(inp) + ".pt"))
        n += 1
    return n


class Distiller(nn.Module):
    """Adapters + (non-registered) teachers; ``forward`` -> dict of weighted distillation losses."""

    def __init__(self, *, seg_hidden_dim: int, hidden_size: int, m2f_teacher=None, sam2_teacher=None,
                 m2f_weight: float = 0.5, sam2_weight: float = 0.5, m2f_channels: int = 256, sam2_channels: int = 256,
                 use_m2f: bool = False, use_sam2: bool = False):
        super().__init__()
        self.teachers: Dict[str, Optional[Callable]] = {"m2f": m2f_teacher, "sam2": sam2_teacher}
        self.weights = {"m2f": float(m2f_weight), "sam2": float(sam2_weight)}
        self.mask2former_distill_linear = nn.Linear(seg_hidden_dim, m2f_channels) if use_m2f else None
        self.sam2_distill_linear = nn.Linear(hidden_size, sam2_channels) if use_sam2 else None

    @classmethod
    def from_cfg(cls, cfg, hidden_size: int) -> Optional["Distiller"]:
        d = cfg.MODEL.PIXEL_SAIL.DISTILL
        if not d.M2F_TEACHER and not d.SAM2_TEACHER:
            return None
        return cls(seg_hidden_dim=cfg.MODEL.PIXEL_SAIL.SEG_HIDDEN_DIM, hidden_size=hidden_size,
                   m2f_teacher=build_teacher(d.M2F_TEACHER), sam2_teacher=build_teacher(d.SAM2_TEACHER),
                   m2f_weight=d.M2F_WEIGHT, sam2_weight=d.SAM2_WEIGHT, m2f_channels=d.M2F_CHANNELS,
                   sam2_channels=d.SAM2_CHANNELS, use_m2f=bool(d.M2F_TEACHER), use_sam2=bool(d.SAM2_TEACHER))

    def _targets(self, name: str, inputs) -> List[torch.Tensor]:
        out = []
        for inp in inputs:
            given = (inp.get("distill_targets") or {}).get(name)
            if given is None:
                if self.teachers[name] is None:
                    raise ValueError(f"distillation {name!r} is on but input {teacher_key(inp)!r} has no target "
                                     "and no teacher is configured")
                given = self.teachers[name](inp)
            out.append(given.detach())
        return out

    def forward(self, inputs, f_mask: List[torch.Tensor], vision_states: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """f_mask: per image [C_seg, H/s, W/s]; vision_states: per image [h, w, D]."""
        losses = {}
        if self.mask2former_distill_linear is not None:
            s = [self.mask2former_distill_linear(f.permute(1, 2, 0)).permute(2, 0, 1) for f in f_mask]
            losses["loss_distill_m2f"] = self.weights["m2f"] * distill_mse(s, self._targets("m2f", inputs))
        if self.sam2_distill_linear is not None:
            s = [self.sam2_distill_linear(v).permute(2, 0, 1) for v in vision_states]
            losses["loss_distill_sam2"] = self.weights["sam2"] * distill_mse(s, self._targets("sam2", inputs))
        return losses
