"""Vision-language projectors: res5 feature map -> image tokens for the LLM.

Both projectors map ``x`` [B, C, h, w] (res5, stride 32) to ``tokens`` [B, (h/2) * (w/2), out_dim]
in row-major order (token ``r * (w/2) + c`` covers the 2x2 res5 cell at row r, column c), i.e.
(S/64)^2 tokens for an S x S input.

* ``"swin_conv"`` (:class:`SwinConvProjector`): the official PSALM projector (``ResNetSwin``): one
  stride-2 ResNet BasicBlock with BatchNorm and a 1x1 stride-2 shortcut, then a Linear. The official
  BasicBlock applies ``conv2`` twice; the released weights were trained that way, so
  ``conv2_twice=True`` (``MODEL.PSALM.PROJECTOR.CONV2_TWICE``) is the compatible setting.
* ``"linear"`` (:class:`LinearProjector`): a plain alternative with no official weights. Each 2x2
  neighbourhood is concatenated (space-to-depth, channel order ``c * 4 + dy * 2 + dx``) and mapped by
  one Linear(4C -> out_dim). It keeps all res5 information at the same token count and has no
  normalisation statistics, which makes it the simplest option for new stage-1 training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwinConvProjector", "LinearProjector", "build_projector", "PROJECTORS"]


class SwinConvProjector(nn.Module):
    """Official ``ResNetSwin``: BasicBlock(C -> mid, stride 2) + Linear(mid -> out_dim).

    ``tokens = fc(flatten(relu(bn2(conv2(conv2?(relu(bn1(conv1(x)))))) + downsample(x))))``. State-dict
    keys: ``conv1``, ``bn1``, ``conv2``, ``bn2``, ``downsample.{0: conv1x1, 1: BN}``, ``fc``.
    """

    def __init__(self, in_channels: int, out_dim: int, mid_dim: int = 2048, conv2_twice: bool = True):
        super().__init__()
        self.conv2_twice = conv2_twice
        self.conv1 = nn.Conv2d(in_channels, mid_dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_dim)
        self.conv2 = nn.Conv2d(mid_dim, mid_dim, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_dim)
        self.downsample = nn.Sequential(
            nn.Conv2d(in_channels, mid_dim, kernel_size=1, stride=2, bias=False), nn.BatchNorm2d(mid_dim)
        )
        self.fc = nn.Linear(mid_dim, out_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # official init: N(0, sqrt(2 / (k*k*out_channels)))
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, h, w] -> [B, ceil(h/2) * ceil(w/2), out_dim]."""
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.conv2(y)
        if self.conv2_twice:
            y = self.conv2(y)
        y = F.relu(self.bn2(y) + self.downsample(x))
        return self.fc(y.flatten(2).transpose(1, 2))

    def extra_repr(self) -> str:
        return f"conv2_twice={self.conv2_twice}"


class LinearProjector(nn.Module):
    """2x2 space-to-depth + Linear(4C -> out_dim). Requires even h and w."""

    def __init__(self, in_channels: int, out_dim: int):
        super().__init__()
        self.fc = nn.Linear(4 * in_channels, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, h, w] -> [B, (h/2) * (w/2), out_dim]."""
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            raise ValueError(
                f"LinearProjector needs an even res5 size, got {h}x{w}; use an input size that is a "
                "multiple of 64 (INPUT.IMAGE_SIZE)"
            )
        return self.fc(F.pixel_unshuffle(x, 2).flatten(2).transpose(1, 2))


PROJECTORS = {"swin_conv": SwinConvProjector, "linear": LinearProjector}


def build_projector(cfg, in_channels: int, out_dim: int) -> nn.Module:
    """The projector named by ``MODEL.PSALM.PROJECTOR.NAME`` for ``in_channels`` res5 channels."""
    p = cfg.MODEL.PSALM.PROJECTOR
    if p.NAME == "swin_conv":
        return SwinConvProjector(in_channels, out_dim, mid_dim=p.MID_DIM, conv2_twice=p.CONV2_TWICE)
    if p.NAME == "linear":
        return LinearProjector(in_channels, out_dim)
    raise ValueError(f"MODEL.PSALM.PROJECTOR.NAME={p.NAME!r}; expected one of {sorted(PROJECTORS)}")
